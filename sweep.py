"""Run the paper's grids of experiments (every training run of a table or figure, then evaluate.py on it)
on this machine's GPUs or CPUs, or on a Slurm cluster through submitit; then write the tables with the
mean ± std over seeds beside the paper's numbers, and the figures.

    python sweep.py table1 --dry-run                   # the commands, nothing run
    python sweep.py table1 --seeds 3 --jobs 4          # here: 4 runs at a time, one GPU each
    python sweep.py paper --seeds 3 --launcher slurm --partition gpu --time 2-00:00:00 --gpus-per-job 1
    python sweep.py paper --seeds 3 --status           # done / running / failed / to do, per run
    python sweep.py paper --seeds 3 --report           # SWEEP_DIR/report/<grid>.md and the figures
    python sweep.py fig6 --epochs 30 --track           # flags sweep.py does not know go to every training run

Grids (GRIDS): table1 (8 methods, ResNet-18), table2 (WRN-32-10), table3 (PIAT with each loss, WRN-32-10),
table4 (ViTs with A&P), table5 (ALP vs NMSE), fig6 (each loss with and without PIAT; also Figs. 1 and 8),
fig7 (NMSE's lambda), fig9 (fixed alpha), rdat (RDAT beside PIAT); `paper` is all nine; `averaging`
(PGD-AT and PIAT with EMA or SWA weights) is not in the paper. `--profile quick` is paper.ipynb's quick
mode: synthetic data, a small CNN, a few epochs, minutes on a CPU.

Each run is one folder, SWEEP_DIR/<dataset>/<run>/seed<k>, that the training script writes (plus the
evaluate.py results in its eval.json); a run shared by several grids (PIAT + NMSE is in Table I, Figs.
6, 7 and 9 and the RDAT comparison) is trained once. Running the same command again is safe: a finished
run (final.pt at its last epoch, eval.json with every evaluation) is skipped, an interrupted one continues
with --resume, and a diverged one (status.json) is reported, not retried. On Slurm each run is one job;
when it is preempted or runs out of time it stops the training, requeues itself and continues from the
last epoch. Logs and job records live in SWEEP_DIR/logs.
"""

import argparse
import csv
import importlib
import io
import json
import math
import os
import pickle
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import redirect_stderr
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import submitit

ROOT = Path(__file__).resolve().parent
ATTACKS = ("clean", "pgd20", "cw20", "aa")
SIGNAL_DELAY_S = 120  # Slurm warns the job (USR2) this long before its time limit: time to stop and requeue
GRACE_S = 60  # a stopped training process gets this long to exit before SIGKILL
MAX_TIMEOUTS = 50  # time-outs a Slurm job may requeue itself after (a preemption does not count)
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # local jobs have no time limit


class UserError(Exception):
    """Bad input: printed as one line (sweep.py: error: ...), with a non-zero exit code."""

# ----------------------------------------------------------------------------------------------
# The paper's numbers (one place: sweep.py --report and paper.ipynb both read them; Table I is evaluate.py's
# PAPER_TABLE_I, which evaluate.py --table --paper prints too)
# ----------------------------------------------------------------------------------------------

# table -> dataset -> method -> (Clean, PGD20, AA) of the best checkpoint: Tables II and III (WRN-32-10), V
PAPER_CPA = {
    "II": {"cifar10": {"PGD-AT": (86.87, 48.77, 47.78), "ALP": (84.18, 53.55, 49.68), "TRADES": (82.13, 55.14, 50.38),
                       "MART": (81.57, 56.44, 49.58), "MAIL": (84.96, 52.58, 47.26), "CFA": (86.44, 57.84, 52.96),
                       "RAT": (83.46, 57.07, 51.56), "PIAT + NMSE": (85.04, 58.04, 53.83)},
           "cifar100": {"PGD-AT": (59.30, 28.13, 23.99), "ALP": (58.11, 28.59, 24.45), "TRADES": (57.99, 31.97, 26.76),
                        "MART": (55.19, 31.16, 26.46), "MAIL": (58.04, 29.50, 23.97), "CFA": (63.37, 33.89, 28.98),
                        "RAT": (60.89, 33.39, 27.95), "PIAT + NMSE": (61.04, 35.15, 30.07)}},
    "III": {"cifar10": {"PGD-AT": (86.87, 48.77, 47.78), "PIAT": (85.56, 52.80, 48.35), "ALP": (84.18, 53.55, 49.68),
                        "PIAT + ALP": (83.35, 57.71, 52.35), "TRADES": (82.13, 55.14, 50.38),
                        "PIAT + TRADES": (82.08, 58.93, 53.73), "MART": (81.57, 56.44, 49.58),
                        "PIAT + MART": (79.88, 59.51, 52.84), "MAIL": (84.96, 52.58, 47.26),
                        "PIAT + MAIL": (84.24, 57.53, 52.22)},
            "cifar100": {"PGD-AT": (59.30, 28.13, 23.99), "PIAT": (60.09, 34.46, 29.47), "ALP": (58.11, 28.59, 24.45),
                         "PIAT + ALP": (59.25, 34.04, 28.94), "TRADES": (57.99, 31.97, 26.76),
                         "PIAT + TRADES": (59.78, 34.52, 29.25), "MART": (55.19, 31.16, 26.46),
                         "PIAT + MART": (54.32, 34.87, 28.79), "MAIL": (58.04, 29.50, 23.97),
                         "PIAT + MAIL": (58.52, 33.65, 28.00)}},
    "V": {"cifar10": {"ALP": (79.74, 52.37, 46.13), "NMSE": (84.77, 51.56, 46.60)},
          "cifar100": {"ALP": (57.29, 28.12, 23.57), "NMSE": (58.88, 29.55, 24.82)}},
}

# model -> loss -> (plain, A&P, PIAT + A&P) as (Clean, PGD20, AA); CIFAR-10, the paper's Table IV
PAPER_TABLE_IV = {
    "convit_base": {"ce": [(61.47, 38.64, 34.07), (85.21, 53.25, 49.01), (87.50, 56.25, 51.86)],
                    "trades": [(82.75, 52.77, 49.61), (83.51, 53.21, 50.11), (86.03, 55.88, 52.35)],
                    "mart": [(63.61, 42.51, 37.08), (80.32, 53.11, 48.35), (81.20, 56.17, 51.13)]},
    "vit_base_patch16_224": {"ce": [(83.07, 52.93, 48.99), (84.64, 53.44, 49.67), (87.83, 56.34, 52.27)],
                             "trades": [(83.45, 53.07, 49.76), (83.91, 53.52, 50.56), (87.09, 55.97, 52.57)],
                             "mart": [(77.05, 52.99, 47.95), (78.75, 53.51, 49.01), (82.23, 55.94, 51.03)]},
    "deit_small_patch16_224": {"ce": [(81.36, 47.94, 47.28), (83.08, 52.28, 47.92), (83.22, 53.55, 49.31)],
                               "trades": [(82.32, 52.52, 49.07), (82.81, 52.74, 49.40), (83.43, 53.31, 50.10)],
                               "mart": [(76.77, 52.06, 47.06), (78.43, 52.98, 47.94), (78.39, 53.83, 48.97)]},
}
PAPER_DATASETS = ("cifar10", "cifar100", "svhn")

# ----------------------------------------------------------------------------------------------
# The grids: one definition, read by sweep.py and paper.ipynb
# ----------------------------------------------------------------------------------------------

