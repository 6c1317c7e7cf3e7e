"""train_piat.py end to end on the synthetic set: outputs, every loss with and without PIAT, resume,
bad input, and the copy test."""

import json
import re
import shutil

import pytest
import torch

import train_piat as tp
import utils
from sweep import read_metrics
from conftest import TINY, kill_after_first_checkpoint, one_line_error, run_script


OUTPUTS = ["args.json", "best.pt", "curves.png", "final.pt", "metrics.csv", "tensorboard"]


def run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    tp.main([*TINY, "--out-dir", str(out), *map(str, extra)])
    return out


def test_two_epochs_write_every_output_and_learn(tmp_path):
    out = run(tmp_path, "--epochs", "2", "--train-size", "1024", "--eval-size", "256")
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    for column in tp.METRIC_FIELDS[:8] + ["epoch_seconds", "images_per_second"]:
        assert all(isinstance(r[column], (int, float)) for r in rows), column
    for r in rows:
        assert 0 <= r["test_pgd20_acc"] <= r["test_clean_acc"] <= 1
        assert r["images_per_second"] > 0 and r["epoch_seconds"] > 0
    assert [r["alpha"] for r in rows] == pytest.approx([0.1, 2 / 11])
    assert rows[-1]["test_clean_acc"] > 0.5  # chance is 0.1: the synthetic set is learnable in 2 epochs
    args = json.loads((out / "args.json").read_text())
    assert args["loss"] == "nmse" and args["piat"] is True and args["lam"] == 4.0
    final = utils.load_checkpoint(out / "final.pt")
    best = utils.load_checkpoint(out / "best.pt")
    assert final["epoch"] == 2 and final["args"]["arch"] == "small-cnn" and len(final["metrics"]) == 2
    best_epoch = max(rows, key=lambda r: r["test_pgd20_acc"])["epoch"]
    assert best["epoch"] == best_epoch and "resume" not in best
    # the checkpoint alone rebuilds the model, and it reproduces the logged accuracy
    model = utils.build_model(final["arch"], final["num_classes"], final["mean"], final["std"])
    model.load_state_dict(final["model"])
    data = utils.load_dataset("synthetic", None)
    idx = utils.fixed_subset(len(data.x_test), 256)
    x, y = utils.to_float(data.x_test[idx]), data.y_test[idx]
    model.eval()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert correct.float().mean().item() == pytest.approx(rows[-1]["test_clean_acc"], abs=1e-6)
    # the checkpoint keeps that evaluation per image, with the indices of the images in the test set
    assert final["per_image"]["indices"] == idx.tolist() and final["per_image"]["clean"] == correct.tolist()
    assert sum(final["per_image"]["pgd20"]) == round(256 * rows[-1]["test_pgd20_acc"])
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_piat_off_leaves_weights_uninterpolated(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(tp, "interpolate_", lambda *a: called.append(a))
    out = run(tmp_path, "--epochs", "2", "--no-piat")
    assert not called
    rows = read_metrics(out / "metrics.csv")
    assert [r["alpha"] for r in rows] == [0, 0]
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS


def test_piat_interpolates_with_the_previous_epochs_weights(tmp_path, monkeypatch):
    """Record the weights around each interpolation: theta_prev is the initial weights at t=0, then
    the previous epoch's interpolated weights; the fixed alpha is used when given."""
    seen = []
    real = tp.interpolate_

    def spy(model, prev_state, alpha):  # theta_prev
        before = {k: v.clone() for k, v in model.state_dict().items()}
        real(model, prev_state, alpha)
        seen.append((before, {k: v.clone() for k, v in prev_state.items()},
                     {k: v.clone() for k, v in model.state_dict().items()}, alpha))

    monkeypatch.setattr(tp, "interpolate_", spy)
    run(tmp_path, "--epochs", "2", "--alpha-fixed", "0.3")
    assert [s[3] for s in seen] == [0.3, 0.3]
    (_, _, after_0, _), (before_1, prev_1, after_1, _) = seen
    for k, v in after_0.items():
        assert torch.equal(prev_1[k], v)  # theta_prev of epoch 1 = interpolated weights of epoch 0
        if v.is_floating_point():
            assert torch.allclose(after_1[k], 0.3 * prev_1[k] + 0.7 * before_1[k], atol=1e-6)


@pytest.mark.parametrize("loss", tp.LOSSES)
@pytest.mark.parametrize("piat", ["--piat", "--no-piat"])
def test_every_loss_with_and_without_piat(tmp_path, loss, piat):
    out = run(tmp_path, "--epochs", "1", "--loss", loss, piat, "--mail-burn-in", "0")
    row = read_metrics(out / "metrics.csv")[0]
    assert row["train_loss"] == row["train_loss"] and row["train_loss"] > 0  # finite, positive
    assert row["alpha"] == (0.1 if piat == "--piat" else 0)
    assert utils.load_checkpoint(out / "final.pt")["args"]["loss"] == loss


def test_val_split_selects_best_on_held_out_images(tmp_path):
    out = run(tmp_path, "--epochs", "2", "--val-size", "64")
    rows = read_metrics(out / "metrics.csv")
    assert all(0 <= r["val_pgd20_acc"] <= 1 for r in rows)
    best_epoch = max(rows, key=lambda r: r["val_pgd20_acc"])["epoch"]
    assert utils.load_checkpoint(out / "best.pt")["epoch"] == best_epoch


def test_image_folder_dataset(tmp_path, monkeypatch):
    from PIL import Image

    x_train, y_train, x_test, y_test = utils.synthetic_images()
    keep_train, keep_test = (y_train < 3).nonzero()[:60, 0], (y_test < 3).nonzero()[:30, 0]
    data = utils.ImageData(x_train[keep_train], y_train[keep_train], x_test[keep_test], y_test[keep_test], 3)
    for split, xs, ys in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = tmp_path / "images" / split / f"class_{int(y)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    loaded = utils.load_dataset("imagefolder", tmp_path / "images")
    assert loaded.num_classes == 3 and loaded.x_train.shape == (60, 3, 32, 32) and loaded.x_test.dtype == torch.uint8
    assert sorted(torch.bincount(loaded.y_train).tolist()) == sorted(torch.bincount(data.y_train).tolist())
    out = tmp_path / "run"
    tp.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"), "--arch", "small-cnn", "--epochs", "1",
             "--pgd-steps", "1", "--eval-pgd-steps", "1", "--out-dir", str(out)])
    assert utils.load_checkpoint(out / "final.pt")["num_classes"] == 3
    # --eval-size defaults to 1000 test images, or all of them when there are fewer (here 30)
    assert utils.load_checkpoint(out / "final.pt")["args"]["eval_size"] == 30
    # --resume without --data-dir reads the images from where the run read them, not from ./data
    final = utils.load_checkpoint(out / "final.pt")
    final["args"]["epochs"] = 2
    torch.save(final, out / "final.pt")
    monkeypatch.chdir(tmp_path)
    tp.main(["--resume", str(out / "final.pt")])  # a checkpoint file resumes its folder
    assert utils.load_checkpoint(out / "final.pt")["epoch"] == 2


