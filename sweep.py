"""Run the paper's grids (each table's and figure's training runs, then evaluate.py on them) on this machine's GPUs
or CPUs, or on Slurm through submitit; then write the tables (mean ± std over seeds beside the paper's numbers, and
each method against PGD-AT with its significance) and the figures.

    python sweep.py table1 --dry-run                   # the commands, checked, nothing run
    python sweep.py table1 --seeds 3 --jobs 4          # here: 4 runs at a time, one GPU each
    python sweep.py paper --seeds 3 --launcher slurm --partition gpu --time 2-00:00:00 --gpus-per-job 1
    python sweep.py paper --seeds 3 --status           # done / running / failed / to do, per run
    python sweep.py paper --seeds 3 --report           # SWEEP_DIR/report/<grid>.md and the figures
    python sweep.py fig6 --epochs 30 --track           # flags sweep.py does not know go to every training run

Each run is one folder, SWEEP_DIR/<dataset>/<run>/seed<k>, trained once however many grids share it. The same command
again is safe: a finished run is skipped, a started one continues with --resume, one that diverged is reported, not
retried. On Slurm a job requeues itself when preempted or out of time.
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
import subprocess
import sys
import time
from collections import namedtuple
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import scipy.stats
from matplotlib.figure import Figure

import utils
from evaluate import ATTACK_TITLES, ATTACKS, PAPER_TABLE_I, choice_list
from evaluate import parse_args as evaluate_args
from report import compare_flags, p_text, plot_landscapes
from utils import LOSS_NAMES, threat_of

ROOT = Path(__file__).resolve().parent
SIGNAL_DELAY_S = 120  # Slurm warns a job (USR2) this long before its time limit: time to stop and requeue
GRACE_S = 60  # a stopped training process gets this long to exit before SIGKILL
LOGGED = ("epoch ", "best ", "final ", "landscape ")  # the log lines of a local job shown as they come
SLURM_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
                "REQUEUE_FED")
SLURM_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
               "PREEMPTED")

# === The grids: the paper's tables and figures as runs (one definition, read by sweep.py and paper.ipynb)

QUICK_CNN = ["--arch", "small-cnn", "--epochs", "3", "--batch-size", "32", "--pgd-steps", "2", "--eval-pgd-steps", "2"]
PROFILES = {
    # the paper's settings (Sec. V-A): the scripts' defaults; evaluate.py on the whole test set, AutoAttack standard
    "paper": {"datasets": None, "data": [], "cnn": ["--arch", "resnet18"], "wrn": ["--arch", "wrn-32-10"], "vit": [],
              "eval": [], "aa": [], "aa_everywhere": True, "landscape": [], "lambdas": [0.5, 1, 2, 4, 6, 8],
              "fixed_alphas": [0.3, 0.6, 0.9, 0.99],
              "vit_models": ["convit_base", "vit_base_patch16_224", "deit_small_patch16_224"],
              "vit_losses": ["ce", "trades", "mart"], "rdat": ["RDAT", "Generalist (RDAT, λ = 0)", "RDAT + PIAT"],
              "ema_decay": 0.999},
    # paper.ipynb's quick mode, minutes on a CPU (the pipeline, not the paper's numbers); the small CNN for WRN too
    "quick": {"datasets": ["synthetic"], "data": ["--train-size", "256", "--eval-size", "32", "--device", "cpu"],
              "cnn": QUICK_CNN, "wrn": QUICK_CNN,
              "vit": ["--no-pretrained", "--model-kwargs", '{"depth": 2, "embed_dim": 32, "num_heads": 2}',
                      "--epochs", "2", "--batch-size", "32", "--pgd-steps", "2", "--eval-pgd-steps", "2",
                      "--ap-warmup-epochs", "1"],
              "eval": ["--n-examples", "32"], "aa_everywhere": False,
              "aa": ["--n-examples", "16", "--aa-version", "custom", "--aa-attacks", "apgd-ce"],
              "landscape": ["--landscape-steps", "5", "--landscape-batch", "32", "--landscape-pgd-steps", "3",
                            "--device", "cpu"],
              "lambdas": [1, 4, 8], "fixed_alphas": [0.3, 0.9],
              "vit_models": ["vit_tiny_patch16_224"], "vit_losses": ["ce"], "rdat": ["RDAT"], "ema_decay": 0.8},
}
# the paper's grids with small-cnn on a CPU: AutoAttack's two gradient attacks (APGD-CE, APGD-T), and an EMA whose
# horizon (1 / (1 - decay) = 50 steps) is about three epochs of a few thousand images, as 0.999 is on CIFAR-10
PROFILES["cpu"] = {**PROFILES["paper"], "cnn": ["--arch", "small-cnn"], "wrn": ["--arch", "small-cnn"],
                   "aa": ["--aa-version", "custom", "--aa-attacks", "apgd-ce,apgd-t"], "ema_decay": 0.98}
PIAT_LOSSES = ["ce", "alp", "trades", "mart", "mail", "nmse"]  # Fig. 6; Table III has all but NMSE
TABLE_I = [(loss, False) for loss in ("ce", "alp", "trades", "mart", "mail", "cfa", "rat")] + [("nmse", True)]
VIT_VARIANTS = {"plain": ["--no-piat"], "A&P": ["--no-piat", "--ard", "--prm"],
                "PIAT + A&P": ["--piat", "--ard", "--prm"]}
RUN_SUFFIXES = {"--lam": "-lam{}", "--alpha-fixed": "-alpha{}", "--ema": "-ema", "--swa-start": "-swa"}  # run names
RDAT_VARIANTS = {"RDAT": ("rdat", ()), "Generalist (RDAT, λ = 0)": ("generalist", ("--lam", "0")),
                 "RDAT + PIAT": ("rdat-piat", ("--piat",))}
# an evaluate.py call on best/final.pt of the run folder, or of its view: "trained", the weights a run with a weight
# average trained (train_piat.py's RUN/trained, the same run without the average)
Step = namedtuple("Step", "attacks flags landscape view", defaults=((), False, ""))


def label(loss, piat):
    """The paper's name of a loss with or without PIAT ("PIAT" alone is PGD-AT with PIAT)."""
    return utils.method_name({"loss": loss, "piat": piat})


def piat_run(P, arch, loss, piat, *more):
    """(run name, script, flags) of a train_piat.py run; the `more` flags (pairs) add their RUN_SUFFIXES."""
    prefix = "wrn-" if arch == "wrn" and P["wrn"] != P["cnn"] else ""  # WRN-32-10 runs, where they differ
    view = more[-1] if len(more) % 2 else ""  # "/trained": the run's trained weights (a view, not a run)
    more = more[:-1] if view else more
    suffix = "".join(RUN_SUFFIXES[flag].format(value) for flag, value in zip(more[::2], more[1::2]))
    return (f"{prefix}{loss}-{'piat' if piat else 'nopiat'}{suffix}{view}", "train_piat.py",
            (*P[arch], "--loss", loss, "--piat" if piat else "--no-piat", *more))


def measured(P, *attacks, aa=None):
    """A row's evaluations: `attacks` on the profile's test images, and AutoAttack where the profile measures it."""
    steps = (Step(attacks, tuple(P["eval"])),)
    return steps + ((Step(("aa",), tuple(P["aa"])),) if (P["aa_everywhere"] if aa is None else aa) else ())


