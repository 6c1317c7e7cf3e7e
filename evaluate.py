"""Evaluate checkpoints as the PIAT paper does: clean, PGD-20, CW-20 and AutoAttack accuracy of a run's best and final
checkpoint and their difference (Table I); the loss landscape (Fig. 8); a checklist against gradient masking.

    python evaluate.py runs/RUN                                    # best.pt and final.pt -> runs/RUN/eval.json
    python evaluate.py runs/RUN/final.pt --attacks clean,pgd20     # one checkpoint -> runs/RUN/final.eval.json
    python evaluate.py model.pt --arch resnet18 --dataset cifar10  # a plain state_dict of another project
    python evaluate.py --table runs/a runs/b --paper cifar10       # several runs' results as one Table I
    python evaluate.py runs/RUN --landscape                        # Fig. 8: final.landscape.npz and .png
    python evaluate.py runs/RUN --sanity                           # is the evaluation trustworthy? (sanity.py)
    python evaluate.py --model my_defence.py:build --sanity        # any nn.Module of yours: build() returns it
    python evaluate.py --compare runs/pgdat runs/piat              # differences with 95 % intervals and p-values

pgd20 and cw20: 20 steps of --step-size on the cross-entropy or the CW margin max_{j!=y} f_j - f_y from a uniform
start in the --epsilon ball of --norm (the training scripts' pgd_attack), BatchNorm in eval mode, images in [0, 1];
aa: AutoAttack through pyautoattack; eot20: PGD-20 on the logits averaged over --eot-draws draws, added for a model
whose forward pass is random (EOT, Athalye et al. 2018). --seed is set afresh before each number. Images: the whole
test set or --n-examples of it (--subset: docs/evaluation.md). --norm l2: the L2 ball; results of each norm and eps
are kept, tabled and compared apart.
"""

import argparse
import functools
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from utils import non_negative_int, number, pixel_units, positive_int

ATTACKS = ("clean", "pgd20", "cw20", "aa")  # Table I's columns; eot20 joins them for a random model
ATTACK_TITLES = {"clean": "Clean", "pgd20": "PGD20", "cw20": "CW", "aa": "AA", "eot20": "EOT"}
ATTACK_LOSSES = {"clean": None, "pgd20": "ce", "cw20": "cw", "eot20": "ce"}  # what attack_flags maximises for each
AA_VERSIONS = ("standard", "plus", "rand", "custom")
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
NORMALIZATIONS = {"none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), **utils.CHANNEL_STATS}
STATE_DICT_WRAPPERS = ("state_dict", "model", "net", "model_state_dict")  # {"state_dict": {...}} and the like
# The row label of each --loss, and the paper's Table I (their one copy: --paper and sweep.py --report read them)
LOSS_NAMES = {"ce": "PGD-AT", "nmse": "NMSE", "alp": "ALP", "trades": "TRADES", "mart": "MART", "mail": "MAIL",
              "cfa": "CFA", "rat": "RAT"}
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
    g.add_argument("--eot-draws", type=positive_int, default=10, help="draws averaged by eot20's every step")
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
                   help="is a difference real? each method of the given runs' results against the first (runs of "
                        "one method: its seeds): 95 %% intervals (paired bootstrap over the images; t over seeds) "
                        "and the exact McNemar p-value; --out writes them as JSON")
    g = p.add_argument_group("loss landscape (Fig. 8): PGD adversarial CE at theta + a*d1 + b*d2 on a fixed batch")
    g.add_argument("--landscape", action="store_true", help="of each run's final.pt (or each checkpoint)")
    g.add_argument("--landscape-steps", type=positive_int, default=21, help="grid points along each direction")
    g.add_argument("--landscape-range", type=number(float, 0, open_bounds=True), default=1.0, help="a, b in +-range")
    g.add_argument("--landscape-batch", type=positive_int, default=256, help="the first N of the evaluated images")
    g.add_argument("--landscape-pgd-steps", type=non_negative_int, default=20, help="PGD steps of its attack")
    g = p.add_argument_group("sanity checklist against gradient masking and broken attacks (sanity.py)")
    g.add_argument("--sanity", action="store_true", help="run it on each checkpoint (after --attacks, when given)")
    g.add_argument("--strict", action="store_true", help="with --sanity: exit status 1 when a check FAILs")
    g.add_argument("--sanity-epsilons", type=epsilon_list, default=None,
                   help="its eps sweep (default: 0,2,4,8,16,32,64 linf, 0,0.125,...,4 l2; 0 and --epsilon added; the "
                        "largest >= 4x --epsilon)")
    g.add_argument("--sanity-steps", type=positive_int, default=100, help="steps of its long PGD, at half --step-size")
    g.add_argument("--sanity-restarts", type=non_negative_int, default=3, help="restarts of its long PGD")
    g.add_argument("--sanity-square-queries", type=positive_int, default=1000, help="queries of its Square attack")
    args = p.parse_args(argv)
    # defaults that depend on other flags, and the checks argparse cannot make
    utils.attack_units(p, args)
    if args.sanity_epsilons is None:  # up to 8x the default eps, where honest models are at about 0 %
        args.sanity_epsilons = [e / (1 if args.norm == "linf" else 16) for e in (0, 2, 4, 8, 16, 32, 64)]
    if args.attacks is None:
        args.attacks = [] if args.landscape or args.sanity else list(ATTACKS)
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
            raise utils.UserError(f"--model {spec}: {path} defines no {name}() to call")
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

    def output_classes(x):  # on two test images: logits (2, K), K the data set's classes
        try:
            with torch.no_grad():
                out = model.eval()(x)
        except Exception as err:  # e.g. a network for other image sizes: one line, not the user's traceback
            raise utils.UserError(f"--model {spec}: fails on images of shape {tuple(x.shape)} in [0, 1]: "
                                  f"{type(err).__name__}: {utils.first_line(err)}") from None
        if not (torch.is_tensor(out) and out.dim() == 2 and out.shape[0] == len(x) and out.is_floating_point()):
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise utils.UserError(f"--model {spec}: maps {len(x)} images to {shape}, not logits of shape "
                                  f"({len(x)}, classes)")
        return out.shape[1]

    return model, {"kind": "model", "arch": type(model).__name__, "method": path.name, "num_classes": None,
                   "output_classes": output_classes, "spec": spec}


