"""evaluate.py --card, --curve and --export on a tiny synthetic run: the four files, every number of the card and the
RobustBench entry equal to eval.json's, a curve that falls with eps, and an exported model that a process without
this project's code loads and runs to the same logits."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import evaluate as ev
import report
import train_piat as tp
import utils
from conftest import TINY


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A 2-epoch run evaluated (clean, PGD-20, CW-20 on 64 images) with --card --curve --export of its final.pt."""
    tmp = tmp_path_factory.mktemp("card")
    run = tmp / "run"
    tp.main([*TINY, "--epochs", "2", "--no-amp", "--out-dir", str(run)])
    out = ev.main([str(run), "--attacks", "clean,pgd20,cw20", "--n-examples", "64", "--device", "cpu", "--card",
                   "--curve", "--export", str(tmp / "model.pt2"), "--reported", "final",
                   "--curve-epsilons", "0,2,8,32,128"])
    return run, tmp / "model.pt2", out


def numbers(text):
    return [float(n) for n in re.findall(r"(?<![\w./-])\d+\.\d\d(?![\d/])", text)]


def test_all_four_files_and_every_number_from_eval_json(released):
    run, exported, _ = released
    for name in ("MODEL_CARD.md", "robustbench.json", "robustness_curve.png", "class_accuracy.png"):
        assert (run / name).stat().st_size > 500, name
    saved = json.loads((run / "eval.json").read_text())
    card = next(c for c in saved["cards"] if c["run"] == str(run))
    rows = {(r["role"], r["attack"]): r for r in saved["results"]}
    for role, attacks in card["results"].items():
        for attack, c in attacks.items():
            row = rows[(role, "pgd20" if attack == "worst_class" else attack)]
            if attack == "worst_class":
                assert c["class"] == row["worst_class"] and c["n"] == row["class_n"][str(c["class"])]
                assert c["accuracy"] == round(100 * row["worst_class_accuracy"], 2)
            else:
                assert (c["accuracy"], c["n"], c["correct"]) == (round(100 * row["accuracy"], 2), row["n"],
                                                                 row["correct"])
            assert c["ci_low"] <= c["accuracy"] <= c["ci_high"]
    # the card's text shows only numbers of its eval.json entry
    allowed = {v for attacks in card["results"].values() for c in attacks.values()
               for v in (c["accuracy"], c["ci_low"], c["ci_high"])}
    text = (run / "MODEL_CARD.md").read_text()
    table = "\n".join(line for line in text.splitlines() if line.startswith("| "))  # the results: accuracies in %
    assert len(numbers(table)) == 3 * sum(map(len, card["results"].values())), table
    assert set(numbers(table)) <= allowed, set(numbers(table)) - allowed
    assert card["sha256"] == report.sha256(run / "final.pt") and card["sha256"] in text
    assert "L-inf, eps = 8/255" in text and "python train_piat.py" in text and "--epochs 2" in text
    assert "python evaluate.py" in text and "--attacks clean,pgd20,cw20" in text and "model.pt2" in text
    # RobustBench: the final checkpoint's clean accuracy, no AutoAttack number, placeholders, the footnote says why
    entry = json.loads((run / "robustbench.json").read_text())
    assert entry == card["robustbench"]
    assert set(entry) == {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                          "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"}
    assert entry["clean_acc"] == f"{100 * rows[('final', 'clean')]['accuracy']:.2f}" and entry["eps"] == "8/255"
    assert entry["autoattack_acc"] == entry["reported"] == "" and "AutoAttack was not run" in entry["footnote"]
    assert "final checkpoint" in entry["footnote"] and "64 test images" in entry["footnote"]
    assert entry["link"] == entry["authors"] == entry["venue"] == report.TO_FILL
    assert entry["additional_data"] is False and entry["number_forward_passes"] == 1


def test_the_curve_falls_with_eps_and_its_numbers_are_kept(released):
    run, _, _ = released
    saved = json.loads((run / "eval.json").read_text())
    curves = {c["role"]: c for c in saved["curves"]}
    assert set(curves) == {"best", "final"}
    rows = {(r["role"], r["attack"]): r for r in saved["results"]}
    for role, c in curves.items():
        assert c["epsilons"] == [0, 2, 8, 32, 128] and len(c["accuracy"]) == 5
        assert c["correct"][0] == rows[(role, "clean")]["correct"]  # eps 0: the clean images
        assert c["correct"][2] == rows[(role, "pgd20")]["correct"]  # eps 8, step 2: the table's PGD-20
        assert all(b <= a + 2 for a, b in zip(c["correct"], c["correct"][1:])), c["correct"]  # within noise
        assert c["accuracy"][-1] <= 0.1 and c["indices"] == rows[(role, "clean")]["indices"]


def test_the_exported_model_runs_without_this_project(released, tmp_path):
    run, exported, _ = released
    x = torch.rand(5, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch\nm = torch.export.load(sys.argv[1]).module()\n"
              "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])\n"
              "assert 'utils' not in sys.modules\n"
              "try:\n    import utils\nexcept ImportError:\n    pass\n"
              "else:\n    raise SystemExit('utils importable')\n")
    (tmp_path / "load.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "load.py", str(exported), "x.pt", "out.pt"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model, _ = ev.project_model(run / "final.pt")
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "out.pt"), model.eval()(x), atol=1e-5)


def test_evaluate_reads_the_exported_model_back(released, tmp_path):
    run, exported, _ = released
    out = ev.main(["--model", str(exported), "--attacks", "clean,pgd20", "--n-examples", "64", "--device", "cpu",
                   "--out", str(tmp_path / "exported.json")])
    saved = json.loads((run / "eval.json").read_text())
    final = {r["attack"]: r["per_image"] for r in saved["results"] if r["role"] == "final"}
    assert {r["attack"]: r["per_image"] for r in out["rows"]} == {a: final[a] for a in ("clean", "pgd20")}
    assert out["rows"][0]["dataset"] == "synthetic"


def test_export_never_writes_over_a_file(released, tmp_path):
    run, exported, _ = released
    with pytest.raises(utils.UserError, match="nothing already there is written over"):
        ev.main([str(run), "--export", str(exported)])