# grid -> (the paper's data sets, rows(profile P, extra flags) -> [(label, run name, script, flags, evaluations)])
GRIDS = {
    "table1": (["cifar10", "cifar100", "svhn"], lambda P, extra: [  # Table I: best and final checkpoints, 4 attacks
        (label(loss, piat), *piat_run(P, "cnn", loss, piat), measured(P, "clean", "pgd20", "cw20", aa=True))
        for loss, piat in TABLE_I]),
    "table2": (["cifar10", "cifar100"], lambda P, extra: [  # Table II: Table I's methods on WRN-32-10
        (label(loss, piat), *piat_run(P, "wrn", loss, piat), measured(P, "clean", "pgd20"))
        for loss, piat in TABLE_I]),
    "table3": (["cifar10", "cifar100"], lambda P, extra: [  # Table III: PIAT with each loss, WRN-32-10
        (label(loss, piat), *piat_run(P, "wrn", loss, piat), measured(P, "clean", "pgd20"))
        for loss in PIAT_LOSSES[:-1] for piat in (False, True)]),
    "table4": (["cifar10"], lambda P, extra: [  # Table IV: ViTs plain, with A&P, with PIAT + A&P
        ((model, loss, variant), f"vit-{model}-{loss}-{variant.replace(' + ', '-').replace('&', '')}", "train_vit.py",
         ("--model", model, *P["vit"], "--loss", loss, *flags), measured(P, "clean", "pgd20"))
        for model in P["vit_models"] for loss in P["vit_losses"] for variant, flags in VIT_VARIANTS.items()]),
    "table5": (["cifar10", "cifar100"], lambda P, extra: [  # Table V: ALP vs NMSE, no PIAT
        (LOSS_NAMES[loss], *piat_run(P, "cnn", loss, False), measured(P, "clean", "pgd20"))
        for loss in ("alp", "nmse")]),
    "fig6": (["cifar10"], lambda P, extra: [  # Fig. 6: each loss ± PIAT; Figs. 1 and 8 (landscapes)
        (label(loss, piat), *piat_run(P, "cnn", loss, piat), measured(P, "clean", "pgd20") + (
            (Step((), tuple(P["landscape"]), landscape=True),) if loss == "ce" else ()))
        for loss in PIAT_LOSSES for piat in (False, True)]),
    "fig7": (["cifar10"], lambda P, extra: [  # Fig. 7: NMSE's λ (the default: the shared PIAT + NMSE run)
        (lam, *piat_run(P, "cnn", "nmse", True, *(() if lam == script_flags("train_piat.py", (), "λ")["lam"] else
                                                 ("--lam", f"{lam:g}"))), measured(P, "clean", "pgd20", aa=False))
        for lam in P["lambdas"]]),
    "fig9": (["cifar10"], lambda P, extra: [  # Fig. 9: fixed α vs the schedule, from metrics.csv
        ("dynamic", *piat_run(P, "cnn", "nmse", True), ())] + [
        (f"α = {alpha:g}", *piat_run(P, "cnn", "nmse", True, "--alpha-fixed", f"{alpha:g}"), ())
        for alpha in P["fixed_alphas"]]),
    "rdat": (["cifar10"], lambda P, extra: [  # RDAT (a reconstruction) beside PIAT + NMSE
        (name, *(piat_run(P, "cnn", "nmse", True) if name == "PIAT + NMSE" else (
            RDAT_VARIANTS[name][0], "train_rdat.py", (*P["cnn"], *RDAT_VARIANTS[name][1]))),
         measured(P, "clean", "pgd20", "cw20", aa=False)) for name in ["PIAT + NMSE", *P["rdat"]]]),
    "averaging": (["cifar10"], lambda P, extra: [  # not in the paper: PIAT vs an EMA of the weights or SWA
        (name, *piat_run(P, "cnn", "ce", piat, *more), measured(P, "clean", "pgd20", "cw20", aa=True))
        for name, piat, more in (
            ("PGD-AT", False, ()), ("PGD-AT + EMA", False, ("--ema", f"{P['ema_decay']:g}")),
            ("PGD-AT + SWA", False, ("--swa-start", str(3 * script_flags(
                "train_piat.py", [*P["cnn"], *extra], "the averaging grid")["epochs"] // 4))),
            ("PIAT", True, ()), ("PIAT + EMA", True, ("--ema", f"{P['ema_decay']:g}")))]),
    "ema": (["cifar10"], lambda P, extra: [  # not in the paper: is PIAT more than an EMA of the weights?
        (name, *piat_run(P, "cnn", loss, piat, *more), measured(P, "clean", "pgd20", "cw20", aa=True))
        for name, loss, piat, more in (  # RUN/trained: the run's trained weights, the same run without its EMA
            ("PGD-AT", "ce", False, ("--ema", f"{P['ema_decay']:g}", "/trained")),
            ("PGD-AT + EMA", "ce", False, ("--ema", f"{P['ema_decay']:g}")), ("PIAT", "ce", True, ()),
            ("PIAT + NMSE", "nmse", True, ("--ema", f"{P['ema_decay']:g}", "/trained")),
            ("PIAT + NMSE + EMA", "nmse", True, ("--ema", f"{P['ema_decay']:g}")))]),
}
ALIASES = {"paper": ["table1", "table2", "table3", "table4", "table5", "fig6", "fig7", "fig9", "rdat"]}

# === The plan: every run of some grids once, with the evaluations all of them need


PAPER_THREAT = utils.threat_model("linf", utils.EPSILONS["linf"])  # the paper's one threat model, "L-inf eps 8/255"


class Run(namedtuple("Run", "dataset name seed script flags run_dir steps threat", defaults=(PAPER_THREAT,))):
    """One training run: `script` with `flags`, seed, folder, evaluations and threat model (as evaluate.py names it)."""
    key = property(lambda self: f"{self.dataset}/{self.name}/seed{self.seed}")


Plan = namedtuple("Plan", "runs tables")  # runs: folder -> Run; tables: (grid, dataset) -> {label: seeds' folders}


def plan(grids, profile="paper", datasets=None, seeds=1, extra=(), sweep_dir="runs/sweep", attacks=None,
         n_examples=None, norm="linf", epsilon=None):
    """The Plan of `grids` for seeds 0..seeds-1; `extra` flags go to every training command, the threat model (norm,
    epsilon; None: the norm's default) to every command too, and to the run's name (docs/sweeps.md)."""
    P, sweep_dir, result = PROFILES[profile], Path(sweep_dir).absolute(), Plan({}, {})
    epsilon = None if epsilon == utils.EPSILONS[norm] else epsilon
    threat_flags = (*(("--norm", norm) if norm != "linf" else ()), *(("--epsilon", f"{epsilon:g}") if epsilon else ()))
    suffix = f"-{norm}" * (norm != "linf") + (f"-eps{epsilon:g}" if epsilon is not None else "")
    threat = utils.threat_model(norm, utils.EPSILONS[norm] if epsilon is None else epsilon)
    for grid in [g for name in grids for g in ALIASES.get(name, [name])]:
        grid_datasets, rows = GRIDS[grid]
        for dataset in datasets or P["datasets"] or grid_datasets:
            table = result.tables.setdefault((grid, dataset), {})
            for row_label, name, script, flags, steps in rows(P, list(extra)):
                name, _, view = name.partition("/")  # RUN/trained: a view of RUN, evaluated in its own folder
                steps = tuple(step._replace(view=view, flags=step.flags + threat_flags) for step in steps)
                for seed in range(seeds):
                    run = Run(dataset, name + suffix, seed, script, ("--dataset", dataset, *P["data"], *flags, *extra,
                                                                      *threat_flags),
                              sweep_dir / dataset / (name + suffix) / f"seed{seed}", steps, threat)
                    known = result.runs.get(run.run_dir)
                    if known and known[:5] != run[:5]:
                        raise ValueError(f"two grids define {run.key} differently: {known.flags} and {run.flags}")
                    result.runs[run.run_dir] = run._replace(steps=known.steps + steps) if known else run
                    table.setdefault(row_label, []).append(run.run_dir / view)
    for run_dir, run in result.runs.items():
        result.runs[run_dir] = run._replace(steps=evaluations(run.steps, attacks, n_examples))
    return result


def evaluations(steps, attacks, n_examples):
    """`steps` as evaluate.py calls: only `attacks` (None: all), on `n_examples` images, one call per set of flags."""
    merged = {}
    for step in steps:
        flags = step.flags
        if n_examples:
            at = flags.index("--n-examples") if "--n-examples" in flags else len(flags)
            flags = flags[:at] + flags[at + 2:] + ("--n-examples", str(n_examples))
        key = flags, step.landscape, step.view
        wanted = {a for a in step.attacks if attacks is None or a in attacks} | set(
            merged[key].attacks if key in merged else ())
        if wanted or (step.landscape and "landscape" in (attacks or ["landscape"])):
            merged[key] = Step(tuple(a for a in ATTACKS if a in wanted), flags, step.landscape, step.view)
    return tuple(merged.values())


def plan_from_args(a, extra):
    return plan(a.grids, a.profile, a.datasets, a.seeds, extra, a.sweep_dir, a.attacks, a.n_examples, a.norm,
                a.epsilon)


# === A run's state and commands, judged from its folder and its latest job's record


def read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def eval_rows(folder, threat):
    """{(role, attack): eval.json's result row} of a run folder (or its view) under `threat`, and clean accuracy."""
    rows = read_json(folder / "eval.json", {}).get("results", [])
    return {(r["role"], r["attack"]): r for r in rows if threat_of(r) in (None, threat)}


def pending(run):
    """(how far its training got, whether it still trains, the evaluate.py steps still needed) of `run`'s folder."""
    epochs, total = 0, None
    if (run.run_dir / "final.pt").exists():
        checkpoint = utils.load_checkpoint(run.run_dir / "final.pt", mmap=True)  # reads no tensor
        epochs, total = checkpoint["epoch"], checkpoint["args"]["epochs"]
    steps = []
    for step in run.steps:  # what is missing, or was measured with other settings, on either checkpoint
        folder = run.run_dir / step.view
        saved, rows = read_json(folder / "eval.json", {}), eval_rows(folder, run.threat)
        drawn = {(e["steps"], e["range"], e["pgd_steps"], e["epsilon"]) for e in saved.get("landscapes", [])}
        a = evaluate_args([str(folder), *step.flags])
        attacks = tuple(x for x in step.attacks if not all(measured_as(rows.get((r, x)), a) for r in ("best", "final")))
        if attacks or step.landscape and (a.landscape_steps, a.landscape_range, a.landscape_pgd_steps,
                                          utils.radii(a)[0]) not in drawn:
            steps.append(step._replace(attacks=attacks))
    progress = f"epoch {epochs}/{total}" if total else "no epoch saved" if (run.run_dir / "args.json").exists() else \
        "not started"
    return progress, total is None or epochs < total, steps


def measured_as(row, a):
    """Whether an eval.json result row (of the run's threat model) was measured as evaluate.py's flags `a` measure it:
    on the same images, attack settings and seed; a setting an older evaluate.py did not record is taken as asked."""
    attack = row and row["attack"]
    wanted = {"n": a.n_examples, "subset": None if a.n_examples else "all", "seed": a.seed, "amp": a.amp,
              "epsilon_255": 0.0 if attack == "clean" else None,  # eps and norm: the run's threat model
              "step_size_255": 255 * utils.radii(a)[1] if attack in ("pgd20", "cw20", "eot20") else None,
              "aa_version": a.aa_version if attack == "aa" else None,
              "aa_attacks": a.aa_attacks if attack == "aa" and a.aa_version == "custom" else None}
    return row is not None and all(v is None or row.get(k, v) == v for k, v in wanted.items())


def next_commands(run, gpus=1):
    """The commands that finish `run` from where its folder stands: its training (--resume once begun), evaluate.py."""
    _, train, steps = pending(run)
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] if gpus > 1 else []
    resume = ["--resume", str(run.run_dir)] if (run.run_dir / "args.json").exists() else []
    commands = [[sys.executable, *torchrun, str(ROOT / run.script), *run.flags, "--seed", str(run.seed), "--out-dir",
                 str(run.run_dir), *resume]] if train else []
    return commands + [[sys.executable, str(ROOT / "evaluate.py"), str(run.run_dir / step.view), *(
        ["--landscape"] if step.landscape else ["--attacks", ",".join(step.attacks)]), *step.flags] for step in steps]


State = namedtuple("State", "state detail log retry", defaults=("", (), True))  # retry: False if no launch can fix it


def run_state(run, logs=None):
    """The State of `run`, from its folder and its latest job's record (none without `logs`)."""
    (progress, train, steps), started = pending(run), read_json(run.run_dir / "args.json")
    wanted = script_flags(run.script, [*run.flags, "--seed", str(run.seed)], run.key) if started else {}
    for key, value in wanted.items():  # a run of other settings never passes for ours
        value = json.loads(json.dumps(value, default=str))  # as args.json holds it
        if key in RUN_ONLY_ARGS or value is None or (key, value) == ("val_size", 0):  # CFA's FAWA holds out its own
            continue
        if started.get(key, value) != value:
            return State("failed", f"its args.json has {key} {started[key]}, this sweep {value}: another sweep's run; "
                         "use another --sweep-dir or delete it", retry=False)
    if not train and not steps:
        return State("done")
    record = read_json(record_path(logs, run)) if logs else None
    if record and job_alive(record, logs):
        return State("running", f"{progress}, {record['launcher']} job {record['job_id']}")
    error = job_error(record) if record else None
    if error and "(it diverged)" in error and started:
        return State("failed", f"diverged ({progress}); delete its folder to train it again", log_tail(record), False)
    if error:
        return State("failed", f"{progress}: {error}", log_tail(record))
    if train:
        return State("to do", f"{progress}; " + ("continues with --resume" if started else "trains"))
    return State("to do", "trained; evaluates " + ", ".join(",".join(s.attacks) or "the landscape" for s in steps))


RUN_ONLY_ARGS = utils.RESUME_MAY_CHANGE | {"out_dir", "exp_name"}  # may differ in args.json from the sweep's own


def script_flags(script, flags, what):
    """`flags` through `script`'s own parser, as a dict; refused (naming `what`), they end the sweep as a flag of
    sweep.py's own: one line, exit status 2."""
    errors = io.StringIO()
    try:
        with redirect_stderr(errors):
            return vars(importlib.import_module(Path(script).stem).parse_args(list(flags)))
    except SystemExit:
        reason = errors.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
    except utils.UserError as err:  # the script's own checks
        reason = str(err)
    utils.ArgumentParser(prog="sweep.py").error(f"{script} refuses the flags of {what}: {reason}")  # as our own: 2


# === Launching: a submitit job per run, here or on Slurm (submitit imported only there), or each run in this process


def _child_setup():
    """In each job's process: ignore Slurm's USR2 (the job stops it with SIGTERM) and die with the job (PDEATHSIG)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class RunJob:
    """A submitit job for one run: next_commands() when it starts; checkpoint() when it is to be requeued."""

    def __init__(self, run, gpus=1, env=None):
        self.run, self.gpus, self._proc = run, gpus, None
        self.env = {"WANDB_NAME": run.key, "WANDB_RUN_GROUP": f"{run.dataset}/{run.name}", **(env or {})}  # --track

    def __getstate__(self):
        return {**self.__dict__, "_proc": None}

    def __call__(self):
        for command in next_commands(self.run, self.gpus):
            self._run(command)
        return str(self.run.run_dir)

    def _run(self, command):
        print("+", shlex.join(command), flush=True)
        self._proc = subprocess.Popen(command, env={**os.environ, **self.env}, start_new_session=True,
                                      preexec_fn=_child_setup)
        try:
            while (code := self._proc.poll()) is None:  # not wait(): the signal handler must be able to reap it
                time.sleep(0.5)
        finally:  # the job was cancelled or is exiting: never leave the run behind
            if self._proc is not None and self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc = None
        if code != 0:
            script = next(Path(arg).name for arg in command if arg.endswith(".py"))
            how = f"signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"exit code {code}"
            how += " (it diverged)" if code == 3 and script != "evaluate.py" else ""  # the scripts' exit status
            raise RuntimeError(f"{script} stopped with {how}: {shlex.join(command)}")

    def checkpoint(self, *args, **kwargs):
        """Before a requeue: stop the training (SIGTERM: it saves its epoch; SIGKILL after GRACE_S), run this again."""
        from submitit.helpers import DelayedSubmission

        try:
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=GRACE_S)  # _run only polls: Popen's lock is free here
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (AttributeError, ProcessLookupError):  # no process, or it is gone already
            pass
        return DelayedSubmission(self, *args, **kwargs)


def record_path(logs, run):
    """The record of the run's latest job: how --status and later sweeps find it."""
    return Path(logs) / "jobs" / f"{run.dataset}.{run.name}.seed{run.seed}.json"


def save_record(logs, run, job, launcher, commands, env=None):
    record_path(logs, run).parent.mkdir(parents=True, exist_ok=True)
    utils.save_json({"run": run.key, "launcher": launcher, "job_id": str(job.job_id), "host": socket.gethostname(),
                     "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "stdout": str(job.paths.stdout),
                     "stderr": str(job.paths.stderr), "result": str(job.paths.result_pickle), "env": env or {},
                     "commands": [shlex.join(c) for c in commands]}, record_path(logs, run))


def job_alive(record, logs):
    """Whether the recorded job may still work on its run (then no second job is started for it)."""
    if record["launcher"] == "inline":  # it ran in a sweep's own process, which has ended
        return False
    if record["launcher"] == "local":
        try:
            return (not Path(record["result"]).exists() and record["host"] == socket.gethostname()
                    and b"submitit" in Path(f"/proc/{record['job_id']}/cmdline").read_bytes())
        except OSError:
            return False
    # sacct's answer (asked in main); a job requeued after a failure is active again though its first left a result
    import submitit

    state = submitit.SlurmJob(folder=logs, job_id=record["job_id"]).watcher.get_state(record["job_id"], mode="cache")
    state = (state.split() or ["UNKNOWN"])[0]
    return state in SLURM_ACTIVE or (state not in SLURM_ENDED and not Path(record["result"]).exists())


def job_error(record):
    """The last line of the recorded job's error; None when it succeeded."""
    if record["launcher"] == "inline":
        return record["error"]
    try:
        with open(record["result"], "rb") as f:
            outcome, value = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError):
        return "its job ended without a result"
    return None if outcome != "error" else ([ln for ln in str(value).splitlines() if ln.strip()] or ["failed"])[-1]


def log_tail(record, n=12, logs=("stderr", "stdout")):
    """The last `n` lines (None: all) of a job's stderr log (or of its stdout when stderr is empty)."""
    for path in (Path(record.get(key) or "") for key in logs):
        if path.is_file() and (lines := path.read_text(errors="replace").rstrip().splitlines()):
            return tuple(lines[-n if n else 0:])
    return ()


def launch_local(runs, jobs, logs, adopted=()):
    """Run `runs` here, `jobs` at a time (docs/sweeps.md), and wait for them and the `adopted` runs (jobs an earlier
    sweep started here). Returns the failures."""
    import submitit
    import torch

    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count()))))
    gpus = [gpu.strip() for gpu in gpus.split(",") if gpu.strip()][: torch.cuda.device_count()]
    jobs = jobs or max(1, len(gpus))
    threads, executor = max(1, (os.cpu_count() or 1) // jobs), submitit.LocalExecutor(folder=logs)
    executor.update_parameters(timeout_min=60 * 24 * 365, signal_delay_s=SIGNAL_DELAY_S)  # no time limit
    where = f"one GPU each ({', '.join(gpus)})" if gpus else f"no GPU, {threads} CPU thread(s) each"
    print(f"{len(runs)} run(s), {jobs} at a time on this machine, {where}; logs in {logs}", flush=True)
    slots = {}  # slot -> [run, its submitit job (None: an earlier sweep's), the lines of its log shown]
    for run in adopted:  # on the GPU its record names where that slot is free
        gpu = read_json(record_path(logs, run), {}).get("env", {}).get("CUDA_VISIBLE_DEVICES")
        free = sorted(set(range(jobs + len(slots))) - set(slots))
        slots[gpus.index(gpu) if gpu in gpus and gpus.index(gpu) in free else free[0]] = [run, None, None]
        print(f"waiting  {run.key} (its job was started by an earlier sweep)", flush=True)
    queue, failed = list(runs), 0
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while queue or slots:
            for slot in [s for s in range(jobs) if s not in slots][: min(len(queue), jobs - len(slots))]:
                run = queue.pop(0)
                device = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else {"OMP_NUM_THREADS": str(threads)}
                detail, job = run_state(run).detail, executor.submit(RunJob(run, env=device))
                slots[slot] = [run, job, 0]
                save_record(logs, run, job, "local", next_commands(run), device)
                where = f", GPU {device['CUDA_VISIBLE_DEVICES']}" if gpus else ""
                print(f"run {len(runs) - len(queue)}/{len(runs)}: {run.key} ({detail}; job {job.job_id}{where}; log "
                      f"{job.paths.stdout})", flush=True)
            time.sleep(0.5)
            for slot, (run, job, shown) in list(slots.items()):
                record = read_json(record_path(logs, run), {})
                ended, lines = job.done() if job else not job_alive(record, logs), log_tail(record, None, ("stdout",))
                for line in lines[len(lines) if shown is None else shown:]:  # each epoch and evaluation as it ends
                    if line.lstrip().startswith(LOGGED):
                        print(f"    {run.key}: {line.strip()}", flush=True)
                slots[slot][2] = len(lines)
                if ended:
                    del slots[slot]
                    state = run_state(run, logs)
                    print(f"finished {run.key}" if state.state == "done" else f"FAILED   {run.key}: {state.detail}"
                          + "".join(f"\n    | {line}" for line in state.log), flush=True)
                    failed += state.state != "done"
    except KeyboardInterrupt:  # Ctrl-C, or this sweep was killed: its jobs stop too
        running = [job for _, job, _ in slots.values() if job]
        for job in running:
            job.cancel(check=False)  # SIGINT to the job's controller: the job stops its training process
        deadline = time.time() + 30
        while time.time() < deadline and not all(job.done() for job in running):
            time.sleep(0.2)
        print(f"stopped {len(slots)} running job(s): run the same command again to continue", flush=True)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return failed


def slurm_minutes(text):
    """--time in Slurm's formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as minutes."""
    days, dash, clock = text.rpartition("-")
    try:
        parts, days = [float(p) for p in clock.split(":")], float(days or 0)
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3:
        raise argparse.ArgumentTypeError(f"{text} is not one of Slurm's formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)")
    hours, minutes, seconds = (parts + [0, 0])[:3] if dash else parts if len(parts) == 3 else [0, *parts, 0][:3]
    return days * 1440 + hours * 60 + minutes + seconds / 60


def launch_slurm(runs, args, logs):
    """Submit one Slurm job per run (sbatch through submitit) and return: the jobs outlive this command."""
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=logs, max_num_timeout=50)  # time-outs to requeue after
    except RuntimeError as err:
        raise utils.UserError(f"--launcher slurm: {err} (sbatch and srun must be on PATH)") from None
    extra = (item.lstrip("-").partition("=") for item in args.slurm_extra)
    gpus, extra = max(1, args.gpus_per_job), {"requeue": True, "chdir": os.getcwd(), **{k: v if sep else True
                                                                                         for k, sep, v in extra}}
    for run in runs:  # what a user would write by hand (no submitit wckey), and the job's commands as comments
        commands = next_commands(run, gpus)
        executor.update_parameters(
            job_name=f"{run.dataset}-{run.name}-seed{run.seed}", time=math.ceil(args.time), nodes=1, ntasks_per_node=1,
            gpus_per_node=args.gpus_per_job or None, cpus_per_task=args.cpus_per_job, mem=args.mem,
            partition=args.partition, account=args.account, qos=args.qos, signal_delay_s=SIGNAL_DELAY_S, wckey=None,
            additional_parameters=extra, setup=[*args.slurm_setup, *(f"# {shlex.join(c)}" for c in commands)])
        submitted = executor.submit(RunJob(run, gpus))
        save_record(logs, run, submitted, "slurm", commands)
        print(f"submitted {run.key}: Slurm job {submitted.job_id}", flush=True)
    print(f"{len(runs)} job(s) submitted; logs in {logs}; see them with --status, the tables with --report")
    return 0


