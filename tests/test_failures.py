"""When something goes wrong. Bad input to train_piat.py, train_vit.py, train_rdat.py and evaluate.py ends in
one line on stderr and a non-zero exit, without a traceback and without touching what a run folder already
holds; a run that diverges stops with its last finite checkpoints and says so (exit code, status.json,
evaluate.py's warning); Ctrl-C and SIGTERM end a run with the command that resumes it to exactly the weights of
a run never stopped."""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as ev
import train_piat as tp
import train_rdat as tr
import train_vit as tv
import utils
from conftest import TINY, run_script

SCRIPTS = {"train_piat.py": tp.__file__, "train_vit.py": tv.__file__, "train_rdat.py": tr.__file__,
           "evaluate.py": ev.__file__}
TINY_VIT = ["--dataset", "synthetic", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
            json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2}), "--train-size", "32", "--eval-size", "16",
            "--batch-size", "16", "--pgd-steps", "1", "--eval-pgd-steps", "1", "--device", "cpu"]
BASE = {"train_piat.py": TINY, "train_rdat.py": TINY, "train_vit.py": TINY_VIT}
# two epochs of one step each: the diverging command, at the size of the tests
ONE_STEP = [*TINY, "--train-size", "32", "--eval-size", "16", "--epochs", "2"]


def png(path, value=128):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(path)


def image_folder(root, train_classes, test_classes):
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for c in classes:
            for i in range(2):
                png(root / split / c / f"{i}.png", 60 * i + 20)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """What the bad inputs are tried on: a finished one-epoch train_piat.py run; one that diverged in its second
    epoch (`--lr 1e38`); image folders with a file that is no image and with a class only in test; a run folder
    that another seed started; one a live process is training; a file where a folder belongs; a checkpoint
    holding a nan."""
    root = tmp_path_factory.mktemp("failures")
    tp.main([*TINY, "--train-size", "32", "--eval-size", "16", "--epochs", "1", "--out-dir", str(root / "run")])
    with pytest.raises(utils.Diverged) as diverged:  # in this process: one start-up less
        tp.main([*ONE_STEP, "--lr", "1e38", "--out-dir", str(root / "diverged")])
    not_an_image = image_folder(root / "not_an_image", ["a", "b"], ["a", "b"])
    (not_an_image / "train" / "a" / "x.png").write_text("this is not an image\n")
    image_folder(root / "extra_class", ["a", "b"], ["a", "b", "c"])
    (root / "seed1").mkdir()
    args = json.loads((root / "run" / "args.json").read_text())
    (root / "seed1" / "args.json").write_text(json.dumps({**args, "seed": 1, "out_dir": str(root / "seed1")}))
    (root / "file").write_text("a file, not a folder\n")
    nan_weights = utils.load_checkpoint(root / "run" / "final.pt")  # as a run of an older version could leave it
    nan_weights["model"]["linear.bias"][2] = float("nan")
    (root / "nan_weights").mkdir()
    torch.save(nan_weights, root / "nan_weights" / "final.pt")
    # a process on this machine that looks like train_piat.py training in root/busy
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "train_piat.py"])
    (root / "busy").mkdir()
    (root / "busy" / "status.json").write_text(json.dumps({"status": "running", "script": "train_piat.py",
                                                           "pid": sleeper.pid, "host": socket.gethostname()}))
    yield {"root": root, "diverged": diverged.value}
    sleeper.kill()
    sleeper.wait()


