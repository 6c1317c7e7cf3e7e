"""Evaluate checkpoints as the PIAT paper does: clean, PGD-20, CW-20 and AutoAttack accuracy of a run's best and final
checkpoint and their difference (Table I); what follows from those numbers (--table, --compare, --card, --curve,
--export); the loss landscape (Fig. 8); a checklist against gradient masking (--sanity). docs/evaluation.md says
what each attack, image subset and option does, with examples.

    python evaluate.py runs/RUN                                    # best.pt and final.pt -> runs/RUN/eval.json
    python evaluate.py runs/RUN --card --curve --export RUN.pt2    # a model card, curves and a self-contained model
    python evaluate.py --model my_defence.py:build --sanity        # any nn.Module of yours: build() returns it
    python evaluate.py --compare runs/pgdat runs/piat              # differences with 95 % intervals and p-values
    python evaluate.py runs/RUN --norm l2                          # the L2 ball, eps 0.5 (RobustBench's)
"""

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from utils import number, pixel_units, positive_int

ATTACKS = ("clean", "pgd20", "cw20", "aa")  # Table I's columns; eot20 joins them for a random model
ATTACK_TITLES = {"clean": "Clean", "pgd20": "PGD20", "cw20": "CW", "aa": "AA", "eot20": "EOT"}
ATTACK_LOSSES = {"clean": None, "pgd20": "ce", "cw20": "cw", "eot20": "ce"}  # what attack_flags maximises for each
AA_VERSIONS = ("standard", "plus", "rand", "custom")
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
NORMALIZATIONS = {"none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), **utils.CHANNEL_STATS}
NO_INFO = {"weights": "trained", "epoch": None, "epochs": None, "num_classes": None, "image_shape": None,
           "dataset": None, "data_dir": None, "image_size": None}  # what a model from elsewhere does not say
NOT_CONFIGURATION = {"seed", "out_dir", "exp_name", "wandb_id", *utils.RESUME_MAY_CHANGE}  # --compare: seeds of one
STATE_DICT_WRAPPERS = ("state_dict", "model", "net", "model_state_dict")  # {"state_dict": {...}} and the like
# The PIAT paper's Table I (ResNet-18): dataset -> method -> (best, final, diff) for Clean, PGD20, CW, AA, in %
PAPER_TABLE_I = {
    "cifar10": {
        "PGD-AT": [(84.28, 85.62, 1.34), (50.29, 45.86, 4.43), (49.31, 43.25, 6.06), (46.33, 41.36, 4.97)],
        "ALP": [(79.74, 81.45, 1.71), (52.37, 48.62, 3.75), (49.60, 43.87, 5.73), (46.13, 41.88, 4.25)],
        "TRADES": [(82.39, 83.04, 0.65), (53.60, 50.74, 2.86), (50.90, 49.04, 1.86), (48.04, 46.80, 1.24)],
        "MART": [(81.91, 83.99, 2.08), (53.70, 48.63, 5.07), (49.35, 44.92, 4.43), (47.45, 43.65, 3.80)],
        "MAIL": [(82.65, 85.17, 2.49), (51.15, 47.14, 4.01), (48.88, 44.38, 4.50), (45.16, 43.02, 2.14)],
        "CFA": [(82.80, 83.88, 1.08), (53.24, 51.69, 1.55), (51.45, 49.97, 1.48), (48.40, 47.74, 0.64)],
        "RAT": [(81.63, 82.61, 0.98), (52.25, 50.09, 2.16), (49.47, 47.93, 1.54), (45.20, 44.30, 0.90)],
        "PIAT + NMSE": [(80.96, 82.84, 1.88), (53.74, 52.81, 0.93), (51.72, 50.49, 1.23), (48.80, 47.97, 0.83)]},
    "cifar100": {
        "PGD-AT": [(58.48, 58.53, 0.05), (28.36, 21.72, 6.64), (27.06, 21.12, 5.94), (23.85, 19.55, 4.30)],
        "ALP": [(57.29, 58.65, 1.36), (28.12, 24.66, 3.46), (26.84, 22.17, 4.67), (23.57, 20.49, 3.08)],
        "TRADES": [(56.71, 56.32, 0.39), (29.19, 27.70, 1.49), (26.05, 24.53, 1.52), (23.91, 22.70, 1.21)],
        "MART": [(55.26, 57.77, 2.51), (30.10, 25.96, 4.14), (26.30, 23.79, 2.51), (24.13, 22.35, 1.78)],
        "MAIL": [(58.73, 59.00, 0.27), (27.99, 24.69, 3.30), (26.28, 23.37, 2.91), (22.50, 20.86, 1.64)],
        "CFA": [(56.28, 61.62, 5.34), (30.64, 29.74, 0.90), (27.74, 25.95, 1.79), (24.26, 21.58, 2.68)],
        "RAT": [(53.35, 56.35, 3.00), (28.69, 27.67, 1.02), (25.52, 23.69, 1.83), (23.10, 22.40, 0.70)],
        "PIAT + NMSE": [(56.04, 57.16, 1.12), (31.45, 30.87, 0.58), (28.74, 27.76, 1.02), (26.09, 25.13, 0.96)]},
    "svhn": {
        "PGD-AT": [(93.85, 94.33, 0.48), (59.01, 52.35, 6.66), (48.66, 44.13, 4.53), (43.02, 38.66, 4.36)],
        "ALP": [(92.54, 93.67, 1.13), (59.13, 55.12, 5.01), (52.22, 48.53, 3.69), (45.67, 42.41, 3.26)],
        "TRADES": [(90.88, 91.34, 0.46), (59.50, 57.04, 2.46), (52.76, 50.42, 2.34), (46.59, 44.87, 1.72)],
        "MART": [(90.84, 92.95, 2.11), (57.70, 54.29, 3.41), (52.95, 50.09, 2.86), (46.98, 43.75, 3.23)],
        "MAIL": [(90.15, 93.69, 3.54), (57.47, 54.60, 3.14), (52.78, 49.73, 3.05), (46.26, 41.24, 5.02)],
        "CFA": [(92.23, 93.68, 1.45), (60.77, 58.85, 1.92), (55.17, 52.71, 2.46), (49.64, 46.53, 3.11)],
        "RAT": [(89.23, 90.97, 1.74), (45.83, 38.25, 7.58), (44.15, 32.71, 11.44), (46.10, 22.40, 23.70)],
        "PIAT + NMSE": [(91.70, 93.07, 1.37), (61.21, 59.84, 1.37), (55.88, 54.45, 1.43), (51.29, 49.82, 1.47)]},
}


# === The flags: every default in one block


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", type=str, metavar="RUN_OR_CHECKPOINT",
                   help="run folders, checkpoints, plain state_dicts (--arch); with --table or --compare: runs or "
                        "result files")
    p.add_argument("--model", type=str, default=None, metavar="FILE.py:NAME",
                   help="evaluate your own defence: NAME() in FILE.py returns an nn.Module mapping [0, 1] images "
                        "(N, C, H, W) to logits")
    g = p.add_argument_group("what to measure (--norm linf: eps and step size in 1/255 units; l2: in [0, 1] units)")
    g.add_argument("--attacks", type=choice_list((*ATTACKS, "eot20")), default=None,
                   help=f"of {','.join(ATTACKS)},eot20 (default: all but eot20, which a random model gets; none with "
                        "--landscape or --sanity)")
    g.add_argument("--eot-draws", type=number(int, 1, 1000), default=10,
                   help="draws averaged by eot20's every step (memory grows with draws x --batch-size)")
    g.add_argument("--norm", type=str, default="linf", choices=tuple(utils.NORM_UNITS), help="the ball of every attack")
    g.add_argument("--epsilon", type=pixel_units, default=None,
                   help="radius of every attack (default: 8/255 under linf, 0.5 under l2, RobustBench's)")
    g.add_argument("--step-size", type=pixel_units, default=None,
                   help="step size of PGD-20 and CW-20 (default: 2/255 under linf, eps/4 under l2)")
    g.add_argument("--aa-version", type=str, default="standard", choices=AA_VERSIONS, help="AutoAttack's version")
    g.add_argument("--aa-attacks", type=choice_list(AA_ATTACKS), default=None,
                   help=f"with --aa-version custom: of {', '.join(AA_ATTACKS)} (default: apgd-ce,apgd-t)")
    g = p.add_argument_group("data (default: the checkpoint's own)")
    g.add_argument("--dataset", type=str, default=None, choices=utils.DATASETS, help="test set (else cifar10)")
    g.add_argument("--data-dir", type=str, default=None, help="where it lives (else ./data)")
    g.add_argument("--image-size", type=positive_int, default=None, help="resize image-folder images to this size")
    g.add_argument("--n-examples", type=positive_int, default=None, help="N test images (default: all; 500: --sanity)")
    g.add_argument("--subset", type=str, default=None, choices=("first", "fixed"), help="which N (above)")
    g.add_argument("--batch-size", type=positive_int, default=250, help="batch of every attack, AutoAttack's too")
    g = p.add_argument_group("plain state_dicts of other projects (TRADES, MART, AutoAttack's example model)")
    g.add_argument("--arch", type=str, default=None, choices=utils.ARCHS, help="read the files as this network's")
    g.add_argument("--num-classes", type=positive_int, default=None, help="its outputs (default: its last layer's)")
    g.add_argument("--input-normalization", type=str, default=None, choices=tuple(NORMALIZATIONS),
                   help="the channel statistics it normalises [0, 1] images with (default: none)")
    g.add_argument("--mean", type=number(float), nargs=3, default=None, metavar="M", help="or its mean, R G B")
    g.add_argument("--std", type=number(float, 0, open_bounds=True), nargs=3, default=None, metavar="S",
                   help="and standard deviation, R G B")
    g.add_argument("--unsafe-load", action="store_true", help="allow pickled Python objects (they can run code)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=utils.seed_number, default=0, help="seed of the random starts and of AutoAttack")
    g.add_argument("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast in the attacks (it can flatter; rows say so)")
    g.add_argument("--out", type=str, default=None,
                   help="results JSON (default: RUN/eval.json or CHECKPOINT.eval.json); --table: markdown file")
    g = p.add_argument_group("Table I")
    g.add_argument("--table", action="store_true", help="gather the given runs' results into one markdown table")
    g.add_argument("--worst-class", action="store_true", help="with --table: the worst class's accuracy too (CFA's)")
    g.add_argument("--paper", type=str, default=None, choices=tuple(PAPER_TABLE_I),
                   help="with --table: the paper's Table I rows of this data set")
    g.add_argument("--compare", action="store_true",
                   help="is a difference real? each configuration of the given runs against the first (runs that "
                        "differ only in --seed: its seeds): 95 %% intervals (bootstrap over the images; t over seeds) "
                        "and the exact McNemar p-value; --out writes them as JSON")
    g = p.add_argument_group("loss landscape (Fig. 8): PGD adversarial CE at theta + a*d1 + b*d2 on a fixed batch")
    g.add_argument("--landscape", action="store_true", help="of each run's final.pt (or each checkpoint)")
    g.add_argument("--landscape-steps", type=number(int, 1, 101), default=21, help="grid points along each direction")
    g.add_argument("--landscape-range", type=number(float, 0, open_bounds=True), default=1.0, help="a, b in +-range")
    g.add_argument("--landscape-batch", type=positive_int, default=256, help="the first N of the evaluated images")
    g.add_argument("--landscape-pgd-steps", type=number(int, 0, 1000), default=20, help="PGD steps of its attack")
    g = p.add_argument_group("results to take elsewhere, beside the results JSON (report.py)")
    g.add_argument("--card", action="store_true", help="MODEL_CARD.md and robustbench.json from the results")
    g.add_argument("--curve", action="store_true",
                   help="accuracy against eps of each checkpoint: robustness_curve.png, and class_accuracy.png")
    g.add_argument("--curve-epsilons", type=epsilon_list, default=None,
                   help="the curve's eps in --norm's units (default: 0,1,2,4,8,12,16 linf, 0,0.125,...,2 l2; "
                        "its PGD-20 steps eps/4)")
    g.add_argument("--curve-attacks", type=choice_list(("pgd20", "aa")), default=["pgd20"], help="of pgd20,aa")
    g.add_argument("--reported", type=str, default="best", choices=("best", "final"),
                   help="the checkpoint --card's RobustBench entry and --export describe")
    g.add_argument("--export", type=str, default=None, metavar="FILE.pt2",
                   help="the reported checkpoint as a torch.export file, loadable without this project")
    g = p.add_argument_group("sanity checklist against gradient masking and broken attacks (sanity.py)")
    g.add_argument("--sanity", action="store_true", help="run it on each checkpoint (after --attacks, when given)")
    g.add_argument("--strict", action="store_true", help="with --sanity: exit status 1 when a check FAILs")
    g.add_argument("--sanity-epsilons", type=epsilon_list, default=None,
                   help="its eps sweep (default: 0,2,4,8,16,32,64 linf, 0,0.125,...,4 l2; 0 and --epsilon added; the "
                        "largest >= 4x --epsilon)")
    g.add_argument("--sanity-steps", type=number(int, 1, 10**4), default=100,
                   help="steps of its long PGD, at half --step-size")
    g.add_argument("--sanity-restarts", type=number(int, 0, 100), default=3, help="restarts of its long PGD")
    g.add_argument("--sanity-square-queries", type=number(int, 1, 10**5), default=1000,
                   help="queries of its Square attack")
    args = p.parse_args(argv)
    # defaults that depend on other flags, and the checks argparse cannot make
    utils.attack_units(p, args)
    if args.sanity_epsilons is None:  # up to 8x the default eps, where honest models are at about 0 %
        args.sanity_epsilons = [e / (1 if args.norm == "linf" else 16) for e in (0, 2, 4, 8, 16, 32, 64)]
    if args.curve_epsilons is None:  # up to 2x the default eps
        args.curve_epsilons = [e / (1 if args.norm == "linf" else 8) for e in (0, 1, 2, 4, 8, 12, 16)]
    if args.attacks is None:
        args.attacks = [] if args.landscape or args.sanity or args.card or args.curve or args.export else list(ATTACKS)
    if not args.paths and not args.model:
        p.error("give run folders or checkpoints (or --model FILE.py:NAME)")
    if args.model and (args.paths or args.arch or args.table or args.compare):
        p.error("--model evaluates your model alone: no run folders, checkpoints, --arch, --table or --compare")
    if args.aa_attacks is not None and args.aa_version != "custom":
        raise utils.UserError(f"--aa-attacks needs --aa-version custom (version {args.aa_version} runs its own set)")
    if args.aa_version == "custom":
        args.aa_attacks = args.aa_attacks or ["apgd-ce", "apgd-t"]
    if (args.mean is None) != (args.std is None):
        raise utils.UserError("--mean and --std go together")
    if args.mean is not None and args.input_normalization is not None:
        raise utils.UserError("give either --input-normalization or --mean/--std, not both")
    foreign = [f for f, v in (("--num-classes", args.num_classes), ("--mean", args.mean),
                              ("--input-normalization", args.input_normalization)) if v is not None]
    if foreign and args.arch is None and not args.table:
        raise utils.UserError(f"{foreign[0]} describes a plain state_dict and needs --arch; checkpoints of this "
                              "project carry their own architecture and normalisation")
    if (args.card or args.curve or args.export) and (args.table or args.compare):
        raise utils.UserError("--card, --curve and --export describe checkpoints; --table and --compare only gather")
    if args.export and (not args.export.endswith(".pt2") or Path(args.export).exists() or len(args.paths) > 1):
        raise utils.UserError(f"--export {args.export}: give one run or checkpoint and a new FILE.pt2 (nothing "
                              "already there is written over)")
    if args.strict and not args.sanity:
        raise utils.UserError("--strict goes with --sanity")
    if args.sanity and args.table:
        raise utils.UserError("--sanity checks checkpoints; --table only gathers results")
    if args.sanity and args.epsilon <= 0:
        raise utils.UserError("--sanity needs --epsilon above 0")
    if args.sanity and max(args.sanity_epsilons) < 4 * args.epsilon:
        raise utils.UserError(f"the largest of --sanity-epsilons ({max(args.sanity_epsilons):g}) must be at least 4x "
                              f"--epsilon ({args.epsilon:g}), where honest models are at about 0 % accuracy")
    return args


def choice_list(allowed):
    """argparse `type=`: a comma-separated list of items from `allowed` (lower-cased, repeats dropped)."""

    def parse(text):
        items = [item.strip().lower() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r} in {text!r}" if unknown else "empty list")
        return list(dict.fromkeys(items))

    parse.__name__ = "list"
    return parse


def epsilon_list(text):
    """argparse `type=`: comma-separated epsilons (in --norm's units)."""
    values = [pixel_units(item) for item in text.split(",") if item.strip()]
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


# === The attacks (docs/method.md §2): train_piat.py's, copied so that the table measures what the scripts train
# against. Images live in [0, 1]; epsilon and step_size in [0, 1] units.


def pgd_attack(model, x, y, epsilon, step_size, steps, loss="ce", random_start="uniform", generator=None,
               delta_mask=None, norm="linf"):
    """PGD maximising `loss` of `model` around x in the L-inf or the L2 ball (norm "linf", "l2"); returns x' with
    ||x' - x|| <= epsilon per example, in [0, 1]: each step (the gradient's sign, or the gradient over its L2 norm)
    is projected onto the ball, then into [0, 1]. epsilon: one radius, or one per example (a tensor (N,): CFA's
    class-wise margins). loss: "ce" cross-entropy, "cw" the Carlini-Wagner margin max_{j!=y} f_j - f_y, "kl"
    TRADES's KL(p(x) || p(x')). random_start: "uniform" in the ball (Madry et al.), "normal" 0.001 * N(0, 1) (the
    official TRADES and MART code) or None, drawn from `generator` (default: the global one). delta_mask: None, or
    a function returning a 0/1 mask (or None) that multiplies delta before every forward pass (PRM). A model that
    gives no gradient is not moved. The caller chooses the model's mode (BatchNorm in eval mode while attacking)."""
    x, per_example = x.detach(), (-1, *[1] * (x.dim() - 1))  # one number per example, broadcast over its image
    epsilon = epsilon.to(x.device, x.dtype).view(per_example) if torch.is_tensor(epsilon) else epsilon

    def l2(v):  # never 0: a zero vector divided by it stays zero
        return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(per_example)

    def project(delta):  # onto the ball (clamping into [0, 1] then only shortens delta)
        delta = delta.clamp(-epsilon, epsilon) if norm == "linf" else delta * (epsilon / l2(delta)).clamp(max=1)
        return (x + delta).clamp_(0, 1) - x

    if loss == "kl":
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
    if random_start == "uniform" and norm == "linf":  # U(-eps, eps) in every coordinate
        delta = torch.empty_like(x).uniform_(-1, 1, generator=generator) * epsilon
    elif random_start == "uniform":  # uniform in the L2 ball: a Gaussian's direction, radius eps * U^(1/dimensions)
        delta = torch.randn(x.shape, generator=generator, device=x.device)
        radius = torch.rand(len(x), generator=generator, device=x.device).pow(1 / x[0].numel()).view(per_example)
        delta = delta / l2(delta) * radius * epsilon
    elif random_start == "normal":
        delta = 0.001 * torch.randn(x.shape, generator=generator, device=x.device)
    else:
        delta = torch.zeros_like(x)
    delta = project(delta)
    for _ in range(steps):
        mask = delta_mask() if delta_mask is not None else None
        delta = (delta * mask if mask is not None else delta).requires_grad_(True)
        logits = model(x + delta)
        if loss == "ce":
            objective = F.cross_entropy(logits, y, reduction="sum")
        elif loss == "cw":
            objective = cw_margin(logits, y).sum()
        else:
            objective = F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
        grad = torch.autograd.grad(objective, delta, allow_unused=True)[0] if objective.requires_grad else None
        grad = torch.zeros_like(x) if grad is None else grad
        delta = project(delta.detach() + step_size * (grad.sign() if norm == "linf" else grad / l2(grad)))
    return (x + delta).detach()


def cw_margin(logits, y):
    """max_{j != y} f_j - f_y per example: positive exactly when x is misclassified."""
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - logits.gather(1, y[:, None]).squeeze(1)


def attack_flags(model, x_all, y_all, loss, epsilon, step_size, steps, batch_size, device, generator=None, desc="",
                 norm="linf"):
    """Per image of x_all (uint8): whether `model` classifies it correctly, clean (loss None) or under PGD in the
    `norm` ball on `loss` ("ce", "cw") with a uniform random start from `generator`. A bool tensor on `device`."""
    model.eval()
    flags = []
    for i in utils.progress(range(0, len(x_all), batch_size), desc=desc, disable=None if desc else True):
        x, y = utils.to_float(x_all[i : i + batch_size].to(device)), y_all[i : i + batch_size].to(device)
        if loss is not None:
            x = pgd_attack(model, x, y, epsilon, step_size, steps, loss=loss, generator=generator, norm=norm)
        with torch.no_grad():
            flags.append(model(x).argmax(1) == y)
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool, device=device)