def run_inline(runs, logs):
    """Each of `runs` in this process (its scripts' main()), its outcome recorded as a job's. Returns the failures."""
    failed = 0
    for number, run in enumerate(runs, 1):
        print(f"run {number}/{len(runs)}: {run.key} ({run_state(run).detail})", flush=True)
        error = None
        for command in next_commands(run):
            try:
                importlib.import_module(Path(command[1]).stem).main(command[2:])
            except utils.Diverged as err:
                print(f"FAILED   {run.key}: diverged: {err}", flush=True)
                error, failed = f"{Path(command[1]).name}: diverged: {err} (it diverged)", failed + 1
                break
        record_path(logs, run).parent.mkdir(parents=True, exist_ok=True)
        utils.save_json({"run": run.key, "launcher": "inline", "error": error}, record_path(logs, run))
    return failed


# === The report: the tables (mean ± std over seeds, the paper's numbers, each method against PGD-AT) and figures

# The paper's other tables (their one copy; Table I's is evaluate.py's, for --paper too):
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

FIG1_METHODS = ["PGD-AT", "TRADES", "MART", "PIAT + NMSE"]
BEST_CPA = [("best", "clean"), ("best", "pgd20"), ("best", "aa")]  # Tables II-V's columns
BEST_FINAL_DIFF = [(role, attack) for attack in ATTACKS for role in ("best", "final", "diff")]  # Table I's
CPA_TABLES = {"table2": ("II", "WRN-32-10"), "table3": ("III", "PIAT + each loss, WRN-32-10"),
              "table5": ("V", "ALP vs NMSE, no PIAT")}
