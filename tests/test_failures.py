"""When something goes wrong. Bad input to train_piat.py, train_vit.py, train_rdat.py and evaluate.py ends in
one line on stderr and a non-zero exit, without a traceback and without touching what a folder already holds; a
run that diverges stops with its last finite checkpoints and says so (exit status 3, evaluate.py's warning); a
stop signal lets the running epoch finish and be saved, then ends the run with the command that resumes it to
exactly the weights of a run never stopped."""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import evaluate as ev
import train_piat as tp
import train_rdat as tr
import train_vit as tv
import utils
from sweep import read_metrics
from conftest import TINY, run_script

SCRIPTS = {"train_piat.py": tp.__file__, "train_vit.py": tv.__file__, "train_rdat.py": tr.__file__,
           "evaluate.py": ev.__file__}
TINY_VIT = ["--dataset", "synthetic", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
            json.dumps({"depth": 2, "embed_dim": 32, "num_heads": 2}), "--train-size", "32", "--eval-size", "16",
            "--batch-size", "16", "--pgd-steps", "1", "--eval-pgd-steps", "1", "--device", "cpu"]
BASE = {"train_piat.py": TINY, "train_rdat.py": TINY, "train_vit.py": TINY_VIT}
# two epochs of one step each: a diverging command at the size of the tests
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
    epoch (`--lr 1e38`); image folders with a file that is no image, with a class only in test, and with one
    class; a folder of a user's own files named like a run's; a file where a folder belongs; a checkpoint holding
    a nan."""
    root = tmp_path_factory.mktemp("failures")
    tp.main([*TINY, "--train-size", "32", "--eval-size", "16", "--epochs", "1", "--out-dir", str(root / "run")])
    with pytest.raises(utils.Diverged) as diverged:  # in this process: one start-up less
        tp.main([*ONE_STEP, "--lr", "1e38", "--out-dir", str(root / "diverged")])
    not_an_image = image_folder(root / "not_an_image", ["a", "b"], ["a", "b"])
    (not_an_image / "train" / "a" / "x.png").write_text("this is not an image\n")
    image_folder(root / "extra_class", ["a", "b"], ["a", "b", "c"])
    image_folder(root / "one_class", ["a"], ["a"])
    (root / "mine").mkdir()
    for name in ("metrics.csv", "best.pt", "final.pt"):
        (root / "mine" / name).write_text(f"the user's own {name}\n")
    (root / "file").write_text("a file, not a folder\n")
    nan_weights = utils.load_checkpoint(root / "run" / "final.pt")  # as a run of an older version could leave it
    nan_weights["model"]["linear.bias"][2] = float("nan")
    (root / "nan_weights").mkdir()
    torch.save(nan_weights, root / "nan_weights" / "final.pt")
    # resumes that cannot continue exactly: final.pt lost (best.pt, metrics.csv kept); flags a parser refuses, in the
    # args.json of a run that saved no epoch (edited by hand) or in final.pt (an older version); no training state
    shutil.copytree(root / "run", root / "lost_final")
    (root / "lost_final" / "final.pt").unlink()
    for name, edit in (("edited_args", {"epochs": "2"}), ("unknown_loss", {"loss": "foo"}),
                       ("missing_flag", {"lr": None})):
        (root / name).mkdir()
        saved = {**json.loads((root / "run" / "args.json").read_text()), **edit}
        (root / name / "args.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "lr" or v}))
        (root / name / "metrics.csv").write_text((root / "run" / "metrics.csv").read_text().splitlines()[0] + "\n")
    old = utils.load_checkpoint(root / "run" / "final.pt")
    shutil.copytree(root / "run", root / "old_final")
    torch.save({**old, "args": {**old["args"], "arch": "resnet50"}}, root / "old_final" / "final.pt")
    shutil.copytree(root / "run", root / "no_state")
    torch.save({k: v for k, v in old.items() if k != "resume"}, root / "no_state" / "final.pt")
    yield {"root": root, "diverged": diverged.value}


def snapshot(root):
    """Every file under root with its content hash and modification time."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# (script, arguments, what the one line must say, exit status). {name} is a folder of the fixture above; {new} an