PROFILES = {
    # the paper's settings (Sec. V-A): the training scripts' defaults for ResNet-18, WRN-32-10 and the ViTs,
    # evaluate.py on the whole test set with AutoAttack standard
    "paper": {"datasets": None, "data": [], "cnn": ["--arch", "resnet18"], "wrn": ["--arch", "wrn-32-10"], "vit": [],
              "eval": [], "aa": [], "aa_everywhere": True, "landscape": [],
              "baselines": ["cfa", "rat"], "lambdas": [0.5, 1, 2, 4, 6, 8], "fixed_alphas": [0.3, 0.6, 0.9, 0.99],
              "vit_models": ["convit_base", "vit_base_patch16_224", "deit_small_patch16_224"],
              "vit_losses": ["ce", "trades", "mart"], "rdat": ["RDAT", "Generalist (RDAT, λ = 0)", "RDAT + PIAT"],
              "ema_decay": 0.999},
    # paper.ipynb's quick mode: the pipeline end to end in minutes on a CPU, not the paper's numbers. The
    # small CNN stands in for WRN-32-10 too; CW-20 and a cheap AutoAttack (APGD-CE, 32 images) only for Table I
    "quick": {"datasets": ["synthetic"], "data": ["--train-size", "256", "--eval-size", "64", "--device", "cpu"],
              "cnn": ["--arch", "small-cnn", "--epochs", "4", "--batch-size", "64", "--pgd-steps", "3",
                      "--eval-pgd-steps", "3"],
              "wrn": ["--arch", "small-cnn", "--epochs", "4", "--batch-size", "64", "--pgd-steps", "3",
                      "--eval-pgd-steps", "3"],
              "vit": ["--no-pretrained", "--model-kwargs", '{"depth": 2, "embed_dim": 32, "num_heads": 2}',
                      "--epochs", "3", "--batch-size", "64", "--pgd-steps", "2", "--eval-pgd-steps", "3",
                      "--ap-warmup-epochs", "2"],
              "eval": ["--n-examples", "64"], "aa_everywhere": False,
              "aa": ["--n-examples", "32", "--aa-version", "custom", "--aa-attacks", "apgd-ce"],
              "landscape": ["--landscape-steps", "5", "--landscape-batch", "64", "--landscape-pgd-steps", "5",
                            "--device", "cpu"],
              "baselines": ["cfa", "rat"], "lambdas": [1, 4, 8], "fixed_alphas": [0.3, 0.9],
              "vit_models": ["vit_tiny_patch16_224"], "vit_losses": ["ce"], "rdat": ["RDAT"], "ema_decay": 0.8},
}
LOSS_NAMES = {"ce": "PGD-AT", "alp": "ALP", "trades": "TRADES", "mart": "MART", "mail": "MAIL", "nmse": "NMSE",
              "cfa": "CFA", "rat": "RAT"}
PIAT_LOSSES = ["ce", "alp", "trades", "mart", "mail", "nmse"]  # Fig. 6; Table III has all but NMSE
VIT_VARIANTS = {"plain": ["--no-piat"], "A&P": ["--no-piat", "--ard", "--prm"],
                "PIAT + A&P": ["--piat", "--ard", "--prm"]}


@dataclass(frozen=True)
class Step:
    """One evaluate.py call a run needs: `attacks` on its best.pt and final.pt (with evaluate.py's `flags`),
    or with `landscape` the loss landscape of final.pt (Fig. 8)."""

    attacks: tuple
    flags: tuple = ()
    landscape: bool = False


@dataclass(frozen=True)
class Run:
    """One training run: `script` with `flags` (the data set's included), the seed, its folder and the
    evaluations it needs."""

    dataset: str
    name: str
    seed: int
    script: str
    flags: tuple
    run_dir: Path
    steps: tuple = ()

    @property
    def key(self):
        return f"{self.dataset}/{self.name}/seed{self.seed}"


@dataclass
class Plan:
    """The runs of some grids (each once, its evaluations merged) and, per (grid, dataset), the grid's rows:
    label -> the run folders of its seeds."""

    runs: dict = field(default_factory=dict)  # run folder -> Run
    tables: dict = field(default_factory=dict)  # (grid, dataset) -> {label: [run folder per seed]}
    profile: str = "paper"

    def table(self, grid, dataset):
        return self.tables.get((grid, dataset), {})


def label(loss, piat):
    """The paper's name of a loss with or without PIAT ("PIAT" alone is PGD-AT with PIAT)."""
    return ("PIAT" if loss == "ce" else f"PIAT + {LOSS_NAMES[loss]}") if piat else LOSS_NAMES[loss]


def piat_run(P, arch, loss, piat, *more, suffix=""):
    """(run name, script, flags) of a train_piat.py run; "wrn-" names WRN-32-10 runs when they differ."""
    prefix = "wrn-" if arch == "wrn" and P["wrn"] != P["cnn"] else ""
    name = f"{prefix}{loss}-{'piat' if piat else 'nopiat'}{suffix}"
    return name, "train_piat.py", (*P[arch], "--loss", loss, "--piat" if piat else "--no-piat", *more)


def measured(P, *attacks, aa=None):
    """The evaluations of a row: `attacks` on the profile's test images, and AutoAttack where the profile
    measures it (`aa` overrides)."""
    steps = (Step(attacks, tuple(P["eval"])),)
    if P["aa_everywhere"] if aa is None else aa:
        steps += (Step(("aa",), tuple(P["aa"])),)
    return steps


def rows_table1(P, extra):
    """Table I: clean, PGD-20, CW-20 and AutoAttack of the best and final ResNet-18 checkpoints."""
    methods = [(loss, False) for loss in ("ce", "alp", "trades", "mart", "mail", *P["baselines"])] + [("nmse", True)]
    return [(label(loss, piat), *piat_run(P, "cnn", loss, piat), measured(P, "clean", "pgd20", "cw20", aa=True))
            for loss, piat in methods]


def rows_table2(P, extra):
    """Table II: Table I's methods on WRN-32-10, best checkpoint."""
    methods = [(loss, False) for loss in ("ce", "alp", "trades", "mart", "mail", *P["baselines"])] + [("nmse", True)]
    return [(label(loss, piat), *piat_run(P, "wrn", loss, piat), measured(P, "clean", "pgd20"))
            for loss, piat in methods]


def rows_table3(P, extra):
    """Table III: PIAT combined with each baseline loss, WRN-32-10."""
    return [(label(loss, piat), *piat_run(P, "wrn", loss, piat), measured(P, "clean", "pgd20"))
            for loss in PIAT_LOSSES[:-1] for piat in (False, True)]


def rows_table4(P, extra):
    """Table IV: vision transformers fine-tuned plain, with A&P (ARD + PRM), and with PIAT + A&P."""
    rows = []
    for model in P["vit_models"]:
        for loss in P["vit_losses"]:
            for variant, flags in VIT_VARIANTS.items():
                name = f"vit-{model}-{loss}-{variant.replace(' + ', '-').replace('&', '')}"
                rows.append(((model, loss, variant), name, "train_vit.py",
                             ("--model", model, *P["vit"], "--loss", loss, *flags), measured(P, "clean", "pgd20")))
    return rows


def rows_table5(P, extra):
    """Table V: ALP against NMSE, both without PIAT (ResNet-18)."""
    return [(LOSS_NAMES[loss], *piat_run(P, "cnn", loss, False), measured(P, "clean", "pgd20"))
            for loss in ("alp", "nmse")]


def rows_fig6(P, extra):
    """Fig. 6: every loss with and without PIAT (ResNet-18); its runs also draw Fig. 1 (robust accuracy per
    epoch) and Fig. 8 (the loss landscapes of PGD-AT and PIAT)."""
    landscape = (Step((), tuple(P["landscape"]), landscape=True),)
    return [(label(loss, piat), *piat_run(P, "cnn", loss, piat),
             measured(P, "clean", "pgd20") + (landscape if loss == "ce" else ()))
            for loss in PIAT_LOSSES for piat in (False, True)]