def project_model(path):
    """A checkpoint of this project, its model rebuilt from what it holds."""
    checkpoint = utils.load_checkpoint(path)
    arch, saved = checkpoint["arch"], checkpoint.get("args") or {}
    model = utils.build_model(arch, checkpoint["num_classes"], checkpoint["mean"], checkpoint["std"],
                              **(checkpoint.get("model_kwargs") or {}))
    load_weights(model, checkpoint["model"], path, arch)
    return model, {"kind": checkpoint.get("script", "train_piat.py"), "arch": arch, "method": method_name(checkpoint),
                   "weights": checkpoint.get("weights", "trained"), "epoch": checkpoint.get("epoch"),
                   "epochs": saved.get("epochs"), "num_classes": checkpoint["num_classes"],
                   "image_shape": checkpoint.get("image_shape"), "dataset": saved.get("dataset"),
                   "data_dir": saved.get("data_dir"), "image_size": saved.get("image_size")}


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
    return model, {"kind": "state_dict", "arch": args.arch, "method": path.stem, "num_classes": num_classes}


def method_name(checkpoint):
    """A Table I row label from a checkpoint's flags: "PGD-AT", "PIAT + NMSE", "TRADES", "PGD-AT + EMA", ..., or
    the label its script stored as args["method"] (train_rdat.py: "RDAT + PIAT", ...). A weight average the run
    reports (--ema, --swa-start) is part of the name; CFA's own average (FAWA) is part of CFA."""
    args = checkpoint.get("args") or {}
    if args.get("method"):
        return str(args["method"])
    script = Path(checkpoint.get("script") or "train_piat.py").stem
    loss = args.get("loss")
    name = LOSS_NAMES.get(loss, loss or script)
    if args.get("piat"):
        name = "PIAT" if loss == "ce" else f"PIAT + {name}"
    if args.get("ema") is not None:
        name += " + EMA"
    elif args.get("swa_start") is not None:
        name += " + SWA"
    return name if script == "train_piat" else f"{script}: {name}"


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
    file, _, name = (model or "").rpartition(":")
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
    for _, _, json_path, _ in jobs:
        if json_path.is_dir() or not json_path.parent.is_dir() or not os.access(json_path.parent, os.W_OK):
            raise utils.UserError(f"cannot write results to {json_path}; pass --out FILE")
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
    if info["num_classes"] is None:  # a user's model (--model): its logits say how many classes it knows
        info["num_classes"] = info["output_classes"](utils.to_float(data.x_test[:2]))
    if data.num_classes != info["num_classes"]:
        raise utils.UserError(f"{ckpt} has {info['num_classes']} outputs but {dataset} has {data.num_classes} "
                              "classes (--dataset? --num-classes?)")
    if info["image_shape"] and tuple(info["image_shape"]) != tuple(data.image_shape):
        raise utils.UserError(f"{ckpt} was trained on {tuple(info['image_shape'])} images but {dataset} holds "
                              f"{tuple(data.image_shape)} (--image-size?)")
    if n is not None and n > n_test:
        raise utils.UserError(f"--n-examples {n} but the test set holds {n_test} images")
    subset = args.subset or ("first" if dataset in ("cifar10", "cifar100", "svhn") else "fixed")
    if n is None or n == n_test:
        idx, subset = torch.arange(n_test), "all"
    else:  # the data set's own order
        idx = torch.arange(n) if subset == "first" else utils.fixed_subset(n_test, n).sort().values
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
                  "batch_size": args.batch_size, "device": str(device), "amp": args.amp,
                  "indices": images["indices"]}
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
            saved["results"] = [r for r in saved["results"] if (r["run"], r["role"], r["attack"], threat_of(r)) !=
                                (run, role, attack, threat_of(row))] + [row]  # another eps or norm's row stays
            save_results(saved, json_path)
        if landscape:  # beside the results: RUN/final.landscape.*, CKPT.landscape.*, with --out RUN_NAME.final.*
            name = output_stem(run, ckpt, role, is_run_dir, args.out)
            entry = landscape_for(model, x, y, args, device, common, json_path.parent / f"{name}.landscape")
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


