"""curves.png, which every training run draws: titled with the one name evaluate.py gives the run's checkpoints
(utils.method_name), only the lines that mean something for the run (alpha only with PIAT, beta only in RDAT, the
other weights beside the reported ones), legends off the data."""

import pytest

import evaluate as ev
import train_piat as tp
import train_rdat as tr
import train_vit as tv
import utils
from conftest import TINY


def labels(fig):
    return {line.get_label() for ax in fig.axes for line in ax.get_lines()}


@pytest.mark.parametrize("script, flags, name, shown, absent", [
    (tp, [], "PIAT + NMSE", {"alpha (PIAT)", "test PGD-20"}, {"test PGD-20, trained weights", "beta (RDAT)"}),
    (tp, ["--loss", "ce", "--no-piat", "--ema", "0.9"], "PGD-AT + EMA",
     {"test PGD-20, EMA weights", "test PGD-20, trained weights", "test clean, trained weights"}, {"alpha (PIAT)"}),
    (tr, ["--piat", "--eval-robust-learner"], "RDAT + PIAT",
     {"alpha (PIAT)", "beta (RDAT)", "test PGD-20, global learner", "test PGD-20, robust learner"}, set()),
    (tr, [], "RDAT", {"beta (RDAT)", "test PGD-20, global learner"}, {"alpha (PIAT)", "test PGD-20, robust learner"}),
])
def test_a_runs_curves_carry_its_method_name_and_only_its_lines(tmp_path, monkeypatch, script, flags, name, shown,
                                                                absent):
    figures, real = [], utils.plot_curves
    monkeypatch.setattr(utils, "plot_curves", lambda *a: figures.append(real(*a)) or figures[-1])
    script.main([*TINY, "--epochs", "1", "--no-amp", "--out-dir", str(tmp_path / "run"), *flags])
    fig = figures[-1]
    assert fig.get_suptitle() == ev.project_model(tmp_path / "run" / "final.pt")[1]["method"] == name  # its row
    assert shown <= labels(fig) and not absent & labels(fig), labels(fig)
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_name_per_method_from_the_flags_each_script_saves():
    """utils.method_name of the flags and script a run saves: its curves' title and evaluate.py's row label."""
    cases = {"PGD-AT": (tp, ["--loss", "ce", "--no-piat"]), "PIAT": (tp, ["--loss", "ce"]),
             "PIAT + TRADES + SWA": (tp, ["--loss", "trades", "--swa-start", "3"]),
             "CFA": (tp, ["--loss", "cfa", "--no-piat"]),
             "Generalist + PIAT": (tr, ["--lam", "0", "--piat"]),
             "deit_small_patch16_224: PIAT + TRADES + A&P": (tv, ["--model", "deit_small_patch16_224", "--loss",
                                                                   "trades", "--ard", "--prm"]),
             "vit_base_patch16_224: PGD-AT + PRM": (tv, ["--no-piat", "--prm"])}
    for name, (script, flags) in cases.items():
        args = script.parse_args(flags)
        assert utils.method_name(args, script.SCRIPT) == utils.method_name(vars(args), script.SCRIPT) == name


def fake_metrics(epochs=30, **columns):
    """train_piat.py's rows for `epochs` epochs, every column logged unless set here ("" where not logged)."""
    return [{field: epoch if field == "epoch" else columns.get(field, 0.2 + 0.01 * epoch)
             for field in tp.METRIC_FIELDS} for epoch in range(1, epochs + 1)]


def test_legends_sit_off_the_data_and_a_run_without_piat_draws_no_alpha(tmp_path):
    args = vars(tp.parse_args(["--ema", "0.999"]))  # PIAT + NMSE + EMA: both legends at their fullest
    fig = utils.plot_curves(fake_metrics(val_pgd20_acc=""), tmp_path / "curves.png", args, tp.SCRIPT)
    fig.draw_without_rendering()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 2 and len(fig.axes) == 3  # accuracy; loss with its alpha axis
    for legend in legends:
        box = legend.get_window_extent()
        assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes), box
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)  # not cut off the PNG
    assert "alpha (PIAT)" in labels(fig) and "test PGD-20, trained weights" in labels(fig)
    assert [int(t) for t in fig.axes[0].get_xticks() if 1 <= t <= 30] == list(range(5, 31, 5))  # whole epochs
    # without PIAT the alpha column holds 0 throughout: no alpha line and no axis for it
    args = vars(tp.parse_args(["--loss", "ce", "--no-piat"]))
    fig = utils.plot_curves(fake_metrics(alpha=0.0, **{f"raw_{c}": "" for c in tp.EVAL_COLUMNS}),
                            tmp_path / "curves.png", args, tp.SCRIPT)
    assert len(fig.axes) == 2 and fig.get_suptitle() == "PGD-AT" and "alpha (PIAT)" not in labels(fig)
    assert not any(label.endswith("weights") for label in labels(fig))