def rows_fig7(P, extra):
    """Fig. 7: PIAT + NMSE across lambda (the default lambda is the PIAT + NMSE run of the other grids)."""
    from train_piat import LAM_DEFAULTS

    return [(lam, *(piat_run(P, "cnn", "nmse", True) if lam == LAM_DEFAULTS["nmse"] else
                    piat_run(P, "cnn", "nmse", True, "--lam", f"{lam:g}", suffix=f"-lam{lam:g}")),
             measured(P, "clean", "pgd20", aa=False)) for lam in P["lambdas"]]


def rows_fig9(P, extra):
    """Fig. 9: PIAT + NMSE with a fixed alpha against the dynamic schedule (curves from metrics.csv)."""
    rows = [("dynamic", *piat_run(P, "cnn", "nmse", True), ())]
    return rows + [(f"α = {alpha:g}", *piat_run(P, "cnn", "nmse", True, "--alpha-fixed", f"{alpha:g}",
                                                 suffix=f"-alpha{alpha:g}"), ()) for alpha in P["fixed_alphas"]]


def rows_rdat(P, extra):
    """RDAT (train_rdat.py, a reconstruction) beside PIAT + NMSE."""
    steps = measured(P, "clean", "pgd20", "cw20", aa=False)
    variants = {"RDAT": ("rdat", ()), "Generalist (RDAT, λ = 0)": ("generalist", ("--lam", "0")),
                "RDAT + PIAT": ("rdat-piat", ("--piat",))}
    return [("PIAT + NMSE", *piat_run(P, "cnn", "nmse", True), steps)] + [
        (name, variants[name][0], "train_rdat.py", (*P["cnn"], *variants[name][1]), steps) for name in P["rdat"]]


def rows_averaging(P, extra):
    """Not in the paper: PIAT against weight averaging (EMA of the weights, SWA over the last quarter)."""
    from train_piat import parse_args

    swa_start = 3 * parse_args([*P["cnn"], *extra]).epochs // 4
    ema = ("--ema", f"{P['ema_decay']:g}")
    steps = measured(P, "clean", "pgd20", "cw20", aa=True)
    return [("PGD-AT", *piat_run(P, "cnn", "ce", False), steps),
            ("PGD-AT + EMA", *piat_run(P, "cnn", "ce", False, *ema, suffix="-ema"), steps),
            ("PGD-AT + SWA", *piat_run(P, "cnn", "ce", False, "--swa-start", str(swa_start), suffix="-swa"), steps),
            ("PIAT", *piat_run(P, "cnn", "ce", True), steps),
            ("PIAT + EMA", *piat_run(P, "cnn", "ce", True, *ema, suffix="-ema"), steps)]


# grid -> (its rows, the data sets the paper runs it on)
GRIDS = {"table1": (rows_table1, ["cifar10", "cifar100", "svhn"]), "table2": (rows_table2, ["cifar10", "cifar100"]),
         "table3": (rows_table3, ["cifar10", "cifar100"]), "table4": (rows_table4, ["cifar10"]),
         "table5": (rows_table5, ["cifar10", "cifar100"]), "fig6": (rows_fig6, ["cifar10"]),
         "fig7": (rows_fig7, ["cifar10"]), "fig9": (rows_fig9, ["cifar10"]), "rdat": (rows_rdat, ["cifar10"]),
         "averaging": (rows_averaging, ["cifar10"])}
ALIASES = {"paper": ["table1", "table2", "table3", "table4", "table5", "fig6", "fig7", "fig9", "rdat"]}


def plan(grids, profile="paper", datasets=None, seeds=1, extra=(), sweep_dir="runs/sweep", attacks=None,
         n_examples=None):
    """The Plan of `grids` (names in GRIDS or ALIASES) for each data set and seeds 0..seeds-1; `extra` flags
    go to every training command, `attacks` and `n_examples` restrict every evaluation."""
    P, sweep_dir = PROFILES[profile], Path(sweep_dir).absolute()
    result = Plan(profile=profile)
    for grid in [g for name in grids for g in ALIASES.get(name, [name])]:
        rows, grid_datasets = GRIDS[grid]
        for dataset in datasets or P["datasets"] or grid_datasets:
            table = result.tables.setdefault((grid, dataset), {})
            for row_label, name, script, flags, steps in rows(P, list(extra)):
                steps = merge_steps(restrict(steps, attacks, n_examples))
                for seed in range(seeds):
                    run = Run(dataset, name, seed, script, ("--dataset", dataset, *P["data"], *flags, *extra),
                              sweep_dir / dataset / name / f"seed{seed}", steps)
                    result.runs[run.run_dir] = merge(result.runs.get(run.run_dir), run)
                    table.setdefault(row_label, []).append(run.run_dir)
    return result


def restrict(steps, attacks, n_examples):
    """Keep only `attacks` (None: all; "landscape" keeps the landscape) and evaluate on `n_examples` images."""
    kept = []
    for step in steps:
        wanted = tuple(a for a in step.attacks if attacks is None or a in attacks)
        if (step.landscape and "landscape" not in (attacks or ["landscape"])) or not (wanted or step.landscape):
            continue
        flags = step.flags
        if n_examples:
            at = flags.index("--n-examples") if "--n-examples" in flags else len(flags)
            flags = flags[:at] + flags[at + 2:] + ("--n-examples", str(n_examples))
        kept.append(replace(step, attacks=wanted, flags=flags))
    return tuple(kept)


def merge(known, run):
    """One Run for a folder two grids share: the same command, the evaluations of both."""
    if known is None:
        return run
    if (known.script, known.flags) != (run.script, run.flags):
        raise ValueError(f"two grids define {run.key} differently: {known.flags} and {run.flags}")
    return replace(known, steps=merge_steps(known.steps + run.steps))


def merge_steps(steps):
    """Steps with the same evaluate.py flags as one call, their attacks united (in ATTACKS order)."""
    merged = {}
    for step in steps:
        key = (step.flags, step.landscape)
        union = set(merged[key].attacks if key in merged else ()) | set(step.attacks)
        merged[key] = replace(step, attacks=tuple(a for a in ATTACKS if a in union))
    return tuple(merged.values())


# ----------------------------------------------------------------------------------------------
# A run's state, judged from its folder alone
# ----------------------------------------------------------------------------------------------


def read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def trained_epochs(run_dir):
    """(epochs final.pt holds, epochs the run trains), or (0, None) before its first checkpoint."""
    if not (Path(run_dir) / "final.pt").exists():
        return 0, None
    import utils

    checkpoint = utils.load_checkpoint(Path(run_dir) / "final.pt", mmap=True)  # reads no tensor
    return checkpoint["epoch"], checkpoint["args"]["epochs"]


def diverged(run_dir):
    return read_json(Path(run_dir) / "status.json", {}).get("status") == "diverged"


def measured_attacks(run_dir):
    """{(role, attack)} in the run's eval.json."""
    results = read_json(Path(run_dir) / "eval.json", {}).get("results", [])
    return {(row["role"], row["attack"]) for row in results}


def missing(step, run_dir):
    """The part of `step` still to do (None when done): attacks measured on neither or one checkpoint."""
    if step.landscape:
        return None if (Path(run_dir) / "final.landscape.npz").exists() else step
    done = measured_attacks(run_dir)
    todo = tuple(a for a in step.attacks if not {("best", a), ("final", a)} <= done)
    return replace(step, attacks=todo) if todo else None


def pending(run):
    """(whether `run` still trains, the evaluations it still needs)."""
    epochs, total = trained_epochs(run.run_dir)
    return total is None or epochs < total, [s for s in (missing(step, run.run_dir) for step in run.steps) if s]


def train_command(run, gpus=1):
    """The training command of a fresh run (torchrun with one process per GPU when `gpus` > 1)."""
    command = [sys.executable, str(ROOT / run.script), *run.flags, "--seed", str(run.seed),
               "--out-dir", str(run.run_dir)]
    if gpus > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    return command


