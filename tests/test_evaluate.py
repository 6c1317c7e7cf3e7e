"""evaluate.py: an undefended model falls to PGD-20/CW-20, AutoAttack equals pyautoattack run directly,
train_piat.py run folders, foreign ResNet-18 state_dicts, the Table I markdown, the loss landscape, and
bad input. Everything on the synthetic set with a narrow small-cnn (seconds on 2 CPU cores)."""

import json
import logging
import re
import shutil
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate as ev
import report
import train_piat
import utils
from sweep import read_metrics
from conftest import TINY, one_line_error, run_script

CPU = ["--device", "cpu"]


def checkpoint(model, data, epoch):
    """A checkpoint in train_piat.py's format, of an undefended (clean-trained) model."""
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "arch": "small-cnn",
            "model_kwargs": {"width": 8}, "num_classes": 10, "mean": data.mean, "std": data.std,
            "image_shape": data.image_shape, "metrics": [], "epoch": epoch, "script": "train_piat.py",
            "args": {"dataset": "synthetic", "data_dir": "./data", "image_size": None, "loss": "ce", "piat": False}}


@pytest.fixture(scope="module")
def undefended(tmp_path_factory):
    """A run folder holding a small-cnn (width 8, through the checkpoint's model_kwargs) trained on clean
    synthetic images for 6 epochs: best.pt after epoch 5, final.pt after epoch 6. About 10 s."""
    run = tmp_path_factory.mktemp("undefended")
    utils.seed_everything(0)
    data = utils.load_dataset("synthetic", None)
    x_train, y_train = data.x_train, data.y_train
    model = utils.build_model("small-cnn", 10, data.mean, data.std, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    epochs, batch = 6, 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=epochs * -(-len(x_train) // batch))
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(x_train), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(utils.to_float(utils.augment(x_train[idx]))), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if epoch + 1 >= epochs - 1:
            name = "best.pt" if epoch + 1 < epochs else "final.pt"
            utils.save_checkpoint(checkpoint(model, data, epoch + 1), run / name)
    return run


def rebuild(path):
    """The model of a checkpoint of this project, rebuilt by hand (not through evaluate.py)."""
    ck = utils.load_checkpoint(path)
    model = utils.build_model(ck["arch"], ck["num_classes"], ck["mean"], ck["std"], **ck["model_kwargs"])
    model.load_state_dict(ck["model"])
    return model.eval()


def synthetic_examples(n):
    """The n synthetic test images evaluate.py takes by default: sorted(utils.fixed_subset(1000, n))."""
    data = utils.load_dataset("synthetic", None)
    idx = utils.fixed_subset(len(data.x_test), n).sort().values
    return utils.to_float(data.x_test[idx]), data.y_test[idx]


def rows_by(results, *keys):
    """Result rows indexed by one key (row[key]) or several (a tuple)."""
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: r for r in results}


# ------------------------------------------------------------------------------------------ attacks


def test_undefended_model_falls_to_pgd20_cw20_and_autoattack(undefended, capsys):
    """All four attacks (the default) on best.pt and final.pt of a run folder; at 16/255 the clean-trained
    model keeps no robust accuracy while its clean accuracy is high."""
    out = ev.main([str(undefended), "--epsilon", "16", "--n-examples", "64", *CPU])
    assert out["outputs"] == [str(undefended / "eval.json")]
    saved = json.loads((undefended / "eval.json").read_text())
    rows = rows_by(saved["results"], "role", "attack")
    assert sorted(rows) == sorted((role, a) for role in ("best", "final") for a in ev.ATTACKS)
    for role in ("best", "final"):
        assert rows[role, "clean"]["accuracy"] >= 0.8, rows[role, "clean"]
        for attack in ("pgd20", "cw20", "aa"):
            row = rows[role, attack]
            assert row["accuracy"] <= 0.05, row
            assert row["epsilon"] == pytest.approx(16 / 255) and row["epsilon_255"] == 16
        for row in (rows[role, a] for a in ev.ATTACKS):
            assert row["n"] == 64 and row["correct"] == round(64 * row["accuracy"]) and row["seconds"] > 0
            assert row["checkpoint"] == str(undefended / f"{role}.pt") and row["dataset"] == "synthetic"
            assert row["subset"] == "fixed" and row["method"] == "PGD-AT" and row["arch"] == "small-cnn"
    assert rows["best", "clean"]["epoch"] == 5 and rows["final", "clean"]["epoch"] == 6
    assert rows["final", "aa"]["aa_version"] == "standard"
    assert rows["final", "aa"]["aa_attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert rows["final", "pgd20"]["steps"] == 20 and rows["final", "cw20"]["step_size_255"] == 2
    # the Table I row: Best, Final and |Best - Final| per attack, in the JSON and printed as markdown
    table = saved["table"][str(undefended)]
    clean = table["clean"]
    assert clean["best"] == rows["best", "clean"]["accuracy"] and clean["final"] == rows["final", "clean"]["accuracy"]
    assert clean["diff"] == pytest.approx(abs(clean["best"] - clean["final"]))
    printed = capsys.readouterr().out
    assert "| Clean Best | Clean Final | Clean Diff | PGD20 Best |" in printed
    row = f"| {undefended.name} | synthetic | PGD-AT | {100 * clean['best']:.2f} | {100 * clean['final']:.2f} |"
    assert row in printed


def test_attacks_stay_in_the_ball_and_raise_their_loss(undefended):
    model = rebuild(undefended / "final.pt")
    x, y = synthetic_examples(32)
    eps = 8 / 255
    for loss, objective in (("ce", lambda z: F.cross_entropy(z, y)), ("cw", lambda z: ev.cw_margin(z, y).mean())):
        x_adv = ev.pgd_attack(model, x, y, eps, 2 / 255, 20, loss=loss)
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            assert objective(model(x_adv)) > objective(model(x)) + 0.5
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert ev.cw_margin(logits, torch.tensor([0, 0])).tolist() == [-1.0, 3.0]


def test_autoattack_equals_pyautoattack_run_directly(undefended, tmp_path, caplog):
    """The same model, the same 24 images, version and seed: evaluate.py's AA accuracy is exactly the
    robust accuracy pyautoattack reports, and a strict share of the clean one (so the check has teeth)."""
    from pyautoattack import AutoAttack

    flags = ["--attacks", "clean,aa", "--aa-version", "custom", "--aa-attacks", "apgd-ce", "--epsilon", "2",
             "--n-examples", "24", "--out", str(tmp_path / "aa.json"), *CPU]
    rows = rows_by(ev.main([str(undefended / "final.pt"), *flags])["rows"], "attack")
    assert rows["aa"]["aa_version"] == "custom" and rows["aa"]["aa_attacks"] == ["apgd-ce"]

    model = rebuild(undefended / "final.pt")
    x, y = synthetic_examples(24)
    caplog.set_level(logging.DEBUG, logger="auto-attack")
    caplog.clear()  # only what the direct run logs
    adversary = AutoAttack(model, norm="Linf", eps=2 / 255, version="custom", attacks=["apgd-ce"], seed=0, device="cpu")
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=250)
    messages = [record.getMessage() for record in caplog.records if record.name == "auto-attack"]
    reported = [float(m[1]) for m in map(re.compile(r"robust accuracy: ([\d.]+)%$").match, messages) if m]
    direct = adversary.clean_accuracy(x_adv, y)
    assert reported == [pytest.approx(100 * direct, abs=0.005)]
    assert rows["aa"]["accuracy"] == direct
    assert 0 < rows["aa"]["accuracy"] < rows["clean"]["accuracy"]
    assert (x_adv - x).abs().max() <= 2 / 255 + 1e-6


def test_amp_is_opt_in_runs_the_model_in_bf16_and_is_marked(undefended, tmp_path, monkeypatch):
    """--amp: every attack sees the model through Bf16Autocast (bf16 inside, fp32 logits out), the rows
    say so and the table notes it; without it the model the attacks get is the fp32 one."""
    seen = []
    real = ev.attack_flags
    monkeypatch.setattr(ev, "attack_flags", lambda *a, **k: seen.append(a[0]) or real(*a, **k))
    flags = ["--attacks", "clean,pgd20", "--n-examples", "64", *CPU]
    fp32 = rows_by(ev.main([str(undefended / "final.pt"), *flags, "--out", str(tmp_path / "fp32.json")])["rows"],
                   "attack")
    bf16 = rows_by(ev.main([str(undefended / "final.pt"), *flags, "--amp", "--out", str(tmp_path / "bf16.json")])
                   ["rows"], "attack")
    assert not any(isinstance(m, ev.Bf16Autocast) for m in seen[:2])
    assert all(isinstance(m, ev.Bf16Autocast) for m in seen[2:]) and len(seen) == 4
    assert [r["amp"] for r in (*fp32.values(), *bf16.values())] == [False, False, True, True]
    assert abs(bf16["clean"]["accuracy"] - fp32["clean"]["accuracy"]) <= 0.05  # 64 images, bf16 logits round
    notes = json.loads((tmp_path / "bf16.json").read_text())["table"][str(undefended / "final.pt")]["notes"]
    assert notes == ["PGD20 in bf16"]

    wrapped = seen[2]
    dtypes = []
    first_conv = next(m for m in wrapped.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    x, _ = synthetic_examples(4)
    assert wrapped(x).dtype == torch.float32 and dtypes == [torch.bfloat16]


# ------------------------------------------------------------------------------------------ checkpoints


def test_train_piat_run_folder_rebuilds_its_model_and_data(tmp_path):
    """A train_piat.py run: the data set comes from the checkpoint, and on the subset train_piat.py
    evaluates every epoch (--subset fixed) the clean accuracy is the one its metrics.csv logged."""
    run = tmp_path / "run"
    train_piat.main([*TINY, "--epochs", "2", "--out-dir", str(run)])
    rows = rows_by(ev.main([str(run), "--attacks", "clean", "--n-examples", "32", *CPU])["rows"], "role")
    metrics = read_metrics(run / "metrics.csv")
    best_epoch = max(metrics, key=lambda m: m["test_pgd20_acc"])["epoch"]
    assert rows["final"]["accuracy"] == pytest.approx(metrics[-1]["test_clean_acc"], abs=1e-6)
    assert rows["best"]["accuracy"] == pytest.approx(metrics[best_epoch - 1]["test_clean_acc"], abs=1e-6)
    assert rows["final"]["dataset"] == "synthetic" and rows["final"]["method"] == "PIAT + NMSE"
    assert rows["best"]["epoch"] == best_epoch and rows["final"]["epoch"] == 2
    assert (run / "eval.json").is_file()


def test_a_run_that_did_not_finish_is_measured_with_one_line_of_warning(undefended, tmp_path, capsys):
    """final.pt of a run that diverged or was stopped holds an earlier epoch than the run's --epochs: its Final
    column is not the paper's, and evaluate.py says so (and measures it all the same); a finished run is quiet."""
    for epochs, warnings in ((10, ["final.pt holds epoch 6 of 10"]), (6, [])):
        run = tmp_path / f"of_{epochs}"
        run.mkdir()
        for name in ("best.pt", "final.pt"):
            saved = utils.load_checkpoint(undefended / name)
            utils.save_checkpoint({**saved, "args": {**saved["args"], "epochs": epochs}}, run / name)
        capsys.readouterr()
        rows = ev.main([str(run), "--attacks", "clean", "--n-examples", "16", *CPU])["rows"]
        assert [r["role"] for r in rows] == ["best", "final"]
        printed = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert printed == [f"evaluate.py: warning: {run} did not finish: {w}" for w in warnings]


def test_identical_best_and_final_are_measured_once(tmp_path, monkeypatch):
    """When best.pt is the final epoch, its weights equal final.pt's: each number is computed once and
    recorded for both, exactly (the seed is reset before every measurement)."""
    run = tmp_path / "run"
    train_piat.main([*TINY, "--epochs", "1", "--out-dir", str(run)])  # one epoch: best = final
    calls = []
    real = ev.attack_flags
    monkeypatch.setattr(ev, "attack_flags", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    result = ev.main([str(run), "--attacks", "clean,pgd20", "--n-examples", "32", *CPU])
    rows = rows_by(result["rows"], "role", "attack")
    assert calls == [None, "ce"]  # clean, then PGD on the cross-entropy: once each
    for attack in ("clean", "pgd20"):
        assert rows["final", attack]["accuracy"] == rows["best", attack]["accuracy"]
        assert rows["final", attack]["same_weights_as"] == str(run / "best.pt")
    alone = ev.main([str(run / "final.pt"), "--attacks", "pgd20", "--n-examples", "32", *CPU])["rows"]
    assert alone[0]["correct"] == rows["final", "pgd20"]["correct"]  # what measuring final.pt itself gives


def test_foreign_resnet18_state_dicts_load_in_every_wrapping(tmp_path):
    """The CIFAR ResNet-18 layout of TRADES, MART and AutoAttack's example: bare, under "state_dict"
    with DataParallel's "module." prefixes, under "net", and beside other entries under "model"."""
    torch.manual_seed(1)
    reference = utils.build_model("resnet18", 10)
    for module in reference.modules():  # non-trivial BatchNorm statistics, so that they must load too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = reference.state_dict()
    variants = {"bare": state, "dataparallel": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
                "net": {"net": state}, "model": {"model": state, "epoch": 100, "acc": 0.5}}
    for name, obj in variants.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        path = tmp_path / f"{name}.pt"
        model, info = ev.load_model(path, ev.parse_args([str(path), "--arch", "resnet18"]))
        assert info["kind"] == "state_dict" and info["num_classes"] == 10, name
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), (name, key)
        assert model.normalize.mean.flatten().tolist() == [0, 0, 0]  # raw [0, 1] input
        assert model.normalize.std.flatten().tolist() == [1, 1, 1]
    # a model that normalises its input with CIFAR-10's statistics says so with a flag
    args = ev.parse_args([str(tmp_path / "bare.pt"), "--arch", "resnet18", "--input-normalization", "cifar10"])
    model, _ = ev.load_model(tmp_path / "bare.pt", args)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(utils.CHANNEL_STATS["cifar10"][0])
    # end to end: its clean accuracy on the evaluated images is the one computed by hand
    out = ev.main([str(tmp_path / "dataparallel.pt"), "--arch", "resnet18", "--dataset", "synthetic",
                   "--attacks", "clean", "--n-examples", "16", *CPU])
    x, y = synthetic_examples(16)
    with torch.no_grad():
        by_hand = (reference.eval()(x).argmax(1) == y).float().mean().item()
    assert out["rows"][0]["accuracy"] == by_hand and out["rows"][0]["role"] == "checkpoint"
    assert out["outputs"] == [str(tmp_path / "dataparallel.eval.json")]


@pytest.mark.skipif(find_spec("pyautoattack") is None, reason="pyautoattack not installed")
def test_autoattacks_published_example_model_fits_resnet18():
    path = Path(find_spec("pyautoattack").origin).parent / "examples" / "model_test.pt"
    if not path.is_file():
        pytest.skip("this pyautoattack ships no example model")
    model, info = ev.load_model(path, ev.parse_args([str(path), "--arch", "resnet18"]))
    assert info["num_classes"] == 10
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# ------------------------------------------------------------------------------------------ Table I


def fake_results(run, dataset, method, best, final, n=10000):
    """An eval.json with known numbers: best/final = {attack: accuracy}."""
    rows = [{"run": str(run), "role": role, "attack": attack, "accuracy": acc, "n": n, "dataset": dataset,
             "method": method, "epsilon_255": 0 if attack == "clean" else 8, "aa_version": "standard"}
            for role, accs in (("best", best), ("final", final)) for attack, acc in accs.items()]
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"script": "evaluate.py", "results": rows}))