# fp32 here whatever the CPU (bf16 resumption: tests/test_speed.py)
RESUME_RUN = [*TINY, "--epochs", "4", "--train-size", "256", "--batch-size", "16", "--no-amp"]


def test_killed_run_resumes_to_the_same_final_weights(tmp_path):
    """Kill a run with SIGKILL in its second epoch, resume it, and compare with a run never stopped."""
    whole = tmp_path / "whole"
    tp.main([*RESUME_RUN, "--out-dir", str(whole)])
    killed = tmp_path / "killed"
    stopped_after = kill_after_first_checkpoint(tp.__file__, RESUME_RUN, killed)
    assert stopped_after < 4, "the run finished before it could be killed; make RESUME_RUN longer"
    assert len(read_metrics(killed / "metrics.csv")) <= stopped_after + 1
    result = run_script(tp.__file__, "--resume", killed)
    assert result.returncode == 0, result.stderr
    a, b = utils.load_checkpoint(whole / "final.pt"), utils.load_checkpoint(killed / "final.pt")
    assert b["epoch"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    rows_a, rows_b = read_metrics(whole / "metrics.csv"), read_metrics(killed / "metrics.csv")
    assert [r["epoch"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("lr", "alpha", "train_loss", "test_clean_acc", "test_pgd20_acc"):
            assert ra[key] == rb[key], key


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--epsilon", "-8"], "--epsilon: must be a finite number in [0, 255], got -8"),
    (["--pgd-steps", "-1"], "--pgd-steps: must be a finite number in [0, inf], got -1"),
    (["--batch-size", "0"], "--batch-size: must be a finite number in (0, inf), got 0"),
    (["--arch", "vgg"], "invalid choice: 'vgg'"),
    (["--alpha-fixed", "1.5"], "--alpha-fixed: must be a finite number in [0, 1], got 1.5"),
    (["--ema", "1"], "--ema: must be a finite number in (0, 1), got 1"),
    (["--ema", "0"], "--ema: must be a finite number in (0, 1), got 0"),
    (["--no-piat", "--piat-every", "2"], "--piat-every needs --piat"),
    (["--no-piat", "--alpha-fixed", "0.9"], "--alpha-fixed needs --piat"),
    (["--train-size", "10000000"], "--train-size 10000000, but the data set has only 4000 images for it"),
    (["--eval-size", "5000"], "--eval-size 5000, but the data set has only 1000 images for it"),
    (["--val-size", "4000"], "--val-size 4000, but the data set has only 3999 images for it"),
])
def test_bad_flags_get_one_line(tmp_path, flags, message):
    result = run_script(tp.__file__, *TINY, "--out-dir", tmp_path / "out", *flags)
    assert message in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_lr_zero_trains_but_warns(tmp_path):
    result = run_script(tp.__file__, *TINY, "--epochs", "1", "--lr", "0", "--out-dir", tmp_path / "out")
    assert result.returncode == 0 and "train_piat.py: warning: --lr 0 trains nothing" in result.stderr


def test_missing_data_without_network(tmp_path):
    # an unreachable proxy makes the download fail at once, whether or not this machine is online
    proxy = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
             "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = run_script(tp.__file__, "--dataset", "cifar10", "--data-dir", tmp_path / "data",
                        "--out-dir", tmp_path / "out", env=proxy)
    line = one_line_error(result)
    assert "cifar10 is not in" in line and str(tmp_path / "data") in line and "cifar-10-python.tar.gz" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()  # no empty folders left behind