def continued(command, run_dir):
    """`command`, continuing its run with --resume once the run has a checkpoint (the run's own flags win)."""
    return [*command, "--resume", str(run_dir)] if (Path(run_dir) / "final.pt").exists() else list(command)


def eval_command(run_dir, step):
    what = ["--landscape"] if step.landscape else ["--attacks", ",".join(step.attacks)]
    return [sys.executable, str(ROOT / "evaluate.py"), str(run_dir), *what, *step.flags]


def next_commands(run, gpus=1):
    """The commands that finish `run` from where its folder stands."""
    train, steps = pending(run)
    return ([continued(train_command(run, gpus), run.run_dir)] if train else []) + [
        eval_command(run.run_dir, step) for step in steps]


# ----------------------------------------------------------------------------------------------
# The job: one run, trained (or continued) then evaluated, in child processes
# ----------------------------------------------------------------------------------------------


def _child_setup():
    """In each training or evaluation process: ignore Slurm's USR2 warning (the job stops the process itself,
    with SIGTERM) and die with the job (PR_SET_PDEATHSIG), so that no run is orphaned."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class RunJob(submitit.helpers.Checkpointable):
    """A submitit job for one run: the training command (continued with --resume once a checkpoint exists),
    then evaluate.py for the attacks eval.json still lacks. Preempted or out of time (Slurm's USR2),
    submitit calls checkpoint(): the training process is stopped (SIGTERM, its last epoch is in final.pt)
    and the job, with the commands it has not finished, is requeued."""

    def __init__(self, run_dir, train, steps, env=None, grace_s=GRACE_S):
        self.run_dir, self.train, self.steps = str(run_dir), train, list(steps)
        self.env, self.grace_s, self._proc = dict(env or {}), grace_s, None

    def __getstate__(self):
        return {**self.__dict__, "_proc": None}

    def __call__(self):
        if self.train:
            self._run(continued(self.train, self.run_dir))
            self.train = None
        while self.steps:
            step = missing(self.steps[0], self.run_dir)
            if step:
                self._run(eval_command(self.run_dir, step))
            self.steps.pop(0)
        return self.run_dir

    def _run(self, command):
        print("+", shlex.join(command), flush=True)
        self._proc = subprocess.Popen(command, env={**os.environ, **self.env}, start_new_session=True,
                                      preexec_fn=_child_setup)
        try:
            while True:  # not a plain wait(): the signal handler must be able to reap the process
                try:
                    code = self._proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
        finally:  # the job was cancelled or is exiting: never leave the run behind
            if self._proc is not None and self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc = None
        if code != 0:
            how = f"signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"exit code {code}"
            script = next(Path(arg).name for arg in command if arg.endswith(".py"))
            raise RuntimeError(f"{script} stopped with {how}: {shlex.join(command)}")

    def checkpoint(self, *args, **kwargs):
        self._stop_child()
        return super().checkpoint(*args, **kwargs)

    def _stop_child(self):
        """SIGTERM the running process and reap it (os.waitpid: Popen's lock may be held by the interrupted
        wait), SIGKILL after grace_s."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + self.grace_s
        while time.time() < deadline:
            try:
                if os.waitpid(proc.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)


def job_for(run, env, gpus=1):
    """The RunJob that finishes `run`, and the commands it starts with."""
    train, steps = pending(run)
    job = RunJob(run.run_dir, train_command(run, gpus) if train else None, steps, env)
    commands = [continued(job.train, run.run_dir)] if train else []
    return job, commands + [eval_command(run.run_dir, step) for step in steps]


def job_env(run):
    """What every job of `run` sees: its W&B name and group (used with --track)."""
    return {"WANDB_NAME": run.key, "WANDB_RUN_GROUP": f"{run.dataset}/{run.name}"}


# ----------------------------------------------------------------------------------------------
# Launchers: this machine (submitit's LocalExecutor) or Slurm (submitit's SlurmExecutor)
# ----------------------------------------------------------------------------------------------

SLURM_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
               "PREEMPTED"}
SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                "REQUEUE_HOLD", "REQUEUE_FED"}


def record_path(logs, run):
    return Path(logs) / "jobs" / f"{run.dataset}.{run.name}.seed{run.seed}.json"


def save_record(logs, run, job, launcher, commands, env=None):
    """The run's latest job (SWEEP_DIR/logs/jobs/...json): how --status and later sweeps find it."""
    record = {"run": run.key, "launcher": launcher, "job_id": str(job.job_id), "host": socket.gethostname(),
              "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "stdout": str(job.paths.stdout),
              "stderr": str(job.paths.stderr), "result": str(job.paths.result_pickle), "env": env or {},
              "commands": [shlex.join(c) for c in commands]}
    path = record_path(logs, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def job_alive(record, logs):
    """Whether the recorded job may still work on its run (then no second job is started for it)."""
    if record["launcher"] == "local":
        if Path(record["result"]).exists() or record["host"] != socket.gethostname():
            return False
        try:
            return b"submitit" in Path(f"/proc/{record['job_id']}/cmdline").read_bytes()
        except OSError:
            return False
    # sacct's answer from ask_sacct(); UNKNOWN when it cannot tell. A job Slurm requeued after a failure
    # (preempted with SIGTERM, a node lost) is active again even though its first attempt left a result.
    state = submitit.SlurmJob(folder=logs, job_id=record["job_id"]).watcher.get_state(record["job_id"], mode="cache")
    state = state.split()[0] if state.strip() else "UNKNOWN"
    if state in SLURM_ACTIVE:
        return True
    return not Path(record["result"]).exists() and state not in SLURM_ENDED


def ask_sacct(records, logs):
    """One sacct call for the state of every recorded Slurm job."""
    jobs = [submitit.SlurmJob(folder=logs, job_id=r["job_id"]) for r in records
            if r and r["launcher"] == "slurm"]  # each registers with submitit's watcher
    if jobs:
        jobs[0].watcher.update()


def job_error(record):
    """The last line of the recorded job's error, None when it succeeded or left no result."""
    try:
        with open(record["result"], "rb") as f:
            outcome, value = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError):
        return None
    if outcome != "error":
        return None
    lines = [line for line in str(value).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def log_tail(record, n=12):
    """The last lines of a job's stderr log (or of its stdout when stderr is empty)."""
    for key in ("stderr", "stdout"):
        try:
            lines = Path(record[key]).read_text(errors="replace").rstrip().splitlines()
        except OSError:
            continue
        if lines:
            return lines[-n:]
    return []


def visible_gpus():
    """The GPUs local jobs are pinned to: CUDA_VISIBLE_DEVICES's entries when it is set, else every GPU."""
    import torch

    count = torch.cuda.device_count()
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def launch_local(runs, jobs, logs, adopted=()):
    """Run `runs` on this machine, `jobs` at a time (default: one per GPU), each job pinned to one GPU or,
    without GPUs, given its share of the CPU cores; wait for them all, and for the `adopted` runs whose jobs
    an earlier sweep started here. A failure is reported with the tail of its log and does not stop the
    others. Returns the number of failed runs."""
    gpus = visible_gpus()
    jobs = jobs or max(1, len(gpus))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    executor = submitit.LocalExecutor(folder=logs)
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, signal_delay_s=SIGNAL_DELAY_S)
    where = f"one GPU each ({', '.join(gpus)})" if gpus else f"no GPU, {threads} CPU thread(s) each"
    print(f"{len(runs)} run(s), {jobs} at a time on this machine, {where}; logs in {logs}", flush=True)
    slots = {}  # slot -> (run, its submitit job; None for a job an earlier sweep started)
    for run in adopted:
        gpu = read_json(record_path(logs, run), {}).get("env", {}).get("CUDA_VISIBLE_DEVICES")
        mine = gpus.index(gpu) if gpu in gpus else None
        slot = mine if mine is not None and mine not in slots else min(set(range(jobs + len(slots))) - set(slots))
        slots[slot] = (run, None)
        print(f"waiting  {run.key} (its job was started by an earlier sweep)", flush=True)
    queue, failed = list(runs), 0
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while queue or slots:
            for slot in [s for s in range(jobs) if s not in slots][: min(len(queue), jobs - len(slots))]:
                run = queue.pop(0)
                device = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else {"OMP_NUM_THREADS": str(threads)}
                slots[slot] = (run, start_local_job(executor, run, device, logs))
            time.sleep(0.5)
            for slot, (run, job) in list(slots.items()):
                record = read_json(record_path(logs, run), {})
                if job.done() if job else not job_alive(record, logs):
                    del slots[slot]
                    failed += not report_outcome(run, record)
    except KeyboardInterrupt:  # Ctrl-C, or this sweep was killed: its jobs stop too
        stop_local_jobs([job for _, job in slots.values() if job])
        print(f"stopped {len(slots)} running job(s): run the same command again to continue", flush=True)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return failed


