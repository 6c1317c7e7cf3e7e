"""The L2 threat model (--norm l2): pgd_attack's L2 ball (uniform start in it, normalised-gradient steps, projection
per example and into [0, 1], no NaN from a zero gradient) against a plain reimplementation of the L-inf attack it
leaves bit for bit unchanged, against AutoAttack's APGD-CE and random noise; the units and their warnings; every loss
trained under L2; a run that trains, resumes bit-identically and is evaluated under L2 with every attack and the
sanity checklist; results of two threat models kept and tabled apart (evaluate.py, sweep.py). Synthetic images and
a narrow small-cnn (about three minutes)."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate as ev
import report
import sanity
import sweep
import train_piat as tp
import train_rdat as tr
import utils
from conftest import TINY, adversarially_trained_small_cnn, kill_after_first_checkpoint, one_line_error, run_script
from sweep import read_metrics

EPS = 0.5  # RobustBench's L2 radius, in [0, 1] units


def l2_distance(x_adv, x):
    return (x_adv - x).flatten(1).norm(dim=1)


@pytest.fixture(scope="module")
def l2_model():
    """(model, x, y): a small-cnn (width 8) adversarially trained for 3 epochs under L2 (PGD-2 at eps 0.5, step eps/4)
    on 2,000 synthetic images, and 64 test images; about 69 % clean and 34 % PGD-20 accuracy at L2 eps 0.5."""
    model, data = adversarially_trained_small_cnn(EPS, EPS / 4, norm="l2")
    idx = utils.fixed_subset(len(data.x_test), 64).sort().values
    return model, utils.to_float(data.x_test[idx]), data.y_test[idx]


# ------------------------------------------------------------------------------------------ L-inf: unchanged


def linf_pgd_before_l2(model, x, y, epsilon, step_size, steps, loss="ce", random_start="uniform", generator=None,
                       delta_mask=None):
    """pgd_attack as it was before --norm (L-inf only), verbatim: the reference the L-inf path must equal."""
    x = x.detach()
    if torch.is_tensor(epsilon):  # one radius per example, broadcast over the image
        epsilon = epsilon.to(x.device, x.dtype).view(-1, *[1] * (x.dim() - 1))
    if loss == "kl":
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
    if random_start == "uniform":
        delta = torch.empty_like(x).uniform_(-1, 1, generator=generator) * epsilon
    elif random_start == "normal":
        delta = (0.001 * torch.randn(x.shape, generator=generator, device=x.device)).clamp_(-epsilon, epsilon)
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp_(0, 1) - x
    for _ in range(steps):
        mask = delta_mask() if delta_mask is not None else None
        delta = (delta * mask if mask is not None else delta).requires_grad_(True)
        logits = model(x + delta)
        if loss == "ce":
            objective = F.cross_entropy(logits, y, reduction="sum")
        elif loss == "cw":
            objective = ev.cw_margin(logits, y).sum()
        else:
            objective = F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
        grad = torch.autograd.grad(objective, delta, allow_unused=True)[0] if objective.requires_grad else None
        delta = (delta.detach() + step_size * (grad.sign() if grad is not None else 0)).clamp_(-epsilon, epsilon)
        delta = (x + delta).clamp_(0, 1) - x  # stay a valid image
    return (x + delta).detach()


def masks(seed=0):
    """PRM's delta_mask: a fresh random 0/1 mask at every step, the same sequence for every call of masks()."""
    gen = torch.Generator().manual_seed(seed)
    return lambda: (torch.rand(1, 1, 32, 32, generator=gen) > 0.3).float()


@pytest.mark.parametrize("kwargs", [
    {}, {"loss": "cw"}, {"loss": "kl", "random_start": "normal"}, {"random_start": None}, {"random_start": "normal"},
    {"per_example": True}, {"generator": True}, {"mask": True}, {"frozen": True}])
def test_linf_attack_is_bit_identical_to_before(l2_model, kwargs):
    model, x, y = l2_model
    x, y = x[:24], y[:24]
    epsilon = torch.linspace(2, 10, len(x)) / 255 if kwargs.get("per_example") else 8 / 255
    attacked = (lambda v: model(v.detach())) if kwargs.get("frozen") else model  # no gradient reaches the input
    outputs = []
    for attack in (ev.pgd_attack, tp.pgd_attack, tr.pgd_attack, linf_pgd_before_l2):
        utils.seed_everything(0)
        extra = {k: v for k, v in kwargs.items() if k in ("loss", "random_start")}
        if kwargs.get("generator"):
            extra["generator"] = torch.Generator().manual_seed(3)
        if kwargs.get("mask"):
            extra["delta_mask"] = masks()
        outputs.append(attack(attacked, x, y, epsilon, 2 / 255, 5, **extra))
    assert all(torch.equal(out, outputs[-1]) for out in outputs[:-1])
    assert not torch.equal(outputs[-1], x) or kwargs.get("frozen")  # the attack did move (a frozen one may not)