def autoattack_flags(model, x, y, epsilon, version, attacks, seed, batch_size, device, norm="linf"):
    """(per image of x (float in [0, 1]): whether it stays correctly classified under AutoAttack, the attacks it ran),
    counted as pyautoattack's run_standard_evaluation counts: it returns the label of each adversarial example, or
    the clean prediction where no attack succeeded, so y_adv == y are its robust flags. Flags on the CPU."""
    from pyautoattack import AutoAttack

    model.eval()
    adversary = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=epsilon, version=version,
                           attacks=attacks if version == "custom" else None, seed=seed, device=device)
    with torch.no_grad():
        num_classes = model(x[:1].to(device)).shape[1]
    if num_classes < 10:  # both targeted attacks default to 9 target classes; fewer exist
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = num_classes - 1
    log = logging.getLogger("auto-attack")
    handler, level = logging.StreamHandler(sys.stderr), log.level
    handler.setFormatter(logging.Formatter("  autoattack: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)  # its per-attack robust accuracy: the only progress it reports
    try:
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return y_adv.cpu() == y.cpu(), list(adversary.attacks_to_run)


class Bf16Autocast(nn.Module):
    """`model` under bf16 autocast with fp32 logits out (--amp): every attack, AutoAttack's too, runs in bf16
    without knowing it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


# === Models: checkpoints of this project, and plain state_dicts of other projects


def load_model(path, args):
    """(model in eval mode on the CPU, info) of a checkpoint of this project, or with --arch of a plain state_dict;
    one UserError for weights that are not finite."""
    if args.model:
        model, info = user_model(args.model)
    else:
        model, info = project_model(Path(path)) if args.arch is None else state_dict_model(Path(path), args)
    info = {"weights": "trained", "epoch": None, "epochs": None, "image_shape": None, "dataset": None,
            "data_dir": None, "image_size": None, **info}  # what a loader cannot know
    for key, tensor in model.state_dict().items():  # every number measured on such weights would be meaningless
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            value = tensor[~torch.isfinite(tensor)].flatten()[0].item()
            raise utils.UserError(f"{path} holds weights that are not finite ({key} is {value}): the run that wrote "
                                  "it diverged")
    model.eval().requires_grad_(False)  # attacks need gradients of the input only
    info["fingerprint"] = (info.get("spec"), utils.state_fingerprint(model))  # equal weights: measured once
    return model, info


def user_model(spec):
    """--model FILE.py:NAME: (NAME() of FILE.py, info). FILE.py may be anywhere (it need not be importable; files
    beside it are). The nn.Module it returns maps [0, 1] images (N, C, H, W) to logits; it is put in eval mode and
    its own randomness is left alone."""
    if spec.endswith(".pt2"):  # a model --export wrote: nothing to call
        return exported_model(spec)
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not file or not name.isidentifier():
        raise utils.UserError(f"--model {spec}: give FILE.py:NAME, e.g. my_defence.py:build")
    if not path.is_file():
        raise utils.UserError(f"--model {spec}: no file {path}")
    loader = importlib.util.spec_from_file_location(f"user_model_{path.stem}", path)
    if loader is None:
        raise utils.UserError(f"--model {spec}: {path} is not a Python file (FILE.py)")
    module = importlib.util.module_from_spec(loader)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        loader.loader.exec_module(module)
        if not callable(getattr(module, name, None)):
            what = f"'s {name} is of type {type(getattr(module, name)).__name__}, not a function" if hasattr(
                module, name) else f" defines no {name}()"
            raise utils.UserError(f"--model {spec}: {path}{what} to call")
        model = getattr(module, name)()
    except utils.UserError:
        raise
    except Exception as err:  # the user's code failed: say where, in one line
        raise utils.UserError(f"--model {spec}: {type(err).__name__} while building it: "
                              f"{utils.first_line(err)}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    if not isinstance(model, nn.Module):
        raise utils.UserError(f"--model {spec}: {name}() returned a {type(model).__name__}, not a torch.nn.Module")

    def probe(x):  # once, before any attack, on test images: (classes, whether the logits lack an input gradient)
        x = x.clone().requires_grad_(True)
        try:
            out = model.eval()(x)
        except Exception as err:  # e.g. a network for other image sizes, or x.numpy(): one line, not a traceback
            raise utils.UserError(f"--model {spec}: fails on images of shape {tuple(x.shape)} in [0, 1] with "
                                  f"gradients on (as attacks run it): {type(err).__name__}: {utils.first_line(err)}")
        finite = torch.is_tensor(out) and out.is_floating_point() and bool(torch.isfinite(out).all())
        if not (finite and out.dim() == 2 and out.shape[0] == len(x)):  # every accuracy would be meaningless
            shape = type(out).__name__ if not torch.is_tensor(out) else str(tuple(out.shape)) + (
                "" if finite else " holding nan or inf" if out.is_floating_point() else f" of {out.dtype}")
            raise utils.UserError(f"--model {spec}: maps {len(x)} test images to {shape}, not finite logits of shape "
                                  f"({len(x)}, classes)")
        weighted = out.float() @ torch.arange(1.0, out.shape[1] + 1, device=out.device)  # nonzero for probabilities
        grad = torch.autograd.grad(weighted.sum(), x, allow_unused=True)[0] if weighted.requires_grad else None
        if (lacking := grad is None or not grad.any()):
            print(f"evaluate.py: warning: --model {spec}: its logits have no input gradient, so PGD-20 and CW-20 "
                  "cannot move the images (they equal clean); attack it with Square or AutoAttack, see --sanity",
                  file=sys.stderr, flush=True)
        return out.shape[1], lacking

    return model, {**NO_INFO, "kind": "model", "arch": type(model).__name__, "method": f"{path.name}:{name}",
                   "probe": probe, "spec": spec, "flags": {"model": f"{path.absolute()}:{name}"}}


def exported_model(path):
    """--model FILE.pt2: a model evaluate.py --export wrote, with what it says it is (its data set, method, classes)."""
    import report

    try:
        model = report.ExportedModel(path)
    except Exception as err:  # a missing file, or not one torch.export wrote
        raise utils.UserError(f"--model {path}: not what --export writes ({utils.first_line(err)})") from None
    meta = model.meta
    return model, {**NO_INFO, "kind": "model", "arch": meta.get("arch", "exported"), "epoch": meta.get("epoch"),
                   "method": meta.get("method", Path(path).name), "num_classes": meta.get("num_classes"),
                   "dataset": meta.get("dataset"), "probe": lambda x: (model(x).shape[1], False), "spec": path,
                   "flags": {"model": str(Path(path).absolute())}}


def project_model(path):
    """A checkpoint of this project, its model rebuilt from what it holds."""
    checkpoint = utils.load_checkpoint(path)
    arch, saved = checkpoint["arch"], checkpoint.get("args") or {}
    model = utils.build_model(arch, checkpoint["num_classes"], checkpoint["mean"], checkpoint["std"],
                              **(checkpoint.get("model_kwargs") or {}))
    load_weights(model, checkpoint["model"], path, arch)
    script = checkpoint.get("script", "train_piat.py")  # the row label is the name on the run's curves.png
    return model, {"kind": script, "arch": arch, "method": utils.method_name(saved, script),
                   "weights": checkpoint.get("weights", "trained"), "epoch": checkpoint.get("epoch"),
                   "epochs": saved.get("epochs"), "num_classes": checkpoint["num_classes"],
                   "image_shape": checkpoint.get("image_shape"), "dataset": saved.get("dataset"),
                   "data_dir": saved.get("data_dir"), "image_size": saved.get("image_size"),
                   "flags": {k: v for k, v in saved.items() if k not in NOT_CONFIGURATION}}


def state_dict_model(path, args):
    """A plain state_dict (--arch) of another project: TRADES's, MART's, AutoAttack's example model."""
    problem = utils.not_a_torch_file(path) if path.is_file() else f"no checkpoint at {path}"
    if problem:
        raise utils.UserError(problem)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not args.unsafe_load)
    except Exception as err:
        hint = "" if args.unsafe_load else (" (if it pickles Python objects and you trust it, add --unsafe-load; a "
                                            "checkpoint of this project needs no --arch)")
        raise utils.UserError(f"{path} is not a readable checkpoint{hint}: {utils.first_line(err)}") from None
    if isinstance(obj, Mapping) and all(k in obj for k in utils.CHECKPOINT_KEYS):
        raise utils.UserError(f"{path} is a checkpoint of this project ({obj['arch']}); drop --arch and it is "
                              "rebuilt from what it holds")
    state_dict = unwrap_state_dict(obj, path)
    if args.arch == "wrn-32-10":  # TRADES/MART's WideResNet builds an unused sub_block1
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("sub_block1.")}
    mean, std = (args.mean, args.std) if args.mean is not None else NORMALIZATIONS[args.input_normalization or "none"]
    num_classes = args.num_classes or classifier_outputs(args.arch, state_dict)
    model = utils.build_model(args.arch, num_classes, mean, std)
    load_weights(model, state_dict, path, args.arch)
    return model, {**NO_INFO, "kind": "state_dict", "arch": args.arch, "method": path.stem, "num_classes": num_classes,
                   "flags": {"checkpoint": str(path.absolute())}}


