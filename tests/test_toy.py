"""toy_example.py: its data generator, its building blocks against train_piat.py's, and a short run."""

import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_script

import toy_example as te
import train_piat as tp

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_TOY = ["--epochs", "3", "--train-size", "80", "--test-size", "60", "--batch-size", "40", "--hidden", "8",
            "--pgd-steps", "2", "--eval-pgd-steps", "3"]
FIGURES = ("fig2_data.png", "fig3_accuracy.png", "fig4_boundary_pgdat.png", "fig5_boundary_pgdat_vs_piat.png")


# ------------------------------------------------------------------------------------ the data


@pytest.mark.parametrize("r0,r1,noise", [(1.0, 2.0, 0.2), (3.0, 0.5, 0.05), (1.0, 1.5, 0.0)])
def test_classes_sit_on_their_radii(r0, r1, noise):
    x, y = te.make_toy_data(4000, r0, r1, noise, x3_noise=0.3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4000, 3) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert (y == 0).sum() == 2000 and (y == 1).sum() == 2000  # balanced
    assert 0 < y[:100].sum() < 100  # and shuffled
    radius = x[:, :2].norm(dim=1)
    for c, r in ((0, r0), (1, r1)):
        rc = radius[y == c]
        # each coordinate has noise sd `noise`: the radius stays within 5 sd (in each direction) of r
        assert (rc - r).abs().max() <= 5 * math.sqrt(2) * noise + 1e-5
        assert abs(rc.mean().item() - r) <= 0.05 + noise**2 / r  # E|r + n| ~ r + sd^2/(2r)
    assert abs(x[:, 2].mean().item()) < 0.03 and abs(x[:, 2].std().item() - 0.3) < 0.02  # x3: pure noise
    angle = torch.atan2(x[:, 1], x[:, 0])
    assert angle.min() < -3.0 and angle.max() > 3.0  # the whole circle


def test_the_same_seed_gives_the_same_data():
    args = te.parse_args(["--train-size", "50", "--test-size", "30"])
    a, b, c = te.make_splits(args, 3), te.make_splits(args, 3), te.make_splits(args, 4)
    assert torch.equal(a["train"][0], b["train"][0]) and torch.equal(a["test"][1], b["test"][1])
    assert not torch.equal(a["train"][0], c["train"][0])
    assert len(a["train"][0]) == 50 and len(a["test"][0]) == 30


# ------------------------------------------ the building blocks are train_piat.py's, the attack agrees with its


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return te.make_mlp(16)


@pytest.mark.parametrize("name", ["nmse_loss", "alp_loss", "piat_alpha", "interpolate_", "clone_state", "piat_step_"])
def test_the_building_blocks_are_train_piats_own_code(name):
    assert inspect.getsource(getattr(te, name)) == inspect.getsource(getattr(tp, name))


@pytest.mark.parametrize("random_start", [False, True])
def test_unboxed_pgd_agrees_with_train_piat_where_the_box_is_inactive(mlp, random_start):
    torch.manual_seed(3)
    eps = 0.1
    x = eps + (1 - 2 * eps) * torch.rand(64, 3)  # x' stays in [x - eps, x + eps], inside (0, 1)
    y = torch.randint(0, 2, (64,))
    torch.manual_seed(4)
    ours = te.pgd_unboxed(mlp, x, y, eps, 0.025, 10, random_start=random_start)
    torch.manual_seed(4)
    theirs = tp.pgd_attack(mlp, x, y, eps, 0.025, 10, random_start="uniform" if random_start else None)
    assert torch.equal(ours, theirs)
    assert (ours - x).abs().max() <= eps + 1e-6 and (ours - x).abs().max() > 0.5 * eps


def test_unboxed_pgd_leaves_the_unit_box():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
        model.bias.zero_()
    x, y = torch.tensor([[3.0, -2.0, 0.0]]), torch.tensor([0])
    x_adv = te.pgd_unboxed(model, x, y, 0.5, 0.2, 5, random_start=False)  # pushes x1 down by eps, no clamp to [0, 1]
    assert torch.allclose(x_adv, torch.tensor([[2.5, -2.0, 0.0]]))
    on_the_edges = torch.tensor([[0.0, 1.0, 0.5]])  # where train_piat.py's clamp acts, the two attacks part
    boxed = tp.pgd_attack(model, on_the_edges, y, 0.5, 0.2, 5, random_start=None)
    assert boxed.min() >= 0 and torch.equal(boxed, on_the_edges)
    assert te.pgd_unboxed(model, on_the_edges, y, 0.5, 0.2, 5, random_start=False)[0, 0] == pytest.approx(-0.5)