def threat_of(row):
    """A result row's threat model as tables name it ("L-inf eps 8/255", "L2 eps 0.5"), None for clean accuracy."""
    norm = row.get("norm") or "linf"  # rows older than --norm: L-inf
    epsilon = row.get("epsilon_255") if norm == "linf" else row.get("epsilon")
    return None if row["attack"] == "clean" else utils.threat_model(norm, epsilon)


def threat_groups(rows):
    """{threat model: its rows and the clean rows}: no table puts two threat models (or radii) side by side."""
    threats = dict.fromkeys(threat_of(r) for r in rows if r["attack"] != "clean") or [None]
    return {threat: [r for r in rows if threat_of(r) in (threat, None)] for threat in threats}


def table_i(rows):
    """{run: {"dataset", "method", "threat", "n", "notes", attack: {"best", "final", "diff", "best_worst",
    "final_worst"}}} from result rows of one threat model; a checkpoint that is neither best.pt nor final.pt fills
    the Best column. Diff is |Best - Final| (Table I); *_worst the worst class's accuracy."""
    runs = {}
    for row in rows:
        run = runs.setdefault(row["run"], {"dataset": row.get("dataset"), "method": row.get("method"), "threat": None,
                                           "n": set(), "notes": set()})
        run["threat"] = run["threat"] or threat_of(row)
        column = "final" if row["role"] == "final" else "best"
        run.setdefault(row["attack"], {})[column] = row["accuracy"]
        if row.get("worst_class_accuracy") is not None:
            run[row["attack"]][f"{column}_worst"] = row["worst_class_accuracy"]
        run["n"].add(row["n"])
        if row["attack"] == "aa" and row.get("aa_version") != "standard":
            run["notes"].add(f"AA {row.get('aa_version')} ({','.join(row.get('aa_attacks') or [])})")
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
    rows = result_rows(args.paths)
    table = markdown_table(rows, worst_class=args.worst_class, paper=args.paper)
    print(table, end="")
    if args.out:
        utils.atomic_write(args.out, lambda f: f.write(table.encode()))
        print(f"wrote {args.out}")
    return {"rows": rows, "table": table, "outputs": [args.out] if args.out else []}