def test_table_gathers_runs_like_table_i(tmp_path, capsys):
    # the paper's CIFAR-10 rows for PGD-AT and PIAT + NMSE (Table I), as two runs' results
    fake_results(tmp_path / "pgdat", "cifar10", "PGD-AT",
                 {"clean": .8428, "pgd20": .5029, "cw20": .4931, "aa": .4633},
                 {"clean": .8562, "pgd20": .4586, "cw20": .4325, "aa": .4136})
    fake_results(tmp_path / "piat", "cifar10", "PIAT + NMSE",
                 {"clean": .8096, "pgd20": .5374, "cw20": .5172},
                 {"clean": .8284, "pgd20": .5281, "cw20": .5049}, n=500)
    ev.main(["--table", str(tmp_path / "pgdat"), str(tmp_path / "piat" / "eval.json"), "--out", str(tmp_path / "t.md")])
    heading, blank, *lines = (tmp_path / "t.md").read_text().splitlines()
    assert [heading, blank, *lines[:4]] == capsys.readouterr().out.splitlines()[:6]
    assert heading == "**Threat model: L-inf eps 8/255**" and blank == "" and len(lines) == 5
    assert lines[4].startswith("<!-- written by evaluate.py --table; sha256 ")  # tells it from a file of the user's
    assert lines[0] == ("| Run | Dataset | Method | Clean Best | Clean Final | Clean Diff | PGD20 Best | PGD20 Final | "
                        "PGD20 Diff | CW Best | CW Final | CW Diff | AA Best | AA Final | AA Diff | n | notes |")
    assert lines[1] == "|" + "---|" * 17
    assert lines[2] == ("| pgdat | cifar10 | PGD-AT | 84.28 | 85.62 | 1.34 | 50.29 | 45.86 | 4.43 | 49.31 | 43.25 | "
                        "6.06 | 46.33 | 41.36 | 4.97 | 10000 |  |")
    assert lines[3] == ("| piat | cifar10 | PIAT + NMSE | 80.96 | 82.84 | 1.88 | 53.74 | 52.81 | 0.93 | 51.72 | "
                        "50.49 | 1.23 | – | – | – | 500 |  |")


