"""The speed paths on CPU: bf16 autocast on and off and its default, resume and evaluation under bf16,
torch.compile, a 2-process gloo run under torchrun, and the training-speed benchmark."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import train_piat as tp
import train_rdat as tr
import train_vit as tv
import utils
from sweep import read_metrics
from conftest import ROOT, TINY, kill_after_first_checkpoint, run_script

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


@pytest.mark.parametrize("pays", [True, False])
def test_amp_default_follows_the_rule(tmp_path, monkeypatch, capsys, pays):
    """Without --amp or --no-amp a run takes bf16 autocast exactly where bf16 pays (the rule is mocked both
    ways, so this machine's own answer does not matter), says so in its first line, and stores the resolved
    choice, not None, in args.json and the checkpoints."""
    monkeypatch.setattr(utils, "bf16_pays", lambda device: pays)
    autocast_seen = autocast_spy(monkeypatch)
    out = tmp_path / "run"
    tp.main([*TINY, "--epochs", "1", "--out-dir", str(out)])
    assert autocast_seen and set(autocast_seen) == {pays}
    assert json.loads((out / "args.json").read_text())["amp"] is pays
    for checkpoint in ("final.pt", "best.pt"):
        assert utils.load_checkpoint(out / checkpoint)["args"]["amp"] is pays
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("small-cnn on synthetic") and ("bf16 autocast" if pays else "fp32") in first_line


def test_amp_flags_force_the_precision_in_every_training_script():
    """--amp and --no-amp force the precision; without them it is left for the run to settle (bf16_pays)."""
    for script in (tp, tr, tv):
        for flags, amp in (([], None), (["--amp"], True), (["--no-amp"], False)):
            assert script.parse_args(["--dataset", "synthetic", *flags]).amp is amp, (script.__name__, flags)


def test_bf16_pays_on_cuda_and_amx_only(monkeypatch):
    """The rule asks for AMX on x86, not bf16 support: oneDNN's own check holds on every AVX-512 CPU (it
    emulates bf16 without bf16 instructions), and AVX512_BF16 alone measured slower than fp32."""
    monkeypatch.setattr(utils.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for avx512_bf16, amx in ((True, False), (False, True), (True, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda answer=avx512_bf16: answer)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda answer=amx: answer)
        assert utils.bf16_pays(CPU) is amx, (avx512_bf16, amx)
    assert utils.bf16_pays(torch.device("cuda")) is True
    assert utils.bf16_pays(torch.device("meta")) is False
    monkeypatch.setattr(utils.platform, "machine", lambda: "aarch64")
    assert utils.bf16_pays(CPU) is False  # ARM's BF16: unmeasured, fp32 unless --amp
    monkeypatch.setattr(utils.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert utils.bf16_pays(CPU) is False  # bf16 kernels on the CPU come from oneDNN


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
    assert result.returncode == 0, result.stderr[-3000:]
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
    """Three variants in their own processes; without --amp our step takes the training scripts' rule
    (bf16 where it pays), both peer loops fp32; channels_last (on by default) applies to our step only."""
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
    assert report["ours"]["amp"] is utils.bf16_pays(CPU)
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