def test_image_folder_without_splits(tmp_path):
    (tmp_path / "images" / "train" / "a").mkdir(parents=True)
    result = run_script(tp.__file__, "--dataset", "imagefolder", "--data-dir", tmp_path / "images")
    assert f"{tmp_path / 'images'}/test/<class>/" in one_line_error(result)


def test_resume_without_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script(tp.__file__, "--resume", tmp_path / "empty")
    assert f"--resume {tmp_path / 'empty'}: no run there" in one_line_error(result)


def test_resume_of_a_run_that_saved_no_epoch_starts_it_over(tmp_path):
    out = tmp_path / "run"
    args = tp.parse_args([*TINY, "--epochs", "1", "--out-dir", str(out)])
    utils.make_run_dir(args, "train_piat.py")  # what a run killed in its first epoch leaves: its args.json alone
    result = run_script(tp.__file__, "--resume", out)
    assert result.returncode == 0 and "saved no epoch yet: starting it over" in result.stdout, result.stderr
    assert utils.load_checkpoint(out / "final.pt")["epoch"] == 1


def test_resume_refuses_a_flag_the_run_disagrees_with(tmp_path):
    out = tmp_path / "run"
    utils.make_run_dir(tp.parse_args([*TINY, "--epochs", "1", "--out-dir", str(out)]), "train_piat.py")
    before = (out / "args.json").read_bytes()
    for typed, its in ((["--epochs", "2"], "--epochs 1"), (["--no-piat"], "--piat"), (["--ema", "0.9"], "no --ema"),
                       (["--out-dir", str(tmp_path / "other")], f"--out-dir {out}")):
        with pytest.raises(utils.UserError, match=re.escape(f"continues the run with its own flags ({its}); drop "
                                                            f"{' '.join(typed)}, or start a new run with it")):
            tp.main(["--resume", str(out), *typed])
    with pytest.raises(utils.UserError, match=re.escape("(--epochs 1); drop --epochs 2")):  # abbreviated as well
        tp.main(["--resume", str(out), "--epoch", "2"])
    assert sorted(p.name for p in out.iterdir()) == ["args.json"] and (out / "args.json").read_bytes() == before
    # the run's own values (sweep.py repeats them), --device and its own folder as --out-dir are accepted
    tp.main(["--resume", str(out), "--epochs", "1", "--device", "cpu", "--out-dir", str(out), "--seed=0"])
    assert utils.load_checkpoint(out / "final.pt")["epoch"] == 1