def unwrap_state_dict(obj, path):
    """The state_dict inside what torch.load returned: bare, or under one of STATE_DICT_WRAPPERS, without
    DataParallel's "module." and torch.compile's "_orig_mod." prefixes."""
    for _ in range(3):  # {"state_dict": {...}}, {"model": nn.Module, "epoch": 100}, ...
        obj = obj.state_dict() if isinstance(obj, nn.Module) else obj
        if not isinstance(obj, Mapping) or all(torch.is_tensor(v) for v in obj.values()):
            break
        obj = next((obj[k] for k in STATE_DICT_WRAPPERS if isinstance(obj.get(k), (Mapping, nn.Module))), obj)
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
        raise utils.UserError(f"{path} holds no state_dict (a dict of tensors, bare or under "
                              f"{'/'.join(STATE_DICT_WRAPPERS)}); found {keys}")
    return {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in obj.items()}


def load_weights(model, state_dict, path, arch):
    """Load state_dict into model, or one UserError naming what does not fit."""
    expected, state_dict = model.state_dict(), dict(state_dict)
    for key, value in expected.items():  # very old BatchNorm checkpoints lack the counter: keep ours
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("size mismatches", mismatched)) if keys]
    if problems:
        raise utils.UserError(f"checkpoint {path} does not fit {arch}: {'; '.join(problems)}")
    model.load_state_dict(state_dict)


