"""train_rdat.py: the EMA / mixing / beta / redistribution math against direct computations, and the
script end to end on the synthetic set (outputs, the GLOBAL learner is what is logged and saved,
redistribution, --lam 0, --piat, resume after SIGKILL, evaluate.py, torchrun, bad flags)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_rdat as tr
import utils
from sweep import read_metrics
from conftest import TINY, kill_after_first_checkpoint, one_line_error, run_script, stub_bf16_probe

OUTPUTS = ["args.json", "best.pt", "curves.png", "final.pt", "metrics.csv", "tensorboard"]


def run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    tr.main([*TINY, "--out-dir", str(out), *map(str, extra)])
    return out


# ------------------------------------------------------------------------------------------ the math


def tiny_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model(torch.randn(8, 3))  # BatchNorm running statistics away from their initial 0 / 1
    model[1].num_batches_tracked.fill_(seed)
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ema_decay_ramp():
    assert tr.ema_decay(0) == pytest.approx(0.1)
    assert [tr.ema_decay(s) for s in (1, 2, 100)] == pytest.approx([2 / 11, 3 / 12, 101 / 110])
    assert tr.ema_decay(8990) == pytest.approx(0.999) and tr.ema_decay(10**6) == 0.999
    assert tr.ema_decay(10**6, max_decay=0.9) == 0.9


def test_ema_update_against_direct_computation():
    """Three updates with the decay ramp d_s = (s+1)/(s+10): parameters AND BatchNorm statistics follow
    ema <- d * ema + (1 - d) * theta; the integer counter is copied."""
    ema, learner = tiny_model(0), tiny_model(1)
    expected = snapshot(ema)
    for s in range(3):
        with torch.no_grad():
            for p in learner.parameters():
                p.add_(torch.randn_like(p))
            learner[1].running_mean.add_(1.0)
        d = tr.ema_decay(s)
        tr.ema_update_(ema, learner, d)
        theta = snapshot(learner)
        expected = {k: d * v + (1 - d) * theta[k] if v.is_floating_point() else theta[k] for k, v in expected.items()}
        for k, v in ema.state_dict().items():
            assert torch.allclose(v, expected[k], atol=1e-6), (s, k)
    assert set(expected) >= {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert ema[1].num_batches_tracked.item() == 1  # the learner's, copied


def test_mix_global_against_method_md():
    """theta_G <- d * theta_G + (1 - d) * (beta * ema_R + (1 - beta) * ema_N) (docs/method.md §10), over
    parameters and BatchNorm statistics, with the global learner's own decay ramp."""
    glob, ema_r, ema_n = tiny_model(2), tiny_model(3), tiny_model(4)
    g0, r, n = snapshot(glob), snapshot(ema_r), snapshot(ema_n)
    expected = g0
    for s, beta in enumerate((1.0, 0.7, 0.4)):
        d = tr.ema_decay(s)
        tr.mix_global_(glob, ema_r, ema_n, beta, d)
        expected = {k: d * v + (1 - d) * (beta * r[k] + (1 - beta) * n[k]) if v.is_floating_point() else r[k]
                    for k, v in expected.items()}
        for k, v in glob.state_dict().items():
            assert torch.allclose(v, expected[k], atol=1e-6), (s, k)
    assert not torch.allclose(glob[0].weight, g0["0.weight"])
    # beta = 1 ignores the natural EMA entirely; the inputs are never modified
    tr.mix_global_(glob, ema_r, ema_n, 1.0, 0.0)
    for k, v in glob.state_dict().items():
        assert torch.equal(v, r[k]), k
    for k, v in ema_n.state_dict().items():
        assert torch.equal(v, n[k])


def test_beta_schedule():
    E = 120
    assert tr.beta_at(0, E) == 1.0 and tr.beta_at(2 * E / 3, E) == 1.0 and tr.beta_at(50.5, E) == 1.0
    assert tr.beta_at(5 * E / 6, E) == pytest.approx(0.7)
    assert tr.beta_at(E, E) == pytest.approx(0.4) and tr.beta_at(E + 5, E) == pytest.approx(0.4)
    assert tr.beta_at(90, E, beta_final=0.0) == pytest.approx(0.75)
    assert tr.beta_at(3, 3) == pytest.approx(0.4) and tr.beta_at(2.5, 3) == pytest.approx(0.7)