# ------------------------------------------------------------------------------------------ landscape


def test_filter_normalized_directions():
    model = utils.build_model("small-cnn", 10, width=8)
    generator = torch.Generator().manual_seed(0)
    d1, d2 = report.filter_normalized_direction(model, generator), report.filter_normalized_direction(model, generator)
    for name, w in model.named_parameters():
        if w.dim() == 1:
            assert not d1[name].any(), name  # biases and BatchNorm parameters stay put
        else:
            assert torch.allclose(d1[name].flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1), rtol=1e-4), name
            assert not torch.allclose(d1[name], d2[name])


def test_landscape_on_a_tiny_model(undefended, tmp_path):
    out = ev.main([str(undefended / "final.pt"), "--landscape", "--landscape-steps", "3", "--landscape-range", "0.5",
                   "--landscape-batch", "16", "--landscape-pgd-steps", "2", "--out", str(tmp_path / "l.json"), *CPU])
    assert out["rows"] == []  # --landscape alone measures no attack
    grid = np.load(tmp_path / "final.landscape.npz")
    assert grid["a"].tolist() == grid["b"].tolist() == [-0.5, 0.0, 0.5]
    loss, accuracy = grid["loss"], grid["accuracy"]
    assert loss.shape == accuracy.shape == (3, 3) and np.isfinite(loss).all() and (loss > 0).all()
    assert ((accuracy >= 0) & (accuracy <= 1)).all()
    # the centre is the trained model itself: its PGD-2 adversarial cross-entropy on the same 16 images
    model = rebuild(undefended / "final.pt")
    x, y = synthetic_examples(1000)
    utils.seed_everything(0)
    x_adv = ev.pgd_attack(model, x[:16], y[:16], 8 / 255, 2 / 255, 2)
    with torch.no_grad():
        assert loss[1, 1] == pytest.approx(F.cross_entropy(model(x_adv), y[:16]).item(), rel=1e-5)
    assert loss.max() > loss[1, 1]  # half a filter-norm away the model is worse
    png = (tmp_path / "final.landscape.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (entry,) = json.loads((tmp_path / "l.json").read_text())["landscapes"]
    assert entry["npz"] == str(tmp_path / "final.landscape.npz") and entry["loss_center"] == pytest.approx(loss[1, 1])
    # the weights are put back afterwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report.loss_landscape(model, x[:8], y[:8], 8 / 255, 2 / 255, 1, np.array([-1.0, 1.0]), 0, 8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_gets_one_line(tmp_path, undefended):
    script = Path(ev.__file__)
    # a missing file
    missing = run_script(script, tmp_path / "missing.pt")
    assert "no checkpoint or run folder at" in one_line_error(missing, "evaluate.py")
    # a plain state_dict of another architecture
    torch.save(utils.build_model("small-cnn", 10).state_dict(), tmp_path / "cnn.pt")
    line = one_line_error(run_script(script, tmp_path / "cnn.pt", "--arch", "resnet18", *CPU), "evaluate.py")
    assert f"checkpoint {tmp_path / 'cnn.pt'} does not fit resnet18: " in line and "missing keys (conv1.weight" in line
    # a checkpoint of this project whose weights belong to another architecture
    foreign = utils.load_checkpoint(undefended / "final.pt")
    foreign["model"] = utils.build_model("resnet18", 10).state_dict()
    torch.save(foreign, tmp_path / "mixed.pt")
    assert "does not fit small-cnn: " in one_line_error(run_script(script, tmp_path / "mixed.pt", *CPU), "evaluate.py")
    # a folder without checkpoints
    (tmp_path / "empty").mkdir()
    assert "holds neither best.pt nor final.pt" in one_line_error(run_script(script, tmp_path / "empty"), "evaluate.py")


def test_more_bad_input_in_process(tmp_path, undefended, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's one line, exit code 2
        ev.main([str(undefended), "--attacks", "clean,fgsm"])
    assert exit_.value.code == 2 and "argument --attacks: unknown 'fgsm'" in capsys.readouterr().err
    with pytest.raises(utils.UserError, match="is not a run folder or results: give run folders or the JSON files"):
        ev.main(["--table", str(tmp_path)])  # a folder that is no run: no advice to evaluate it
    (tmp_path / "run").mkdir()
    shutil.copy(undefended / "final.pt", tmp_path / "run" / "final.pt")
    with pytest.raises(utils.UserError, match=f"no results at {tmp_path / 'run' / 'eval.json'}; run evaluate.py"):
        ev.main(["--compare", str(tmp_path / "run"), str(undefended)])
    with pytest.raises(utils.UserError, match="--aa-attacks needs --aa-version custom"):
        ev.main([str(undefended), "--aa-attacks", "apgd-ce"])
    whole = (undefended / "final.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(utils.UserError, match="not a readable checkpoint"):
        ev.main([str(tmp_path / "half.pt"), *CPU])
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")  # neither a zip archive nor a pickle
    for extra in ([], ["--arch", "resnet18"]):
        with pytest.raises(utils.UserError, match=r"notes.txt is not a checkpoint at all \(a text file"):
            ev.main([str(tmp_path / "notes.txt"), *extra, *CPU])
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(utils.UserError, match=r"empty.pt is not a checkpoint at all \(empty"):
        ev.main([str(tmp_path / "empty.pt"), *CPU])
    with pytest.raises(utils.UserError, match="is a checkpoint of this project"):
        ev.main([str(undefended / "best.pt"), "--arch", "small-cnn", *CPU])
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "nothing.pt")
    with pytest.raises(utils.UserError, match="holds no state_dict"):
        ev.main([str(tmp_path / "nothing.pt"), "--arch", "resnet18", *CPU])
    with pytest.raises(utils.UserError, match="has 10 outputs but imagefolder has 3 classes"):
        images = tmp_path / "images"
        for split in ("train", "test"):
            for c in range(3):
                (images / split / f"c{c}").mkdir(parents=True)
                utils_png(images / split / f"c{c}" / "0.png")
        ev.main([str(undefended / "final.pt"), "--dataset", "imagefolder", "--data-dir", str(images), *CPU])
    with pytest.raises(utils.UserError, match="--n-examples 2000 but the test set holds 1000"):
        ev.main([str(undefended / "final.pt"), "--n-examples", "2000", *CPU])


def utils_png(path):
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8)).save(path)