def result_rows(paths):
    """The result rows of the given run folders or JSON files evaluate.py wrote; one UserError where there are none."""
    rows = []
    for path in map(Path, paths):
        json_path = path / "eval.json" if path.is_dir() else path
        if not json_path.is_file():
            raise utils.UserError(f"no results at {json_path}; run evaluate.py {path} first")
        rows += read_results(json_path)["results"]
    if not rows:
        raise utils.UserError(f"no results in {', '.join(map(str, paths))}")
    return rows


# === Is a difference real? Paired over the same images, and over seeds


def compare_flags(reference, other, resamples=10_000, seed=0):
    """Two methods' per-image correctness on the same images, (seeds, images) 0/1 arrays (each row one run): the
    difference of their accuracies (other - reference), its 95 % interval by a paired bootstrap over the images
    (of the per-image mean over seeds), a 95 % t-interval over seeds (paired by seed when both have as many, else
    Welch's; None with one seed each), and the exact McNemar p-value: the two-sided binomial test of the images one
    gets right and the other wrong (summed over the seeds paired in order)."""
    import scipy.stats

    a, b = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    d = b.mean(0) - a.mean(0)
    rng = np.random.default_rng(seed)
    boots = np.concatenate([d[rng.integers(0, len(d), (min(1000, resamples - i), len(d)))].mean(1)
                            for i in range(0, resamples, 1000)])  # in chunks of 1000 resamples
    pairs = min(len(a), len(b))
    only_a, only_b = int((a[:pairs] > b[:pairs]).sum()), int((b[:pairs] > a[:pairs]).sum())
    p = scipy.stats.binomtest(only_b, only_a + only_b).pvalue if only_a + only_b else 1.0
    t_low = t_high = None
    per_seed_a, per_seed_b = a.mean(1), b.mean(1)
    if len(a) > 1 and len(b) > 1:
        with warnings.catch_warnings():  # scipy's notice when every seed differs by the same amount
            warnings.simplefilter("ignore", RuntimeWarning)
            t = (scipy.stats.ttest_rel(per_seed_b, per_seed_a) if len(a) == len(b) else
                 scipy.stats.ttest_ind(per_seed_b, per_seed_a, equal_var=False)).confidence_interval(0.95)
        t_low, t_high = float(t.low), float(t.high)
    return {"reference_accuracy": float(a.mean()), "accuracy": float(b.mean()), "diff": float(d.mean()),
            "ci_low": float(np.percentile(boots, 2.5)), "ci_high": float(np.percentile(boots, 97.5)),
            "t_low": t_low, "t_high": t_high, "p_value": float(p), "only_reference": only_a, "only_other": only_b,
            "seeds": [len(a), len(b)], "n": len(d)}