SIGNIFICANCE = ("Δ vs {0}: accuracy minus {0}'s (points) [95 % interval: paired bootstrap over the test images], p: "
                "exact McNemar test on the images one gets right and the other wrong, seeds paired in order; * p < "
                "0.05; – no per-image results on the same images (an older evaluate.py's: evaluate the run again).")
SEED_INTERVALS = ("Δ over seeds: the mean over seeds of the difference to {0}'s run of the same seed [95 % "
                  "t-interval over the seeds]; oscillation: the mean |change| of test PGD-20 accuracy from one epoch "
                  "to the next after the first quarter of training (metrics.csv).")


def read_metrics(path):
    """metrics.csv as a list of {column: int, float, or None for an empty cell}; [] when there is none."""

    def value(text):
        for kind in (int, float):
            try:
                return kind(text)
            except (TypeError, ValueError):
                pass
        return None if text in ("", None) else text

    try:
        with open(path, newline="") as f:
            return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except OSError:
        return []


def collect(the_plan):
    """{run folder: {"eval": {(role, attack): eval.json's result row}, "metrics": metrics.csv rows}} of every run."""
    folders = {d for table in the_plan.tables.values() for dirs in table.values() for d in dirs}
    threat = threat_of_plan(the_plan)
    return {d: {"eval": eval_rows(d, threat), "metrics": run_metrics(d)} for d in {*the_plan.runs, *folders}}