def start_local_job(executor, run, device, logs):
    job, commands = job_for(run, {**job_env(run), **device})
    submitted = executor.submit(job)
    save_record(logs, run, submitted, "local", commands, device)
    where = f" on GPU {device['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in device else ""
    print(f"started  {run.key} (job {submitted.job_id}{where})", flush=True)
    return submitted


def report_outcome(run, record):
    """Print how a run's job ended (a failure with its log's tail); True when it succeeded."""
    error = job_error(record) if Path(record.get("result", "")).exists() else "its job ended without a result"
    if error is None:
        print(f"finished {run.key}", flush=True)
        return True
    print(f"FAILED   {run.key}: {error}" + (" (diverged)" if diverged(run.run_dir) else ""), flush=True)
    print("".join(f"    | {line}\n" for line in log_tail(record)), end="", flush=True)
    return False


def stop_local_jobs(jobs, timeout_s=30):
    """Cancel local jobs (SIGINT to each controller: the job stops its training process) and wait for them."""
    for job in jobs:
        job.cancel(check=False)
    deadline = time.time() + timeout_s
    while time.time() < deadline and not all(job.done() for job in jobs):
        time.sleep(0.2)


def parse_time(text):
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in minutes."""
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = [float(p) for p in rest.split(":")]
    if "-" in text:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return float(days) * 1440 + hours * 60 + minutes + seconds / 60


def slurm_parameters(args, run, commands):
    """submitit's sbatch parameters of one run's job: what a user would write by hand (no submitit wckey), and
    the commands the job runs as comments."""
    extra = {"requeue": True, "chdir": os.getcwd()}
    for item in args.slurm_extra:
        key, sep, value = item.lstrip("-").partition("=")
        extra[key] = value if sep else True
    about = ["# This job runs each command below that is still needed when it starts. Warned before a time-out",
             f"# or preemption (USR2, {SIGNAL_DELAY_S} s ahead), it stops the training and requeues itself; the",
             "# requeued job continues the run with --resume RUN_DIR (sweep.py's RunJob)."]
    return {"job_name": f"{run.dataset}-{run.name}-seed{run.seed}", "time": math.ceil(parse_time(args.time)),
            "nodes": 1, "ntasks_per_node": 1, "gpus_per_node": args.gpus_per_job or None,
            "cpus_per_task": args.cpus_per_job, "mem": args.mem, "partition": args.partition, "account": args.account,
            "qos": args.qos, "signal_delay_s": SIGNAL_DELAY_S, "wckey": None,
            "setup": [*args.slurm_setup, *about, *(f"# {shlex.join(c)}" for c in commands)],
            "additional_parameters": extra}


def launch_slurm(runs, args, logs):
    """Submit one Slurm job per run (sbatch through submitit) and return: the jobs outlive this command."""
    try:
        executor = submitit.SlurmExecutor(folder=logs, max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as err:
        raise UserError(f"--launcher slurm: {err} (sbatch and srun must be on PATH)") from None
    for run in runs:
        job, commands = job_for(run, job_env(run), gpus=max(1, args.gpus_per_job))
        executor.update_parameters(**slurm_parameters(args, run, commands))
        submitted = executor.submit(job)
        save_record(logs, run, submitted, "slurm", commands)
        print(f"submitted {run.key}: Slurm job {submitted.job_id}", flush=True)
    print(f"{len(runs)} job(s) submitted; logs in {logs}; see them with --status, the tables with --report")
    return 0


def run_inline(the_plan):
    """Every unfinished run of `the_plan`, one after another in this process (paper.ipynb's quick mode): the
    same commands, each script's main() called instead of a new process."""
    for run in the_plan.runs.values():
        if diverged(run.run_dir):
            print(f"skipped {run.key}: it diverged (status.json); delete its folder to train it again")
            continue
        for command in next_commands(run):
            importlib.import_module(Path(command[1]).stem).main(command[2:])


def check_commands(runs):
    """Each distinct training command's flags through its script's own parser, before anything is started:
    one UserError names the first run a script refuses."""
    import utils

    seen = set()
    for run in runs:
        if (run.script, run.flags) in seen:
            continue
        seen.add((run.script, run.flags))
        errors = io.StringIO()
        try:
            with redirect_stderr(errors):
                importlib.import_module(Path(run.script).stem).parse_args(list(run.flags))
        except SystemExit:
            reason = errors.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
            raise UserError(f"{run.script} refuses the flags of {run.key}: {reason}") from None
        except utils.UserError as err:  # the script's own checks
            raise UserError(f"{run.script} refuses the flags of {run.key}: {err}") from None


# ----------------------------------------------------------------------------------------------
# Status
# ----------------------------------------------------------------------------------------------


class State(NamedTuple):
    """Where a run stands: done, running, failed or to do; `retry` is False for a failure that launching
    the run again cannot fix (it diverged, or its folder holds a run of other flags)."""

    state: str
    detail: str = ""
    log: tuple = ()
    retry: bool = True


def run_state(run, logs):
    """The State of `run`, from its folder and its latest job's record."""
    epochs, total = trained_epochs(run.run_dir)
    progress = f"epoch {epochs}/{total}" if total else "not started"
    if diverged(run.run_dir):
        return State("failed", f"diverged at {progress} (status.json); delete the folder to train it again",
                     retry=False)
    other = other_flags(run)
    if other:
        return State("failed", f"{other}: another sweep's run; use another --sweep-dir or delete it", retry=False)
    train, steps = pending(run)
    if not train and not steps:
        return State("done")
    record = read_json(record_path(logs, run))
    if record and job_alive(record, logs):
        return State("running", f"{progress}, {record['launcher']} job {record['job_id']}")
    error = job_error(record) if record else None
    if error:
        return State("failed", f"{progress}: {error}", tuple(log_tail(record)))
    if train:
        return State("to do", f"{progress}; {'continues with --resume' if epochs else 'trains'}")
    return State("to do", f"trained; evaluates {', '.join(describe(s) for s in steps)}")


# what may differ between a run's args.json and the sweep's command for the same run
RUN_ONLY_ARGS = {"out_dir", "resume", "device", "data_dir", "track", "wandb_project", "wandb_entity", "exp_name"}


def other_flags(run):
    """How the run in `run`'s folder was trained differently from the sweep's command (None when it was not, or
    before it started): a finished run of other settings must not pass for this sweep's."""
    saved = read_json(run.run_dir / "args.json")
    if saved is None:
        return None
    errors = io.StringIO()
    try:
        with redirect_stderr(errors):
            script = importlib.import_module(Path(run.script).stem)
            wanted = vars(script.parse_args([*run.flags, "--seed", str(run.seed)]))
    except (SystemExit, Exception):  # flags the script refuses: check_commands reports them before any launch
        return None
    for key, value in wanted.items():
        value = json.loads(json.dumps(value, default=str))  # as args.json holds it
        if key not in RUN_ONLY_ARGS and value is not None and key in saved and saved[key] != value:
            return f"its args.json has {key} {saved[key]}, this sweep {value}"
    return None


def describe(step):
    return "the landscape" if step.landscape else ",".join(step.attacks)


def print_status(the_plan, states):
    counts = {s: 0 for s in ("done", "running", "failed", "to do")}
    for run in the_plan.runs.values():
        state, detail, tail, _ = states[run.run_dir]
        counts[state] += 1
        print(f"{state:8s} {run.key:44s} {detail}".rstrip())
        for line in tail:
            print(f"    | {line}")
    print(f"{len(the_plan.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))


# ----------------------------------------------------------------------------------------------
# The report: the paper's tables with mean ± std over seeds, and its figures
# ----------------------------------------------------------------------------------------------

ATTACK_TITLES = {"clean": "Clean", "pgd20": "PGD20", "cw20": "CW", "aa": "AA"}
FIG1_METHODS = ["PGD-AT", "TRADES", "MART", "PIAT + NMSE"]


def read_metrics(path):
    """metrics.csv as a list of {column: float} (empty cells None); [] when there is none yet."""
    try:
        with open(path, newline="") as f:
            return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]
    except OSError:
        return []


def collect(the_plan):
    """{run folder: {"eval": {(role, attack): accuracy}, "metrics": metrics.csv rows}} of every run."""
    results = {}
    for run_dir in the_plan.runs:
        rows = read_json(run_dir / "eval.json", {}).get("results", [])
        results[run_dir] = {"eval": {(r["role"], r["attack"]): r["accuracy"] for r in rows},
                            "metrics": read_metrics(run_dir / "metrics.csv")}
    return results


def mean_std(values):
    """Accuracies in [0, 1] as "mean ± std" in % over seeds (sample std), the mean alone for one seed."""
    if not values:
        return "–"
    percent = [100 * v for v in values]
    if len(percent) == 1:
        return f"{percent[0]:.2f}"
    return f"{statistics.fmean(percent):.2f} ± {statistics.stdev(percent):.2f}"


def seed_values(results, run_dirs, role, attack):
    return [results[d]["eval"][(role, attack)] for d in run_dirs if (role, attack) in results[d]["eval"]]


def seeds_evaluated(results, run_dirs):
    return sum(bool(results[d]["eval"]) for d in run_dirs)


def paper_key(dataset):
    return dataset if dataset in PAPER_DATASETS else "cifar10"


def layout_note(dataset):
    if dataset in PAPER_DATASETS:
        return ""
    return f"**{dataset} is not one of the paper's data sets: the paper's numbers below only show the layout.**\n\n"


def best_final_diff(results, run_dirs, attack):
    """Best, Final and |Best - Final| of one attack, each as mean ± std over the run's seeds."""
    pairs = [(results[d]["eval"][("best", attack)], results[d]["eval"][("final", attack)]) for d in run_dirs
             if {("best", attack), ("final", attack)} <= set(results[d]["eval"])]
    return [mean_std(seed_values(results, run_dirs, "best", attack)),
            mean_std(seed_values(results, run_dirs, "final", attack)), mean_std([abs(b - f) for b, f in pairs])]


def table_i_markdown(table, results, dataset):
    """Table I: Best, Final and |Best - Final| per attack, ours (mean ± std over n seeds) above the paper's."""
    from evaluate import PAPER_TABLE_I as paper_table_i  # its one copy (evaluate.py --table --paper prints it too)

    key = paper_key(dataset)
    title = (f"**Table I ({dataset})**: accuracy (%) of the best and the final checkpoint; Diff = |Best − Final|; "
             "ours as mean ± std over n seeds")
    return layout_note(dataset) + best_final_diff_markdown(title, table, results, paper_table_i[key], key)


def averaging_markdown(table, results, dataset):
    """PIAT against weight averaging: Best, Final and |Best - Final| per attack (mean ± std over n seeds)."""
    title = (f"**PIAT vs weight averaging ({dataset})**: accuracy (%) of the best and the final checkpoint (of the "
             "average, where one is kept); Diff = |Best − Final|; mean ± std over n seeds")
    return best_final_diff_markdown(title, table, results)


def best_final_diff_markdown(title, table, results, paper=None, key=None):
    """One row per method of Best, Final and Diff per attack; with `paper` ({method: triples}) a "source"
    column and the paper's row under ours, where it has one."""
    columns = [f"{ATTACK_TITLES[a]} {c}" for a in ATTACKS for c in ("Best", "Final", "Diff")]
    source = ["source"] if paper is not None else []
    lines = [title, "", "| " + " | ".join(["Method", *source, *columns, "n"]) + " |",
             "|" + "---|" * (len(columns) + 2 + len(source))]
    for name, run_dirs in table.items():
        cells = [cell for attack in ATTACKS for cell in best_final_diff(results, run_dirs, attack)]
        ours = ["ours"] if source else []
        lines.append("| " + " | ".join([name, *ours, *cells, str(seeds_evaluated(results, run_dirs))]) + " |")
        if paper and paper.get(name):
            lines.append(f"| | paper ({key}) | " + " | ".join(f"{v:.2f}" for triple in paper[name] for v in triple)
                         + " | |")
    return "\n".join(lines) + "\n"


def cpa_markdown(title, table, results, paper):
    """Clean, PGD-20 and AutoAttack accuracy (%) of the best checkpoint beside the paper's (Tables II, III, V)."""
    lines = [f"**Table {title}**", "", "| Method | Clean | PGD20 | AA | n | paper: Clean | PGD20 | AA |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run_dirs in table.items():
        ours = [mean_std(seed_values(results, run_dirs, "best", a)) for a in ("clean", "pgd20", "aa")]
        theirs = [f"{v:.2f}" for v in paper.get(name, ())] or ["–"] * 3
        lines.append(f"| {name} | " + " | ".join(ours + [str(seeds_evaluated(results, run_dirs))] + theirs) + " |")
    return "\n".join(lines) + "\n"


def table_iv_markdown(table, results):
    lines = ["**Table IV**: vision transformers, best checkpoint, accuracy (%)", "",
             "| Model | Loss | Variant | Clean | PGD20 | AA | n | paper: Clean | PGD20 | AA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, loss, variant), run_dirs in table.items():
        ours = [mean_std(seed_values(results, run_dirs, "best", a)) for a in ("clean", "pgd20", "aa")]
        paper = PAPER_TABLE_IV.get(model, {}).get(loss)
        theirs = [f"{x:.2f}" for x in paper[list(VIT_VARIANTS).index(variant)]] if paper else ["–"] * 3
        lines.append(f"| {model} | {LOSS_NAMES[loss]} | {variant} | " + " | ".join(
            ours + [str(seeds_evaluated(results, run_dirs))] + theirs) + " |")
    return "\n".join(lines) + "\n"


def best_final_markdown(title, table, results, cells):
    """One row per method: each (role, attack) of `cells` as mean ± std over its seeds."""
    header = [f"{ATTACK_TITLES[a]} {role}" for role, a in cells]
    lines = [title, "", "| Method | " + " | ".join(header) + " | n |", "|" + "---|" * (len(cells) + 2)]
    for name, run_dirs in table.items():
        ours = [mean_std(seed_values(results, run_dirs, role, a)) for role, a in cells]
        lines.append(f"| {name} | " + " | ".join(ours) + f" | {seeds_evaluated(results, run_dirs)} |")
    return "\n".join(lines) + "\n"


def curves_markdown(title, table, results):
    """From metrics.csv alone: the best epoch's and the last epoch's PGD-20 test accuracy per method."""
    lines = [title, "", "| Method | PGD20 best epoch | PGD20 last epoch | Clean last epoch | n |",
             "|---|---|---|---|---|"]
    for name, run_dirs in table.items():
        curves = [results[d]["metrics"] for d in run_dirs if results[d]["metrics"]]
        best = [max(row["test_pgd20_acc"] for row in rows) for rows in curves]
        last = [rows[-1]["test_pgd20_acc"] for rows in curves]
        clean = [rows[-1]["test_clean_acc"] for rows in curves]
        lines.append(f"| {name} | {mean_std(best)} | {mean_std(last)} | {mean_std(clean)} | {len(curves)} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_curves(ax, table, results, column="test_pgd20_acc"):
    """Per method, `column` in % per epoch: the mean over seeds, and a ± std band with several seeds."""
    import numpy as np

    for name, run_dirs in table.items():
        curves = [results[d]["metrics"] for d in run_dirs if results[d]["metrics"]]
        if not curves:
            continue
        n = min(len(rows) for rows in curves)
        values = np.array([[100 * row[column] for row in rows[:n]] for rows in curves])
        epochs = [row["epoch"] for row in curves[0][:n]]
        mean = values.mean(axis=0)
        ax.plot(epochs, mean, marker=".", label=f"{name} (n={len(curves)})" if len(curves) > 1 else str(name))
        if len(curves) > 1:
            std = values.std(axis=0, ddof=1)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_curves(table, results, title, column="test_pgd20_acc", ylabel="PGD-20 test accuracy (%)"):
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    draw_curves(ax, table, results, column)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    return fig


def plot_fig6(table, results):
    """Each loss with and without PIAT: the best checkpoint's AutoAttack accuracy (PGD-20 where AutoAttack
    was not measured for every run), mean and std over seeds."""
    import numpy as np

    attack = "aa" if all(seed_values(results, dirs, "best", "aa") for dirs in table.values()) else "pgd20"
    fig, ax = _pyplot().subplots(figsize=(8, 4))
    xs = np.arange(len(PIAT_LOSSES))
    for offset, piat in ((-0.2, False), (0.2, True)):
        values = [[100 * v for v in seed_values(results, table.get(label(loss, piat), []), "best", attack)]
                  for loss in PIAT_LOSSES]
        means = [statistics.fmean(v) if v else float("nan") for v in values]
        errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar(xs + offset, means, width=0.4, yerr=errors if any(errors) else None, capsize=3,
               label="with PIAT" if piat else "without PIAT")
    ax.set_xticks(xs, [LOSS_NAMES[loss] for loss in PIAT_LOSSES])
    name = "AutoAttack" if attack == "aa" else "PGD-20"
    ax.set(ylabel=f"{name} accuracy (%), best checkpoint", title="Fig. 6: PIAT combined with each loss")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_fig7(table, results):
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    lams = list(table)
    for attack, name in (("clean", "clean"), ("pgd20", "PGD-20")):
        values = [[100 * v for v in seed_values(results, table[lam], "best", attack)] for lam in lams]
        errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.errorbar(lams, [statistics.fmean(v) if v else float("nan") for v in values],
                    yerr=errors if any(errors) else None, marker="o", capsize=3, label=name)
    ax.set(xscale="log", xlabel="λ", ylabel="accuracy (%), best checkpoint", title="Fig. 7: PIAT + NMSE across λ")
    ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_fig9(table, results):
    fig, (ax_clean, ax_robust) = _pyplot().subplots(1, 2, figsize=(11, 4))
    draw_curves(ax_clean, table, results, "test_clean_acc")
    draw_curves(ax_robust, table, results, "test_pgd20_acc")
    ax_clean.set(xlabel="epoch", ylabel="clean test accuracy (%)")
    ax_robust.set(xlabel="epoch", ylabel="PGD-20 test accuracy (%)")
    fig.suptitle("Fig. 9: fixed α vs the dynamic schedule (PIAT + NMSE)")
    return fig


def plot_landscapes(run_dirs):
    """Fig. 8: {method: run folder} -> the loss surfaces evaluate.py --landscape saved (final.landscape.npz)."""
    import numpy as np

    surfaces = {name: np.load(Path(d) / "final.landscape.npz") for name, d in run_dirs.items()}
    zmax = max(float(s["loss"].max()) for s in surfaces.values())
    fig = _pyplot().figure(figsize=(11, 4.5))
    for i, (name, s) in enumerate(surfaces.items()):
        ax = fig.add_subplot(1, len(surfaces), i + 1, projection="3d")
        a, b = np.meshgrid(s["a"], s["b"], indexing="ij")
        ax.plot_surface(a, b, s["loss"], cmap="viridis", vmin=0, vmax=zmax)
        ax.set(title=f"{name}: min {s['loss'].min():.2f}, max {s['loss'].max():.2f}", xlabel="a", ylabel="b",
               zlabel="adversarial CE", zlim=(0, zmax))
    fig.suptitle("Fig. 8: loss landscape under PGD")
    return fig


def grid_report(the_plan, grid, dataset, results):
    """(markdown, {file name: figure}) of one grid on one data set."""
    table = the_plan.table(grid, dataset)
    paper = {"table2": "II", "table3": "III", "table5": "V"}
    if grid == "table1":
        return table_i_markdown(table, results, dataset), {}
    if grid in paper:
        what = {"table2": "WRN-32-10", "table3": "PIAT + each loss, WRN-32-10", "table5": "ALP vs NMSE, no PIAT"}[grid]
        title = f"{paper[grid]} ({what}; {dataset}): the best checkpoint, accuracy (%)"
        return layout_note(dataset) + cpa_markdown(title, table, results,
                                                   PAPER_CPA[paper[grid]].get(paper_key(dataset), {})), {}
    if grid == "table4":
        return table_iv_markdown(table, results), {}
    if grid == "fig6":
        figures = {"fig1_robust_accuracy_per_epoch.png": plot_curves(
                       {k: table[k] for k in FIG1_METHODS if k in table}, results,
                       "Fig. 1: robust accuracy during training"),
                   "fig6_piat_with_each_loss.png": plot_fig6(table, results)}
        landscapes = {k: table[k][0] for k in ("PGD-AT", "PIAT") if (table[k][0] / "final.landscape.npz").exists()}
        if landscapes:
            figures["fig8_loss_landscape.png"] = plot_landscapes(landscapes)
        cells = [("best", "clean"), ("best", "pgd20"), ("best", "aa")]
        return best_final_markdown(f"**Fig. 6 ({dataset})**: accuracy (%)", table, results, cells), figures
    if grid == "fig7":
        table = {f"λ = {lam:g}": dirs for lam, dirs in table.items()}
        markdown = best_final_markdown(f"**Fig. 7 ({dataset})**: accuracy (%)", table, results,
                                       [("best", "clean"), ("best", "pgd20")])
        return markdown, {"fig7_lambda_sweep.png": plot_fig7(the_plan.table(grid, dataset), results)}
    if grid == "fig9":
        return (curves_markdown(f"**Fig. 9 ({dataset})**: per-epoch test accuracy (%)", table, results),
                {"fig9_fixed_vs_dynamic_alpha.png": plot_fig9(table, results)})
    if grid == "averaging":
        return (averaging_markdown(table, results, dataset),
                {"averaging.png": plot_curves(table, results, "PIAT vs weight averaging")})
    cells = [("best", "clean"), ("best", "pgd20"), ("best", "cw20"), ("final", "pgd20")]
    title = "RDAT (global learner) vs PIAT + NMSE"
    return (best_final_markdown(f"**{title} ({dataset})**: accuracy (%)", table, results, cells),
            {"rdat_vs_piat.png": plot_curves(table, results, title)})


def write_report(the_plan, grids, out_dir):
    """REPORT_DIR/<grid>.md for each grid (every data set) and its figures under REPORT_DIR/<dataset>/."""
    out_dir, results = Path(out_dir), collect(the_plan)
    plt, written = _pyplot(), []
    for grid in [g for name in grids for g in ALIASES.get(name, [name])]:
        sections = []
        for (table_grid, dataset) in the_plan.tables:
            if table_grid != grid:
                continue
            markdown, figures = grid_report(the_plan, grid, dataset, results)
            for name, fig in figures.items():
                (out_dir / dataset).mkdir(parents=True, exist_ok=True)
                fig.savefig(out_dir / dataset / name, dpi=120, bbox_inches="tight")
                plt.close(fig)
                markdown += f"\n![{name}]({dataset}/{name})\n"
                written.append(out_dir / dataset / name)
            sections.append(markdown)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{grid}.md").write_text("\n\n".join(sections))
        written.append(out_dir / f"{grid}.md")
        print("\n\n".join(sections))
    without = sum(not r["eval"] and not r["metrics"] for r in results.values())
    if without:
        print(f"{without} of {len(results)} runs have no results yet (see --status)")
    print("wrote " + ", ".join(str(p) for p in written))
    return written


# ----------------------------------------------------------------------------------------------
# The flags (python sweep.py --help) and main
# ----------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump) with exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def comma_list(allowed=None):
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if allowed is not None and item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; choose from {', '.join(allowed)}" if unknown
                                             else "empty list")
        return items

    parse.__name__ = "list"
    return parse


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv=None):
    """(sweep.py's flags, the flags for every training command)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("grids", type=comma_list([*GRIDS, *ALIASES]), metavar="GRID[,GRID...]",
                   help=f"grids to run: {', '.join([*GRIDS, *ALIASES])}")
    add_what_arguments(p)
    add_action_arguments(p)
    add_launcher_arguments(p)
    args, extra = p.parse_known_args(argv)
    owned = [flag for flag in extra if flag.split("=")[0] in ("--dataset", "--seed", "--out-dir", "--resume")]
    if owned:
        p.error(f"{owned[0]} is set by sweep.py for each run (use --datasets, --seeds, --sweep-dir)")
    if args.sweep_dir is None:
        args.sweep_dir = f"runs/sweep-{args.profile}"
    return args, extra


def add_what_arguments(p):
    g = p.add_argument_group("what to run (flags sweep.py does not know, e.g. --epochs 30, are passed to every "
                             "training command)")
    g.add_argument("--profile", type=str, default="paper", choices=tuple(PROFILES),
                   help="paper: the paper's settings (GPUs); quick: paper.ipynb's quick mode (synthetic data, a small "
                        "CNN, minutes on a CPU)")
    g.add_argument("--datasets", type=comma_list(), default=None,
                   help="comma-separated data sets (default: the paper's for each grid; synthetic with --profile "
                        "quick)")
    g.add_argument("--seeds", type=positive_int, default=1,
                   help="seeds 0..N-1 of every run (default 1; 3 for error bars)")
    g.add_argument("--sweep-dir", type=str, default=None,
                   help="where the runs, logs and report go (default: runs/sweep-<profile>)")
    g.add_argument("--attacks", type=comma_list([*ATTACKS, "landscape"]), default=None,
                   help="evaluate only these (clean,pgd20,cw20,aa,landscape; default: what each grid reports)")
    g.add_argument("--n-examples", type=positive_int, default=None,
                   help="evaluate on N test images (default: the profile's; the paper's: the whole test set)")


def add_action_arguments(p):
    g = p.add_argument_group("instead of running")
    action = g.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true", help="print the commands still needed, run nothing")
    action.add_argument("--status", action="store_true", help="print each run's state: done, running, failed, to do")
    action.add_argument("--report", action="store_true",
                        help="write the tables (mean ± std over seeds, the paper's beside) and the figures")
    g.add_argument("--report-dir", type=str, default=None, help="where --report writes (default: SWEEP_DIR/report)")


def add_launcher_arguments(p):
    g = p.add_argument_group("launcher")
    g.add_argument("--launcher", type=str, default="local", choices=("local", "slurm"),
                   help="local: jobs on this machine, waited for; slurm: one sbatch job per run (submitit)")
    g.add_argument("--jobs", type=positive_int, default=None,
                   help="local: runs at a time (default: one per GPU, else 1); each gets one GPU, or without GPUs "
                        "its share of the CPU cores (OMP_NUM_THREADS)")
    s = p.add_argument_group("slurm (--launcher slurm)")
    s.add_argument("--partition", type=str, default=None, help="partition (default: the cluster's)")
    s.add_argument("--gpus-per-job", type=int, default=1,
                   help="GPUs per run (default 1; more runs the training under torchrun, one process per GPU)")
    s.add_argument("--cpus-per-job", type=positive_int, default=None, help="CPU cores per run (--cpus-per-task)")
    s.add_argument("--time", type=str, default="24:00:00",
                   help="time limit per job, in Slurm's format (default 24:00:00); a longer run requeues itself")
    s.add_argument("--mem", type=str, default=None, help="memory per job, e.g. 64G")
    s.add_argument("--account", type=str, default=None, help="account to charge")
    s.add_argument("--qos", type=str, default=None, help="quality of service")
    s.add_argument("--slurm-setup", type=str, action="append", default=[], metavar="COMMAND",
                   help="a line run before the job, e.g. 'module load cuda' (repeatable)")
    s.add_argument("--slurm-extra", type=str, action="append", default=[], metavar="KEY[=VALUE]",
                   help="any other sbatch option, e.g. constraint=a100 or exclusive (repeatable)")


def plan_from_args(args, extra):
    return plan(args.grids, args.profile, args.datasets, args.seeds, extra, args.sweep_dir, args.attacks,
                args.n_examples)


def main(argv=None):
    """Returns the exit status: 0, or 1 when a run failed."""
    args, extra = parse_args(argv)
    try:
        parse_time(args.time)
    except (ValueError, KeyError):
        raise UserError(f"--time {args.time}: not one of Slurm's formats (M, H:M:S, D-H:M:S, ...)") from None
    the_plan, logs = plan_from_args(args, extra), Path(args.sweep_dir).absolute() / "logs"
    if args.report:
        write_report(the_plan, args.grids, args.report_dir or Path(args.sweep_dir) / "report")
        return 0
    ask_sacct([read_json(record_path(logs, run)) for run in the_plan.runs.values()], logs)
    states = {run.run_dir: run_state(run, logs) for run in the_plan.runs.values()}
    if args.status:
        print_status(the_plan, states)
        return 0
    todo = [run for run in the_plan.runs.values() if states[run.run_dir].state in ("to do", "failed")
            and states[run.run_dir].retry]
    for run in the_plan.runs.values():
        state, detail, log, _ = states[run.run_dir]
        if args.dry_run or state in ("running", "failed"):
            print(f"# {run.key}: {state}" + (f" ({detail})" if detail else ""))
            print("".join(f"    | {line}\n" for line in log), end="")
        if args.dry_run and run in todo:
            print("\n".join(shlex.join(c) for c in next_commands(run, max(1, args.gpus_per_job))))
    given_up = sum(not state.retry for state in states.values())  # failures no launch can fix
    adopted = [run for run in the_plan.runs.values() if args.launcher == "local" and states[run.run_dir].state ==
               "running" and read_json(record_path(logs, run), {}).get("launcher") == "local"]
    if args.dry_run or not (todo or adopted):
        print(f"{len(todo)} of {len(the_plan.runs)} runs to launch" + ("" if args.dry_run else ": nothing to do"))
        return 1 if given_up and not args.dry_run else 0
    check_commands(todo)
    if args.launcher == "slurm":
        return launch_slurm(todo, args, logs)
    failed = launch_local(todo, args.jobs, logs, adopted)
    print(f"{len(todo) + len(adopted) - failed} run(s) finished, {failed} failed" + (" (above)" if failed else ""))
    return 1 if failed or given_up else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        sys.exit(f"sweep.py: error: {err}")
    except KeyboardInterrupt:
        sys.exit(130)