def test_script_runs_when_copied_alone_into_an_empty_folder(tmp_path, root, undefended):
    for name in ("evaluate.py", "utils.py"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copy(undefended / "final.pt", tmp_path / "model.pt")
    result = run_script(tmp_path / "evaluate.py", "model.pt", "--attacks", "clean", "--n-examples", "16", *CPU,
                        cwd=tmp_path, )
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "model.eval.json").read_text())
    assert [r["attack"] for r in saved["results"]] == ["clean"] and saved["results"][0]["n"] == 16


# ------------------------------------------------------------------------------------------ a user's own defence

DEFENCES = '''
import torch
import torch.nn as nn
import utils


def trained():
    ck = utils.load_checkpoint(r"{final}")
    net = utils.build_model(ck["arch"], ck["num_classes"], ck["mean"], ck["std"], **ck["model_kwargs"])
    net.load_state_dict(ck["model"])
    return net


class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = trained()

    def forward(self, x):
        return self.net(x)


class Noisy(nn.Module):  # a randomised defence: fresh input noise at every forward pass
    def __init__(self):
        super().__init__()
        self.net = trained()

    def forward(self, x):
        return self.net((x + 0.03 * torch.randn_like(x)).clamp(0, 1))


def identity():
    return Identity()


def noisy():
    return Noisy()


def probabilities_of_three():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))


def images_out():
    return nn.Identity()


def for_other_images():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 10))


def not_a_module():
    return dict(trained().state_dict())


def raises():
    raise ValueError("my own mistake")


class NaNLogits(nn.Module):
    def forward(self, x):
        return torch.full((len(x), 10), float("nan"))


class Numpy(nn.Module):  # runs without gradients only (the clean pass), not under an attack
    def __init__(self):
        super().__init__()
        self.net = trained()

    def forward(self, x):
        return self.net(torch.from_numpy(x.numpy()))


class NoGradient(nn.Module):  # logits without autograd: PGD cannot move the images
    def __init__(self):
        super().__init__()
        self.net = trained()

    def forward(self, x):
        with torch.no_grad():
            return self.net(x)


def nan_logits():
    return NaNLogits()


def needs_no_grad():
    return Numpy()


def no_gradient():
    return NoGradient()


not_callable = 42
'''


