"""The speed paths on CPU: bf16 autocast on and off, and a 2-process gloo run under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

import train_piat as tp
import utils
from conftest import TINY, run_script


@pytest.mark.parametrize("amp", ["--amp", "--no-amp"])
def test_amp_paths_run(tmp_path, monkeypatch, amp):
    autocast_seen = []
    real = tp.training_loss

    def spy(*args, **kwargs):
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        loss, logits_adv, logits_clean = real(*args, **kwargs)
        assert loss.dtype == logits_adv.dtype == torch.float32  # the losses themselves run in fp32
        return loss, logits_adv, logits_clean

    monkeypatch.setattr(tp, "training_loss", spy)
    out = tmp_path / "run"
    tp.main([*TINY, "--epochs", "1", amp, "--out-dir", str(out)])
    assert autocast_seen and set(autocast_seen) == {amp == "--amp"}
    row = utils.read_metrics(out / "metrics.csv")[0]
    assert 0 < row["train_loss"] < 10 and 0 <= row["test_pgd20_acc"] <= row["test_clean_acc"] <= 1
    assert utils.load_checkpoint(out / "final.pt")["args"]["amp"] is (amp == "--amp")


def test_amp_defaults_to_off_on_cpu(tmp_path):
    out = tmp_path / "run"
    tp.main([*TINY, "--epochs", "1", "--out-dir", str(out)])
    assert utils.load_checkpoint(out / "final.pt")["args"]["amp"] is False


def test_torchrun_two_gloo_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", tp.__file__,
               *TINY, "--epochs", "2", "--eval-size", "33", "--out-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # the fingerprints of both ranks' final weights are compared inside the run; only rank 0 prints
    assert result.stdout.count("weights identical on all 2 ranks") == 1
    assert result.stdout.count("done: best") == 1
    assert {p.name for p in out.iterdir()} == {"args.json", "metrics.csv", "best.pt", "final.pt", "curves.png",
                                               "tensorboard"}
    rows = utils.read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    # the 33 test images are split 17/16 between the ranks and the counts summed: accuracies are
    # multiples of 1/33, which a rank's own 17 or 16 images could not give (except 0 and 1)
    accuracies = [r["test_clean_acc"] for r in rows] + [r["test_pgd20_acc"] for r in rows]
    assert any(0 < a < 1 for a in accuracies)
    for a in accuracies:
        assert abs(a * 33 - round(a * 33)) < 1e-3
        assert a in (0, 1) or (abs(a * 17 - round(a * 17)) > 1e-3 and abs(a * 16 - round(a * 16)) > 1e-3)


def test_batch_must_divide_among_processes(monkeypatch):
    monkeypatch.setattr(utils, "setup_distributed", lambda device: (0, 3, torch.device("cpu")))
    with pytest.raises(utils.UserError, match="must divide among 3 processes"):
        tp.main([*TINY, "--epochs", "1", "--batch-size", "32"])


def test_bench_train_runs_with_tiny_settings(tmp_path, root):
    out = tmp_path / "bench.json"
    result = run_script(root / "benchmarks" / "bench_train.py", "--arch", "small-cnn", "--batch-size", "16",
                        "--warmup", "1", "--steps", "1", "--pgd-steps", "1", "--eval-images", "8", "--workers", "0",
                        "--out", out)
    assert result.returncode == 0, result.stderr
    assert "ratio ours / conventional:" in result.stdout and "evaluate.py PGD-20 (fp32):" in result.stdout
    report = json.loads(out.read_text())
    for variant in ("ours", "conventional", "eval-pgd20"):
        assert report[variant]["images_per_second"] > 0 and report[variant]["peak_memory_mib"] > 0
        assert report[variant]["forward_gflops_per_image"] == pytest.approx(report["ours"]["forward_gflops_per_image"])
    assert report["ours"]["amp"] is False and report["conventional"]["amp"] is False  # fp32 on CPU by default
    assert report["summary"]["ratio"] == pytest.approx(
        report["ours"]["images_per_second"] / report["conventional"]["images_per_second"])
    assert report["summary"]["forward_equivalents_per_image"] == 2 * 1 + 6