def classifier_outputs(arch, state_dict):
    """The number of classes a state_dict was trained for: the rows of its last linear layer."""
    reference = utils.build_model(arch, 10)
    last = [name for name, module in reference.named_modules() if isinstance(module, nn.Linear)][-1]
    weight = state_dict.get(f"{last}.weight")
    return weight.shape[0] if weight is not None and weight.dim() == 2 else 10


# === The run: which checkpoints and images, one result row per checkpoint and attack


def resolve_inputs(paths, out, model=None):
    """[(run, [(role, checkpoint path)], json path, is a run folder)] for the given folders and files (or --model:
    its file, results beside it as FILE.eval.json)."""
    file, _, name = (model or "").rpartition(":") if not str(model).endswith(".pt2") else (model, "", "exported")
    jobs = [(f"{Path(file).absolute()}:{name}", [("model", Path(file).absolute())], Path(out) if out else
             Path(file).absolute().with_suffix(".eval.json"), False)] if model else []
    for text in [] if model else paths:
        path = Path(text).absolute()  # absolute: results merge the same way from any working directory
        if path.is_dir():
            checkpoints = [(role, path / f"{role}.pt") for role in ("best", "final") if (path / f"{role}.pt").is_file()]
            if not checkpoints:
                why = " (its run saved no epoch yet)" if (path / "args.json").is_file() else ""
                raise utils.UserError(f"{path} holds neither best.pt nor final.pt{why}")
            jobs.append((str(path), checkpoints, Path(out) if out else path / "eval.json", True))
        elif path.is_file():
            role = path.stem if path.stem in ("best", "final") else "checkpoint"
            jobs.append((str(path), [(role, path)], Path(out) if out else path.with_suffix(".eval.json"), False))
        else:
            raise utils.UserError(f"no checkpoint or run folder at {text}")
    for _, _, json_path, _ in jobs:  # a file of another kind: read_results's one line
        utils.check_output(json_path, "--out", lambda path: bool(read_results(path)))
    return jobs