def snapshot(root):
    """Every file under root with its content hash and modification time."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# (script, arguments, what the one line must say, exit code). {name} is a folder of the fixture above; {new} an
# --out-dir that must still not exist afterwards (or, for a run that diverged, hold only finite weights). Exit
# codes: 2, argparse refused a flag; 1, bad input found later; 3, the run diverged.
BAD_INPUTS = {
    # every numeric flag: finite and in range
    "piat-lr-nan": ("train_piat.py", ["--lr", "nan"], "argument --lr: must be a finite number, got nan", 2),
    "piat-momentum": ("train_piat.py", ["--momentum", "1.5"], "argument --momentum: must lie in [0, 1], got 1.5", 2),
    "piat-weight-decay": ("train_piat.py", ["--weight-decay=-1e-4"], "argument --weight-decay: must be >= 0", 2),
    "piat-alpha-fixed": ("train_piat.py", ["--alpha-fixed", "nan"], "argument --alpha-fixed: must be a finite", 2),
    "piat-alpha-b": ("train_piat.py", ["--alpha-b", "0"], "argument --alpha-b: must be > 0, got 0", 2),
    "piat-epsilon": ("train_piat.py", ["--epsilon", "300"], "argument --epsilon: must be <= 255, got 300", 2),
    "piat-seed": ("train_piat.py", ["--seed", "-1"], "argument --seed: must lie in [0, 4294967295], got -1", 2),
    "rdat-beta-final": ("train_rdat.py", ["--beta-final", "1.5"], "argument --beta-final: must lie in [0, 1]", 2),
    "rdat-ema-decay": ("train_rdat.py", ["--ema-decay", "nan"], "argument --ema-decay: must be a finite number", 2),
    "vit-lr": ("train_vit.py", ["--lr", "nan"], "argument --lr: must be a finite number, got nan", 2),
    "vit-grad-clip": ("train_vit.py", ["--grad-clip", "inf"], "argument --grad-clip: must be a finite number", 2),
    "vit-milestones": ("train_vit.py", ["--lr-milestones", "10", "nan"], "argument --lr-milestones: must be a "
                                                                         "finite number, got nan", 2),
    "vit-alpha-max": ("train_vit.py", ["--alpha-max", "2"], "argument --alpha-max: must lie in [0, 1], got 2", 2),
    "eval-epsilon": ("evaluate.py", ["{run}", "--epsilon", "nan"], "argument --epsilon: must be a finite number", 2),
    # a run that diverges (the command): exit code 3; its folder keeps only finite weights (checked below)
    "piat-lr-1e38": ("train_piat.py", [*ONE_STEP, "--lr", "1e38", "--out-dir", "{new}"],
                     "diverged: the training loss is nan at epoch 2, step 1; ", 3),
    # image folders
    "piat-not-an-image": ("train_piat.py", ["--dataset", "imagefolder", "--data-dir", "{not_an_image}"],
                          "{not_an_image}/train/a/x.png is not a readable image", 1),
    "piat-class-only-in-test": ("train_piat.py", ["--dataset", "imagefolder", "--data-dir", "{extra_class}"],
                                "class folder 'c' is in {extra_class}/test but not in {extra_class}/train", 1),
    "eval-not-an-image": ("evaluate.py", ["{run}/final.pt", "--dataset", "imagefolder", "--data-dir",
                                          "{not_an_image}", "--attacks", "clean", "--device", "cpu"],
                          "{not_an_image}/train/a/x.png is not a readable image", 1),
    # output folders and resumed runs
    "piat-out-dir-holds-a-run": ("train_piat.py", [*TINY, "--out-dir", "{run}"], "{run} already holds a run", 1),
    "rdat-out-dir-holds-a-piat-run": ("train_rdat.py", [*TINY, "--out-dir", "{run}"],
                                      "{run} already holds a run of train_piat.py", 1),
    "piat-out-dir-of-another-seed": ("train_piat.py", [*TINY, "--out-dir", "{seed1}"],
                                     "{seed1} holds the args.json of a run with --seed 1", 1),
    "piat-out-dir-in-use": ("train_piat.py", [*TINY, "--out-dir", "{busy}"], "{busy} is being trained by process", 1),
    "piat-out-dir-is-a-file": ("train_piat.py", [*TINY, "--out-dir", "{file}"], "{file} is a file, not a folder", 1),
    "piat-resume-diverged": ("train_piat.py", ["--resume", "{diverged}"], "{diverged} diverged at epoch 2, step 1", 1),
    "rdat-resume-piat-run": ("train_rdat.py", ["--resume", "{run}"], "written by train_piat.py, not train_rdat.py", 1),
    "eval-nan-weights": ("evaluate.py", ["{nan_weights}/final.pt", "--device", "cpu"],
                         "{nan_weights}/final.pt holds weights that are not finite (linear.bias is nan)", 1),
    # devices
    "piat-device": ("train_piat.py", [*TINY[:-2], "--device", "gpu", "--out-dir", "{new}"],
                    "--device gpu is not a torch device", 1),
    "eval-device": ("evaluate.py", ["{run}", "--device", "cuda:99"], "--device cuda:99, but this machine has", 1),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_and_changes_nothing(case, folders, tmp_path):
    script, argv, message, code = BAD_INPUTS[case]
    names = {p.name: str(p) for p in folders["root"].iterdir()} | {"new": str(tmp_path / "new")}
    argv = [a.format(**names) for a in argv]
    if script != "evaluate.py" and "--out-dir" not in argv and "--resume" not in argv:
        argv = [*BASE[script], "--out-dir", names["new"], *argv]  # were the input accepted, the run would write here
    before = snapshot(folders["root"])
    result = run_script(SCRIPTS[script], *argv, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code and len(lines) == 1, result.stderr
    kind = "diverged" if code == utils.EXIT_DIVERGED else "error"
    assert lines[0].startswith(f"{script}: {kind}: ") and message.format(**names) in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(folders["root"]) == before  # nothing that was written changed
    if code == utils.EXIT_DIVERGED:
        assert utils.read_status(tmp_path / "new")["status"] == "diverged"
        for name in ("best.pt", "final.pt"):
            assert weights_are_finite(utils.load_checkpoint(tmp_path / "new" / name)), name
    else:
        assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------ divergence


def weights_are_finite(checkpoint):
    return all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_a_diverged_run_keeps_its_last_finite_checkpoints_and_says_so(folders, tmp_path, capsys):
    """The issue's command (run as a script in the table above): --lr 1e38 on one step per epoch. Epoch 1 ends
    with huge but finite weights; the first loss of epoch 2 is nan."""
    stopped, run = folders["diverged"], folders["root"] / "diverged"
    assert (stopped.epoch, stopped.step, stopped.stop.status, stopped.stop.exit_code) == (2, 1, "diverged", 3)
    line = stopped.stop.line
    assert re.match(r"diverged: the training loss is (nan|inf|-inf) at epoch 2, step 1; ", line), line
    assert "final.pt: epoch 1" in line and "try a lower --lr than 1e+38" in line
    for name in ("final.pt", "best.pt"):
        checkpoint = utils.load_checkpoint(run / name)
        assert checkpoint["epoch"] == 1 and weights_are_finite(checkpoint), name
    assert [r["epoch"] for r in utils.read_metrics(run / "metrics.csv")] == [1]
    status = utils.read_status(run)
    assert {k: status[k] for k in ("status", "script", "epoch", "step", "epochs_saved", "epochs", "exit_code")} == {
        "status": "diverged", "script": "train_piat.py", "epoch": 2, "step": 1, "epochs_saved": 1, "epochs": 2,
        "exit_code": 3}
    assert status["message"] == line
    # evaluate.py measures it (into a copy: the folder stays as it was), with one line of warning
    copy = tmp_path / "diverged"
    shutil.copytree(run, copy)
    capsys.readouterr()
    ev.main([str(copy), "--attacks", "clean", "--n-examples", "16", "--device", "cpu"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert warnings == [f"evaluate.py: warning: {copy} did not finish: it diverged at epoch 2, step 1; epochs saved: "
                        "1 of 2; status.json"]


@pytest.mark.parametrize("script", ["train_rdat.py", "train_vit.py"])
def test_a_planted_nan_loss_stops_every_training_script_before_it_saves(script, tmp_path, monkeypatch):
    """A nan planted into the natural learner's loss (RDAT's second loss) or the ViT's training loss at the
    second of the two steps of epoch 2: the run stops there, and its checkpoints hold epoch 1."""
    module, flags = (tr, [*TINY, "--train-size", "64", "--eval-size", "16"]) if script == "train_rdat.py" else \
        (tv, TINY_VIT)
    calls = []
    if module is tr:
        real = tr.rdat_step_

        def poisoned(*args, **kwargs):
            calls.append(1)
            loss, natural_loss, *logits = real(*args, **kwargs)
            return loss, (natural_loss * float("nan") if len(calls) == 4 else natural_loss), *logits

        monkeypatch.setattr(tr, "rdat_step_", poisoned)
        what = "the natural learner loss is nan at epoch 2, step 2"
    else:
        real = tv.training_loss

        def poisoned(*args, **kwargs):
            calls.append(1)
            loss, *logits = real(*args, **kwargs)
            return (loss * float("nan") if len(calls) == 4 else loss), *logits

        monkeypatch.setattr(tv, "training_loss", poisoned)
        what = "the training loss is nan at epoch 2, step 2"
    out = tmp_path / "run"
    with pytest.raises(utils.Diverged, match=what) as stopped:
        module.main([*flags, "--epochs", "3", "--out-dir", str(out)])
    assert (stopped.value.epoch, stopped.value.step) == (2, 2)
    assert stopped.value.stop.exit_code == 3 and stopped.value.stop.line.startswith(f"diverged: {what}; ")
    for name in ("final.pt", "best.pt"):
        checkpoint = utils.load_checkpoint(out / name)
        assert checkpoint["epoch"] == 1 and weights_are_finite(checkpoint), name
    assert len(utils.read_metrics(out / "metrics.csv")) == 1
    status = utils.read_status(out)
    assert (status["status"], status["script"], status["epoch"], status["step"], status["epochs_saved"]) == (
        "diverged", script, 2, 2, 1)


def test_weights_that_turn_non_finite_are_never_saved(tmp_path, monkeypatch):
    """Non-finite weights at the end of an epoch (here planted by the interpolation of epoch 2) stop the run
    before anything of that epoch is written."""
    real = tp.piat_step_

    def poisoned(model, prev_state, epoch, args):
        alpha, prev = real(model, prev_state, epoch, args)
        if epoch == 1:
            model.linear.bias.data[3] = float("inf")
        return alpha, prev

    monkeypatch.setattr(tp, "piat_step_", poisoned)
    out = tmp_path / "run"
    with pytest.raises(utils.Diverged, match="linear.bias of the model is inf at the end of epoch 2"):
        tp.main([*ONE_STEP, "--epochs", "3", "--out-dir", str(out)])
    assert utils.load_checkpoint(out / "final.pt")["epoch"] == 1 and len(utils.read_metrics(out / "metrics.csv")) == 1
    assert (utils.read_status(out)["status"], utils.read_status(out)["step"]) == ("diverged", None)


def test_check_finite_names_the_loss_and_counts_from_one():
    utils.check_finite(0, 0, training_loss=torch.tensor(1.5))
    with pytest.raises(utils.Diverged, match="the robust loss is inf at epoch 3, step 8") as stopped:
        utils.check_finite(2, 7, natural_loss=torch.tensor(0.3), robust_loss=torch.tensor(float("inf")))
    assert (stopped.value.epoch, stopped.value.step, stopped.value.value) == (3, 8, float("inf"))


# ------------------------------------------------------------------------------------------ interrupts

SIGNAL_RUN = [*TINY, "--epochs", "2", "--train-size", "256", "--batch-size", "16"]  # epoch 2 outlasts the signal


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    tp.main([*SIGNAL_RUN, "--out-dir", str(out)])
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_names_its_resume_command_which_resumes_exactly(signum, tmp_path, uninterrupted):
    """Ctrl-C or SIGTERM (Slurm's warning before preemption) once the first final.pt exists: one line with the
    exact --resume command and exit code 128 + the signal's number; that command ends with the weights of a run
    never stopped."""
    run = tmp_path / "run"
    # SIGINT as in a terminal, even where the suite itself was started in the background (which ignores it)
    proc = subprocess.Popen([sys.executable, tp.__file__, *SIGNAL_RUN, "--out-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not (run / "final.pt").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 128 + signum and len(lines) == 1, stderr
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"train_piat.py: interrupted by {name} in epoch 2; {run}/final.pt holds epoch 1; ")
    saved = utils.load_checkpoint(run / "final.pt")
    assert saved["epoch"] == 1 and len(utils.read_metrics(run / "metrics.csv")) == 1
    status = utils.read_status(run)
    assert (status["status"], status["epochs_saved"], status["exit_code"]) == ("interrupted", 1, 128 + signum)
    # the printed command (run in this process: one start-up less)
    command = shlex.split(lines[0].split("continue exactly from there with: ", 1)[1])
    assert command == ["python", tp.__file__, "--resume", str(run)]
    tp.main(command[2:])
    a, b = utils.load_checkpoint(uninterrupted / "final.pt"), utils.load_checkpoint(run / "final.pt")
    assert b["epoch"] == 2 and utils.read_status(run)["status"] == "finished"
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert utils.read_metrics(run / "metrics.csv")[-1]["train_loss"] == \
        utils.read_metrics(uninterrupted / "metrics.csv")[-1]["train_loss"]


def test_a_signal_while_an_epoch_is_written_waits_until_all_of_it_is(tmp_path, monkeypatch):
    """SIGUSR2 (sent before a requeue on some clusters) arriving between epoch 2's final.pt and its metrics.csv
    row: the row, status.json and curves.png are still written, then the run stops, consistent."""
    real = utils.save_checkpoint

    def save_then_signal(checkpoint, path):
        real(checkpoint, path)
        if Path(path).name == "final.pt" and checkpoint["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(utils, "save_checkpoint", save_then_signal)
    out = tmp_path / "run"
    with pytest.raises(utils.Interrupted) as stopped:
        tp.main([*ONE_STEP, "--epochs", "3", "--out-dir", str(out)])
    assert stopped.value.signum == signal.SIGUSR2 and stopped.value.stop.exit_code == 128 + signal.SIGUSR2
    assert utils.load_checkpoint(out / "final.pt")["epoch"] == 2
    assert [r["epoch"] for r in utils.read_metrics(out / "metrics.csv")] == [1, 2]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn as the run stops
    status = utils.read_status(out)
    assert (status["status"], status["epochs_saved"], status["epoch"]) == ("interrupted", 2, 3)
    assert f"--resume {out}" in status["message"]
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # the handlers are put back


def test_a_run_folder_that_saved_no_epoch_is_reused_by_the_same_run_only(tmp_path, monkeypatch):
    """A run stopped in its first epoch leaves args.json (and status.json): the same command starts it over there;
    another seed or another script is refused."""
    monkeypatch.setattr(utils.RUN, "script", "train_piat.py")  # as run_guard sets it
    args = tp.parse_args([*TINY, "--out-dir", str(tmp_path / "run")])
    utils.make_run_dir(args)
    utils.save_json(vars(args), tmp_path / "run" / "args.json")
    assert utils.make_run_dir(args) == tmp_path / "run"  # the same command again starts over
    args.seed = 3
    with pytest.raises(utils.UserError, match="with --seed 0 that saved no epoch yet, not --seed 3"):
        utils.make_run_dir(args)
    (tmp_path / "run" / "status.json").write_text(json.dumps({"status": "interrupted", "script": "train_piat.py"}))
    monkeypatch.setattr(utils.RUN, "script", "train_rdat.py")
    args = tr.parse_args([*TINY, "--out-dir", str(tmp_path / "run")])
    with pytest.raises(utils.UserError, match="holds the args.json of a run of train_piat.py that saved no epoch"):
        utils.make_run_dir(args)