def run_metrics(run_dir):
    """metrics.csv's rows of a run folder; of its view RUN/trained, the run's rows with raw_* as the columns."""
    if run_dir.name != "trained":
        return read_metrics(run_dir / "metrics.csv")
    return [{**row, **{k[len("raw_"):]: v for k, v in row.items() if k.startswith("raw_") and v is not None}}
            for row in read_metrics(run_dir.parent / "metrics.csv")]


def mean_std(values, text=True):
    """Accuracies in [0, 1] as "mean ± std" in % (the mean alone for one, "–" for none), or as (mean, std or 0)."""
    percent = 100 * np.array(values, dtype=float)
    mean, std = percent.mean() if values else np.nan, percent.std(ddof=1) if len(values) > 1 else 0
    return (mean, std) if not text else "–" if not values else f"{mean:.2f}" + f" ± {std:.2f}" * (len(values) > 1)


def seed_values(results, run_dirs, role, attack):
    """Per seed, `attack`'s accuracy of the `role`: "best", "final", "diff" (|best - final|), "best/last epoch"."""
    values = []
    for d in run_dirs:
        evals, rows, column = results[d]["eval"], results[d]["metrics"], f"test_{attack}_acc"
        if role == "diff" and {("best", attack), ("final", attack)} <= evals.keys():
            values.append(abs(evals["best", attack]["accuracy"] - evals["final", attack]["accuracy"]))
        elif (role, attack) in evals:
            values.append(evals[role, attack]["accuracy"])
        elif role.endswith("epoch") and rows:
            values.append(max(row[column] for row in rows) if role == "best epoch" else rows[-1][column])
        elif role == "oscillation" and len(rows) > 4:  # after the first quarter of the epochs
            values.append(oscillation([row[column] for row in rows[len(rows) // 4 :]]))
    return values


def oscillation(values):
    """Mean absolute change between consecutive epochs (0 for fewer than two epochs)."""
    return float(np.abs(np.diff(np.asarray(values, dtype=float))).mean()) if len(values) > 1 else 0.0


def seed_interval(results, reference, run_dirs, role, attack):
    """Mean over seeds of `run_dirs`' value minus `reference`'s, with its 95 % t-interval; "–" under two seeds."""
    values = ((seed_values(results, [d], role, attack), seed_values(results, [r], role, attack))
              for r, d in zip(reference, run_dirs))
    pairs = [(a[0], b[0]) for a, b in values if a and b]
    if len(pairs) < 2:
        return "–"
    diffs = 100 * np.array([a - b for a, b in pairs])
    half = scipy.stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return f"{diffs.mean():+.2f} [{diffs.mean() - half:+.1f}, {diffs.mean() + half:+.1f}]"


def versus(results, reference, run_dirs, role, attack):
    """`run_dirs` against `reference`'s (seeds paired in order) by report.compare_flags, over the seeds both have
    per-image results of; "–" without any, or not on the same images."""
    pairs = [[results[d]["eval"].get((role, attack), {}) for d in pair] for pair in zip(reference, run_dirs)]
    pairs = [pair for pair in pairs if all("per_image" in r for r in pair)]
    if not pairs or len({(r.get("dataset"), str(r.get("indices"))) for pair in pairs for r in pair}) > 1:
        return "–"
    s = compare_flags(*([r["per_image"] for r in side] for side in zip(*pairs)))
    return f"{100 * s['diff']:+.2f} [{100 * s['ci_low']:+.1f}, {100 * s['ci_high']:+.1f}] p={p_text(s['p_value'])}"


def accuracy_markdown(title, rows, results, cells, first=("Method",), paper=None, reference=None, over_seeds=False):
    """A table of (label cells, run folders) `rows`: each (role, attack) of `cells` as mean ± std over the seeds;
    under each row its difference to `reference`'s (a row's label), and `paper`'s numbers (data set, per row)."""
    second, mixed = paper is not None or reference is not None, len({role for role, _ in cells}) > 1
    header = [*first, *[""] * second, *(ATTACK_TITLES[a] + f" {role}" * mixed for role, a in cells), "n"]
    against, blank, lines = {cells_[0]: dirs for cells_, dirs in rows}.get(reference), [""] * len(first), []
    for (first_cells, dirs), theirs in zip(rows, paper[1] if paper else [None] * len(rows)):
        values = [seed_values(results, dirs, role, a) for role, a in cells]
        lines.append([*first_cells, *["ours"] * second, *map(mean_std, values), max(map(len, values))])
        if against and dirs is not against:
            lines.append([*blank, f"Δ vs {reference}", *(versus(results, against, dirs, role, a) if role in (
                "best", "final") else "" for role, a in cells), ""])
            if over_seeds:
                lines.append([*blank, "Δ over seeds", *(seed_interval(results, against, dirs, role, a)
                                                       for role, a in cells), ""])
        if theirs:
            lines.append([*blank, f"paper ({paper[0]})", *(f"{v:.2f}" for v in theirs), ""])
    lines = ["|" + "|".join(f" {c} " if c != "" else " " for c in line) + "|" for line in [header, *lines]]
    note = "\n" + SIGNIFICANCE.format(reference) + "\n" if against else ""
    note += SEED_INTERVALS.format(reference) + "\n" if against and over_seeds else ""
    return "\n".join([title, "", lines[0], "|" + "---|" * len(header), *lines[1:]]) + "\n" + note  # empty: "| |"


def plot_mean_curves(table, results, title, columns=("test_pgd20_acc",)):
    """Columns of metrics.csv per epoch, one panel each: per method the mean over seeds and a ± std band."""
    fig = Figure(figsize=(4 * len(columns) + 3, 4))
    for ax, column in zip(fig.subplots(1, len(columns), squeeze=False)[0], columns):
        for name, dirs in table.items():
            curves = [results[d]["metrics"] for d in dirs if results[d]["metrics"]]
            n = min(map(len, curves), default=0)
            if n:
                values = np.array([[100 * row[column] for row in rows[:n]] for rows in curves])
                epochs, mean = [row["epoch"] for row in curves[0][:n]], values.mean(0)
                ax.plot(epochs, mean, marker=".", label=f"{name} (n={len(curves)})" if len(curves) > 1 else str(name))
                if len(curves) > 1:
                    ax.fill_between(epochs, mean - values.std(0, ddof=1), mean + values.std(0, ddof=1), alpha=0.2)
        ax.set(xlabel="epoch", ylabel=f"{'PGD-20' if 'pgd20' in column else 'clean'} test accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    return fig


def curves_csv(table, results, columns=("test_clean_acc", "test_pgd20_acc")):
    """metrics.csv's `columns` of every run of `table` as one tidy CSV (method, seed, epoch, columns...)."""
    lines = [",".join(("method", "seed", "epoch", *columns))]
    for name, dirs in table.items():
        for seed, d in enumerate(dirs):
            lines += [",".join((f'"{name}"', str(seed), str(row["epoch"]), *(f"{row[c]:.6g}" for c in columns)))
                      for row in results[d]["metrics"]]
    return "\n".join(lines) + "\n"


def curves_from_csv(text):
    """(table, results) of a curves_csv text, as plot_mean_curves takes them: the figure again without its runs."""
    table, results = {}, {}
    for row in csv.DictReader(io.StringIO(text)):
        key = (row.pop("method"), int(row.pop("seed")))
        if key not in results:
            table.setdefault(key[0], []).append(key)
        results.setdefault(key, {"metrics": []})["metrics"].append({k: float(v) for k, v in row.items()})
    return table, results


def plot_bars(groups, results, title, ylabel):
    """The best checkpoint's accuracy, mean and std over seeds, of `groups`: [(legend, attack, {x: run folders})]."""
    fig = Figure(figsize=(8, 4))
    ax, width = fig.subplots(), 0.8 / len(groups)
    for i, (name, attack, bars) in enumerate(groups):
        means, errors = zip(*(mean_std(seed_values(results, dirs, "best", attack), False) for dirs in bars.values()))
        ax.bar(np.arange(len(bars)) + (i + 0.5) * width - 0.4, means, width, yerr=errors if any(errors) else None,
               capsize=3, label=name)
    ax.set_xticks(np.arange(len(bars)), list(bars))
    ax.set(ylabel=f"{ylabel} (%), best checkpoint", title=title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


def grid_report(the_plan, grid, dataset, results):
    """(markdown, {file name: figure}) of one grid on one data set."""
    table, best = the_plan.tables[grid, dataset], f"({dataset}): the best checkpoint, accuracy (%)"
    rows = [([name], dirs) for name, dirs in table.items()]
    key = dataset if dataset in ("cifar10", "cifar100", "svhn") else "cifar10"  # the paper's numbers beside ours
    theirs = threat_of_plan(the_plan) == PAPER_THREAT  # the paper's numbers beside ours: L-inf 8/255 only
    note = "" if key == dataset else f"**{dataset} is not one of the paper's data sets: theirs show the layout.**\n\n"
    if grid == "table1":
        title = f"**Table I ({dataset})**: accuracy (%) of the best and the final checkpoint; diff = |best − final|"
        paper = [[v for triple in PAPER_TABLE_I[key].get(name, ()) for v in triple] for name in table]
        markdown = accuracy_markdown(title, rows, results, BEST_FINAL_DIFF, paper=(key, paper) if theirs else None,
                                     reference="PGD-AT")
        return note + markdown, {}
    if grid in CPA_TABLES:
        number, what = CPA_TABLES[grid]
        paper = (key, [PAPER_CPA[number].get(key, {}).get(name) for name in table]) if theirs else None
        return note + accuracy_markdown(f"**Table {number}** ({what}) {best}", rows, results, BEST_CPA, paper=paper), {}
    if grid == "table4":
        paper = [PAPER_TABLE_IV[model][loss][list(VIT_VARIANTS).index(variant)] if loss in PAPER_TABLE_IV.get(
            model, {}) else None for model, loss, variant in table]
        rows = [((model, LOSS_NAMES[loss], variant), dirs) for (model, loss, variant), dirs in table.items()]
        return accuracy_markdown("**Table IV**: vision transformers, best checkpoint, accuracy (%)", rows, results,
                                 BEST_CPA, ("Model", "Loss", "Variant"), ("cifar10", paper) if theirs else None), {}
    if grid == "fig6":  # Fig. 6 plots AutoAttack where it was measured for every run, else PGD-20
        attack = "aa" if all(seed_values(results, dirs, "best", "aa") for dirs in table.values()) else "pgd20"
        figures = {"fig1_robust_accuracy_per_epoch.png": plot_mean_curves(
            {name: table[name] for name in FIG1_METHODS if name in table}, results,
            "Fig. 1: robust accuracy during training"), "fig6_piat_with_each_loss.png": plot_bars(
            [(f"with{'out' * (not piat)} PIAT", attack, {LOSS_NAMES[loss]: table.get(label(loss, piat), [])
                                                         for loss in PIAT_LOSSES}) for piat in (False, True)],
            results, "Fig. 6: PIAT combined with each loss", "AutoAttack" if attack == "aa" else "PGD-20")}
        landscapes = {k: table[k][0] for k in ("PGD-AT", "PIAT") if (table[k][0] / "final.landscape.npz").exists()}
        if landscapes:
            figures["fig8_loss_landscape.png"] = plot_landscapes(landscapes)
        return accuracy_markdown(f"**Fig. 6** {best}", rows, results, BEST_CPA), figures
    if grid == "fig7":
        return (accuracy_markdown(f"**Fig. 7** {best}", [([f"λ = {lam:g}"], dirs) for lam, dirs in table.items()],
                                  results, BEST_CPA[:2]), {"fig7_lambda_sweep.png": plot_bars(
            [(name, attack, {f"λ = {lam:g}": dirs for lam, dirs in table.items()}) for attack, name in (
                ("clean", "clean"), ("pgd20", "PGD-20"))], results, "Fig. 7: PIAT + NMSE across λ", "accuracy")})
    if grid == "fig9":
        cells = [("best epoch", "pgd20"), ("last epoch", "pgd20"), ("last epoch", "clean")]
        return (accuracy_markdown(f"**Fig. 9 ({dataset})**: test accuracy (%) from metrics.csv", rows, results, cells),
                {"fig9_fixed_vs_dynamic_alpha.png": plot_mean_curves(
                    table, results, "Fig. 9: fixed α vs the dynamic schedule (PIAT + NMSE)",
                    ("test_clean_acc", "test_pgd20_acc"))})
    if grid == "ema":
        title = (f"**Is PIAT more than an EMA of the weights? ({dataset})**: accuracy (%) of the best and the final "
                 "checkpoint; Diff = |Best − Final|; mean ± std over n seeds")
        cells = [("best", "clean"), ("final", "clean"), *BEST_FINAL_DIFF[3:], ("oscillation", "pgd20")]
        return (accuracy_markdown(title, rows, results, cells, reference="PGD-AT", over_seeds=True),
                {"ema.png": plot_mean_curves(table, results, "Robust accuracy per epoch (mean ± std over seeds)"),
                 "ema_curves.csv": curves_csv(table, results)})
    if grid == "averaging":
        title = (f"**PIAT vs weight averaging ({dataset})**: accuracy (%) of the best and the final checkpoint (of "
                 "the average, where one is kept); Diff = |Best − Final|; mean ± std over n seeds")
        return (accuracy_markdown(title, rows, results, BEST_FINAL_DIFF, reference="PGD-AT"),
                {"averaging.png": plot_mean_curves(table, results, "PIAT vs weight averaging")})
    title = "RDAT (global learner) vs PIAT + NMSE"
    cells = [("best", "clean"), ("best", "pgd20"), ("best", "cw20"), ("final", "pgd20")]
    return (accuracy_markdown(f"**{title} ({dataset})**: accuracy (%)", rows, results, cells),
            {"rdat_vs_piat.png": plot_mean_curves(table, results, title)})


REPORT = "sweep.py --report"  # what its files carry: a file without it (or edited since) is never replaced


def threat_of_plan(the_plan):
    """The threat model of a plan's runs (one per sweep: sweep.py --norm and --epsilon)."""
    return next(iter(the_plan.runs.values())).threat if the_plan.runs else PAPER_THREAT


def write_report(the_plan, out_dir):
    """REPORT_DIR/<grid>.md and the figures under REPORT_DIR/<dataset>/; nothing if a file there is not our own."""
    out_dir, results, files, threat = Path(out_dir), collect(the_plan), {}, threat_of_plan(the_plan)
    if not any(r["eval"] or r["metrics"] for r in results.values()):
        raise utils.UserError(f"no run of {', '.join(dict.fromkeys(g for g, _ in the_plan.tables))} has results yet: "
                              "nothing to report (another --sweep-dir?)")
    for grid in dict.fromkeys(grid for grid, _ in the_plan.tables):
        sections = [f"Threat model: {threat}" + (
            "" if threat == PAPER_THREAT else " (the paper measured L-inf eps 8/255 only: its numbers are left out)")]
        for dataset in [ds for g, ds in the_plan.tables if g == grid]:
            markdown, figures = grid_report(the_plan, grid, dataset, results)
            for name, fig in figures.items():
                if isinstance(fig, str):  # the numbers behind a figure
                    files[out_dir / dataset / name] = fig.encode()
                    continue
                png = io.BytesIO()
                fig.savefig(png, format="png", dpi=120, bbox_inches="tight", metadata={"Software": REPORT})
                files[out_dir / dataset / name] = png.getvalue()
                markdown += f"\n![{name}]({dataset}/{name})\n"
            sections.append(markdown)
        files[out_dir / f"{grid}.md"] = utils.signed("\n\n".join(sections), REPORT).encode()
        print("\n\n".join(sections) + f"\n{out_dir / grid}.md and its figures\n")
    for path in (p for p in files if p.exists()):  # all checked before anything is written, a folder too
        own = {".md": REPORT, ".csv": lambda p: p.read_bytes().startswith(b"method,seed,epoch,")}.get(  # curves_csv
            path.suffix, lambda p: f"Software\0{REPORT}".encode() in p.read_bytes())  # a PNG's tag
        utils.check_output(path, "--report-dir", own)
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        utils.atomic_write(path, lambda f: f.write(data))
    print(f"wrote {len(files)} files in {out_dir}; {sum(not r['eval'] and not r['metrics'] for r in results.values())} "
          f"of {len(results)} runs without results")


# === The flags (python sweep.py --help) and main


def parse_args(argv=None):
    """(sweep.py's flags, the flags for every training command)."""
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=0)
    p.add_argument("grids", type=choice_list([*GRIDS, *ALIASES]), metavar="GRIDS", help=", ".join([*GRIDS, *ALIASES]))
    g = p.add_argument_group("what to run (other flags, e.g. --epochs 30, go to every training command)")
    g.add_argument("--profile", type=str, default="paper", choices=tuple(PROFILES),
                   help="quick: paper.ipynb's CPU run; cpu: small-cnn, AutoAttack's APGD-CE and APGD-T, EMA 0.98")
    g.add_argument("--datasets", type=choice_list(utils.DATASETS), default=None, metavar="LIST",
                   help=f"of {','.join(utils.DATASETS)} (default: each grid's)")
    g.add_argument("--seeds", type=utils.number(int, 1, 100), default=1, metavar="N", help="seeds 0..N-1 of every run")
    g.add_argument("--sweep-dir", type=str, default=None, metavar="DIR", help="default: runs/sweep-<profile>")
    g.add_argument("--attacks", type=choice_list([*ATTACKS, "landscape"]), default=None, metavar="LIST",
                   help=f"evaluate only these of {','.join(ATTACKS)},landscape")
    g.add_argument("--n-examples", type=utils.positive_int, default=None, metavar="N", help="evaluate on N test images")
    g.add_argument("--norm", type=str, default="linf", choices=tuple(utils.NORM_UNITS),
                   help="threat model of every training run and evaluation (not linf: runs of their own, NAME-l2)")
    g.add_argument("--epsilon", type=utils.pixel_units, default=None,
                   help="its radius, in training and evaluation (linf: 1/255 units, default 8; l2: [0, 1], 0.5)")
    g = p.add_argument_group("instead of running")
    action = g.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true", help="check and print the commands still needed")
    action.add_argument("--status", action="store_true", help="print each run's state")
    action.add_argument("--report", action="store_true", help="write the tables and figures")
    g.add_argument("--report-dir", type=str, default=None, metavar="DIR", help="default: SWEEP_DIR/report")
    g = p.add_argument_group("launcher")
    g.add_argument("--launcher", type=str, default="local", choices=("local", "slurm", "inline"),
                   help="local: jobs here, waited for; slurm: one sbatch job per run; inline: in this process")
    g.add_argument("--jobs", type=utils.positive_int, default=None, metavar="N",
                   help="local: runs at a time, one GPU or a share of the CPU cores each (default: one per GPU)")
    g.add_argument("--partition", type=str, default=None, help="slurm: partition")
    g.add_argument("--gpus-per-job", type=utils.non_negative_int, default=1, metavar="N", help="slurm: GPUs (2+: DDP)")
    g.add_argument("--cpus-per-job", type=utils.positive_int, default=None, metavar="N", help="slurm: --cpus-per-task")
    g.add_argument("--time", type=slurm_minutes, default="24:00:00", metavar="TIME",
                   help="slurm: time limit per job, e.g. 2-00:00:00 (a longer run requeues itself)")
    g.add_argument("--mem", type=str, default=None, help="slurm: memory per job, e.g. 64G")
    g.add_argument("--account", type=str, default=None, help="slurm: account to charge")
    g.add_argument("--qos", type=str, default=None, help="slurm: quality of service")
    g.add_argument("--slurm-setup", type=str, action="append", default=[], metavar="LINE",
                   help="slurm: a line run before the job, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--slurm-extra", type=str, action="append", default=[], metavar="KEY[=VALUE]",
                   help="slurm: another sbatch option, e.g. constraint=a100 (repeatable)")
    args, extra = p.parse_known_args(argv)
    owned = [flag for flag in extra if flag.split("=")[0] in ("--dataset", "--seed", "--out-dir", "--resume")]
    if owned:
        p.error(f"{owned[0]} is set by sweep.py for each run (use --datasets, --seeds, --sweep-dir)")
    utils.attack_units(p, argparse.Namespace(norm=args.norm, epsilon=args.epsilon, step_size=None))  # its warnings
    args.sweep_dir = args.sweep_dir or f"runs/sweep-{args.profile}"
    args.report_dir = args.report_dir or str(Path(args.sweep_dir) / "report")
    return args, extra


def check_dir(path, flag, writable=True):
    """One UserError unless `path` is a folder, or can become one, that this user may write in (when `writable`)."""
    there = next(p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists())
    if not there.is_dir():
        raise utils.UserError(f"{flag} {path}: {there} is a file, not a folder")
    if writable and not os.access(there, os.W_OK | os.X_OK):
        raise utils.UserError(f"{flag} {path}: {there} is not writable by this user")


def main(argv=None):
    """Returns the exit status: 0, or 1 when a run failed."""
    args, extra = parse_args(argv)
    the_plan, logs = plan_from_args(args, extra), Path(args.sweep_dir).absolute() / "logs"
    check_dir(args.sweep_dir, "--sweep-dir", writable=not (args.status or args.report))
    for run in the_plan.runs.values():  # a flag a training script refuses stops the sweep before anything is printed
        script_flags(run.script, [*run.flags, "--seed", str(run.seed)], run.key)
    if args.report:
        check_dir(args.report_dir, "--report-dir")
        write_report(the_plan, args.report_dir)
        return 0
    jobs = [r["job_id"] for r in map(read_json, (record_path(logs, run) for run in the_plan.runs.values()))
            if r and r["launcher"] == "slurm"]
    if jobs:  # one sacct call for every recorded Slurm job (each SlurmJob registers with the shared watcher)
        import submitit

        [submitit.SlurmJob(folder=logs, job_id=job) for job in jobs][0].watcher.update()
    states = {run.run_dir: run_state(run, logs) for run in the_plan.runs.values()}
    todo = [run for run in the_plan.runs.values() if states[run.run_dir].state in ("to do", "failed")
            and states[run.run_dir].retry]
    for run in the_plan.runs.values():  # --status: every run; --dry-run: as a shell script; else what went wrong
        state, detail, tail, _ = states[run.run_dir]
        if args.status or args.dry_run or state in ("running", "failed"):
            print(f"{'# ' * args.dry_run}{state:8s} {run.key:44s} {detail}".rstrip()
                  + "".join(f"\n{'# ' * args.dry_run}    | {line}" for line in tail))
        if args.dry_run and run in todo:
            print("\n".join(shlex.join(c) for c in next_commands(run, max(1, args.gpus_per_job))))
    if args.status:
        counts = [sum(s.state == state for s in states.values()) for state in ("done", "running", "failed", "to do")]
        print(f"{len(states)} runs: {counts[0]} done, {counts[1]} running, {counts[2]} failed, {counts[3]} to do")
        return 0
    given_up = sum(not state.retry for state in states.values())  # failures no launch can fix
    adopted = [run for run in the_plan.runs.values() if args.launcher == "local" and states[run.run_dir].state ==
               "running" and read_json(record_path(logs, run), {}).get("launcher") == "local"]
    if args.dry_run or not (todo or adopted):
        print(f"{len(todo)} of {len(the_plan.runs)} runs to launch" + ("" if args.dry_run else ": nothing to do"))
        return 1 if given_up and not args.dry_run else 0
    if args.launcher == "slurm":
        return launch_slurm(todo, args, logs)
    failed = run_inline(todo, logs) if args.launcher == "inline" else launch_local(todo, args.jobs, logs, adopted)
    print(f"{len(todo) + len(adopted) - failed} run(s) finished, {failed} failed" + (" (above)" if failed else ""))
    return 1 if failed or given_up else 0


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # README's exit statuses; 1 also when a run failed (listed above)