def test_redistribution_epochs_120_and_scaled():
    """1-indexed epochs, as in Generalist's official code: 75, 80, ..., 120 of 120; scaled to 12 epochs:
    from floor(7.5 + 0.5) = 8, every max(1, floor(0.5 + 0.5)) = 1."""
    assert tr.scaled_redistribution(120) == (75, 5)
    assert tr.redistribution_epochs(120, 75, 5) == [75, 80, 85, 90, 95, 100, 105, 110, 115, 120]
    assert tr.scaled_redistribution(12) == (8, 1)
    assert tr.redistribution_epochs(12, *tr.scaled_redistribution(12)) == [8, 9, 10, 11, 12]
    assert tr.scaled_redistribution(30) == (19, 1) and tr.scaled_redistribution(180) == (113, 8)
    assert tr.redistribution_epochs(10, 11, 1) == [] and not tr.is_redistribution_epoch(74, 75, 5)
    # the effective values are filled in (and land in args.json); given values are used as they are
    args = tr.parse_args([*TINY, "--epochs", "12"])
    assert (args.redistribute_from, args.redistribute_every, args.redistribute_mode) == (8, 1, "every-batch")
    args = tr.parse_args([*TINY, "--epochs", "12", "--redistribute-from", "3", "--redistribute-every", "4"])
    assert (args.redistribute_from, args.redistribute_every) == (3, 4)
    assert tr.parse_args(["--arch", "resnet18"]).redistribute_from == 75