def test_truncated_and_foreign_checkpoints(tmp_path):
    out = run(tmp_path, "--epochs", "1")
    whole = (out / "final.pt").read_bytes()
    (out / "final.pt").write_bytes(whole[: len(whole) // 2])
    assert "not a readable checkpoint" in one_line_error(run_script(tp.__file__, "--resume", out))
    torch.save(utils.build_model("small-cnn", 10).state_dict(), out / "final.pt")  # a bare state_dict
    assert "not a checkpoint of this project" in one_line_error(run_script(tp.__file__, "--resume", out))
    args = json.loads((out / "args.json").read_text())  # another script's run: resumed by that script only
    (out / "args.json").write_text(json.dumps({**args, "script": "train_rdat.py"}))
    assert "a run of train_rdat.py, not train_piat.py" in one_line_error(run_script(tp.__file__, "--resume", out))


def test_an_existing_run_or_a_users_folder_is_never_overwritten(tmp_path):
    out = run(tmp_path, "--epochs", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = run_script(tp.__file__, *TINY, "--epochs", "1", "--out-dir", out)
    assert f"--out-dir {out} is not empty; choose a new or empty folder, or continue its run with --resume" in \
        one_line_error(result)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    mine = tmp_path / "mine"  # a folder of the user's own files, named like a run's
    mine.mkdir()
    for name in ("metrics.csv", "best.pt", "final.pt"):
        (mine / name).write_text(f"my own {name}\n")
    result = run_script(tp.__file__, *TINY, "--epochs", "1", "--out-dir", mine)
    assert f"--out-dir {mine} is not empty" in one_line_error(result)
    assert {p.name: p.read_text() for p in mine.iterdir()} == {n: f"my own {n}\n" for n in
                                                               ("metrics.csv", "best.pt", "final.pt")}


def test_atomic_checkpoint_survives_a_failed_write(tmp_path):
    path = tmp_path / "final.pt"
    utils.save_checkpoint({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        utils.save_checkpoint({"a": Unpicklable()}, path)
    assert torch.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["final.pt"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------ the copy test


def test_script_runs_when_copied_alone_into_an_empty_folder(tmp_path, root):
    for name in ("train_piat.py", "utils.py"):
        shutil.copy(root / name, tmp_path / name)
    result = run_script(tmp_path / "train_piat.py", *TINY, "--epochs", "1", cwd=tmp_path, env={"TQDM_DISABLE": "0"})
    assert result.returncode == 0, result.stderr
    assert " 1 epoch on 1 x cpu" in result.stdout.splitlines()[0]
    assert "epoch 1/1:" in result.stderr and "test pgd20:" in result.stderr  # progress, in a log too
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("synthetic__train_piat__0__")
    assert set(OUTPUTS) <= {p.name for p in run_dir.iterdir()}