def warn_unfinished(jobs, models):
    """One line on stderr for each run whose final.pt holds an earlier epoch than its --epochs: it diverged, was
    stopped, or is still training, so its Final column is not the paper's."""
    for run, checkpoints, _, is_run_dir in jobs:
        for role, ckpt in checkpoints:
            info = models[str(ckpt)][1]
            if role == "final" and info["epochs"] and (info["epoch"] or 0) < info["epochs"]:
                print(f"evaluate.py: warning: {run if is_run_dir else Path(run).parent} did not finish: final.pt "
                      f"holds epoch {info['epoch']} of {info['epochs']}", file=sys.stderr, flush=True)


def load_test_images(info, ckpt, args, cache):
    """(x uint8, y, {"dataset", "subset", "key"}) of the test images a checkpoint is evaluated on (--n-examples,
    --subset): its own data set unless --dataset says otherwise, each data set loaded once (`cache`); one UserError
    when the checkpoint does not fit the data (classes, image shape)."""
    dataset = args.dataset or info["dataset"] or "cifar10"
    own = dataset == info["dataset"]
    data_dir = args.data_dir or (info["data_dir"] if own else None) or "./data"
    image_size = args.image_size or (info["image_size"] if own else None)
    key = (dataset, str(data_dir), image_size)
    if key not in cache:
        cache[key] = utils.load_dataset(dataset, data_dir, image_size)
    data, n, n_test = cache[key], args.n_examples, len(cache[key].x_test)
    if n is not None and n > n_test:
        raise utils.UserError(f"--n-examples {n} but the test set holds {n_test} images")
    subset = args.subset or ("first" if dataset in ("cifar10", "cifar100", "svhn") else "fixed")
    if n is None or n == n_test:
        idx, subset = torch.arange(n_test), "all"
    else:  # the data set's own order
        idx = torch.arange(n) if subset == "first" else utils.fixed_subset(n_test, n).sort().values
    if info["num_classes"] is None:  # a user's model (--model): its logits say how many classes it knows
        info["num_classes"], info["no_gradient"] = info["probe"](utils.to_float(data.x_test[idx[:8]]))
    if data.num_classes != info["num_classes"]:
        raise utils.UserError(f"{ckpt} has {info['num_classes']} outputs but {dataset} has {data.num_classes} "
                              "classes (--dataset? --num-classes?)")
    if info["image_shape"] and tuple(info["image_shape"]) != tuple(data.image_shape):
        raise utils.UserError(f"{ckpt} was trained on {tuple(info['image_shape'])} images but {dataset} holds "
                              f"{tuple(data.image_shape)} (--image-size?)")
    if len(torch.unique(data.y_test[idx])) < 2:
        print(f"evaluate.py: warning: the {len(idx)} test images evaluated hold a single class: every accuracy on "
              "them is meaningless", file=sys.stderr, flush=True)
    images = {"dataset": dataset, "subset": subset, "key": (*key, tuple(idx.tolist())), "indices": idx.tolist()}
    return data.x_test[idx], data.y_test[idx], images