# ------------------------------------------------------------------------------------------ the L2 attack


@pytest.mark.parametrize("loss,start", [("ce", "uniform"), ("cw", "uniform"), ("kl", "normal"), ("ce", None)])
def test_l2_examples_stay_in_their_ball_and_in_the_box(l2_model, loss, start):
    model, x, y = l2_model
    epsilon = torch.linspace(0.05, 2.0, len(x))  # one radius per example, as CFA's class-wise margins
    for eps in (EPS, epsilon):
        x_adv = ev.pgd_attack(model, x, y, eps, 0.3, 10, loss=loss, random_start=start, norm="l2")
        distance = l2_distance(x_adv, x)
        assert torch.isfinite(x_adv).all() and x_adv.min() >= 0 and x_adv.max() <= 1
        assert (distance <= eps * (1 + 1e-6) + 1e-6).all()
        assert (distance >= 0.9 * eps).float().mean() > 0.9  # the attack uses its budget
    # the attack raises its loss over the clean images' (CE)
    x_adv = ev.pgd_attack(model, x, y, EPS, EPS / 4, 20, norm="l2")
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.1


def test_l2_random_start_is_uniform_in_the_ball():
    """Away from the box's faces: the start's radius is eps * U^(1/d), so for images of d = 3072 numbers all but
    surely within 1 % of eps, and its directions are a Gaussian's (no coordinate favoured)."""
    x, gen = torch.full((2000, 3, 32, 32), 0.5), torch.Generator().manual_seed(0)
    delta = ev.pgd_attack(nn.Identity(), x, torch.zeros(2000, dtype=torch.long), EPS, 0.1, 0, generator=gen,
                          norm="l2") - x
    radius = delta.flatten(1).norm(dim=1)
    assert radius.max() <= EPS * (1 + 1e-6) and radius.min() >= 0.99 * EPS
    direction = delta.flatten(1) / radius[:, None]
    assert direction.mean(0).abs().max() < 5 / 2000 ** 0.5 / 3072 ** 0.5  # 5 standard errors of a coordinate's mean
    assert direction.pow(2).mean(0).mul(3072).sub(1).abs().max() < 0.2  # every coordinate has the same variance
    assert not torch.equal(delta, ev.pgd_attack(nn.Identity(), x, torch.zeros(2000, dtype=torch.long), EPS, 0.1, 0,
                                                norm="l2") - x)  # from the global generator without one


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_a_zero_gradient_gives_no_nan_and_no_move(norm):
    """An output that ignores the input (a constant, or a path autograd does not see): the gradient is zero or
    absent, and the L2 step (gradient over its norm) must not divide 0 by 0."""
    model = utils.build_model("small-cnn", 10, width=8).eval()
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    constant = lambda v: model(torch.zeros_like(v)) + 0 * v.sum()  # noqa: E731  a gradient of exactly zero
    detached = lambda v: model(v.detach())  # noqa: E731  no gradient at all
    for attacked in (constant, detached):
        assert torch.equal(ev.pgd_attack(attacked, x, y, EPS, 0.1, 5, random_start=None, norm=norm), x)
        start = ev.pgd_attack(attacked, x, y, EPS, 0.1, 0, generator=torch.Generator().manual_seed(1), norm=norm)
        moved = ev.pgd_attack(attacked, x, y, EPS, 0.1, 5, generator=torch.Generator().manual_seed(1), norm=norm)
        assert torch.isfinite(moved).all() and torch.equal(moved, start)


def test_l2_pgd20_is_as_strong_as_apgd_and_far_stronger_than_noise(l2_model):
    model, x, y = l2_model
    utils.seed_everything(0)
    pgd = ev.attack_flags(model, (x * 255).round().to(torch.uint8), y, "ce", EPS, EPS / 4, 20, 64, "cpu",
                          norm="l2").float()
    apgd, ran = ev.autoattack_flags(model, x, y, EPS, "custom", ["apgd-ce"], 0, 64, "cpu", norm="l2")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float()
        noisy = (model((x + noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * EPS).clamp(0, 1)).argmax(1)
                 == y).float()
    assert ran == ["apgd-ce"] and 0.3 < clean.mean() and 0.1 < pgd.mean() < clean.mean() - 0.1
    assert pgd.mean() <= apgd.float().mean() + 3 / len(y)  # APGD-CE (100 steps) finds at most noise more
    assert noisy.mean() - pgd.mean() >= 0.15  # a random direction of the same length does little


