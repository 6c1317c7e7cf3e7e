"""paper.ipynb executed top to bottom in its default quick mode, as a user's "Run all" would (nbclient): the time
docs/sweeps.md states is the time this test takes."""

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FIGURES = ["fig1_robust_accuracy_per_epoch.png", "fig2_toy_data.png", "fig3_toy_accuracy.png",
           "fig4_toy_boundary_pgdat.png", "fig5_toy_boundary_pgdat_vs_piat.png", "fig6_piat_with_each_loss.png",
           "fig7_lambda_sweep.png", "fig8_loss_landscape.png", "fig9_fixed_vs_dynamic_alpha.png", "rdat_vs_piat.png",
           "robustness_curve.png",
           "averaging.png", "ema_study.png"]
TABLES = ["table1.md", "tables2_3_5.md", "table4.md", "averaging.md"]


def test_notebook_is_committed_without_outputs(root):
    nb = nbformat.read(root / "paper.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert (root / "paper.ipynb").stat().st_size < 100_000


@pytest.mark.notebook
def test_notebook_runs_in_quick_mode_and_writes_every_figure(tmp_path, root, monkeypatch):
    nb = nbformat.read(root / "paper.ipynb", as_version=4)
    parameters = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert 'MODE = "quick"' in parameters.source  # the default a user gets
    # like papermill: the injected lines override the defaults, so nothing lands in the checkout; the rest as shipped
    parameters.source += f"\nRUNS_DIR = {str(tmp_path / 'runs')!r}\nFIGURES_DIR = {str(tmp_path / 'figures')!r}\n"
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # this Python's kernel
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every run said where it stood as it started: "run 1/N: <key> (...)" up to N, each once
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    numbers = [tuple(map(int, m)) for m in re.findall(r"^run (\d+)/(\d+): synthetic/", text, re.MULTILINE)]
    assert numbers and numbers == [(i, numbers[0][1]) for i in range(1, numbers[0][1] + 1)], numbers
    for name in FIGURES:
        png = (tmp_path / "figures" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    for name in TABLES:
        text = (tmp_path / "figures" / name).read_text()
        assert text.count("|") > 20 and "nan" not in text, name
    table1 = (tmp_path / "figures" / "table1.md").read_text()
    assert "| PIAT + NMSE | ours |" in table1 and "| | paper (cifar10) | 80.96 |" in table1
    for method, paper_clean in (("CFA", "82.80"), ("RAT", "81.63")):  # both baselines trained, beside the paper
        assert f"| {method} | ours |" in table1 and f"| | paper (cifar10) | {paper_clean} |" in table1
    averaging = (tmp_path / "figures" / "averaging.md").read_text()
    for method in ("PGD-AT", "PGD-AT + EMA", "PGD-AT + SWA", "PIAT", "PIAT + EMA"):
        assert f"| {method} | ours |" in averaging, method
    # each method against PGD-AT, from the runs' per-image results: a difference, its interval and McNemar p
    for table, methods in ((table1, 7), (averaging, 4)):
        deltas = re.findall(r"^\| \| Δ vs PGD-AT \| ([+-]\d+\.\d\d \[[+-]\d+\.\d, [+-]\d+\.\d\] p=[\d.e-]+( \*)?) \|",
                            table, re.MULTILINE)
        assert len(deltas) == methods and "Δ vs PGD-AT: accuracy minus PGD-AT's" in table, table
    # every grid run was trained to the end and evaluated
    runs = tmp_path / "runs"
    for loss in ("ce", "alp", "trades", "mart", "mail", "nmse"):
        for piat in ("piat", "nopiat"):
            run = runs / "synthetic" / f"{loss}-{piat}" / "seed0"
            assert {"best.pt", "final.pt", "metrics.csv", "eval.json"} <= {p.name for p in run.iterdir()}, run
    # a second "Run all" reuses every run: nothing is retrained
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("final.pt")}
    nb2 = nbformat.read(root / "paper.ipynb", as_version=4)
    next(c for c in nb2.cells if "parameters" in c.metadata.get("tags", [])).source = parameters.source
    NotebookClient(nb2, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("final.pt")} == stamps
    outputs = "".join(o.get("text", "") for c in nb2.cells if c.cell_type == "code" for o in c.outputs)
    assert "runs to launch: nothing to do" in outputs