def test_method_losses_are_the_formulas(mlp):
    torch.manual_seed(6)
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    x_adv = x + 0.1 * torch.randn_like(x)
    adv, clean = mlp(x_adv), mlp(x)
    ce = F.cross_entropy(adv, y)
    assert torch.allclose(te.method_loss("ce", mlp, x, y, x_adv, 0.5, 4.0), ce)
    assert torch.allclose(te.method_loss("alp", mlp, x, y, x_adv, 0.5, 4.0), ce + 0.5 * tp.alp_loss(adv, clean))
    assert torch.allclose(te.method_loss("nmse", mlp, x, y, x_adv, 0.5, 4.0), ce + 4.0 * tp.nmse_loss(adv, clean, y))


def test_the_toys_alpha_schedule_and_fixed_alpha():
    assert te.piat_alpha(0) == pytest.approx(0.1) and te.piat_alpha(49) == pytest.approx(50 / 59)
    args = te.parse_args([])
    assert (args.alpha_max, args.alpha_a, args.alpha_b) == (0.99, 1.0, 10.0)  # train_piat.py's defaults
    torch.manual_seed(7)
    model, prev_model = te.make_mlp(8), te.make_mlp(8)
    prev, start = te.clone_state(prev_model), te.clone_state(model)
    alpha, theta_prev = te.piat_step_(model, prev, 7, te.parse_args(["--alpha-fixed", "0.3"]))
    assert alpha == 0.3
    for k, v in model.state_dict().items():
        assert torch.allclose(v, 0.3 * prev[k] + 0.7 * start[k], atol=1e-6) and torch.equal(theta_prev[k], v)


# ------------------------------------------------------------------------------- the bookkeeping


def test_oscillation_and_largest_drop():
    robust = [0.5, 0.7, 0.6, 0.65, 0.3, 0.4]
    assert te.oscillation(robust) == pytest.approx((0.2 + 0.1 + 0.05 + 0.35 + 0.1) / 5)
    assert te.largest_drop_epoch(robust) == 5  # epoch 4 -> 5 (1-based) fell by 0.35
    assert te.oscillation([0.3]) == 0.0 and te.oscillation([0.4, 0.4, 0.4]) == 0.0
    stats = te.mean_and_std([0.1, 0.3])
    assert stats["mean"] == pytest.approx(0.2) and stats["std"] == pytest.approx(math.sqrt(0.02))


def test_piat_with_alpha_zero_is_pgd_at_and_methods_share_their_start():
    """Every method starts from the same weights, batch order and attack starts: with alpha = 0 the
    interpolation is the identity, and PIAT must then reproduce PGD-AT exactly."""
    args = te.parse_args(TINY_TOY + ["--alpha-fixed", "0"])
    splits = te.make_splits(args, 0)
    pgd_at, piat = te.train_method("pgd-at", splits, args, 0), te.train_method("piat", splits, args, 0)
    assert pgd_at["robust"] == piat["robust"] and pgd_at["clean"] == piat["clean"]
    for s1, s2 in zip(pgd_at["snapshots"], piat["snapshots"]):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    nmse_run = te.train_method("nmse", splits, args, 0)
    assert all(torch.equal(nmse_run["snapshots"][0][k], pgd_at["snapshots"][0][k]) for k in pgd_at["snapshots"][0])
    assert len(pgd_at["snapshots"]) == args.epochs + 1


def test_decision_grid_is_the_logit_margin(mlp):
    g1, g2, margin = te.decision_grid(mlp.state_dict(), 16, lim=2.0, x3=0.5, resolution=11)
    assert g1.shape == g2.shape == margin.shape == (11, 11)
    point = torch.tensor([[g1[3, 7], g2[3, 7], 0.5]])
    with torch.no_grad():
        logits = mlp(point)[0]
    assert margin[3, 7] == pytest.approx((logits[1] - logits[0]).item(), abs=1e-5)


# ------------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    proc = run_script(ROOT / "toy_example.py", *TINY_TOY, "--seeds", "2", "--out-dir", out, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_a_short_run_writes_every_figure(tiny_run):
    out, _ = tiny_run
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 10_000, name  # not an empty canvas