@pytest.fixture(scope="module")
def defences(undefended, tmp_path_factory):
    folder = tmp_path_factory.mktemp("defences")
    (folder / "defences.py").write_text(DEFENCES.replace("{final}", str(undefended / "final.pt")))
    return folder / "defences.py"


def test_an_identity_wrapper_through_model_reproduces_the_checkpoints_numbers(undefended, defences, tmp_path):
    flags = ["--attacks", "clean,pgd20,cw20", "--n-examples", "64", *CPU]
    by_checkpoint = rows_by(ev.main([str(undefended / "final.pt"), *flags, "--out", str(tmp_path / "a.json")])["rows"],
                            "attack")
    by_model = rows_by(ev.main(["--model", f"{defences}:identity", "--dataset", "synthetic", *flags])["rows"], "attack")
    assert set(by_model) == {"clean", "pgd20", "cw20"}  # deterministic: no EOT row
    for attack, row in by_model.items():
        assert row["accuracy"] == by_checkpoint[attack]["accuracy"] and row["per_image"] == \
            by_checkpoint[attack]["per_image"], attack
        assert row["method"] == "defences.py:identity" and row["run"].endswith("defences.py:identity")
        assert row["flags"] == {"model": row["run"]} and not row["no_gradient"]
    saved = json.loads(defences.with_suffix(".eval.json").read_text())  # FILE.eval.json, the usual layout
    assert {r["attack"] for r in saved["results"]} == {"clean", "pgd20", "cw20"} and "table" in saved