def test_the_sanity_checklist_passes_an_honest_l2_model(l2_model):
    model, x, y = l2_model
    settings = dict(norm="l2", epsilons=(0.0, 0.25, 0.5, 2.0), long_steps=40, restarts=1, square_queries=100,
                    batch_size=64)
    checks = {c["name"]: c for c in sanity.run_sanity_checks(model, x, y, sanity.SanitySettings(**settings))}
    assert {c["status"] for c in checks.values()} == {"PASS"}, {n: c["detail"] for n, c in checks.items()
                                                                if c["status"] != "PASS"}
    sweep_ = checks["eps-monotone"]["numbers"]
    assert sweep_["norm"] == "l2" and sweep_["epsilons"] == [0.0, 0.25, 0.5, 2.0]
    attacks = checks["valid-examples"]["numbers"]["attacks"]
    assert attacks["pgd20"]["epsilon"] == EPS and attacks["pgd20"]["max_distance"] <= EPS + 1e-5
    assert attacks["fgsm"]["max_distance"] == pytest.approx(EPS, abs=1e-5)  # one normalised step of eps
    assert "L2 distance" in checks["valid-examples"]["detail"] and "L2 eps 2" in checks["large-eps-zero"]["detail"]
    # the settings default by norm as evaluate.py's flags do
    defaults = sanity.SanitySettings(norm="l2")
    assert (defaults.epsilon, defaults.step_size, defaults.epsilons[-1]) == (0.5, 0.125, 4.0)
    assert sanity.SanitySettings().epsilon == 8.0 and sanity.SanitySettings().epsilons == sanity.SANITY_EPSILONS


def test_valid_examples_is_judged_in_the_l2_ball():
    x = torch.full((2, 3, 32, 32), 0.5)
    delta = torch.randn(2, 3, 32, 32)
    x_adv = x + delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * torch.tensor([0.5, 0.51]).view(-1, 1, 1, 1)
    faults, distance = sanity.perturbation_faults(x, x_adv, 0.5, torch.zeros(2, 10), "l2")
    assert faults["outside_ball"].tolist() == [False, True] and distance == pytest.approx(0.51, abs=1e-5)
    faults, _ = sanity.perturbation_faults(x, x_adv, 0.5, torch.zeros(2, 10), "linf")  # L-inf: both well inside
    assert faults["outside_ball"].tolist() == [False, False]


# ------------------------------------------------------------------------------------------ units


def test_units_defaults_warnings_and_a_step_of_zero(capsys):
    args = tp.parse_args(["--norm", "l2"])
    assert (args.norm, args.epsilon, args.step_size) == ("l2", 0.5, 15 / 255)  # Rice et al.'s training step
    assert utils.radii(args) == (0.5, 15 / 255) and utils.radii(tp.parse_args([])) == (8 / 255, 2 / 255)
    args = ev.parse_args(["run", "--norm", "l2", "--epsilon", "1"])
    assert (args.epsilon, args.step_size, args.sanity_epsilons[-1]) == (1.0, 0.25, 4.0)  # evaluation: eps/4
    assert capsys.readouterr().err == ""
    tp.parse_args(["--epsilon", "0.031"])  # the [0, 1] habit for 8/255 under L-inf
    assert capsys.readouterr().err.split(": ", 1)[1] == ("warning: --epsilon 0.031 is 0.031/255 (L-inf's units): for "
                                                          "0.031 write --epsilon 7.91\n")
    ev.parse_args(["run", "--norm", "l2", "--epsilon", "8"])  # the L-inf habit for 8/255 under L2
    assert capsys.readouterr().err.split(": ", 1)[1] == ("warning: --epsilon 8 is 8 in [0, 1] units (L2's): for "
                                                          "8/255 write --epsilon 0.0314\n")
    result = run_script(tp.__file__, "--step-size", "0")
    assert result.returncode == 2 and "train_piat.py: error: argument --step-size: 0 never moves the attack" in \
        one_line_error(result, "train_piat.py")
    for parse in (ev.parse_args, tr.parse_args):  # every script that takes a step refuses 0, under either norm
        with pytest.raises(SystemExit):
            parse([*(["run"] if parse is ev.parse_args else []), "--norm", "l2", "--step-size", "0"])
        assert "--step-size: 0 never moves the attack" in capsys.readouterr().err
    result = run_script(ev.__file__, "run", "--norm", "l2", "--step-size", "0.02", "--epsilon", "0.031")
    assert result.returncode != 0 and "warning" not in result.stderr  # sensible L2 values: no warning