def compare(paths, out=None):
    """--compare: each method of the given runs' results against the first one's (runs of one method are its seeds,
    paired with the other method's in the order given), per checkpoint role and attack; printed as a table and, with
    --out, written as JSON. Runs not evaluated on the same images are refused."""
    methods = {}  # method -> {run: {(role, attack, threat model): row}}
    for path in paths:
        for row in result_rows([path]):
            if "per_image" not in row:
                raise utils.UserError(f"{row['run']} was evaluated before results kept per-image correctness; "
                                      "evaluate it again")
            key = (row["role"] if row["role"] in ("best", "final") else "checkpoint", row["attack"], threat_of(row))
            methods.setdefault(row["method"], {}).setdefault(row["run"], {})[key] = row  # one per threat model
    if len(methods) < 2:
        raise utils.UserError(f"--compare needs results of at least two methods; found {', '.join(methods) or 'none'}")
    (reference, reference_runs), *others = methods.items()
    results, lines = [], ["| Method | vs | Checkpoint | Attack | Accuracy | Reference | Diff | 95 % CI (images) | "
                          "95 % CI (seeds) | McNemar p |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, runs in others:
        cells = sorted(set.intersection(*(set(r) for r in (*reference_runs.values(), *runs.values()))),
                       key=lambda c: (c[2] or "", c[0], list(ATTACK_TITLES).index(c[1])))
        for role, attack, threat in cells:  # never two threat models (or radii) compared with each other
            rows = [r[(role, attack, threat)] for r in (*reference_runs.values(), *runs.values())]
            if any((r["dataset"], r["indices"]) != (rows[0]["dataset"], rows[0]["indices"]) for r in rows):
                odd = next(r for r in rows if (r["dataset"], r["indices"]) != (rows[0]["dataset"], rows[0]["indices"]))
                raise utils.UserError(f"{odd['run']} and {rows[0]['run']} were not evaluated on the same images "
                                      f"({attack}, {role}); evaluate both with the same --dataset and --n-examples")
            stats = compare_flags([r[(role, attack, threat)]["per_image"] for r in reference_runs.values()],
                                  [r[(role, attack, threat)]["per_image"] for r in runs.values()])
            results.append(dict(method=method, reference=reference, role=role, attack=attack, threat=threat, **stats))
            t = f"[{100 * stats['t_low']:+.1f}, {100 * stats['t_high']:+.1f}]" if stats["t_low"] is not None else "–"
            name = ATTACK_TITLES[attack] + (f" ({threat})" if threat else "")  # "PGD20 (L2 eps 0.5)"
            lines.append(f"| {method} | {reference} | {role} | {name} | {100 * stats['accuracy']:.2f} "
                         f"| {100 * stats['reference_accuracy']:.2f} | {100 * stats['diff']:+.2f} | "
                         f"[{100 * stats['ci_low']:+.1f}, {100 * stats['ci_high']:+.1f}] | {t} | "
                         f"{stats['p_value']:.3g}{' *' if stats['p_value'] < 0.05 else ''} |")
    if not results:
        raise utils.UserError("no attack was measured on the same checkpoints of every run")
    table = "\n".join(lines) + (f"\n\nin %; seeds: {', '.join(f'{m} {len(r)}' for m, r in methods.items())}; * p < "
                                "0.05 (exact McNemar on the images one gets right and the other wrong)\n")
    print(table, end="")
    if out:
        utils.save_json({"reference": reference, "comparisons": results}, out)
        print(f"wrote {out}")
    return {"comparisons": results, "table": table}


# === The loss landscape (Fig. 8; Li et al., "Visualizing the loss landscape of neural nets", 2018)


def filter_normalized_direction(model, generator):
    """A random Gaussian direction in weight space, each filter (a slice along the first dimension: a conv's output
    channel, a linear layer's row) rescaled to the norm of the same filter of the weights. One-dimensional
    parameters (biases, BatchNorm's scale and shift) get a zero direction (Li et al.'s ignore='biasbn')."""
    direction = {}
    for name, w in model.named_parameters():
        if w.dim() <= 1:
            direction[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator).to(w.device, w.dtype)
        scale = w.detach().flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)
        direction[name] = d * scale.view(-1, *[1] * (w.dim() - 1))
    return direction


def loss_landscape(model, x, y, epsilon, step_size, steps, coords, seed, batch_size, desc="landscape", norm="linf"):
    """(loss, accuracy) grids: loss[i, j] the mean CE on the fixed batch (x, y) of the model with the weights
    theta + coords[i]*d1 + coords[j]*d2, under PGD made against those weights from the same random start. The
    weights are passed in (torch.func.functional_call): the model's own are never touched."""
    model.eval()
    theta = {name: p.detach() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    d1, d2 = filter_normalized_direction(model, generator), filter_normalized_direction(model, generator)
    loss, accuracy = np.zeros((len(coords), len(coords))), np.zeros((len(coords), len(coords)))
    for i, j in utils.progress([(i, j) for i in range(len(coords)) for j in range(len(coords))], desc=desc):
        weights = {k: theta[k] + float(coords[i]) * d1[k] + float(coords[j]) * d2[k] for k in theta}
        perturbed = functools.partial(torch.func.functional_call, model, weights)  # perturbed(x): the logits
        utils.seed_everything(seed)  # the same random start at every grid point: a smoother surface
        total, correct = 0.0, 0
        for k in range(0, len(x), batch_size):
            xb, yb = x[k : k + batch_size], y[k : k + batch_size]
            x_adv = pgd_attack(perturbed, xb, yb, epsilon, step_size, steps, norm=norm)
            with torch.no_grad():
                logits = perturbed(x_adv)
            total += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(1) == yb).sum())
        loss[i, j], accuracy[i, j] = total / len(x), correct / len(x)
    return loss, accuracy