def test_rdat_loss():
    torch.manual_seed(0)
    logits_adv, logits_clean, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    p, q = F.softmax(logits_clean, 1), F.softmax(logits_adv, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    ce = F.cross_entropy(logits_adv, y)
    assert tr.rdat_loss(logits_adv, logits_clean, y, 6.0) == pytest.approx((ce + 6 * kl).item(), rel=1e-5)
    assert tr.rdat_loss(logits_adv, None, y, 0.0) == pytest.approx(ce.item())  # Generalist's robust learner


# ------------------------------------------------------------------------------------------ end to end


def test_two_epochs_write_every_output_and_log_the_global_learner(tmp_path, monkeypatch):
    """Every output; the logged accuracy is the GLOBAL learner's (the evaluated weights are final.pt's model,
    not the robust or the natural learner's), and the loop feeds the EMAs and the mixing the decay ramp
    and the beta schedule."""
    evaluated, mixes, emas = [], [], []
    real_eval, real_mix, real_ema = tr.evaluate_epoch, tr.mix_global_, tr.ema_update_
    monkeypatch.setattr(tr, "evaluate_epoch", lambda model, *a: evaluated.append(
        (a[5] if len(a) > 5 else "", snapshot(model))) or real_eval(model, *a))  # (model, split, ..., desc)
    monkeypatch.setattr(tr, "mix_global_",
                        lambda g, r, n, beta, d: mixes.append((beta, d)) or real_mix(g, r, n, beta, d))
    monkeypatch.setattr(tr, "ema_update_", lambda e, m, d: emas.append(d) or real_ema(e, m, d))
    probed = stub_bf16_probe(monkeypatch, tmp_path, 0.5)
    out = run(tmp_path, "--epochs", "2", "--redistribute-mode", "off", "--eval-robust-learner")
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    rows = read_metrics(out / "metrics.csv")
    assert list(rows[0]) == tr.METRIC_FIELDS and [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["test_pgd20_acc"] <= r["test_clean_acc"] <= 1 and r["redistributed"] == 0 and r["alpha"] == 0
        assert r["train_loss"] > 0 and r["natural_loss"] > 0 and r["images_per_second"] > 0
        assert 0 <= r["robust_learner_pgd20_acc"] <= r["robust_learner_clean_acc"] <= 1
    # 3 steps per epoch; beta at the fractional epoch after each step; each counter's own ramp
    betas = [b for b, _ in mixes]
    assert betas == pytest.approx([1, 1, 1, 1, 0.7, 0.4]) and [r["beta"] for r in rows] == pytest.approx([1, 0.4])
    assert [d for _, d in mixes] == pytest.approx([tr.ema_decay(s) for s in range(6)])
    assert emas == pytest.approx([tr.ema_decay(s // 2) for s in range(12)])  # robust, natural, robust, ...
    args = json.loads((out / "args.json").read_text())
    assert args["lam"] == 6.0 and args["piat"] is False and utils.method_name(args, tr.SCRIPT) == "RDAT"
    assert args["amp"] is False  # the default, measured on the robust learner (channels_last) before args.json
    assert [tuple(x.shape) for x in probed] == [(utils.PROBE_IMAGES, 3, 32, 32)]
    assert probed[0].is_contiguous(memory_format=torch.channels_last)
    assert (args["redistribute_from"], args["redistribute_every"]) == (1, 1)  # 75 and 5 of 120, scaled to 2
    final, best = utils.load_checkpoint(out / "final.pt"), utils.load_checkpoint(out / "best.pt")
    assert final["script"] == "train_rdat.py" and final["epoch"] == 2 and "resume" not in best
    assert best["epoch"] == max(rows, key=lambda r: r["test_pgd20_acc"])["epoch"]
    # what was evaluated as "test" is the global learner: final.pt's model, unlike both base learners
    assert [d for d, _ in evaluated] == ["", " (robust learner)"] * 2
    last = evaluated[-2][1]
    for k, v in final["model"].items():
        assert torch.equal(v, last[k]), k
    for learner in ("robust", "natural"):
        state = final["resume"][learner]
        assert any(not torch.equal(v, state[k]) for k, v in last.items() if v.is_floating_point()), learner
    for k, v in final["resume"]["robust"].items():
        assert torch.equal(v, evaluated[-1][1][k])
    # the checkpoint alone rebuilds the global learner and reproduces the logged accuracy
    model = utils.build_model(final["arch"], final["num_classes"], final["mean"], final["std"], **final["model_kwargs"])
    model.load_state_dict(final["model"])
    data = utils.load_dataset("synthetic", None)
    idx = utils.fixed_subset(len(data.x_test), 32)
    x, y = utils.to_float(data.x_test[idx]), data.y_test[idx]
    model.eval()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert correct.float().mean().item() == pytest.approx(rows[-1]["test_clean_acc"], abs=1e-6)
    # that evaluation per image, with the images' indices in the test set
    assert final["per_image"]["indices"] == idx.tolist() and final["per_image"]["clean"] == correct.tolist()
    assert sum(final["per_image"]["pgd20"]) == round(32 * rows[-1]["test_pgd20_acc"])
    assert final["weights"] == "global learner"
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode,copies", [("every-batch", 3), ("once", 1)])
def test_redistribution_copies_the_global_learner_into_both_learners(tmp_path, monkeypatch, mode, copies):
    """Epoch 2 only (--redistribute-from 2): after every batch of it (or once, after its last batch) both
    learners hold exactly the global learner's weights; nothing is copied in epoch 1."""
    calls = []
    real = tr.redistribute_

    def spy(global_model, *learners):
        real(global_model, *learners)
        calls.append(len(calls))
        state = global_model.state_dict()
        assert len(learners) == 2 and global_model not in learners
        for learner in learners:
            for k, v in learner.state_dict().items():
                assert torch.equal(v, state[k]), k

    monkeypatch.setattr(tr, "redistribute_", spy)
    out = run(tmp_path, "--epochs", "2", "--redistribute-from", "2", "--redistribute-mode", mode)
    rows = read_metrics(out / "metrics.csv")
    assert [r["redistributed"] for r in rows] == [0, 1] and len(calls) == copies
    final = utils.load_checkpoint(out / "final.pt")
    for learner in ("robust", "natural"):  # the copy is the last thing the epoch does
        for k, v in final["model"].items():
            assert torch.equal(v, final["resume"][learner][k]), (learner, k)


def test_lam_zero_is_generalist_and_amp_runs(tmp_path, monkeypatch):
    """--lam 0: no KL term and no clean forward of the robust learner; under --amp the training passes run
    in bf16 autocast, the loss in fp32."""
    seen = []
    real = tr.robust_learner_loss

    def spy(*args, **kwargs):
        loss, logits_adv = real(*args, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), loss.dtype))
        return loss, logits_adv

    monkeypatch.setattr(tr, "robust_learner_loss", spy)
    monkeypatch.setattr(tr, "trades_kl", lambda *a: pytest.fail("KL computed with --lam 0"))
    out = run(tmp_path, "--epochs", "1", "--lam", "0", "--amp")
    assert seen and set(seen) == {(True, torch.float32)}
    row = read_metrics(out / "metrics.csv")[0]
    assert 0 < row["train_loss"] < 10
    args = utils.load_checkpoint(out / "final.pt")["args"]
    assert utils.method_name(args, tr.SCRIPT) == "Generalist" and args["amp"] is True


def test_piat_interpolates_the_robust_learner(tmp_path, monkeypatch):
    seen = []
    real = tr.interpolate_

    def spy(model, theta_prev, alpha):
        before = snapshot(model)
        real(model, theta_prev, alpha)
        seen.append((before, {k: v.clone() for k, v in theta_prev.items()}, snapshot(model), alpha))

    monkeypatch.setattr(tr, "interpolate_", spy)
    out = run(tmp_path, "--epochs", "2", "--piat", "--redistribute-mode", "off")
    rows = read_metrics(out / "metrics.csv")
    assert [r["alpha"] for r in rows] == pytest.approx([0.1, 2 / 11], abs=1e-6)
    assert [s[3] for s in seen] == pytest.approx([0.1, 2 / 11])
    (_, _, after_0, _), (before_1, prev_1, after_1, alpha_1) = seen
    final = utils.load_checkpoint(out / "final.pt")
    for k, v in after_1.items():
        assert torch.equal(prev_1[k], after_0[k])  # theta_prev of epoch 1 = interpolated weights of epoch 0
        assert torch.equal(final["resume"]["robust"][k], v)  # it is the robust learner that is interpolated
        if v.is_floating_point():
            assert torch.allclose(v, alpha_1 * prev_1[k] + (1 - alpha_1) * before_1[k], atol=1e-6)
    assert utils.method_name(final["args"], tr.SCRIPT) == "RDAT + PIAT"


RESUME_RUN = [*TINY, "--epochs", "4", "--train-size", "128", "--batch-size", "16", "--piat", "--no-amp"]


def test_killed_run_resumes_to_the_same_final_state(tmp_path):
    """SIGKILL after the first epoch, --resume, and compare every saved model (global, both learners, both
    EMAs, theta_prev), the EMA counters and the log with a run never stopped. Epochs 3 and 4 redistribute."""
    whole = tmp_path / "whole"
    tr.main([*RESUME_RUN, "--out-dir", str(whole)])
    killed = tmp_path / "killed"
    stopped_after = kill_after_first_checkpoint(tr.__file__, RESUME_RUN, killed)
    assert stopped_after < 4, "the run finished before it could be killed; make RESUME_RUN longer"
    result = run_script(tr.__file__, "--resume", killed)
    assert result.returncode == 0, result.stderr
    # it went on after the saved epoch: nothing before it trained again
    epochs_run = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs_run == list(range(stopped_after + 1, 5)), result.stdout
    a, b = utils.load_checkpoint(whole / "final.pt"), utils.load_checkpoint(killed / "final.pt")
    assert b["epoch"] == 4 and a["resume"]["ema_steps"] == b["resume"]["ema_steps"] == dict.fromkeys(
        ("robust", "natural", "global"), 32)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for part in ("robust", "natural", "ema_robust", "ema_natural", "theta_prev"):
        for k, v in a["resume"][part].items():
            assert torch.equal(v, b["resume"][part][k]), (part, k)
    for part in ("robust_optimizer", "natural_optimizer"):  # the momentum buffers too
        for index, buffers in a["resume"][part]["state"].items():
            assert torch.equal(buffers["momentum_buffer"], b["resume"][part]["state"][index]["momentum_buffer"])
    rows_a, rows_b = read_metrics(whole / "metrics.csv"), read_metrics(killed / "metrics.csv")
    assert [r["epoch"] for r in rows_b] == [1, 2, 3, 4] and [r["redistributed"] for r in rows_a] == [0, 0, 1, 1]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("lr", "alpha", "beta", "train_loss", "natural_loss", "test_clean_acc", "test_pgd20_acc"):
            assert ra[key] == rb[key], key


def test_copied_script_runs_alone_and_evaluate_py_loads_its_run(tmp_path, root):
    """train_rdat.py needs only utils.py beside it; evaluate.py rebuilds the global learner from its run folder."""
    for name in ("train_rdat.py", "utils.py"):
        shutil.copy(root / name, tmp_path / name)
    result = run_script(tmp_path / "train_rdat.py", *TINY, "--epochs", "1", "--eval-size", "16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (out,) = (tmp_path / "runs").iterdir()
    assert out.name.startswith("synthetic__train_rdat__0__") and sorted(p.name for p in out.iterdir()) == OUTPUTS
    if not (root / "evaluate.py").exists():
        pytest.skip("evaluate.py is not there yet")
    logged = read_metrics(out / "metrics.csv")[0]
    result = run_script(root / "evaluate.py", out, "--attacks", "clean,pgd20", "--n-examples", "16", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    rows = {(r["role"], r["attack"]): r for r in json.loads((out / "eval.json").read_text())["results"]}
    assert set(rows) == {(role, a) for role in ("best", "final") for a in ("clean", "pgd20")}
    # the same 16 images (the fixed subset) as the run's own evaluation: the global learner's clean accuracy
    assert rows["final", "clean"]["accuracy"] == pytest.approx(logged["test_clean_acc"], abs=1e-6)


def test_torchrun_two_gloo_processes_end_with_identical_global_learners(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", tr.__file__,
               *TINY, "--epochs", "2", "--eval-size", "33", "--piat", "--out-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("global_learner, robust_learner, natural_learner: identical on all 2 ranks") == 1
    assert {p.name for p in out.iterdir()} == set(OUTPUTS)
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2] and [r["redistributed"] for r in rows] == [1, 1]
    for a in [r["test_clean_acc"] for r in rows] + [r["test_pgd20_acc"] for r in rows]:
        assert abs(a * 33 - round(a * 33)) < 1e-3  # both ranks' counts summed over the 33 images


# ------------------------------------------------------------------------------------------ bad input


def test_bad_flag_gets_one_line_and_writes_nothing(tmp_path):
    result = run_script(tr.__file__, *TINY, "--out-dir", tmp_path / "out", "--beta-final", "1.5")
    assert result.returncode == 2
    assert one_line_error(result) == ("train_rdat.py: error: argument --beta-final: must be a finite number in "
                                      "[0, 1], got 1.5")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--lam", "-1"], "argument --lam: must be a finite number in [0, inf], got -1"),
    (["--ema-decay", "nan"], "argument --ema-decay: must be a finite number in [0, 1], got nan"),
    (["--redistribute-every", "0"], "argument --redistribute-every: must be a finite number in (0, inf), got 0"),
    (["--redistribute-mode", "sometimes"], "invalid choice: 'sometimes'"),
    (["--alpha-fixed", "0.5"], "--alpha-fixed needs --piat"),
    (["--redistribute-mode", "off", "--redistribute-from", "3"],
     "--redistribute-from needs --redistribute-mode every-batch or once"),
])
def test_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exited:
        tr.parse_args([*TINY, *flags])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and ": error: " in err and message in err, err


def test_resume_refuses_a_train_piat_run(tmp_path):
    import train_piat as tp

    out = tmp_path / "piat"
    tp.main([*TINY, "--epochs", "1", "--out-dir", str(out)])
    with pytest.raises(utils.UserError, match=re.escape(f"--resume {out}: a run of train_piat.py, not train_rdat.py")):
        tr.main(["--resume", str(out)])
    assert one_line_error(run_script(tr.__file__, "--resume", out)) == \
        f"train_rdat.py: error: --resume {out}: a run of train_piat.py, not train_rdat.py"