def test_a_short_run_writes_the_summary(tiny_run):
    out, proc = tiny_run
    result = json.loads((out / "summary.json").read_text())
    assert set(result) >= {"args", "seeds", "summary", "per_seed", "figures", "seconds"}
    assert result["seeds"] == [0, 1] and len(result["per_seed"]) == 2
    for entry in result["per_seed"]:
        assert set(entry["methods"]) == set(te.METHODS)
        assert 2 <= entry["drop_epoch"] <= 3
        for stats in entry["methods"].values():
            assert len(stats["robust"]) == len(stats["clean"]) == len(stats["alpha"]) == 3
            assert set(stats) >= {"final_robust", "best_robust", "best_epoch", "oscillation", "final_clean"}
            assert stats["final_robust"] == stats["robust"][-1] and stats["best_robust"] == max(stats["robust"])
    assert result["per_seed"][0]["methods"]["piat"]["alpha"] == pytest.approx([0.1, 2 / 11, 3 / 12])
    assert result["per_seed"][0]["methods"]["pgd-at"]["alpha"] == [0.0, 0.0, 0.0]
    for method, stats in result["summary"].items():
        for key in ("final_robust", "best_robust", "oscillation"):
            values = [e["methods"][method][key] for e in result["per_seed"]]
            assert stats[key]["mean"] == pytest.approx(sum(values) / 2)
            assert stats[key]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert "+-" in proc.stdout and "PIAT+NMSE" in proc.stdout


@pytest.mark.parametrize("flags,message", [(["--epsilon", "-1"], "must be a finite number in [0, inf]"),
                                           (["--methods", "sgd"], "invalid choice"),
                                           (["--seeds", "0"], "must be a finite number in [1, 1000], got 0"),
                                           (["--seeds", "1000000000"], "must be a finite number in [1, 1000]"),
                                           (["--seed", "4294967295", "--seeds", "2"], "argument --seeds: seeds "
                                            "4294967295..4294967296 pass 4294967295, the largest seed"),
                                           (["--threads", "1000000000"], "must be a finite number in [1, 1024]"),
                                           (["--pgd-steps", "1000000000"], "must be a finite number in [0, 1000]"),
                                           (["--train-size", "1"], "must be a finite number in [2, 1000000]")])
def test_bad_flags_fail_in_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        te.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_input_stops_the_script_in_one_line_before_writing(tmp_path):
    proc = run_script(ROOT / "toy_example.py", "--r0", "2", "--r1", "2", "--out-dir", tmp_path / "x", timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("toy_example.py: error:") and "must differ" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags,message", [(["--epsilon", "1e9"], "--epsilon: 1e+09 is not below the outer radius 2"),
                                           (["--epsilon", "2"], "--epsilon: 2 is not below the outer radius 2")])
def test_an_epsilon_that_reaches_every_point_is_refused(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        te.main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_diverging_toy_exits_non_zero_and_writes_no_nan(tmp_path):
    proc = run_script(ROOT / "toy_example.py", *TINY_TOY, "--lr", "1e38", "--out-dir", tmp_path / "toy", timeout=60)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("toy_example.py: diverged: the training loss is ")
    assert not (tmp_path / "toy").exists()  # nothing written: no summary.json with a NaN in it


def test_the_toy_writes_only_into_a_folder_it_made(tmp_path, tiny_run):
    """A folder of the user's (or a training run's) is refused and left byte for byte; a file is refused; the
    toy's own folder (its marker) is written again."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("my own summary\n")
    (mine / "fig2_data.png").write_bytes(b"mine")
    for out, message in ((mine, f"--out-dir {mine} is not empty; choose a new or empty folder, or move them away"),
                         (mine / "summary.json", f"--out-dir {mine / 'summary.json'} is a file; choose a new or empty "
                                                 "folder")):
        proc = run_script(ROOT / "toy_example.py", *TINY_TOY, "--out-dir", out, timeout=60)
        assert proc.returncode == 1 and proc.stderr.strip() == f"toy_example.py: error: {message}", proc.stderr
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == {"summary.json": b"my own summary\n",
                                                                 "fig2_data.png": b"mine"}
    out, _ = tiny_run
    assert (out / te.TOY_MARKER).is_file()
    proc = run_script(ROOT / "toy_example.py", *TINY_TOY, "--out-dir", out, timeout=120)
    assert proc.returncode == 0, proc.stderr