def measure(model, x, y, attack, args, device, desc):
    """One attack on the images x (uint8) of one model: the result row's measured fields, with the accuracy of every
    class among the images and the worst class's (CFA's fairness measure)."""
    eps, step = utils.radii(args)
    if attack == "aa":
        flags, ran = autoattack_flags(model, utils.to_float(x), y, eps, args.aa_version, args.aa_attacks, args.seed,
                                      args.batch_size, device, args.norm)
        extra = {"aa_version": args.aa_version, "aa_attacks": ran}
    else:
        attacked = ExpectedLogits(model, args.eot_draws) if attack == "eot20" else model
        flags = attack_flags(attacked, x, y, ATTACK_LOSSES[attack], eps, step, 20, args.batch_size, device, desc=desc,
                             norm=args.norm).cpu()
        extra = {} if attack == "clean" else {"steps": 20, "step_size": step, "step_size_255": 255 * step}
        extra.update({"draws": args.eot_draws} if attack == "eot20" else {})
    classes, y = torch.unique(y.cpu()), y.cpu()
    accuracy = [float(flags[y == c].float().mean()) for c in classes]
    worst = min(range(len(accuracy)), key=accuracy.__getitem__)
    return {**extra, "accuracy": int(flags.sum()) / len(y), "correct": int(flags.sum()),
            "class_accuracy": dict(zip(map(int, classes), accuracy)), "worst_class": int(classes[worst]),
            "class_n": {int(c): int((y == c).sum()) for c in classes},
            "worst_class_accuracy": accuracy[worst], "per_image": flags.int().tolist()}


class ExpectedLogits(nn.Module):
    """EOT (Athalye et al. 2018) for a model whose forward pass is random: while the attack takes gradients, the
    logits averaged over `draws` passes, so PGD follows the expected gradient; without autograd (the prediction
    that is counted) one pass, the model as deployed."""

    def __init__(self, model, draws):
        super().__init__()
        self.model, self.draws = model, draws

    def forward(self, x):
        if not torch.is_grad_enabled():
            return self.model(x)
        return torch.stack([self.model(x) for _ in range(self.draws)]).mean(0)


def is_random(model, x, device):
    """Whether two forward passes of the same images differ: a randomised defence, whose PGD-20 EOT must back up."""
    with torch.no_grad():
        probe = utils.to_float(x[:8].to(device))
        first, second = model(probe).float(), model(probe).float()
    return not torch.allclose(first, second, rtol=1e-4, atol=1e-5)


def evaluate_run(run, checkpoints, json_path, is_run_dir, models, args, device, cache, measured):
    """Every attack of --attacks on every checkpoint of one run folder (or one checkpoint file), and with --landscape
    the landscape of its final weights (Fig. 8). json_path is rewritten after every number: a crash keeps what was
    measured. `measured` remembers rows by (weights, images, attack): identical weights (best.pt is often the final
    epoch) are measured once. Returns the new result rows."""
    saved, new_rows = read_results(json_path), []
    for role, ckpt in checkpoints:
        landscape = args.landscape and (role != "best" or len(checkpoints) == 1)
        if not args.attacks and not landscape:
            continue
        model, info = models[str(ckpt)]
        x, y, images = load_test_images(info, ckpt, args, cache)
        model.to(device)
        which = "all" if images["subset"] == "all" else f"{images['subset']} subset"
        epoch = f", epoch {info['epoch']}" if info["epoch"] else ""
        print(f"{ckpt}: {info['arch']} ({info['method']}{epoch}) on {len(y)} {images['dataset']} test images "
              f"({which}), {utils.threat_model(args.norm, args.epsilon)}, {device}"
              f"{', bf16 autocast' if args.amp else ''}")
        common = {"run": run, "checkpoint": str(ckpt), "role": role, "kind": info["kind"], "method": info["method"],
                  "weights": info["weights"], "arch": info["arch"], "epoch": info["epoch"],
                  "dataset": images["dataset"], "subset": images["subset"], "n": len(y), "seed": args.seed,
                  "batch_size": args.batch_size, "device": str(device), "amp": args.amp, "flags": info["flags"],
                  "no_gradient": info.get("no_gradient", False), "indices": images["indices"]}
        attacks = list(args.attacks)
        if {"pgd20", "cw20"} & set(attacks) and "eot20" not in attacks and is_random(model, x, device):
            print(f"  {role:10s} its forward pass is random: EOT-PGD-20 ({args.eot_draws} draws a step) as well")
            attacks.append("eot20")
        for attack in attacks:
            utils.seed_everything(args.seed)  # each number is reproducible on its own
            start, same = time.time(), (info["fingerprint"], images["key"], attack)
            eps = 0.0 if attack == "clean" else utils.radii(args)[0]  # clean accuracy has no threat model
            row = {**common, "attack": attack, "norm": None if attack == "clean" else args.norm, "epsilon": eps,
                   "epsilon_255": args.epsilon if eps and args.norm == "linf" else 255 * eps}
            if same in measured:
                earlier = measured[same]
                row.update({k: v for k, v in earlier.items() if k not in row and k != "seconds"}, seconds=0.0,
                           same_weights_as=earlier["checkpoint"])
            else:
                row.update(measure(Bf16Autocast(model) if args.amp else model, x, y, attack, args, device,
                                   desc=f"{role} {attack}"), seconds=time.time() - start)
                measured[same] = row
            print(f"  {role:10s} {attack:6s} {100 * row['accuracy']:6.2f}%  ({row['correct']}/{len(y)}, "
                  f"{row['seconds']:.1f} s)", flush=True)
            new_rows.append(row)
            saved["results"] = [r for r in saved["results"] if (r["run"], r["role"], r["attack"], utils.threat_of(r)) !=
                                (run, role, attack, utils.threat_of(row))] + [row]  # another eps or norm's row stays
            save_results(saved, json_path)
        if landscape:  # beside the results: RUN/final.landscape.*, CKPT.landscape.*, with --out RUN_NAME.final.*
            name = output_stem(run, ckpt, role, is_run_dir, args.out)
            import report  # Fig. 8, loaded only when asked for

            entry = report.landscape_for(model, x, y, args, device, common, json_path.parent / f"{name}.landscape")
            saved["landscapes"] = [e for e in saved["landscapes"] if (e["run"], e["role"]) != (run, role)] + [entry]
            save_results(saved, json_path)
        model.cpu()
    return new_rows


def output_stem(run, ckpt, role, is_run_dir, out):
    """The name a checkpoint's figures take beside its results: final (in RUN), the checkpoint's name, FILE.NAME for
    --model FILE.py:NAME, or with --out RUN_NAME.final."""
    if role == "model":
        return f"{Path(ckpt).stem}.{run.rpartition(':')[2]}"
    return Path(ckpt).stem if not is_run_dir else role if out is None else f"{Path(run).name}.{role}"


# === Results: the JSON files and Table I


def read_results(path):
    """What a JSON file evaluate.py wrote holds, or empty lists when it is not there."""
    path = Path(path)
    if not path.exists():
        return {"results": [], "landscapes": []}
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved.get("results"), list):
            raise ValueError("no 'results' list")
    except (ValueError, AttributeError, OSError) as err:
        raise utils.UserError(f"{path} is not a results file of evaluate.py ({err}); move it away or pass "
                              "--out") from None
    saved.setdefault("landscapes", [])
    return saved