def test_a_random_model_gets_eot_pgd_beside_pgd20(defences):
    rows = rows_by(ev.main(["--model", f"{defences}:noisy", "--dataset", "synthetic", "--attacks", "clean,pgd20",
                            "--n-examples", "32", "--eot-draws", "4", *CPU])["rows"], "attack")
    assert set(rows) == {"clean", "pgd20", "eot20"} and rows["eot20"]["draws"] == 4
    assert 0 <= rows["eot20"]["accuracy"] <= rows["clean"]["accuracy"] + 0.2
    assert len(rows["eot20"]["per_image"]) == 32


@pytest.mark.parametrize("name,message", [
    ("missing", "defines no missing() to call"),
    ("not_callable", "defences.py's not_callable is of type int, not a function to call"),
    ("not_a_module", "not_a_module() returned a dict, not a torch.nn.Module"),
    ("images_out", "maps 8 test images to (8, 3, 32, 32), not finite logits of shape (8, classes)"),
    ("nan_logits", "maps 8 test images to (8, 10) holding nan or inf, not finite logits of shape (8, classes)"),
    ("for_other_images", "fails on images of shape (8, 3, 32, 32) in [0, 1] with gradients on (as attacks run it): "
                         "RuntimeError: mat1 and mat2 shapes"),
    ("needs_no_grad", "with gradients on (as attacks run it): RuntimeError: Can't call numpy() on Tensor that requires "
                      "grad"),
    ("probabilities_of_three", "has 3 outputs but synthetic has 10 classes"),
    ("raises", "ValueError while building it: my own mistake")])
def test_a_users_model_that_does_not_fit_gets_one_line(defences, name, message):
    result = run_script(ev.__file__, "--model", f"{defences}:{name}", "--dataset", "synthetic", "--attacks", "clean",
                        "--n-examples", "8", *CPU)
    assert message in one_line_error(result, "evaluate.py") and "Traceback" not in result.stderr


def test_a_model_without_input_gradient_is_warned_about_in_the_table_itself(defences, tmp_path, capsys):
    result = ev.main(["--model", f"{defences}:no_gradient", "--dataset", "synthetic", "--attacks", "clean,pgd20",
                      "--n-examples", "32", "--out", str(tmp_path / "e.json"), *CPU])
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert warning == [f"evaluate.py: warning: --model {defences}:no_gradient: its logits have no input gradient, so "
                       "PGD-20 and CW-20 cannot move the images (they equal clean); attack it with Square or "
                       "AutoAttack, see --sanity"]
    rows = rows_by(result["rows"], "attack")
    assert rows["pgd20"]["per_image"] == rows["clean"]["per_image"] and rows["pgd20"]["no_gradient"]
    assert "no input gradient: PGD/CW cannot attack |" in captured.out  # the table's notes column


def test_model_refuses_a_missing_file_and_a_spec_without_name(tmp_path):
    assert f"no file {tmp_path / 'none.py'}" in one_line_error(run_script(ev.__file__, "--model",
                                                                          f"{tmp_path / 'none.py'}:build"))
    assert "give FILE.py:NAME" in one_line_error(run_script(ev.__file__, "--model", str(tmp_path / "none.py")))


def test_a_single_class_subset_is_warned_about(undefended, capsys):
    data = utils.load_dataset("synthetic", None)
    first_class = int(data.y_test[0])
    n = int((data.y_test != first_class).nonzero()[0, 0])  # the first n test images share one class
    ev.main([str(undefended / "final.pt"), "--attacks", "clean", "--n-examples", str(n), "--subset", "first", *CPU])
    assert "hold a single class: every accuracy on them is meaningless" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ comparisons


def test_rows_keep_per_image_correctness_in_test_set_order(undefended, tmp_path):
    rows = ev.main([str(undefended), "--attacks", "clean,pgd20", "--n-examples", "40", "--out",
                    str(tmp_path / "e.json"), *CPU])["rows"]
    x, y = synthetic_examples(40)
    with torch.no_grad():
        correct = (rebuild(undefended / "final.pt")(x).argmax(1) == y).int().tolist()
    final = rows_by(rows, "role", "attack")
    assert final[("final", "clean")]["per_image"] == correct
    assert final[("final", "clean")]["indices"] == utils.fixed_subset(1000, 40).sort().values.tolist()
    for row in rows:
        assert sum(row["per_image"]) == row["correct"] and len(row["per_image"]) == 40