def test_every_loss_trains_under_l2_within_the_ball(tmp_path, monkeypatch):
    """Each loss's training attack (CFA's per-class radii too) stays in its L2 ball; the losses stay finite."""
    distances, real = [], tp.pgd_attack

    def spy(model, x, y, epsilon, *args, **kwargs):
        x_adv = real(model, x, y, epsilon, *args, **kwargs)
        radius = epsilon.view(-1) if torch.is_tensor(epsilon) else torch.full((len(x),), epsilon)
        distances.append((kwargs["norm"], (l2_distance(x_adv, x) / radius.to(x.device)).max().item()))
        return x_adv

    monkeypatch.setattr(tp, "pgd_attack", spy)
    for loss in tp.LOSSES:
        distances.clear()
        tp.main([*TINY, "--epochs", "1", "--train-size", "64", "--loss", loss, "--norm", "l2",
                 "--out-dir", str(tmp_path / loss)])
        row = read_metrics(tmp_path / loss / "metrics.csv")[0]
        assert {norm for norm, _ in distances} == {"l2"} and max(d for _, d in distances) <= 1 + 1e-5, loss
        assert 0 <= row["test_pgd20_acc"] <= row["test_clean_acc"] and math.isfinite(row["train_loss"]), loss


def test_rdat_trains_under_l2(tmp_path):
    tr.main([*TINY, "--epochs", "1", "--train-size", "64", "--norm", "l2", "--out-dir", str(tmp_path / "rdat")])
    args = json.loads((tmp_path / "rdat" / "args.json").read_text())
    assert (args["norm"], args["epsilon"]) == ("l2", 0.5) and read_metrics(tmp_path / "rdat" / "metrics.csv")


# ------------------------------------------------------------------------------------------ end to end


L2_RUN = [*TINY, "--epochs", "4", "--train-size", "256", "--batch-size", "16", "--no-amp", "--norm", "l2",
          "--loss", "trades"]


def test_an_l2_run_resumes_to_the_same_final_weights(tmp_path):
    whole = tmp_path / "whole"
    tp.main([*L2_RUN, "--out-dir", str(whole)])
    killed = tmp_path / "killed"
    assert kill_after_first_checkpoint(tp.__file__, L2_RUN, killed) < 4
    result = run_script(tp.__file__, "--resume", killed)
    assert result.returncode == 0 and "L2 eps 0.5" in result.stdout, result.stderr
    a, b = utils.load_checkpoint(whole / "final.pt"), utils.load_checkpoint(killed / "final.pt")
    assert b["epoch"] == 4 and b["args"]["norm"] == "l2" and b["args"]["step_size"] == 15 / 255
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert read_metrics(whole / "metrics.csv") != [] and [
        {k: r[k] for k in ("train_loss", "test_pgd20_acc")} for r in read_metrics(killed / "metrics.csv")] == [
        {k: r[k] for k in ("train_loss", "test_pgd20_acc")} for r in read_metrics(whole / "metrics.csv")]


def test_a_run_from_before_norm_resumes_as_linf(tmp_path):
    out = tmp_path / "run"
    args = tp.parse_args([*TINY, "--epochs", "1", "--out-dir", str(out)])
    del args.norm  # an args.json written before --norm existed
    utils.make_run_dir(args, "train_piat.py")
    with pytest.raises(utils.UserError, match=r"its own flags \(--norm linf\); drop --norm l2"):
        tp.main(["--resume", str(out), "--norm", "l2"])
    tp.main(["--resume", str(out)])
    assert utils.load_checkpoint(out / "final.pt")["args"]["norm"] == "linf"