def save_results(saved, json_path):
    saved["script"], groups = "evaluate.py", threat_groups(saved["results"])
    saved["table"] = {run if len(groups) == 1 else f"{run} ({threat})": entry for threat, rows in groups.items()
                      for run, entry in table_i(rows).items()}
    utils.save_json(saved, json_path)


def threat_groups(rows):
    """{threat model: its rows and the clean rows}: no table puts two threat models (or radii) side by side."""
    threats = dict.fromkeys(utils.threat_of(r) for r in rows if r["attack"] != "clean") or [None]
    return {threat: [r for r in rows if utils.threat_of(r) in (threat, None)] for threat in threats}


def table_i(rows):
    """{run: {"dataset", "method", "threat", "n", "notes", attack: {"best", "final", "diff", "best_worst",
    "final_worst"}}} from result rows of one threat model; a checkpoint that is neither best.pt nor final.pt fills
    the Best column. Diff is |Best - Final| (Table I); *_worst the worst class's accuracy."""
    runs = {}
    for row in rows:
        run = runs.setdefault(row["run"], {"dataset": row.get("dataset"), "method": row.get("method"), "threat": None,
                                           "n": set(), "notes": set()})
        run["threat"] = run["threat"] or utils.threat_of(row)
        column = "final" if row["role"] == "final" else "best"
        run.setdefault(row["attack"], {})[column] = row["accuracy"]
        if row.get("worst_class_accuracy") is not None:
            run[row["attack"]][f"{column}_worst"] = row["worst_class_accuracy"]
        run["n"].add(row["n"])
        if row["attack"] == "aa" and row.get("aa_version") != "standard":
            run["notes"].add(f"AA {row.get('aa_version')} ({','.join(row.get('aa_attacks') or [])})")
        if row.get("no_gradient") and row["attack"] != "clean":
            run["notes"].add("no input gradient: PGD/CW cannot attack")
        if row.get("amp") and row["attack"] != "clean":
            run["notes"].add(f"{ATTACK_TITLES[row['attack']]} in bf16")
    for run in runs.values():
        run["n"], run["notes"] = sorted(run["n"]), sorted(run["notes"])
        for attack in ATTACK_TITLES:
            cell = run.get(attack)
            if cell and "best" in cell and "final" in cell:
                cell["diff"] = abs(cell["best"] - cell["final"])
    return runs


def markdown_table(rows, worst_class=False, paper=None):
    """Table I as markdown, one table per threat model (named above it): a row per run, Best | Final | Diff (in %)
    of Clean, PGD20, CW and AA; with worst_class the worst class's Best and Final too (CFA's fairness measure); with
    paper (a data set of PAPER_TABLE_I) the paper's row under each method it reports, beside L-inf eps 8/255 only."""
    columns = ("best", "final", "diff") + (("best_worst", "final_worst") if worst_class else ())
    titles = {"best": "Best", "final": "Final", "diff": "Diff", "best_worst": "Best worst",
              "final_worst": "Final worst"}
    attacks = [*ATTACKS, *(["eot20"] if any(r["attack"] == "eot20" for r in rows) else [])]
    header = ["Run", "Dataset", "Method"] + [f"{ATTACK_TITLES[a]} {titles[c]}" for a in attacks for c in columns]
    tables = []
    for threat, group in threat_groups(rows).items():
        lines = [f"**Threat model: {threat or 'none (clean accuracy only)'}**", "",
                 "| " + " | ".join(header + ["n", "notes"]) + " |", "|" + "---|" * (len(header) + 2)]
        for run, t in table_i(group).items():
            cells = [Path(run).name, str(t["dataset"]), str(t["method"])]
            for attack in attacks:
                cell = t.get(attack, {})
                cells += [f"{100 * cell[c]:.2f}" if c in cell else "–" for c in columns]
            cells += ["/".join(map(str, t["n"])), "; ".join(t["notes"])]
            lines.append("| " + " | ".join(cells) + " |")
            reported = (PAPER_TABLE_I.get(paper) or {}).get(t["method"]) if threat == "L-inf eps 8/255" else None
            if reported:
                cells = ["", f"paper ({paper})", str(t["method"])]
                for triple in reported + [("–",) * 3] * (len(attacks) - len(reported)):
                    cells += [f"{v:.2f}" if v != "–" else v for v in triple] + ["–"] * (len(columns) - 3)
                lines.append("| " + " | ".join(cells + ["", "ResNet-18, the paper's Table I"]) + " |")
        tables.append("\n".join(lines) + "\n")
    return "\n".join(tables)


def print_table(args):
    """--table: the results of the given run folders or JSON files as one Table I, printed and with --out written."""
    out = args.out and utils.check_output(args.out, "--out", "evaluate.py --table")
    rows = result_rows(args.paths)
    table = markdown_table(rows, worst_class=args.worst_class, paper=args.paper)
    print(table, end="")
    if out:
        utils.atomic_write(out, lambda f: f.write(utils.signed(table, "evaluate.py --table").encode()))
        print(f"wrote {out}")
    return {"rows": rows, "table": table, "outputs": [args.out] if args.out else []}


def result_rows(paths):
    """The result rows of the given run folders or JSON files evaluate.py wrote; one UserError where there are none."""
    rows = []
    for path in map(Path, paths):
        json_path = path / "eval.json" if path.is_dir() else path
        if not json_path.is_file():
            raise utils.UserError(f"no results at {json_path}; run evaluate.py {path} first" if any(
                (path / f"{role}.pt").is_file() for role in ("best", "final")) else f"{path} is not a run folder or "
                "results: give run folders or the JSON files evaluate.py wrote")
        rows += read_results(json_path)["results"]
    if not rows:
        raise utils.UserError(f"no results in {', '.join(map(str, paths))}")
    return rows


# === --sanity on checkpoints: the checklist is sanity.py's, the checkpoints, images and JSON are kept here


