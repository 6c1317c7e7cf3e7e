"""PIAT against weight averaging in train_piat.py: --ema (per-step EMA, checked against its closed form),
--swa-start (the mean of the end-of-epoch weights, BatchNorm recomputed), --piat-every (N = one epoch is the
paper's PIAT exactly), averages that only observe (the same seed trains the same weights with or without one),
what the checkpoints hold, evaluate.py's method names, and resume after SIGKILL."""

import json

import pytest
import torch
import torch.nn as nn

import evaluate as ev
import train_piat as tp
import utils
from sweep import read_metrics
from conftest import TINY, kill_after_first_checkpoint, run_script


def run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    tp.main([*TINY, "--out-dir", str(out), *map(str, extra)])
    return out


def test_ema_after_k_steps_is_its_closed_form():
    """AveragedModel with the EMA rule: the first update copies theta_1, then ema <- d * ema + (1 - d) * theta,
    so after k updates ema = d^(k-1) theta_1 + sum_{j=2..k} (1 - d) d^(k-j) theta_j, BatchNorm buffers included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    args = tp.parse_args([*TINY, "--ema", "0.9"])
    average = tp.make_average(model, args)
    assert tp.average_kind(args) == "ema"
    thetas = []
    for _ in range(4):
        model.train()
        model(torch.randn(8, 3))  # moves the BatchNorm statistics
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        thetas.append({k: v.clone() for k, v in model.state_dict().items()})
        average.update_parameters(model)
    d, k = 0.9, len(thetas)
    for name, value in average.module.state_dict().items():
        if not value.is_floating_point():
            continue
        expected = d ** (k - 1) * thetas[0][name] + sum((1 - d) * d ** (k - j) * thetas[j - 1][name]
                                                        for j in range(2, k + 1))
        assert torch.allclose(value, expected, atol=1e-5), name
    assert any("running_mean" in name for name in average.module.state_dict())


def test_ema_run_reports_the_average_and_logs_the_trained_weights(tmp_path):
    out = run(tmp_path, "--epochs", "2", "--ema", "0.9", "--no-piat", "--loss", "ce")
    rows = read_metrics(out / "metrics.csv")
    final = utils.load_checkpoint(out / "final.pt")
    assert final["weights"] == "ema" and utils.load_checkpoint(out / "best.pt")["weights"] == "ema"
    assert final["resume"]["average"]["n_averaged"] == 6  # 96 images in batches of 32, two epochs: every step
    for k, v in final["resume"]["average"].items():  # best/final hold the average, resume the trained weights
        if k != "n_averaged":
            assert torch.equal(final["model"][k[len("module."):]], v), k
    assert any(not torch.equal(final["model"][k], v) for k, v in final["resume"]["model"].items()
               if v.is_floating_point())
    for r in rows:
        assert 0 <= r["raw_test_pgd20_acc"] <= r["raw_test_clean_acc"] <= 1
    result = ev.main([str(out), "--attacks", "clean", "--n-examples", "32", "--device", "cpu"])
    assert {r["method"] for r in result["rows"]} == {"PGD-AT + EMA"}
    assert {r["weights"] for r in result["rows"]} == {"ema"}
    assert result["rows"][0]["accuracy"] == pytest.approx(rows[-1]["test_clean_acc"], abs=1e-6)
    # RUN/trained is the run without the average: the trained weights' own best.pt and final.pt, chosen on raw_*
    trained_final, trained_best = (utils.load_checkpoint(out / "trained" / f"{r}.pt") for r in ("final", "best"))
    assert trained_final["weights"] == "trained" and trained_final["args"]["ema"] is None
    assert all(torch.equal(v, final["resume"]["model"][k]) for k, v in trained_final["model"].items())
    raw = [r["raw_test_pgd20_acc"] for r in rows]
    assert [m["test_pgd20_acc"] for m in trained_final["metrics"]] == pytest.approx(raw, abs=1e-6)
    assert trained_best["epoch"] == 1 + raw.index(max(raw))
    assert sorted(p.name for p in (out / "trained").iterdir()) == ["best.pt", "final.pt"]
    result = ev.main([str(out / "trained"), "--attacks", "clean", "--n-examples", "32", "--device", "cpu"])
    assert {r["method"] for r in result["rows"]} == {"PGD-AT"} and (out / "trained" / "eval.json").is_file()
    final_row = next(r for r in result["rows"] if r["role"] == "final")
    assert final_row["accuracy"] == pytest.approx(rows[-1]["raw_test_clean_acc"], abs=1e-6)


def test_swa_is_the_mean_of_the_end_of_epoch_weights_with_recomputed_batchnorm(tmp_path, monkeypatch):
    epoch_weights = []
    real = tp.update_average_

    def spy(average, model, trained, split, args, epoch):
        if epoch + 1 >= args.swa_start:
            epoch_weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(average, model, trained, split, args, epoch)

    monkeypatch.setattr(tp, "update_average_", spy)
    out = run(tmp_path, "--epochs", "4", "--swa-start", "2", "--loss", "ce")
    assert len(epoch_weights) == 3  # epochs 2, 3 and 4
    final = utils.load_checkpoint(out / "final.pt")
    assert final["weights"] == "swa"
    model = utils.build_model(final["arch"], final["num_classes"], final["mean"], final["std"])
    model.load_state_dict(final["model"])
    for name, p in model.named_parameters():
        assert torch.allclose(p, sum(w[name] for w in epoch_weights) / 3, atol=1e-6), name
    # BatchNorm statistics: one pass over the unaugmented training images of the run, recomputed here
    data = utils.load_dataset("synthetic", None)
    x_train = data.x_train[utils.fixed_subset(len(data.x_train), None)[:96]]
    fresh = utils.build_model(final["arch"], final["num_classes"], final["mean"], final["std"])
    fresh.load_state_dict(final["model"])
    for m in fresh.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    torch.optim.swa_utils.update_bn([utils.to_float(x_train[i : i + 256]) for i in range(0, 96, 256)], fresh)
    for name, buffer in fresh.named_buffers():
        if "running" in name:
            assert torch.allclose(buffer, model.get_buffer(name), atol=1e-5), name
            assert not torch.allclose(buffer, epoch_weights[-1][name], atol=1e-3), name  # not the trained ones
    rows = read_metrics(out / "metrics.csv")
    assert rows[0]["test_clean_acc"] == rows[0]["raw_test_clean_acc"]  # before --swa-start: the trained weights
    assert ev.project_model(out / "final.pt")[1]["method"] == "PIAT + SWA"


def test_piat_every_one_epoch_is_the_papers_piat_exactly(tmp_path):
    per_epoch = run(tmp_path, "--epochs", "3", "--loss", "ce", "--no-amp", name="per_epoch")  # fp32 whatever the CPU
    every = run(tmp_path, "--epochs", "3", "--loss", "ce", "--no-amp", "--piat-every", "3", name="every")  # 3 steps
    a, b = utils.load_checkpoint(per_epoch / "final.pt"), utils.load_checkpoint(every / "final.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r["alpha"] for r in read_metrics(every / "metrics.csv")] == pytest.approx([0.1, 2 / 11, 3 / 12])
    # N = 1: an interpolation after every step, alpha at the fractional epoch t = step / steps - 1
    seen = []
    real = tp.piat_alpha
    tp_alpha = lambda t, *a: seen.append(t) or real(t, *a)  # noqa: E731
    try:
        tp.piat_alpha = tp_alpha
        run(tmp_path, "--epochs", "1", "--loss", "ce", "--piat-every", "1", name="lookahead")
    finally:
        tp.piat_alpha = real
    assert seen == pytest.approx([1 / 3 - 1, 2 / 3 - 1, 0.0])


@pytest.mark.parametrize("flags", [["--ema", "0.9", "--piat-every", "5"], ["--swa-start", "2"]])
def test_killed_run_resumes_to_the_same_weights(tmp_path, flags):
    common = [*TINY, "--loss", "ce", "--epochs", "3", "--train-size", "128", "--batch-size", "16", "--no-amp", *flags]
    whole = tmp_path / "whole"
    tp.main([*common, "--out-dir", str(whole)])
    killed = tmp_path / "killed"
    stopped_after = kill_after_first_checkpoint(tp.__file__, common, killed)
    assert stopped_after < 3, "the run finished before it could be killed"
    result = run_script(tp.__file__, "--resume", killed)
    assert result.returncode == 0, result.stderr
    a, b = utils.load_checkpoint(whole / "final.pt"), utils.load_checkpoint(killed / "final.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for part in ("theta_prev", "model", "average"):
        for k, v in (a["resume"].get(part) or {}).items():
            assert torch.equal(v, b["resume"][part][k]), (part, k)
    args = json.loads((killed / "args.json").read_text())
    assert {k: args[k] for k in ("ema", "swa_start", "piat_every")} == {k: a["args"][k] for k in
                                                                        ("ema", "swa_start", "piat_every")}


@pytest.mark.parametrize("flags,message", [
    (["--ema", "1.5"], "--ema: must be a finite number in (0, 1), got 1.5"),
    (["--ema", "0.9", "--swa-start", "2"], "two weight averages"),
    (["--swa-start", "9", "--epochs", "3"], "--swa-start 9 is after the last epoch"),
    (["--piat-every", "0"], "--piat-every: must be a finite number in (0, inf), got 0"),
])
def test_bad_averaging_flags(flags, message, capsys):
    with pytest.raises((utils.UserError, SystemExit)) as err:
        tp.parse_args([*TINY, *flags])
    assert message in (str(err.value) if err.type is utils.UserError else capsys.readouterr().err)


TRAINING_COLUMNS = ["lr", "alpha", "train_loss", "train_clean_acc", "train_robust_acc"]


@pytest.mark.parametrize("loss,plain,averaged", [
    ("ce", ["--no-piat"], ["--no-piat", "--ema", "0.9"]),
    ("ce", ["--piat"], ["--piat", "--swa-start", "2"]),
    ("cfa", ["--no-cfa-fawa", "--val-size", "16"], ["--cfa-fawa", "--val-size", "16", "--cfa-threshold", "0"]),
])
def test_an_average_only_observes_the_same_seeds_training(tmp_path, loss, plain, averaged):
    """The same seed with and without a weight average: the training columns agree exactly, and the trained
    weights' evaluation (raw_*) equals the plain run's, epoch by epoch (the evaluation attacks from a generator of
    its own, seeded per epoch); the final trained weights are bit-identical."""
    common = ["--loss", loss, "--epochs", "3", "--no-amp", "--cfa-fawa-start", "1", "--cfa-begin", "1"]
    a, b = run(tmp_path, *common, *plain, name="plain"), run(tmp_path, *common, *averaged, name="averaged")
    rows_a, rows_b = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert {c: ra[c] for c in TRAINING_COLUMNS} == {c: rb[c] for c in TRAINING_COLUMNS}
        raw = {c: rb[f"raw_{c}"] for c in tp.EVAL_COLUMNS if rb.get(f"raw_{c}") is not None}
        assert raw and raw == {c: ra[c] for c in raw}, ra["epoch"]
    trained_a = utils.load_checkpoint(a / "final.pt")["resume"]["model"]
    trained_b = utils.load_checkpoint(b / "final.pt")["resume"]["model"]
    assert all(torch.equal(v, trained_b[k]) for k, v in trained_a.items())