def test_compare_reports_the_difference_its_interval_and_the_exact_mcnemar_p(undefended, tmp_path):
    """Two methods (a second run: the same weights under another method's name, one image flipped by hand in its
    results): the printed difference and p are recomputed here from eval.json's per-image results."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(undefended, a, ignore=shutil.ignore_patterns("*.json", "*.npz", "*.png"))  # the weights alone
    ev.main([str(a), "--attacks", "clean,pgd20", "--n-examples", "200", *CPU])
    shutil.copytree(a, b)
    saved = json.loads((b / "eval.json").read_text())
    for row in saved["results"]:
        row["method"], row["run"], row["flags"] = "Other", str(b), {**row["flags"], "loss": "other"}
        flags = row["per_image"]
        right, wrong = [i for i, f in enumerate(flags) if f][:6], [i for i, f in enumerate(flags) if not f][:1]
        for i in right:  # six right answers become wrong, and one wrong answer right
            flags[i] = 0
        for i in wrong:
            flags[i] = 1
        row["accuracy"] = sum(flags) / len(flags)
    (b / "eval.json").write_text(json.dumps(saved))
    result = ev.main(["--compare", str(a), str(b), "--out", str(tmp_path / "cmp.json")])
    written = json.loads((tmp_path / "cmp.json").read_text())
    assert written["reference"] == "PGD-AT" and len(written["comparisons"]) == 4
    for c in written["comparisons"]:
        assert {"diff", "ci_low", "ci_high", "p_value"} <= set(c)
        assert c["diff"] == pytest.approx(-5 / 200) and c["ci_low"] < c["diff"] < c["ci_high"] <= 0
        assert (c["only_reference"], c["only_other"]) == (6, 1)
        assert c["p_value"] == pytest.approx(2 * sum(math_comb(7, k) for k in range(2)) / 2 ** 7)  # exact binomial
    assert "| Other | PGD-AT | final | PGD20 (L-inf eps 8/255) |" in result["table"]


def test_a_p_value_below_0_05_never_prints_as_0_05():
    assert [report.p_text(p) for p in (0.0499, 0.04996, 0.05, 0.054, 0.0016, 9.4e-18, 1.0)] == [
        "0.0499 *", "0.04996 *", "0.05", "0.054", "0.0016 *", "9.4e-18 *", "1"]
    assert report.p_text(0.0499, 3) == "0.0499 *" and report.p_text(0.123456, 3) == "0.123"


def math_comb(n, k):
    import math

    return math.comb(n, k)


def test_compare_over_seeds_adds_a_t_interval_and_refuses_other_images(undefended, tmp_path):
    runs = []
    for name, method, shift in (("a0", "A", 0), ("a1", "A", 1), ("b0", "B", 2), ("b1", "B", 3)):
        run = tmp_path / name
        shutil.copytree(undefended, run)
        rows = [{"run": str(run), "role": "final", "attack": "clean", "method": method, "dataset": "synthetic",
                 "indices": list(range(50)), "per_image": [int((i + shift) % 3 > 0) for i in range(50)],
                 "accuracy": 0.0}]
        (run / "eval.json").write_text(json.dumps({"results": rows}))
        runs.append(run)
    (c,) = ev.main(["--compare", *map(str, runs)])["comparisons"]
    per_seed = [[(i + s) % 3 > 0 for i in range(50)] for s in range(4)]
    acc = [sum(f) / 50 for f in per_seed]
    assert c["seeds"] == [2, 2] and c["diff"] == pytest.approx((acc[2] + acc[3] - acc[0] - acc[1]) / 2)
    assert c["t_low"] is not None and c["t_low"] <= c["diff"] <= c["t_high"]
    rows = json.loads((runs[3] / "eval.json").read_text())
    rows["results"][0]["indices"] = list(range(1, 51))
    (runs[3] / "eval.json").write_text(json.dumps(rows))
    result = run_script(ev.__file__, "--compare", *runs)
    assert "were not evaluated on the same images" in one_line_error(result, "evaluate.py")


@pytest.fixture(scope="module")
def configurations(undefended, tmp_path_factory):
    """Three evaluated runs of PIAT + NMSE (the same weights): lam 1 with seeds 0 and 1, lam 4 with seed 0."""
    root, runs = tmp_path_factory.mktemp("configurations"), []
    for name, seed, lam in (("lam1_s0", 0, 1.0), ("lam1_s1", 1, 1.0), ("lam4_s0", 0, 4.0)):
        (root / name).mkdir()
        for role in ("best", "final"):
            ck = utils.load_checkpoint(undefended / f"{role}.pt")
            ck["args"] = {**ck["args"], "loss": "nmse", "piat": True, "lam": lam, "seed": seed,
                          "out_dir": str(root / name)}
            utils.save_checkpoint(ck, root / name / f"{role}.pt")
        ev.main([str(root / name), "--attacks", "clean,pgd20", "--n-examples", "40", *CPU])
        runs.append(root / name)
    return runs


def test_compare_pairs_the_seeds_of_a_configuration_and_names_configurations_by_their_flags(configurations, tmp_path):
    """Runs that differ only in --seed are seeds of one configuration; two values of lam of one method, same seed,
    are two configurations, named by the flag in which they differ, and compared."""
    lam1_s0, lam1_s1, lam4_s0 = map(str, configurations)
    result = ev.main(["--compare", lam1_s0, lam1_s1, lam4_s0, "--out", str(tmp_path / "cmp.json")])
    assert {(c["method"], c["reference"], tuple(c["seeds"])) for c in result["comparisons"]} == {
        ("PIAT + NMSE (lam=4)", "PIAT + NMSE (lam=1)", (2, 1))}
    assert len(result["comparisons"]) == 4 and all(c["diff"] == 0 for c in result["comparisons"])  # same weights
    written = json.loads((tmp_path / "cmp.json").read_text())
    assert written["configurations"] == {"PIAT + NMSE (lam=1)": [lam1_s0, lam1_s1], "PIAT + NMSE (lam=4)": [lam4_s0]}
    assert "seeds: PIAT + NMSE (lam=1) 2, PIAT + NMSE (lam=4) 1" in result["table"]
    ev.main(["--compare", lam4_s0, lam1_s0, "--out", str(tmp_path / "cmp.json")])  # its own output: replaced
    assert json.loads((tmp_path / "cmp.json").read_text())["reference"] == "PIAT + NMSE (lam=4)"
    with pytest.raises(utils.UserError, match=r"the 2 given are seeds of one \(PIAT \+ NMSE\)"):
        ev.main(["--compare", lam1_s0, lam1_s1])


def test_compare_refuses_results_not_measured_alike_in_one_line(configurations, tmp_path):
    """Other eps, norm (a missing norm is L-inf) or images: one line, exit status 1, nothing written."""
    changes = {"eps": ({"epsilon_255": 4.0, "epsilon": 4 / 255}, "were not evaluated on the same eps (1/255) (pgd20, "
                                                                 "best: 4.0 vs 8.0)"),
               "norm": ({"norm": "l2"}, "were not evaluated on the same norm (pgd20, best: l2 vs linf)"),
               "images": ({"indices": list(range(40))}, "were not evaluated on the same images (pgd20, best)")}
    for what, (change, message) in changes.items():
        other = tmp_path / what
        shutil.copytree(configurations[2], other)
        saved = json.loads((other / "eval.json").read_text())
        for row in saved["results"]:
            row.update(change if row["attack"] == "pgd20" else {}, run=str(other))
        (other / "eval.json").write_text(json.dumps(saved))
        args = ("--compare", configurations[0], other, "--out", tmp_path / "cmp.json")
        if what == "eps":  # as a user would: the exit status and the one line
            result = run_script(ev.__file__, *args)
            assert result.returncode == 1 and message in one_line_error(result, "evaluate.py")
        else:
            with pytest.raises(utils.UserError, match=re.escape(message)):
                ev.main(list(map(str, args)))
        assert not (tmp_path / "cmp.json").exists()


def test_compare_and_table_never_write_over_a_file_that_is_not_their_own_output(configurations, tmp_path):
    """--out that holds a user's notes, a run's checkpoint, a folder, or a table edited since it was written: one line,
    exit status 1, every file byte for byte as it was; their own earlier output is replaced."""
    runs = list(map(str, configurations[:2]))
    notes, final = tmp_path / "notes.md", configurations[0] / "final.pt"
    notes.write_text("my notes\n")
    before = {path: path.read_bytes() for path in (notes, final)}
    result = run_script(ev.__file__, "--compare", *runs, "--out", notes)
    assert result.returncode == 1 and one_line_error(result, "evaluate.py") == (
        f"evaluate.py: error: {notes} holds a file this command did not write (or one edited since); move it away or "
        "choose another --out")
    result = run_script(ev.__file__, "--table", *runs, "--out", tmp_path)
    assert result.returncode == 1 and f"{tmp_path} cannot be written (a folder" in one_line_error(result)
    for args in (["--compare", *runs, "--out", str(final)], ["--table", *runs, "--out", str(notes)]):
        with pytest.raises(utils.UserError, match="holds a file this command did not write"):
            ev.main(args)
    assert {path: path.read_bytes() for path in (notes, final)} == before
    table = tmp_path / "table.md"
    for _ in range(2):  # its own output, unedited: written again
        ev.main(["--table", *runs, "--out", str(table)])
    assert table.read_text().startswith("**Threat model: L-inf eps 8/255**\n\n| Run |")
    assert table.read_text().count("<!-- written by evaluate.py") == 1
    table.write_text(table.read_text() + "my comment\n")
    with pytest.raises(utils.UserError, match="did not write \\(or one edited since\\)"):
        ev.main(["--table", *runs, "--out", str(table)])
    assert table.read_text().endswith("my comment\n")
    with pytest.raises(utils.UserError, match="not a run folder or results: give run folders or the JSON files"):
        ev.main(["--compare", str(tmp_path), *runs])


def test_every_attack_shows_progress_in_a_log_too(undefended):
    """Not in a terminal (a log, a pipe) the progress bars still say which attack runs and how far it is."""
    result = run_script(ev.__file__, undefended / "final.pt", "--attacks", "clean,pgd20,cw20", "--n-examples", "64",
                        "--batch-size", "32", *CPU, env={"TQDM_DISABLE": "0"})
    assert result.returncode == 0, result.stderr
    for attack in ("clean", "pgd20", "cw20"):
        assert f"final {attack}:" in result.stderr, result.stderr