def sanity_run(run, checkpoints, json_path, is_run_dir, models, args, device, cache, checked):
    """The checklist on every checkpoint of one run folder (or one checkpoint file): printed, stored as a
    "sanity" entry per checkpoint in json_path, drawn beside it. `checked` remembers the entries by (weights,
    images, settings): identical weights are checked once. Returns the new entries."""
    import sanity as checklist  # loaded only when asked for: evaluate.py alone runs everything else

    epsilons = tuple(sorted({0.0, args.epsilon, *args.sanity_epsilons}))
    settings = checklist.SanitySettings(
        norm=args.norm, epsilon=args.epsilon, step_size=args.step_size, epsilons=epsilons,
        long_steps=args.sanity_steps, restarts=args.sanity_restarts, square_queries=args.sanity_square_queries,
        batch_size=args.batch_size, seed=args.seed, device=str(device), bf16=args.amp)
    saved, entries = read_results(json_path), []
    saved.setdefault("sanity", [])
    for role, ckpt in checkpoints:
        model, info = models[str(ckpt)]
        x, y, images = load_test_images(info, ckpt, args, cache)
        if args.n_examples is None and len(y) > checklist.SANITY_N:  # its default: the first (or fixed) SANITY_N
            x, y, images = load_test_images(info, ckpt, argparse.Namespace(**{**vars(args), "n_examples":
                                                                               checklist.SANITY_N}), cache)
        print(f"{ckpt}: sanity checks of {info['arch']} ({info['method']}) on {len(y)} {images['dataset']} test "
              f"images, {utils.threat_model(args.norm, args.epsilon)}, {device}{', bf16 autocast' if args.amp else ''}")
        same = (info["fingerprint"], images["key"], settings)
        entry = {"run": run, "checkpoint": str(ckpt), "role": role, "kind": info["kind"], "method": info["method"],
                 "arch": info["arch"], "epoch": info["epoch"], "dataset": images["dataset"], "subset": images["subset"],
                 "n": len(y), "seed": args.seed, "device": str(device), "amp": args.amp,
                 "settings": dataclasses.asdict(settings)}
        png = json_path.parent / f"{output_stem(run, ckpt, role, is_run_dir, args.out)}.sanity.png"
        title = (f"{info['method']} ({role}): sanity, {len(y)} {images['dataset']} images, "
                 f"{utils.threat_model(args.norm, args.epsilon)}")
        net = checklist.Bf16Autocast(model.to(device)) if args.amp else model.to(device)  # sanity.py's: it unwraps it
        entry.update(checklist.check_checkpoint(net, x, y, settings, role, png, title, checked.get(same)))
        checked.setdefault(same, entry)
        model.cpu()
        mine = (run, role, args.norm, args.epsilon)  # the entries of another norm or eps stay
        saved["sanity"] = [e for e in saved["sanity"] if (e["run"], e["role"], e["settings"].get("norm", "linf"),
                                                          e["settings"]["epsilon"]) != mine] + [entry]
        save_results(saved, json_path)
        entries.append(entry)
    return entries


# === Results to take elsewhere: --curve, --export, --card (report.py writes the files)


def release(run, checkpoints, json_path, models, args, device, cache):
    """--curve, --export and --card for one run folder (or checkpoint file): the curve's numbers and the card's
    kept in json_path, the files beside it (RUN/MODEL_CARD.md; CKPT.MODEL_CARD.md beside CKPT.eval.json)."""
    import report  # loaded only when asked for, as sanity.py

    saved, roles, found = read_results(json_path), dict(checkpoints), {}  # found: each set of weights' curves, once
    stem = "" if json_path.name == "eval.json" else json_path.name.removesuffix(".json").removesuffix(".eval") + "."
    beside = json_path.parent.joinpath
    reported = args.reported if args.reported in roles else next(iter(roles))  # a checkpoint file: itself
    model, info = models[str(roles[reported])]
    if args.curve:
        saved["curves"] = [c for c in saved.get("curves", []) if c["run"] != run] + [
            {**c, "role": role} for role, ckpt in checkpoints for c in robustness_curve(run, ckpt, models, args,
                                                                                           device, cache, found)]
        save_results(saved, json_path)
        curves, rows = [c for c in saved["curves"] if c["run"] == run], [r for r in saved["results"] if r["run"] == run]
        report.plot_robustness_curve(curves, beside(stem + "robustness_curve.png"), info["method"])
        if rows:  # the per-class accuracies every result row holds: nothing measured again
            report.plot_class_accuracy(rows, beside(stem + "class_accuracy.png"), info["method"])
    export = None
    if args.export:
        x, _, _ = load_test_images(info, roles[reported], args, cache)
        meta = {k: info[k] for k in ("method", "arch", "dataset", "epoch", "num_classes")}
        export = report.export_model(model, tuple(x.shape[1:]), Path(args.export), {**meta, "checkpoint": reported})
    if args.card:  # from the rows already measured; what the card shows is kept in json_path too
        card = report.write_card([r for r in saved["results"] if r["run"] == run], saved.get("sanity", []), reported,
                                 roles[reported], info["kind"], export, device, beside(stem + "MODEL_CARD.md"),
                                 beside(stem + "robustbench.json"))
        saved["cards"] = [c for c in saved.get("cards", []) if c["run"] != run] + [card]
        save_results(saved, json_path)


def robustness_curve(run, ckpt, models, args, device, cache, found):
    """Accuracy of one checkpoint at each of --curve-epsilons under each of --curve-attacks (PGD-20 with step eps/4,
    the default's 2/255 at 8/255; AutoAttack as --aa-version), re-seeded at every eps, on the images of --n-examples."""
    model, info = models[str(ckpt)]
    x, y, images = load_test_images(info, ckpt, args, cache)
    key, curves = (info["fingerprint"], images["key"]), []
    if key in found:
        return found[key]
    net = Bf16Autocast(model.to(device)) if args.amp else model.to(device)
    unit = utils.NORM_UNITS[args.norm]  # the flags' eps (1/255 for L-inf) -> the attacks' [0, 1] units
    for attack in args.curve_attacks:
        correct = []
        for e in args.curve_epsilons:
            utils.seed_everything(args.seed)
            flags = (autoattack_flags(net, utils.to_float(x), y, e / unit, args.aa_version, args.aa_attacks, args.seed,
                                      args.batch_size, device, norm=args.norm)[0] if attack == "aa" and e else
                     attack_flags(net, x, y, "ce" if e else None, e / unit, e / 4 / unit, 20, args.batch_size, device,
                                  norm=args.norm))
            correct.append(int(flags.sum()))
            print(f"  curve {Path(ckpt).stem:6s} {attack:5s} eps {e:g}: {100 * correct[-1] / len(y):.2f}%", flush=True)
        curves.append({"run": run, "method": info["method"], "attack": attack, "norm": args.norm,
                       "epsilons": list(args.curve_epsilons), "correct": correct, "n": len(y),
                       "accuracy": [c / len(y) for c in correct], "seed": args.seed, "indices": images["indices"]})
    model.cpu()
    found[key] = curves
    return curves


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        return print_table(args)
    if args.compare:
        import report  # --compare's statistics

        return report.compare(result_rows(args.paths), ATTACK_TITLES, args.out)
    device = utils.pick_device(args.device)
    # every checkpoint is read first: bad input stops here, before any data is loaded or number computed
    jobs = resolve_inputs(args.paths, args.out, args.model)
    models = {str(ckpt): load_model(ckpt, args) for _, checkpoints, _, _ in jobs for _, ckpt in checkpoints}
    warn_unfinished(jobs, models)
    cache, measured, checked, new_rows, written, entries = {}, {}, {}, [], [], []
    for run, checkpoints, json_path, is_run_dir in jobs:
        new_rows += evaluate_run(run, checkpoints, json_path, is_run_dir, models, args, device, cache, measured)
        if args.sanity:
            entries += sanity_run(run, checkpoints, json_path, is_run_dir, models, args, device, cache, checked)
        if args.card or args.curve or args.export:
            release(run, checkpoints, json_path, models, args, device, cache)
        if json_path not in written:
            written.append(json_path)
        print(f"wrote {json_path}")
    if new_rows:
        runs = set(r["run"] for r in new_rows)
        print(markdown_table([r for p in written for r in read_results(p)["results"] if r["run"] in runs]), end="")
    failed = sum(entry["counts"]["FAIL"] for entry in entries)
    if args.strict and failed:
        print(f"evaluate.py: {failed} sanity checks FAILed (--strict)", file=sys.stderr)
        sys.exit(1)
    return {"rows": new_rows, "outputs": [str(p) for p in written], "sanity": entries}


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit status for every way it can end early