def test_train_evaluate_and_check_under_l2_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    tp.main([*TINY, "--epochs", "2", "--train-size", "512", "--loss", "ce", "--no-piat", "--norm", "l2",
             "--out-dir", str(run)])
    assert "PGD-AT, small-cnn on synthetic: 512 training images, L2 eps 0.5, 2 epochs" in capsys.readouterr().out
    assert json.loads((run / "args.json").read_text())["norm"] == "l2"
    flags = ["--n-examples", "48", "--device", "cpu", "--batch-size", "48"]
    out = ev.main([str(run), "--norm", "l2", "--aa-version", "custom", "--aa-attacks", "apgd-ce,apgd-t", *flags])
    rows = {(r["role"], r["attack"]): r for r in out["rows"]}
    assert {a for _, a in rows} == {"clean", "pgd20", "cw20", "aa"}
    for (role, attack), row in rows.items():
        threat = (None, 0.0) if attack == "clean" else ("l2", EPS)
        assert (row["norm"], row["epsilon"]) == threat and 0 <= row["accuracy"] <= rows[role, "clean"]["accuracy"]
    assert rows["final", "pgd20"]["step_size"] == EPS / 4 and rows["final", "aa"]["aa_attacks"] == ["apgd-ce",
                                                                                                    "apgd-t"]
    printed = capsys.readouterr().out
    assert "48 synthetic test images (fixed subset), L2 eps 0.5, cpu" in printed
    assert "**Threat model: L2 eps 0.5**" in printed and "L-inf" not in printed
    # the L-inf numbers of the same run go beside the L2 ones, never into one table
    ev.main([str(run), "--attacks", "clean,pgd20", *flags])
    saved = json.loads((run / "eval.json").read_text())
    threats = sorted({(r["norm"], r["epsilon_255"]) for r in saved["results"] if r["attack"] == "pgd20"})
    assert threats == [("l2", 255 * EPS), ("linf", 8.0)] and len(saved["results"]) == 10
    assert sorted(saved["table"]) == [f"{run} (L-inf eps 8/255)", f"{run} (L2 eps 0.5)"]
    capsys.readouterr()
    tables = {part.split("**", 1)[0]: part for part in ev.main(["--table", str(run)])["table"].split(
        "**Threat model: ")[1:]}
    assert sorted(tables) == ["L-inf eps 8/255", "L2 eps 0.5"]
    for threat, norm in (("L-inf eps 8/255", "linf"), ("L2 eps 0.5", "l2")):
        (ours,) = [line for line in tables[threat].splitlines() if line.startswith(f"| {run.name} |")]
        pgd20 = {(r["role"], r["norm"]): r["accuracy"] for r in saved["results"] if r["attack"] == "pgd20"}
        assert ours.split(" | ")[7] == f"{100 * pgd20['final', norm]:.2f}"  # PGD20 Final, of its own threat model
    # the sanity checklist under L2: every check passes on this honest model
    out = ev.main([str(run / "final.pt"), "--norm", "l2", "--sanity", "--sanity-epsilons", "0,0.25,0.5,2",
                   "--sanity-steps", "40", "--sanity-restarts", "1", "--sanity-square-queries", "100", *flags])
    (entry,) = out["sanity"]
    assert entry["counts"] == {"PASS": 16, "WARN": 0, "FAIL": 0}, [c["detail"] for c in entry["checks"]
                                                                    if c["status"] != "PASS"]
    assert entry["settings"]["norm"] == "l2" and "L2 eps 0.5" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ sweep.py


def test_sweep_passes_the_threat_model_on_and_keeps_it_apart(tmp_path, capsys):
    plan = sweep.plan(["table5"], profile="quick", sweep_dir=tmp_path, norm="l2")
    (run_dir, run), *_ = plan.runs.items()
    assert run.name == "alp-nopiat-l2" and run_dir == tmp_path / "synthetic" / "alp-nopiat-l2" / "seed0"
    assert run.flags[-2:] == ("--norm", "l2") and run.threat == "L2 eps 0.5"
    assert all(step.flags[-2:] == ("--norm", "l2") for step in run.steps)
    assert sweep.plan(["table5"], profile="quick", norm="linf", epsilon=16).runs[
        next(iter(sweep.plan(["table5"], profile="quick", norm="linf", epsilon=16).runs))].name == "alp-nopiat-eps16"
    default = next(iter(sweep.plan(["table5"], profile="quick", norm="l2", epsilon=0.5).runs.values()))
    assert default.name == "alp-nopiat-l2" and "--epsilon" not in default.flags  # the norm's default eps: no suffix
    # eval.json with both threat models: the L2 sweep counts and reports its own rows only
    run_dir.mkdir(parents=True)
    rows = [{"role": role, "attack": attack, "accuracy": acc, "norm": norm, "epsilon": eps,
             "epsilon_255": 255 * eps if norm == "l2" else 8.0 * (attack != "clean")}
            for role in ("best", "final") for attack, norm, eps, acc in (
                ("clean", None, 0.0, 0.9), ("pgd20", "linf", 8 / 255, 0.2), ("pgd20", "l2", EPS, 0.6))]
    (run_dir / "eval.json").write_text(json.dumps({"results": rows}))
    got = sweep.eval_rows(run.run_dir, run.threat)
    assert got["final", "pgd20"]["accuracy"] == 0.6 and got["best", "clean"]["accuracy"] == 0.9
    linf_run = run._replace(threat=sweep.PAPER_THREAT)
    assert sweep.eval_rows(linf_run.run_dir, linf_run.threat)["final", "pgd20"]["accuracy"] == 0.2
    args, extra = sweep.parse_args(["table5", "--norm", "l2", "--epsilon", "8", "--epochs", "2"])
    assert (args.norm, args.epsilon, extra) == ("l2", 8.0, ["--epochs", "2"])
    assert "warning: --epsilon 8 is 8 in [0, 1] units (L2's)" in capsys.readouterr().err