def landscape_for(model, x, y, args, device, common, stem):
    """Compute and describe one checkpoint's loss landscape; saved as stem.npz and drawn as a surface in stem.png."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    start, n = time.time(), min(args.landscape_batch, len(x))
    xb, yb = utils.to_float(x[:n].to(device)), y[:n].to(device)
    coords = np.linspace(-args.landscape_range, args.landscape_range, args.landscape_steps)
    loss, accuracy = loss_landscape(model, xb, yb, *utils.radii(args), args.landscape_pgd_steps, coords, args.seed,
                                    args.batch_size, desc=f"{common['role']} landscape", norm=args.norm)
    npz, png = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".png")
    utils.atomic_write(npz, lambda f: np.savez(f, a=coords, b=coords, loss=loss, accuracy=accuracy,
                                               epsilon=utils.radii(args)[0], norm=args.norm,
                                               pgd_steps=args.landscape_pgd_steps, n=n))
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(*np.meshgrid(coords, coords, indexing="ij"), loss, cmap="viridis", linewidth=0, antialiased=True)
    ax.set(xlabel="a (direction d1)", ylabel="b (direction d2)", zlabel="adversarial CE",
           title=f"{common['method']} ({common['role']}): PGD-{args.landscape_pgd_steps} CE, "
                 f"{utils.threat_model(args.norm, args.epsilon)}, {n} images")
    fig.tight_layout()
    utils.atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110))
    center = len(coords) // 2
    entry = {**common, "npz": str(npz), "png": str(png), "steps": args.landscape_steps, "range": args.landscape_range,
             "batch": n, "pgd_steps": args.landscape_pgd_steps, "norm": args.norm, "epsilon": utils.radii(args)[0],
             "loss_min": float(loss.min()), "loss_max": float(loss.max()),
             "loss_center": float(loss[center, center]) if len(coords) % 2 else None, "seconds": time.time() - start}
    print(f"  landscape {args.landscape_steps}x{args.landscape_steps} in [-{args.landscape_range:g}, "
          f"{args.landscape_range:g}]^2: loss {entry['loss_min']:.3f}..{entry['loss_max']:.3f}, wrote {npz} and {png} "
          f"({entry['seconds']:.1f} s)")
    return entry


# === The sanity checklist from Python (a notebook); --sanity runs it on checkpoints (sanity.py)


def sanity(model, x, y, **settings):
    """The --sanity checklist on `model` (any nn.Module taking [0, 1] images) and the test images x (float in
    [0, 1], on the CPU) with labels y; settings: sanity.SanitySettings' fields (device="cuda", epsilon=8.0, ...).
    A list of checks, each a dict with "name", "status" (PASS, WARN, FAIL), "numbers", "detail" and "meaning"."""
    import sanity as checklist

    return checklist.run_sanity_checks(model, x, y, checklist.SanitySettings(**settings))


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        return print_table(args)
    if args.compare:
        return compare(args.paths, args.out)
    device = utils.pick_device(args.device)
    # every checkpoint is read first: bad input stops here, before any data is loaded or number computed
    jobs = resolve_inputs(args.paths, args.out, args.model)
    models = {str(ckpt): load_model(ckpt, args) for _, checkpoints, _, _ in jobs for _, ckpt in checkpoints}
    warn_unfinished(jobs, models)
    if args.sanity:
        import sanity as checklist  # loaded only when asked for: evaluate.py alone runs everything else
    cache, measured, checked, new_rows, written, entries = {}, {}, {}, [], [], []
    for run, checkpoints, json_path, is_run_dir in jobs:
        new_rows += evaluate_run(run, checkpoints, json_path, is_run_dir, models, args, device, cache, measured)
        if args.sanity:
            entries += checklist.sanity_run(run, checkpoints, json_path, is_run_dir, models, args, device, cache,
                                            checked)
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
