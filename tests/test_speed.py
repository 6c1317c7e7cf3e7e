"""The speed paths on CPU: bf16 autocast on and off and its default, resume and evaluation under bf16,
torch.compile, a 2-process gloo run under torchrun, and the training-speed benchmark."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import train_piat as tp
import train_rdat as tr
import train_vit as tv
import utils
from sweep import read_metrics
from conftest import ROOT, TINY, kill_after_first_checkpoint, run_script, stub_bf16_probe

CPU = torch.device("cpu")


def autocast_spy(monkeypatch):
    """Record, for every training step of train_piat.py (--loss nmse), whether bf16 autocast was on."""
    seen = []
    real = tp.nmse_loss

    def spy(logits_adv, logits_clean, y):
        seen.append(torch.is_autocast_enabled("cpu"))
        assert logits_adv.dtype == logits_clean.dtype == torch.float32  # the losses themselves run in fp32
        return real(logits_adv, logits_clean, y)

    monkeypatch.setattr(tp, "nmse_loss", spy)
    return seen


@pytest.mark.parametrize("amp", ["--amp", "--no-amp"])
def test_amp_paths_run(tmp_path, monkeypatch, amp):
    autocast_seen = autocast_spy(monkeypatch)
    out = tmp_path / "run"
    tp.main([*TINY, "--epochs", "1", amp, "--out-dir", str(out)])
    assert autocast_seen and set(autocast_seen) == {amp == "--amp"}
    row = read_metrics(out / "metrics.csv")[0]
    assert 0 < row["train_loss"] < 10 and 0 <= row["test_pgd20_acc"] <= row["test_clean_acc"] <= 1
    assert utils.load_checkpoint(out / "final.pt")["args"]["amp"] is (amp == "--amp")


@pytest.mark.parametrize("speedup", [2.0, 0.8])
def test_amp_default_is_measured_on_the_runs_own_model(tmp_path, monkeypatch, capsys, speedup):
    """Without --amp or --no-amp a CPU run times its own model (a slice of its batch, channels_last as it trains) and
    takes bf16 autocast only when bf16 measured faster (the timing is stubbed both ways, so this machine's answer
    does not matter); its first line says what and why, and args.json and the checkpoints keep the choice."""
    probed = stub_bf16_probe(monkeypatch, tmp_path, speedup)
    autocast_seen = autocast_spy(monkeypatch)
    out = tmp_path / "run"
    tp.main([*TINY, "--epochs", "1", "--out-dir", str(out)])
    bf16 = speedup > 1
    assert [tuple(x.shape) for x in probed] == [(utils.PROBE_IMAGES, 3, 32, 32)]
    assert probed[0].is_contiguous(memory_format=torch.channels_last) and not probed[0].is_contiguous()
    assert autocast_seen and set(autocast_seen) == {bf16}
    assert json.loads((out / "args.json").read_text())["amp"] is bf16
    for checkpoint in ("final.pt", "best.pt"):
        assert utils.load_checkpoint(out / checkpoint)["args"]["amp"] is bf16
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("PIAT + NMSE, small-cnn on synthetic")
    assert ("bf16 autocast (measured 2.00x fp32 on this CPU)" if bf16 else "fp32 (bf16 measured 0.80x on this CPU)") \
        in first_line


def test_amp_flags_force_the_precision_in_every_training_script():
    """--amp and --no-amp force the precision; without them it is left for the run to settle (settle_amp)."""
    for script in (tp, tr, tv):
        for flags, amp in (([], None), (["--amp"], True), (["--no-amp"], False)):
            assert script.parse_args(["--dataset", "synthetic", *flags]).amp is amp, (script.__name__, flags)


def settle(amp=None, device=CPU, arch="small-cnn", resume=None):
    model = utils.build_model(arch, 10)
    args = argparse.Namespace(amp=amp, arch=arch, resume=resume)
    return utils.settle_amp(args, device, model, (32, 3, 32, 32)), args.amp


def test_settle_amp_measures_once_per_cpu_and_torch(tmp_path, monkeypatch):
    """The measured answer is remembered per CPU, thread count, torch version, model and input: a second run on
    the same machine does not time again, another torch or another CPU does; bf16 needs a clear 1.2x; a noisy
    measurement is not remembered."""
    probed = stub_bf16_probe(monkeypatch, tmp_path, 1.19)
    cache = tmp_path / "cache" / "piat" / "amp.json"
    assert settle() == ("fp32 (bf16 measured 1.19x on this CPU)", False) and len(probed) == 1
    assert settle() == (f"fp32 (bf16 measured 1.19x on this CPU, remembered in {cache})", False) and len(probed) == 1
    (key,) = json.loads(cache.read_text())
    assert f"torch {torch.__version__}" in key and "small-cnn" in key and "8x3x32x32 channels_last" in key
    monkeypatch.setattr(utils, "bf16_speedup", lambda model, x: probed.append(x) or (1.2, True))
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert settle() == ("bf16 autocast (measured 1.20x fp32 on this CPU)", True) and len(probed) == 2
    monkeypatch.setattr(utils, "cpu_name", lambda: "Another CPU (AVX512, AVX512_BF16)")
    assert settle() == ("bf16 autocast (measured 1.20x fp32 on this CPU)", True) and len(probed) == 3
    assert settle()[0].endswith(f", remembered in {cache})") and len(probed) == 3
    assert len(json.loads(cache.read_text())) == 3 and not list(cache.parent.glob(".*.tmp"))
    # a noisy measurement (a busy machine) decides this run only
    monkeypatch.setattr(utils, "bf16_speedup", lambda model, x: probed.append(x) or (3.0, False))
    busy = "bf16 autocast (measured 3.00x fp32 on this CPU, but noisily: measured again next run)", True
    assert settle(arch="resnet18") == settle(arch="resnet18") == busy and len(probed) == 5
    assert len(json.loads(cache.read_text())) == 3
    # no timing where the answer is known without it: the flags, --resume, CUDA, a CPU without bf16 kernels
    assert settle(amp=True) == ("bf16 autocast (--amp)", True)
    assert settle(amp=False) == ("fp32 (--no-amp)", False)
    assert settle(amp=False, resume="runs/x") == ("fp32 (as the run started)", False)
    assert settle(device=torch.device("cuda")) == ("bf16 autocast (CUDA)", True)
    assert settle(device=torch.device("meta"))[1] is False
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert settle(arch="resnet18") == ("fp32 (no bf16 kernels on this CPU)", False)
    assert len(probed) == 5


def test_bf16_speedup_times_without_changing_the_model():
    """The real probe: a positive ratio, in about a second, and the model (weights, BatchNorm statistics, mode) and
    the global random stream exactly as they were."""
    model = utils.build_model("small-cnn", 10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    rng, start = torch.get_rng_state(), time.perf_counter()
    speedup, steady = utils.bf16_speedup(model, x)
    assert 0.05 < speedup < 20 and steady in (True, False) and time.perf_counter() - start < 10
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())


def test_resume_keeps_the_precision_the_run_started_with(tmp_path, monkeypatch, capsys):
    """A run that measured bf16 faster continues in bf16 under --resume although bf16 would now measure slower:
    args.json decides, and nothing is timed again."""
    stub_bf16_probe(monkeypatch, tmp_path, 2.0)
    out = tmp_path / "run"
    tp.main([*TINY, "--epochs", "1", "--out-dir", str(out)])
    final = utils.load_checkpoint(out / "final.pt")
    final["args"]["epochs"] = 2
    torch.save(final, out / "final.pt")
    probed = stub_bf16_probe(monkeypatch, tmp_path / "later", 0.5)
    autocast_seen = autocast_spy(monkeypatch)
    capsys.readouterr()
    tp.main(["--resume", str(out)])
    assert probed == [] and autocast_seen and set(autocast_seen) == {True}
    assert "bf16 autocast (as the run started)" in capsys.readouterr().out.splitlines()[0]
    assert utils.load_checkpoint(out / "final.pt")["args"]["amp"] is True


def test_bf16_run_resumes_bit_identically(tmp_path):
    """A bf16 run (--amp: whatever this CPU) killed with SIGKILL in its last epoch and resumed ends with
    exactly the weights and metrics of a bf16 run never stopped; the resumed run stays bf16."""
    bf16_run = [*TINY, "--epochs", "2", "--train-size", "256", "--batch-size", "16", "--amp"]
    whole = tmp_path / "whole"
    tp.main([*bf16_run, "--out-dir", str(whole)])
    killed = tmp_path / "killed"
    stopped_after = kill_after_first_checkpoint(tp.__file__, bf16_run, killed)
    assert stopped_after < 2, "the run finished before it could be killed; make bf16_run longer"
    result = run_script(tp.__file__, "--resume", killed)
    assert result.returncode == 0, result.stderr
    assert "bf16 autocast" in result.stdout
    a, b = utils.load_checkpoint(whole / "final.pt"), utils.load_checkpoint(killed / "final.pt")
    assert b["epoch"] == 2 and a["args"]["amp"] is b["args"]["amp"] is True
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    rows_a, rows_b = read_metrics(whole / "metrics.csv"), read_metrics(killed / "metrics.csv")
    assert [r["epoch"] for r in rows_b] == [1, 2]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("lr", "alpha", "train_loss", "train_robust_acc", "test_clean_acc", "test_pgd20_acc"):
            assert ra[key] == rb[key], key


def test_per_epoch_evaluation_runs_in_fp32_under_amp(tmp_path, monkeypatch):
    """With --amp the training attack and step compute their convolutions in bf16, the per-epoch evaluation
    in fp32: every convolution it runs returns fp32, and a plain fp32 forward of the saved weights
    reproduces the logged clean accuracy."""
    conv_dtypes = {"training": set(), "evaluation": set()}
    phase = ["training"]
    real_evaluate = tp.evaluate_epoch

    def evaluate(*args, **kwargs):
        phase[0] = "evaluation"
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            phase[0] = "training"

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            conv_dtypes[phase[0]].add(output.dtype)

    monkeypatch.setattr(tp, "evaluate_epoch", evaluate)
    out = tmp_path / "run"
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        tp.main([*TINY, "--epochs", "1", "--amp", "--out-dir", str(out)])
    finally:
        hook.remove()
    assert conv_dtypes == {"training": {torch.bfloat16}, "evaluation": {torch.float32}}
    final = utils.load_checkpoint(out / "final.pt")
    model = utils.build_model(final["arch"], final["num_classes"], final["mean"], final["std"])
    model.load_state_dict(final["model"])
    data = utils.load_dataset("synthetic", None)
    idx = utils.fixed_subset(len(data.x_test), 32)
    with torch.no_grad():
        clean = (model.eval()(utils.to_float(data.x_test[idx])).argmax(1) == data.y_test[idx]).float().mean().item()
    assert clean == pytest.approx(final["metrics"][-1]["test_clean_acc"], abs=1e-6)


def test_torchrun_two_gloo_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", tp.__file__,
               *TINY, "--epochs", "2", "--eval-size", "33", "--out-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # the fingerprints of both ranks' final weights are compared inside the run; only rank 0 prints
    assert result.stdout.count("weights: identical on all 2 ranks") == 1
    assert result.stdout.count("done: best") == 1
    assert {p.name for p in out.iterdir()} == {"args.json", "metrics.csv", "best.pt", "final.pt", "curves.png",
                                               "tensorboard"}
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    # the 33 test images are split 17/16 between the ranks and the counts summed: accuracies are
    # multiples of 1/33, which a rank's own 17 or 16 images could not give (except 0 and 1)
    accuracies = [r["test_clean_acc"] for r in rows] + [r["test_pgd20_acc"] for r in rows]
    assert any(0 < a < 1 for a in accuracies)
    for a in accuracies:
        assert abs(a * 33 - round(a * 33)) < 1e-3
        assert a in (0, 1) or (abs(a * 17 - round(a * 17)) > 1e-3 and abs(a * 16 - round(a * 16)) > 1e-3)


def test_compile_trains_the_same_model_as_eager(tmp_path):
    """--compile (torch.compile in place, the attacks compiled too) on this CPU: the run trains, saves keys without
    compile's prefix, and its first epoch agrees with the eager run's to float rounding."""
    flags = [*TINY, "--epochs", "1", "--train-size", "64", "--eval-size", "16", "--no-amp"]
    tp.main([*flags, "--out-dir", str(tmp_path / "eager")])
    tp.main([*flags, "--compile", "--out-dir", str(tmp_path / "compiled")])
    eager, compiled = (utils.load_checkpoint(tmp_path / name / "final.pt") for name in ("eager", "compiled"))
    assert compiled["args"]["compile"] and list(compiled["model"]) == list(eager["model"])
    assert compiled["metrics"][0]["train_loss"] == pytest.approx(eager["metrics"][0]["train_loss"], rel=1e-3)
    for k, v in eager["model"].items():
        assert torch.allclose(v.float(), compiled["model"][k].float(), atol=1e-3), k


def test_batch_must_divide_among_processes(monkeypatch):
    monkeypatch.setattr(utils, "setup_distributed", lambda device: (0, 3, torch.device("cpu")))
    with pytest.raises(utils.UserError, match="must divide among 3 processes"):
        tp.main([*TINY, "--epochs", "1", "--batch-size", "32"])


def test_bench_train_runs_with_tiny_settings(tmp_path, root):
    """Three variants in their own processes; without --amp our step takes the training scripts' rule (bf16
    where it measures faster), both peer loops fp32; channels_last (on by default) applies to our step only."""
    out = tmp_path / "bench.json"
    result = run_script(root / "benchmarks" / "bench_train.py", "--arch", "small-cnn", "--batch-size", "16",
                        "--warmup", "1", "--steps", "1", "--pgd-steps", "1", "--eval-images", "8", "--workers", "0",
                        "--out", out)
    assert result.returncode == 0, result.stderr
    for line in ("ratio ours / efficient peer:", "ratio ours / conventional:", "evaluate.py PGD-20 (fp32):"):
        assert line in result.stdout
    report = json.loads(out.read_text())
    for variant in ("ours", "efficient-peer", "conventional", "eval-pgd20"):
        assert report[variant]["images_per_second"] > 0 and report[variant]["peak_memory_mib"] > 0
        assert report[variant]["forward_gflops_per_image"] == pytest.approx(report["ours"]["forward_gflops_per_image"])
    assert report["ours"]["precision"].startswith("bf16 autocast (" if report["ours"]["amp"] else "fp32 (")
    assert f"our step: {report['ours']['precision']}" in result.stdout
    assert report["efficient-peer"]["amp"] is report["conventional"]["amp"] is False
    assert report["ours"]["channels_last"] is True
    assert report["efficient-peer"]["channels_last"] is report["conventional"]["channels_last"] is False
    for peer in ("efficient-peer", "conventional"):
        assert report["summary"][f"ratio_vs_{peer.replace('-', '_')}"] == pytest.approx(
            report["ours"]["images_per_second"] / report[peer]["images_per_second"])
    assert report["summary"]["forward_equivalents_per_image"] == 2 * 1 + 6


def test_bench_train_times_l2_against_linf_in_turn(tmp_path):
    """--norm both: our step under each norm, alternately in one process, as many timed steps of each; the ratios
    are those of the median step times."""
    out = tmp_path / "bench.json"
    report = load_bench().main(["--arch", "small-cnn", "--batch-size", "8", "--warmup", "1", "--steps", "3",
                                "--pgd-steps", "1", "--norm", "both", "--out", str(out)])
    assert json.loads(out.read_text())["l2_over_linf_time"] == report["l2_over_linf_time"]
    times = report["times"]
    assert len(times["linf"]) == len(times["l2"]) == 3 and all(w > 0 and c > 0 for ts in times.values() for w, c in ts)
    median = {norm: sorted(w for w, _ in ts)[1] for norm, ts in times.items()}
    assert report["l2_over_linf_time"] == pytest.approx(median["l2"] / median["linf"])


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("variant,attack,weight_grads", [("efficient-peer", "efficient_attack", False),
                                                         ("conventional", "conventional_attack", True)])
def test_peer_loops_differ_only_in_their_attack(monkeypatch, variant, attack, weight_grads):
    """Both peer loops attack with BatchNorm in eval mode within the epsilon ball, then take the same
    training step; only the naive one leaves weight gradients behind from its attack."""
    bench = load_bench()
    args = bench.parse_args(["--arch", "small-cnn", "--batch-size", "8", "--pgd-steps", "2", "--workers", "0",
                             "--variant", variant])
    data = bench.bench_data(32, 8)
    model = utils.build_model("small-cnn", data.num_classes, data.mean, data.std)
    seen, peer_attack = [], getattr(bench, attack)

    def watched_attack(model, x, y, steps):
        x_adv = peer_attack(model, x, y, steps)
        grads = any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        seen.append((model.training, grads, (x_adv - x).abs().max().item(), x_adv.min().item(), x_adv.max().item()))
        return x_adv

    monkeypatch.setattr(bench, attack, watched_attack)
    step, settings = bench.peer(args, CPU, model, data)
    before = [p.detach().clone() for p in model.parameters()]
    step(0)
    ((training, grads, distance, low, high),) = seen
    assert training is False and grads is weight_grads
    assert 0 < distance <= 8 / 255 + 1e-6 and 0 <= low and high <= 1
    assert model.training and any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # then trained
    assert settings["amp"] is False and settings["channels_last"] is False