def test_tables_never_hold_two_threat_models():
    """One markdown table per threat model, each named above it, the clean accuracy in every one; rows from before
    --norm are L-inf; the paper's rows only beside L-inf eps 8/255."""
    rows = [{"run": "/runs/a", "role": "final", "attack": attack, "accuracy": acc, "n": 100, "dataset": "cifar10",
             "method": "PGD-AT", "norm": norm, "epsilon": eps, "epsilon_255": eps_255}
            for attack, norm, eps, eps_255, acc in (("clean", None, 0.0, 0.0, 0.8), ("pgd20", "linf", 8 / 255, 8, 0.4),
                                                    ("pgd20", "l2", EPS, 255 * EPS, 0.6),
                                                    ("cw20", "linf", 16 / 255, 16, 0.2))]
    del rows[1]["norm"]  # a row written before --norm
    parts = ev.markdown_table(rows, paper="cifar10").split("**Threat model: ")[1:]
    tables = {part.split("**", 1)[0]: part.splitlines() for part in parts}
    assert list(tables) == ["L-inf eps 8/255", "L2 eps 0.5", "L-inf eps 16/255"]
    for threat, value in (("L-inf eps 8/255", "40.00"), ("L2 eps 0.5", "60.00"), ("L-inf eps 16/255", "20.00")):
        ours = tables[threat][4].split(" | ")
        assert ours[4] == "80.00" and value in ours and ours.count("–") == 10, (threat, ours)
        assert any("paper (cifar10)" in line for line in tables[threat]) == (threat == "L-inf eps 8/255")


def test_compare_pairs_results_of_one_threat_model_only(tmp_path):
    """Two methods, each run evaluated under L-inf 8/255 and L2 0.5 (L2 rows written last in one run, first in the
    other): --compare pairs L-inf with L-inf and L2 with L2, and names each comparison's threat model."""
    flags = {("linf", "A"): [1, 1, 0, 0], ("l2", "A"): [1, 1, 1, 1], ("linf", "B"): [1, 0, 0, 0],
             ("l2", "B"): [1, 1, 1, 0]}
    for method, order in (("A", ("linf", "l2")), ("B", ("l2", "linf"))):
        rows = [{"run": str(tmp_path / method), "role": "final", "attack": "pgd20", "method": method, "n": 4,
                 "dataset": "synthetic", "indices": [0, 1, 2, 3], "norm": norm, "epsilon": EPS if norm == "l2" else
                 8 / 255, "epsilon_255": 255 * EPS if norm == "l2" else 8.0, "per_image": flags[norm, method],
                 "accuracy": sum(flags[norm, method]) / 4} for norm in order]
        (tmp_path / method).mkdir()
        (tmp_path / method / "eval.json").write_text(json.dumps({"results": rows}))
    out = report.compare(ev.result_rows([tmp_path / "A", tmp_path / "B"]), ev.ATTACK_TITLES)
    diffs = {c["threat"]: c["diff"] for c in out["comparisons"]}
    assert diffs == {"L-inf eps 8/255": -0.25, "L2 eps 0.5": -0.25}
    assert "| B | A | final | PGD20 (L2 eps 0.5) | 75.00 | 100.00 | -25.00 |" in out["table"]
    assert "| B | A | final | PGD20 (L-inf eps 8/255) | 25.00 | 50.00 | -25.00 |" in out["table"]