# --out-dir that must still not exist afterwards (or, for a run that diverged, hold only finite weights). Exit
# statuses: 2, argparse refused a flag; 1, bad input found later; 3, the run diverged.
BAD_INPUTS = {
    # every numeric flag: finite and in range
    "piat-lr-nan": ("train_piat.py", ["--lr", "nan"], "argument --lr: must be a finite number in [0, inf], got nan", 2),
    "piat-momentum": ("train_piat.py", ["--momentum", "1.5"], "argument --momentum: must be a finite number in [0, 1]",
                      2),
    "piat-weight-decay": ("train_piat.py", ["--weight-decay=-1e-4"], "argument --weight-decay: must be a finite", 2),
    "piat-alpha-fixed": ("train_piat.py", ["--alpha-fixed", "nan"], "argument --alpha-fixed: must be a finite", 2),
    "piat-alpha-b": ("train_piat.py", ["--alpha-b", "0"], "argument --alpha-b: must be a finite number in (0, inf)", 2),
    "piat-epsilon": ("train_piat.py", ["--epsilon", "300"], "argument --epsilon: must be a finite number in [0, 255]",
                     2),
    "piat-seed": ("train_piat.py", ["--seed", "-1"], "argument --seed: must be a finite number in [0, 4294967295]", 2),
    "piat-ema-one": ("train_piat.py", ["--ema", "1"], "argument --ema: must be a finite number in (0, 1), got 1", 2),
    "piat-piat-every-without-piat": ("train_piat.py", ["--no-piat", "--piat-every", "2"], "--piat-every needs --piat",
                                     2),
    "rdat-beta-final": ("train_rdat.py", ["--beta-final", "1.5"], "argument --beta-final: must be a finite number", 2),
    "rdat-ema-decay": ("train_rdat.py", ["--ema-decay", "nan"], "argument --ema-decay: must be a finite number", 2),
    "vit-lr": ("train_vit.py", ["--lr", "nan"], "argument --lr: must be a finite number", 2),
    "vit-grad-clip": ("train_vit.py", ["--grad-clip", "inf"], "argument --grad-clip: must be a finite number", 2),
    "vit-milestones": ("train_vit.py", ["--lr-milestones", "10", "nan"], "argument --lr-milestones: must be a "
                                                                         "finite number", 2),
    "vit-alpha-max": ("train_vit.py", ["--alpha-max", "2"], "argument --alpha-max: must be a finite number in [0, 1]",
                      2),
    "eval-epsilon": ("evaluate.py", ["{run}", "--epsilon", "nan"], "argument --epsilon: must be a finite number", 2),
    # every count a user types has a limit, checked before anything is spent
    "eval-eot-draws": ("evaluate.py", ["{run}", "--eot-draws", "1000000000"], "argument --eot-draws: must be a finite "
                                                                              "number in [1, 1000], got 1000000000", 2),
    "eval-sanity-restarts": ("evaluate.py", ["{run}", "--sanity", "--sanity-restarts", "1000000000"],
                             "argument --sanity-restarts: must be a finite number in [0, 100]", 2),
    "eval-landscape-steps": ("evaluate.py", ["{run}", "--landscape", "--landscape-steps", "100000"],
                             "argument --landscape-steps: must be a finite number in [1, 101]", 2),
    # sizes beyond the data
    "piat-train-size": ("train_piat.py", ["--train-size", "10000000"], "--train-size 10000000, but the data set has "
                                                                       "only 4000 images", 1),
    "rdat-eval-size": ("train_rdat.py", ["--eval-size", "5000"], "--eval-size 5000, but the data set has only 1000", 1),
    # a run that diverges: exit status 3; its folder keeps only finite weights (checked below)
    "piat-lr-1e38": ("train_piat.py", [*ONE_STEP, "--lr", "1e38", "--out-dir", "{new}"],
                     "diverged: the training loss is nan at epoch 2, step 1; ", 3),
    # image folders
    "piat-not-an-image": ("train_piat.py", ["--dataset", "imagefolder", "--data-dir", "{not_an_image}"],
                          "{not_an_image}/train/a/x.png is not a readable image", 1),
    "piat-class-only-in-test": ("train_piat.py", ["--dataset", "imagefolder", "--data-dir", "{extra_class}"],
                                "class folder 'c' is in {extra_class}/test but not in {extra_class}/train", 1),
    "piat-one-class": ("train_piat.py", ["--dataset", "imagefolder", "--data-dir", "{one_class}"],
                       "{one_class} holds one class", 1),
    "eval-not-an-image": ("evaluate.py", ["{run}/final.pt", "--dataset", "imagefolder", "--data-dir",
                                          "{not_an_image}", "--attacks", "clean", "--device", "cpu"],
                          "{not_an_image}/train/a/x.png is not a readable image", 1),
    # output folders and resumed runs: a folder that holds anything is never written into
    "piat-out-dir-holds-a-run": ("train_piat.py", [*TINY, "--out-dir", "{run}"],
                                 "--out-dir {run} is not empty; choose a new or empty folder, or continue its run with "
                                 "--resume {run}", 1),
    "rdat-out-dir-holds-a-piat-run": ("train_rdat.py", [*TINY, "--out-dir", "{run}"], "--out-dir {run} is not empty",
                                      1),
    "vit-out-dir-holds-my-files": ("train_vit.py", [*TINY_VIT, "--out-dir", "{mine}"], "--out-dir {mine} is not empty",
                                   1),
    "piat-out-dir-holds-my-files": ("train_piat.py", [*TINY, "--out-dir", "{mine}"],
                                    "--out-dir {mine} is not empty; choose a new or empty folder, or move them "
                                    "away", 1),
    "piat-out-dir-is-a-file": ("train_piat.py", [*TINY, "--out-dir", "{file}"], "--out-dir {file} is a file", 1),
    "rdat-resume-piat-run": ("train_rdat.py", ["--resume", "{run}"], "a run of train_piat.py, not train_rdat.py", 1),
    "piat-resume-my-files": ("train_piat.py", ["--resume", "{mine}/final.pt"], "--resume {mine}/final.pt: no run", 1),
    "piat-resume-lost-final": ("train_piat.py", ["--resume", "{lost_final}"], "--resume {lost_final}: final.pt is "
                               "missing but best.pt or metrics.csv hold saved epochs, so it cannot continue", 1),
    "piat-resume-edited-args": ("train_piat.py", ["--resume", "{edited_args}"], "--resume {edited_args}: its args.json "
                                "holds --epochs '2', which train_piat.py refuses; start a new run", 1),
    "piat-resume-unknown-loss": ("train_piat.py", ["--resume", "{unknown_loss}"], "holds --loss 'foo', which "
                                 "train_piat.py refuses", 1),
    "piat-resume-missing-flag": ("train_piat.py", ["--resume", "{missing_flag}"], "holds --lr None, which "
                                 "train_piat.py refuses (written by another version?)", 1),
    "piat-resume-old-final": ("train_piat.py", ["--resume", "{old_final}"], "--resume {old_final}: its final.pt holds "
                              "--arch 'resnet50', which train_piat.py refuses", 1),
    "piat-resume-no-state": ("train_piat.py", ["--resume", "{no_state}"], "{no_state}/final.pt holds no training "
                             "state to continue from", 1),
    "eval-nan-weights": ("evaluate.py", ["{nan_weights}/final.pt", "--device", "cpu"],
                         "{nan_weights}/final.pt holds weights that are not finite (linear.bias is nan)", 1),
    # devices
    "piat-sync-bn-on-cpu": ("train_piat.py", ["--sync-bn"], "--sync-bn needs one CUDA device per process", 1),
    "rdat-sync-bn-on-cpu": ("train_rdat.py", ["--sync-bn"], "--sync-bn needs one CUDA device per process", 1),
    "piat-device": ("train_piat.py", [*TINY[:-2], "--device", "gpu", "--out-dir", "{new}"],
                    "--device gpu is not a torch device", 1),
    "eval-device": ("evaluate.py", ["{run}", "--device", "cuda:99"], "--device cuda:99, but this machine has", 1),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_and_changes_nothing(case, folders, tmp_path):
    script, argv, message, code = BAD_INPUTS[case]
    names = {p.name: str(p) for p in folders["root"].iterdir()} | {"new": str(tmp_path / "new")}
    argv = [a.format(**names) if "{" in a and "}" in a and not a.startswith("{\"") else a for a in argv]
    if script != "evaluate.py" and "--out-dir" not in argv and "--resume" not in argv:
        argv = [*BASE[script], "--out-dir", names["new"], *argv]  # were the input accepted, the run would write here
    before = snapshot(folders["root"])
    result = run_script(SCRIPTS[script], *argv, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code and len(lines) == 1, result.stderr
    kind = "diverged" if code == 3 else "error"
    assert lines[0].startswith(f"{script}: {kind}: ") and message.format(**names) in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(folders["root"]) == before  # nothing that was written changed
    if code == 3:
        for name in ("best.pt", "final.pt"):
            assert weights_are_finite(utils.load_checkpoint(tmp_path / "new" / name)), name
    else:
        assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------ divergence


def weights_are_finite(checkpoint):
    return all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_a_diverged_run_keeps_its_last_finite_checkpoints_and_says_so(folders, tmp_path, capsys):
    """--lr 1e38 on one step per epoch (run as a script in the table above): epoch 1 ends with huge but finite
    weights; the first loss of epoch 2 is nan."""
    line, run = str(folders["diverged"]), folders["root"] / "diverged"
    assert re.match(r"the training loss is (nan|inf|-inf) at epoch 2, step 1; best.pt and final.pt keep epoch 1; "
                    r"start a new run with a lower --lr$", line), line
    for name in ("final.pt", "best.pt"):
        checkpoint = utils.load_checkpoint(run / name)
        assert checkpoint["epoch"] == 1 and weights_are_finite(checkpoint), name
    assert [r["epoch"] for r in read_metrics(run / "metrics.csv")] == [1]
    # evaluate.py measures it (into a copy: the folder stays as it was), with one line of warning
    copy = tmp_path / "diverged"
    shutil.copytree(run, copy)
    capsys.readouterr()
    ev.main([str(copy), "--attacks", "clean", "--n-examples", "16", "--device", "cpu"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert warnings == [f"evaluate.py: warning: {copy} did not finish: final.pt holds epoch 1 of 2"]


def poison_the_fourth_check(monkeypatch, module):
    """Make the last loss checked at the 4th step (epoch 2, step 2 of two-step epochs) nan, as if it diverged."""
    real, calls = utils.check_finite, []

    def poisoned(epoch, step, **losses):
        calls.append(1)
        if len(calls) == 4:
            name = list(losses)[-1]
            losses[name] = losses[name] * float("nan")
        return real(epoch, step, **losses)

    monkeypatch.setattr(module.utils, "check_finite", poisoned)


@pytest.mark.parametrize("script", ["train_piat.py", "train_rdat.py", "train_vit.py"])
def test_a_nan_loss_stops_every_training_script_before_it_saves(script, tmp_path, monkeypatch):
    """A nan loss at the second of the two steps of epoch 2 (RDAT: its natural learner's, the second loss it
    checks): the run stops there, and its checkpoints and metrics hold epoch 1."""
    module, flags = {"train_piat.py": (tp, TINY), "train_rdat.py": (tr, TINY), "train_vit.py": (tv, TINY_VIT)}[script]
    flags = [*flags, "--train-size", "64", "--batch-size", "32", "--eval-size", "16"]
    poison_the_fourth_check(monkeypatch, module)
    out = tmp_path / "run"
    with pytest.raises(utils.Diverged, match=r"the \w[\w ]* loss is nan at epoch 2, step 2; best.pt and final.pt keep "
                                             r"epoch 1") as stopped:
        module.main([*flags, "--epochs", "3", "--out-dir", str(out)])
    assert script != "train_rdat.py" or "natural" in str(stopped.value)
    for name in ("final.pt", "best.pt"):
        checkpoint = utils.load_checkpoint(out / name)
        assert checkpoint["epoch"] == 1 and weights_are_finite(checkpoint), name
    assert len(read_metrics(out / "metrics.csv")) == 1


def test_weights_that_turn_non_finite_are_never_saved(tmp_path, monkeypatch):
    """Non-finite weights at the end of an epoch (here planted by the interpolation of epoch 2) stop the run
    before anything of that epoch is written."""
    real = tp.piat_step_

    def poisoned(model, theta_prev, epoch, args):
        alpha, theta_prev = real(model, theta_prev, epoch, args)
        if epoch == 1:
            model.linear.bias.data[3] = float("inf")
        return alpha, theta_prev

    monkeypatch.setattr(tp, "piat_step_", poisoned)
    out = tmp_path / "run"
    with pytest.raises(utils.Diverged, match="linear.bias of the model is not finite at the end of epoch 2; best.pt "
                                             "and final.pt keep epoch 1"):
        tp.main([*ONE_STEP, "--epochs", "3", "--out-dir", str(out)])
    assert utils.load_checkpoint(out / "final.pt")["epoch"] == 1 and len(read_metrics(out / "metrics.csv")) == 1


def test_check_finite_names_the_loss_and_counts_from_one():
    utils.check_finite(0, 0, training_loss=torch.tensor(1.5))
    with pytest.raises(utils.Diverged, match="the robust loss is inf at epoch 3, step 8; best.pt and final.pt keep "
                                             "epoch 2"):
        utils.check_finite(2, 7, natural_loss=torch.tensor(0.3), robust_loss=torch.tensor(float("inf")))
    with pytest.raises(utils.Diverged, match="at epoch 1, step 1; nothing was saved"):
        utils.check_finite(0, 0, training_loss=torch.tensor(float("nan")))


# ------------------------------------------------------------------------------------------ stop signals

SIGNAL_RUN = [*TINY, "--epochs", "3", "--train-size", "256", "--batch-size", "16", "--no-amp"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    tp.main([*SIGNAL_RUN, "--out-dir", str(out)])
    return out


# train_piat.py as a user starts it, except that the first step of epoch 2 leaves a mark and waits 3 s: epoch 1's
# stop check has passed by then, so signals sent on the mark land in epoch 2 however loaded the machine is.
PAUSE_IN_EPOCH_2 = """
import os, runpy, sys, time
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import utils
real_batches = utils.epoch_batches
def epoch_batches(x, y, args, epoch, *more):
    for i, batch in enumerate(real_batches(x, y, args, epoch, *more)):
        if (epoch, i) == (1, 0):
            open(os.environ["EPOCH_2_MARK"], "w").close()
            time.sleep(3)
        yield batch
utils.epoch_batches = epoch_batches
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_and_signal(run, signums):
    """Start train_piat.py and send `signums`, one after another, in its second epoch. SIGINT as in a terminal, even
    where the suite itself runs in the background."""
    mark = run.parent / "epoch_2.mark"
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_EPOCH_2, tp.__file__, *SIGNAL_RUN, "--out-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1", "EPOCH_2_MARK": str(mark)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not mark.exists() and proc.poll() is None:
        time.sleep(0.02)
    for signum in signums:
        proc.send_signal(signum)
        time.sleep(0.2)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    return proc.returncode, lines


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR2])
def test_a_stop_signal_ends_the_run_after_the_epoch_with_the_command_that_resumes_it(signum, tmp_path,
                                                                                     uninterrupted):
    """Ctrl-C, SIGTERM (Slurm's warning before preemption) or SIGUSR2 in epoch 2: the epoch is finished and saved
    whole (checkpoints, its metrics row, curves.png), then one line with the exact --resume command and exit status
    128 + the signal's number; that command ends with the weights of a run never stopped."""
    run = tmp_path / "run"
    code, lines = start_and_signal(run, [signum])
    name = signal.Signals(signum).name
    assert code == 128 + signum and lines[-1].startswith(f"train_piat.py: interrupted by {name} after epoch 2; "
                                                         "continue from the last saved epoch with: "), lines
    assert lines[:-1] == [f"{name}: stopping once this epoch is saved (again to stop at once)"]
    assert utils.load_checkpoint(run / "final.pt")["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(run / "metrics.csv")] == [1, 2]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn as the run stops
    command = shlex.split(lines[-1].split("continue from the last saved epoch with: ", 1)[1])
    assert command == ["python", tp.__file__, "--resume", str(run)]
    tp.main(command[2:])  # in this process: one start-up less
    a, b = utils.load_checkpoint(uninterrupted / "final.pt"), utils.load_checkpoint(run / "final.pt")
    assert b["epoch"] == 3 and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    columns = ("epoch", "lr", "alpha", "train_loss", "test_clean_acc", "test_pgd20_acc")
    assert [{c: r[c] for c in columns} for r in read_metrics(run / "metrics.csv")] == \
        [{c: r[c] for c in columns} for r in read_metrics(uninterrupted / "metrics.csv")]


def test_a_second_signal_stops_at_once_and_final_pt_keeps_the_last_saved_epoch(tmp_path):
    run = tmp_path / "run"
    code, lines = start_and_signal(run, [signal.SIGINT, signal.SIGINT])
    assert code == 130 and lines[-1].startswith("train_piat.py: interrupted by SIGINT at once; continue from the last "
                                                "saved epoch with: "), lines
    assert utils.load_checkpoint(run / "final.pt")["epoch"] == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no half-written file


def test_the_signal_handlers_are_put_back(tmp_path):
    before = {s: signal.getsignal(s) for s in utils.STOP_SIGNALS}
    tp.main([*ONE_STEP, "--epochs", "1", "--out-dir", str(tmp_path / "run")])
    assert {s: signal.getsignal(s) for s in utils.STOP_SIGNALS} == before


@pytest.mark.parametrize("rank", [0, 1])
def test_a_torchrun_worker_ends_before_python_shutdown_and_only_rank_0_says_why(rank, root):
    # the process group is left before run_main prints, so the rank comes from torchrun's environment; the worker
    # ends with os._exit (gloo can abort in the interpreter's shutdown), so an atexit handler never runs
    code = ("import atexit, sys, utils; atexit.register(print, 'python shutdown'); "
            "stop = lambda: (_ for _ in ()).throw(utils.Interrupted(15, 'interrupted by SIGTERM after epoch 1')); "
            "status = utils.run_main(stop, 'train_piat.py'); print('not reached', status)")
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank)}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 128 + 15 and result.stdout == ""
    assert result.stderr == ("train_piat.py: interrupted by SIGTERM after epoch 1\n" if rank == 0 else "")
    result = subprocess.run([sys.executable, "-c", code.replace("utils.Interrupted(15, ", "utils.UserError(")],
                            cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "train_piat.py: error: interrupted by SIGTERM after epoch 1\n"  # a bad input: every rank
