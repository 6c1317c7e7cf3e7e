"""Evaluate checkpoints the way the PIAT paper does: clean, PGD-20, CW-20 and AutoAttack accuracy of the
best and the final checkpoint of a run, and their difference (Table I); the loss landscape (Fig. 8).

    python evaluate.py runs/cifar10__train_piat__0__1763800000     # best.pt and final.pt -> RUN_DIR/eval.json
    python evaluate.py runs/a/final.pt --attacks clean,pgd20       # one checkpoint -> runs/a/final.eval.json
    python evaluate.py model.pt --arch resnet18 --dataset cifar10  # a plain state_dict (TRADES, MART, AutoAttack's
                                                  # example model): raw [0,1] input unless --input-normalization
    python evaluate.py --table runs/a runs/b                       # several runs' eval.json as one Table I
    python evaluate.py runs/a --landscape                          # Fig. 8: final.landscape.npz and .png
    python evaluate.py runs/a --sanity                             # is the evaluation itself trustworthy? (below)

Attacks (L-inf, images in [0, 1], the model normalises its input itself, BatchNorm in eval mode):
    clean   accuracy on the unperturbed images
    pgd20   PGD on the cross-entropy, 20 steps of 2/255, uniform random start in the 8/255 ball (Madry et al.)
    cw20    the same loop on the Carlini-Wagner margin max_{j!=y} f_j - f_y
    aa      AutoAttack (Croce & Hein 2020) through the pyautoattack package: version standard (APGD-CE,
            APGD-T, FAB-T, Square) at eps 8/255, seed --seed, batch --batch-size; the accuracy is the
            robust accuracy run_standard_evaluation computes. --aa-version custom --aa-attacks ... is cheaper.

Examples: the whole test set by default (as the paper); --n-examples N takes the first N test images
(--subset first, the default for cifar10/cifar100/svhn: what AutoAttack's eval.py and RobustBench use), or
sorted(utils.fixed_subset(n_test, N)) (--subset fixed, the default for imagefolder and synthetic sets,
whose files are ordered by class; it is the subset train_piat.py's --eval-size N evaluates every epoch).
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import utils

ATTACKS = ("clean", "pgd20", "cw20", "aa")
ATTACK_TITLES = {"clean": "Clean", "pgd20": "PGD20", "cw20": "CW", "aa": "AA"}  # Table I's column groups
AA_VERSIONS = ("standard", "plus", "rand", "custom")
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
NORMALIZATIONS = {"none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), **utils.CHANNEL_STATS}
STATE_DICT_WRAPPERS = ("state_dict", "model", "net", "model_state_dict")  # {"state_dict": {...}} and the like
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


# ----------------------------------------------------------------------------------------------
# The attacks (docs/method.md §2). Images live in [0, 1]; epsilon and step_size in [0, 1] units.
# pgd_attack and cw_margin are train_piat.py's, copied so that this script stands alone.
# ----------------------------------------------------------------------------------------------


def pgd_attack(model, x, y, epsilon, step_size, steps, loss="ce", random_start=True):
    """L-inf PGD maximising `loss` of `model` around x; returns x' with ||x'-x||_inf <= epsilon, x' in [0,1].

    loss: "ce" cross-entropy; "cw" the Carlini-Wagner margin max_{j!=y} f_j - f_y; "kl" TRADES's
    KL(p(x) || p(x')) (y unused). random_start: True or "uniform" draws U(-eps, eps) (Madry et al.);
    "normal" starts at 0.001*N(0, 1), as the official TRADES and MART code does; False starts at x.
    The caller chooses the model's mode (evaluation keeps it in eval mode)."""
    x = x.detach()
    if loss == "kl":
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
    if random_start is True or random_start == "uniform":
        delta = torch.empty_like(x).uniform_(-epsilon, epsilon)
    elif random_start == "normal":
        delta = (0.001 * torch.randn_like(x)).clamp_(-epsilon, epsilon)
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp_(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(x + delta)
        if loss == "ce":
            objective = F.cross_entropy(logits, y, reduction="sum")
        elif loss == "cw":
            objective = cw_margin(logits, y).sum()
        elif loss == "kl":
            objective = F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
        else:
            raise ValueError(f"unknown attack loss {loss!r}")
        (grad,) = torch.autograd.grad(objective, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp_(-epsilon, epsilon)
        delta = (x + delta).clamp_(0, 1) - x  # stay a valid image
    return (x + delta).detach()


def cw_margin(logits, y):
    """max_{j != y} f_j - f_y per example: positive exactly when x is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


def attack_flags(model, x_all, y_all, attack, epsilon, step_size, batch_size, device, desc=""):
    """Per image of x_all (uint8, on the CPU): whether `model` classifies it correctly under `attack`:
    "clean", "pgd20" (CE) or "cw20" (CW margin), 20 steps of step_size, uniform random start. A bool
    tensor on the CPU."""
    model.eval()
    flags = []
    for i in utils.progress(range(0, len(x_all), batch_size), desc=desc):
        x = utils.to_float(x_all[i : i + batch_size].to(device))
        y = y_all[i : i + batch_size].to(device)
        if attack != "clean":
            x = pgd_attack(model, x, y, epsilon, step_size, 20, loss="ce" if attack == "pgd20" else "cw")
        with torch.no_grad():
            flags.append((model(x).argmax(1) == y).cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def autoattack_flags(model, x, y, epsilon, version, attacks, seed, batch_size, device):
    """Images x (float in [0, 1]) that stay correctly classified under AutoAttack, exactly as
    pyautoattack's run_standard_evaluation counts them: it returns for every example the label the
    model gives its adversarial example, or its clean prediction when no attack succeeded (a clean
    mistake stays a mistake), so y_adv == y is its robust_flags. Returns (those flags as a bool tensor on
    the CPU, the attacks it ran)."""
    from pyautoattack import AutoAttack

    model.eval()
    adversary = AutoAttack(model, norm="Linf", eps=epsilon, version=version,
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
    """`model` run under bf16 autocast, returning fp32 logits, so every attack (AutoAttack's
    included, which only sees a module) runs in bf16 without knowing it (--amp)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


# ----------------------------------------------------------------------------------------------
# Models: checkpoints of this project, and plain state_dicts from other projects
# ----------------------------------------------------------------------------------------------


def method_name(checkpoint):
    """A Table I row label from a checkpoint's flags: "PGD-AT", "PIAT + NMSE", "TRADES", "PGD-AT + EMA", ...,
    or the label its script stored as args["method"] (train_rdat.py: "RDAT + PIAT", ...). A weight average
    the run reports (--ema, --swa-start) is part of the name; CFA's own average (FAWA) is part of CFA."""
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
    """The state_dict inside what torch.load returned: bare, or under one of STATE_DICT_WRAPPERS,
    with DataParallel's "module." and torch.compile's "_orig_mod." prefixes removed."""
    for _ in range(3):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if isinstance(obj, Mapping) and not all(torch.is_tensor(v) for v in obj.values()):
            inner = next((obj[k] for k in STATE_DICT_WRAPPERS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
        raise utils.UserError(f"{path} holds no state_dict (a dict of tensors, bare or under "
                              f"{'/'.join(STATE_DICT_WRAPPERS)}); found {keys}")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):  # DataParallel / DistributedDataParallel, torch.compile
            key = key[len(prefix):] if key.startswith(prefix) else key
        out[key] = value
    return out


def load_weights(model, state_dict, path, arch):
    """Load state_dict into model, or one clear UserError naming what does not fit."""
    expected = model.state_dict()
    state_dict = dict(state_dict)
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


def load_model(path, args):
    """(model in eval mode on the CPU, info) for a checkpoint of this project (rebuilt from what it
    holds), or, with --arch, for a plain state_dict."""
    path = Path(path)
    if args.arch is None:
        checkpoint = utils.load_checkpoint(path)
        arch, kwargs = checkpoint["arch"], checkpoint.get("model_kwargs") or {}
        model = utils.build_model(arch, checkpoint["num_classes"], checkpoint["mean"], checkpoint["std"], **kwargs)
        load_weights(model, checkpoint["model"], path, arch)
        saved = checkpoint.get("args") or {}
        info = {"kind": checkpoint.get("script", "train_piat.py"), "arch": arch, "method": method_name(checkpoint),
                "weights": checkpoint.get("weights", "trained"),
                "epoch": checkpoint.get("epoch"), "num_classes": checkpoint["num_classes"],
                "mean": list(checkpoint["mean"]), "std": list(checkpoint["std"]),
                "image_shape": checkpoint.get("image_shape"), "dataset": saved.get("dataset"),
                "data_dir": saved.get("data_dir"), "image_size": saved.get("image_size")}
    else:
        if not path.is_file():
            raise utils.UserError(f"no checkpoint at {path}")
        problem = utils.not_a_torch_file(path)
        if problem:
            raise utils.UserError(problem)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not args.unsafe_load)
        except Exception as err:
            hint = "" if args.unsafe_load else (" (if it pickles Python objects and you trust it, add --unsafe-load; "
                                                "a checkpoint of this project needs no --arch)")
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise utils.UserError(f"{path} is not a readable checkpoint{hint}: {first}") from None
        if isinstance(obj, Mapping) and all(k in obj for k in utils.CHECKPOINT_KEYS):
            raise utils.UserError(f"{path} is a checkpoint of this project ({obj['arch']}); drop --arch and it is "
                                  "rebuilt from what it holds")
        state_dict = unwrap_state_dict(obj, path)
        if args.arch == "wrn-32-10":  # TRADES/MART's WideResNet builds an unused sub_block1
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("sub_block1.")}
        if args.mean is not None:
            mean, std = args.mean, args.std
        else:
            mean, std = NORMALIZATIONS[args.input_normalization or "none"]
        num_classes = args.num_classes or classifier_outputs(args.arch, state_dict)
        model = utils.build_model(args.arch, num_classes, mean, std)
        load_weights(model, state_dict, path, args.arch)
        info = {"kind": "state_dict", "arch": args.arch, "method": path.stem, "weights": "trained", "epoch": None,
                "num_classes": num_classes,
                "mean": list(mean), "std": list(std), "image_shape": None, "dataset": None, "data_dir": None,
                "image_size": None}
    problem = utils.first_non_finite(model.state_dict())
    if problem:  # every number measured on it would be meaningless
        raise utils.UserError(f"{path} holds weights that are not finite ({problem[0]} is {problem[1]}): the run that "
                              "wrote it diverged")
    model.eval().requires_grad_(False)  # attacks need gradients of the input only
    info["fingerprint"] = utils.state_fingerprint(model)  # equal weights give equal numbers: measured once
    return model, info


def classifier_outputs(arch, state_dict):
    """The number of classes a state_dict was trained for: the rows of its last linear layer."""
    reference = utils.build_model(arch, 10)
    last = [name for name, module in reference.named_modules() if isinstance(module, nn.Linear)][-1]
    weight = state_dict.get(f"{last}.weight")
    return weight.shape[0] if weight is not None and weight.dim() == 2 else 10


# ----------------------------------------------------------------------------------------------
# The loss landscape (Fig. 8; Li et al., "Visualizing the loss landscape of neural nets", 2018)
# ----------------------------------------------------------------------------------------------


def filter_normalized_direction(model, generator):
    """A random Gaussian direction in weight space, one tensor per parameter, each filter (slice
    along the first dimension: a conv's output channel, a linear layer's row) rescaled to the norm
    of the same filter of the weights. One-dimensional parameters (biases, BatchNorm's scale and
    shift) get a zero direction, Li et al.'s `ignore='biasbn'`; BatchNorm's running statistics are
    buffers and stay as they are."""
    direction = {}
    for name, w in model.named_parameters():
        if w.dim() <= 1:
            direction[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator).to(w.device, w.dtype)
        scale = w.detach().flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)
        direction[name] = d * scale.view(-1, *[1] * (w.dim() - 1))
    return direction


def loss_landscape(model, x, y, epsilon, step_size, steps, coords, seed, batch_size, desc="landscape"):
    """loss[i, j] = mean CE of the perturbed model on PGD-`steps` adversarial examples of the fixed
    batch (x, y), at theta + coords[i]*d1 + coords[j]*d2; the attack is regenerated against every
    perturbed model, from the same random start. Returns (loss, accuracy) grids; the weights are
    restored afterwards."""
    model.eval()
    params = dict(model.named_parameters())
    origin = {name: p.detach().clone() for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(model, generator)
    d2 = filter_normalized_direction(model, generator)
    loss = np.zeros((len(coords), len(coords)))
    accuracy = np.zeros_like(loss)
    grid = [(i, j) for i in range(len(coords)) for j in range(len(coords))]
    try:
        for i, j in utils.progress(grid, desc=desc):
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(origin[name] + coords[i] * d1[name] + coords[j] * d2[name])
            utils.seed_everything(seed)  # the same random start at every grid point: a smoother surface
            total, correct = 0.0, 0
            for k in range(0, len(x), batch_size):
                xb, yb = x[k : k + batch_size], y[k : k + batch_size]
                x_adv = pgd_attack(model, xb, yb, epsilon, step_size, steps)
                with torch.no_grad():
                    logits = model(x_adv)
                total += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += int((logits.argmax(1) == yb).sum())
            loss[i, j], accuracy[i, j] = total / len(x), correct / len(x)
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(origin[name])
    return loss, accuracy


def plot_landscape(coords, loss, path, title):
    """A 3-D surface of the loss grid, saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = np.meshgrid(coords, coords, indexing="ij")
    fig = plt.figure(figsize=(6.5, 5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(a, b, loss, cmap="viridis", linewidth=0, antialiased=True)
    ax.set(xlabel="a (direction d1)", ylabel="b (direction d2)", zlabel="adversarial CE", title=title)
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Results: the JSON files and Table I
# ----------------------------------------------------------------------------------------------


def read_results(path):
    """The rows and landscapes of a JSON file evaluate.py wrote, or empty lists when it is not there."""
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


def table_i(rows):
    """{run: {"dataset", "method", attack: {"best", "final", "diff", "best_worst", "final_worst"}}} from result
    rows; a checkpoint that is neither best.pt nor final.pt fills the Best column. Diff is |Best - Final| (Table
    I); *_worst the worst class's accuracy (when the rows have it)."""
    runs = {}
    for row in rows:
        run = runs.setdefault(row["run"], {"dataset": row.get("dataset"), "method": row.get("method"), "n": set(),
                                           "notes": set()})
        column = "final" if row["role"] == "final" else "best"
        run.setdefault(row["attack"], {})[column] = row["accuracy"]
        if row.get("worst_class_accuracy") is not None:
            run[row["attack"]][f"{column}_worst"] = row["worst_class_accuracy"]
        run["n"].add(row["n"])
        if row["attack"] != "clean" and row.get("epsilon_255") != 8:
            run["notes"].add(f"eps {row.get('epsilon_255'):g}/255")
        if row["attack"] == "aa" and row.get("aa_version") != "standard":
            run["notes"].add(f"AA {row.get('aa_version')} ({','.join(row.get('aa_attacks') or [])})")
        if row.get("amp") and row["attack"] != "clean":
            run["notes"].add(f"{ATTACK_TITLES[row['attack']]} in bf16")
    for run in runs.values():
        for attack in ATTACKS:
            cell = run.get(attack)
            if cell and "best" in cell and "final" in cell:
                cell["diff"] = abs(cell["best"] - cell["final"])
    return runs


def markdown_table(rows, worst_class=False, paper=None):
    """Table I as markdown: one row per run, Best | Final | Diff (in %) for Clean, PGD20, CW and AA; with
    worst_class, the worst class's Best and Final accuracy too (CFA's fairness measure); with paper (a data
    set of PAPER_TABLE_I), the paper's row under each method it reports."""
    columns = ("best", "final", "diff") + (("best_worst", "final_worst") if worst_class else ())
    titles = {"best": "Best", "final": "Final", "diff": "Diff", "best_worst": "Best worst",
              "final_worst": "Final worst"}
    header = ["Run", "Dataset", "Method"] + [f"{ATTACK_TITLES[a]} {titles[c]}" for a in ATTACKS for c in columns]
    lines = ["| " + " | ".join(header + ["n", "notes"]) + " |", "|" + "---|" * (len(header) + 2)]
    for run, t in table_i(rows).items():
        cells = [Path(run).name, str(t["dataset"]), str(t["method"])]
        for attack in ATTACKS:
            cell = t.get(attack, {})
            cells += [f"{100 * cell[c]:.2f}" if c in cell else "–" for c in columns]
        cells += ["/".join(str(n) for n in sorted(t["n"])), "; ".join(sorted(t["notes"]))]
        lines.append("| " + " | ".join(cells) + " |")
        reported = (PAPER_TABLE_I.get(paper) or {}).get(t["method"])
        if reported:
            cells = ["", f"paper ({paper})", str(t["method"])]
            for triple in reported:
                cells += [f"{v:.2f}" for v in triple] + ["–"] * (len(columns) - 3)
            lines.append("| " + " | ".join(cells + ["", "ResNet-18, the paper's Table I"]) + " |")
    return "\n".join(lines) + "\n"


def table_mode(args):
    rows = []
    for path in map(Path, args.paths):
        json_path = path / "eval.json" if path.is_dir() else path
        if not json_path.is_file():
            raise utils.UserError(f"no results at {json_path}; run evaluate.py {path} first")
        rows += read_results(json_path)["results"]
    if not rows:
        raise utils.UserError(f"no results in {', '.join(args.paths)}")
    table = markdown_table(rows, worst_class=args.worst_class, paper=args.paper)
    print(table, end="")
    if args.out:
        utils.atomic_write(args.out, lambda f: f.write(table.encode()))
        print(f"wrote {args.out}")
    return {"rows": rows, "table": table, "outputs": [args.out] if args.out else []}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def resolve_inputs(paths, out):
    """[(run, [(role, checkpoint path)], json path, is a run folder)] for the given folders and files."""
    jobs = []
    for text in paths:
        path = Path(text).absolute()  # absolute: results merge the same way from any working directory
        if path.is_dir():
            checkpoints = [(role, path / f"{role}.pt") for role in ("best", "final") if (path / f"{role}.pt").is_file()]
            if not checkpoints:
                why = run_status_note(path)
                raise utils.UserError(f"{path} holds neither best.pt nor final.pt{f' ({why})' if why else ''}")
            jobs.append((str(path), checkpoints, Path(out) if out else path / "eval.json", True))
        elif path.is_file():
            role = path.stem if path.stem in ("best", "final") else "checkpoint"
            jobs.append((str(path), [(role, path)], Path(out) if out else path.with_suffix(".eval.json"), False))
        else:
            raise utils.UserError(f"no checkpoint or run folder at {text}")
    for _, _, json_path, _ in jobs:
        if not json_path.parent.is_dir() or not os.access(json_path.parent, os.W_OK):
            raise utils.UserError(f"cannot write results to {json_path}; pass --out FILE")
    return jobs


def run_status_note(run_dir):
    """What a run folder's status.json says when the run did not finish ("it diverged at epoch 2, step 5"), else
    None: a run that diverged or stopped early has checkpoints of its last saved epoch, not of its last one."""
    status = utils.read_status(run_dir)
    if not status or status.get("status") in (None, "finished"):
        return None
    saved = f"epochs saved: {status.get('epochs_saved')} of {status.get('epochs')}"
    if status["status"] == "diverged":
        return f"it diverged at epoch {status.get('epoch')}, step {status.get('step')}; {saved}; status.json"
    if status["status"] == "running":
        return f"status.json says it is still running, or was killed; {saved}"
    return f"it stopped early ({status['status']}); {saved}; status.json"


def warn_if_unfinished(run_dir):
    """One line on stderr for a run folder whose status.json says it did not finish."""
    note = run_status_note(run_dir)
    if note:
        print(f"evaluate.py: warning: {run_dir} did not finish: {note}", file=sys.stderr, flush=True)


def pick_examples(data, n, subset):
    """Indices of the evaluated test images (see --subset), in the data set's own order."""
    n_test = len(data.x_test)
    if n is not None and n > n_test:
        raise utils.UserError(f"--n-examples {n} but the test set holds {n_test} images")
    if n is None or n == n_test:
        return torch.arange(n_test)
    return torch.arange(n) if subset == "first" else utils.fixed_subset(n_test, n).sort().values


def load_test_images(info, ckpt, args, cache):
    """(x uint8, y, description) of the test images a checkpoint is evaluated on: its own data set unless
    --dataset says otherwise, each data set loaded once (`cache`); one UserError when the checkpoint does
    not fit the data (classes, image shape)."""
    dataset = args.dataset or info["dataset"] or "cifar10"
    own = dataset == info["dataset"]
    data_dir = args.data_dir or (info["data_dir"] if own else None) or "./data"
    image_size = args.image_size or (info["image_size"] if own else None)
    key = (dataset, str(data_dir), image_size)
    if key not in cache:
        cache[key] = utils.load_dataset(dataset, data_dir, image_size)
    data = cache[key]
    if data.num_classes != info["num_classes"]:
        raise utils.UserError(f"{ckpt} has {info['num_classes']} outputs but {dataset} has {data.num_classes} "
                              "classes (--dataset? --num-classes?)")
    if info["image_shape"] and tuple(info["image_shape"]) != tuple(data.image_shape):
        raise utils.UserError(f"{ckpt} was trained on {tuple(info['image_shape'])} images but {dataset} holds "
                              f"{tuple(data.image_shape)} (--image-size?)")
    subset = args.subset or ("first" if dataset in ("cifar10", "cifar100", "svhn") else "fixed")
    idx = pick_examples(data, args.n_examples, subset)
    subset = "all" if len(idx) == len(data.x_test) else subset
    images = {"dataset": dataset, "subset": subset, "key": (*key, tuple(idx.tolist()))}
    return data.x_test[idx], data.y_test[idx], images


def measure(model, x, y, attack, args, device, desc):
    """One attack on the images x (uint8) of one model: the result row's measured fields."""
    eps = args.epsilon / 255
    if attack == "aa":
        flags, ran = autoattack_flags(model, utils.to_float(x), y, eps, args.aa_version, args.aa_attacks, args.seed,
                                      args.batch_size, device)
        extra = {"aa_version": args.aa_version, "aa_attacks": ran}
    else:
        flags = attack_flags(model, x, y, attack, eps, args.step_size / 255, args.batch_size, device, desc=desc)
        extra = {} if attack == "clean" else {"steps": 20, "step_size_255": args.step_size}
    correct = int(flags.sum())
    return {**extra, "accuracy": correct / len(y), "correct": correct, **class_accuracies(flags, y)}


def class_accuracies(flags, y):
    """CFA's fairness measure beside the average: the accuracy of every class present among the images
    (per-example flags, true per-class counts), and the worst class's."""
    y = y.cpu()
    classes = torch.unique(y)
    accuracy = [float(flags[y == c].float().mean()) for c in classes]
    worst = min(range(len(accuracy)), key=accuracy.__getitem__)
    return {"class_accuracy": dict(zip(map(int, classes), accuracy)), "worst_class": int(classes[worst]),
            "worst_class_accuracy": accuracy[worst]}


def evaluate_checkpoint(model, info, x, y, common, args, device, measured, record):
    """Every attack of --attacks on one checkpoint's model: one result row each, handed to record(row) as
    soon as it is measured. `measured` remembers rows by (weights, images, attack), so identical weights
    (best.pt is often the final epoch) are measured once."""
    for attack in args.attacks:
        utils.seed_everything(args.seed)  # each number is reproducible on its own
        start = time.time()
        row = {**common, "attack": attack, "epsilon": 0.0 if attack == "clean" else args.epsilon / 255,
               "epsilon_255": 0.0 if attack == "clean" else args.epsilon}
        same = (info["fingerprint"], common["images"], attack)
        if same in measured:
            earlier = measured[same]
            row.update({k: v for k, v in earlier.items() if k not in row and k != "seconds"},
                       seconds=0.0, same_weights_as=earlier["checkpoint"])
        else:
            row.update(measure(model, x, y, attack, args, device, desc=f"{common['role']} {attack}"),
                       seconds=time.time() - start)
            measured[same] = row
        print(f"  {common['role']:10s} {attack:6s} {100 * row['accuracy']:6.2f}%  ({row['correct']}/{len(y)}, "
              f"{row['seconds']:.1f} s)", flush=True)
        record({k: v for k, v in row.items() if k != "images"})


def evaluate_run(run, checkpoints, json_path, is_run_dir, models, args, device, cache, measured):
    """Every checkpoint of one run folder (or one checkpoint file): its attacks and, with --landscape, the
    landscape of its final weights; json_path is rewritten after every number, so a crash keeps what was
    measured. Returns the new result rows."""
    saved, new_rows = read_results(json_path), []

    def record(row):
        new_rows.append(row)
        saved["results"] = [r for r in saved["results"]
                            if (r["run"], r["role"], r["attack"]) != (run, row["role"], row["attack"])] + [row]
        save_results(saved, json_path)

    for role, ckpt in checkpoints:
        # the landscape of a run is the one of its final weights, as the paper's Fig. 8
        landscape = args.landscape and (role != "best" or len(checkpoints) == 1)
        if not args.attacks and not landscape:
            continue
        model, info = models[str(ckpt)]
        x, y, images = load_test_images(info, ckpt, args, cache)
        model.to(device)
        which = "all" if images["subset"] == "all" else f"{images['subset']} subset"
        epoch = f", epoch {info['epoch']}" if info["epoch"] else ""
        print(f"{ckpt}: {info['arch']} ({info['method']}{epoch}) on {len(y)} {images['dataset']} test images "
              f"({which}), {device}{', bf16 autocast' if args.amp else ''}")
        common = {"run": run, "checkpoint": str(ckpt), "role": role, "kind": info["kind"], "method": info["method"],
                  "weights": info["weights"], "arch": info["arch"], "epoch": info["epoch"],
                  "dataset": images["dataset"],
                  "subset": images["subset"], "n": len(y), "seed": args.seed, "batch_size": args.batch_size,
                  "device": str(device), "amp": args.amp}
        attacked = Bf16Autocast(model) if args.amp else model
        evaluate_checkpoint(attacked, info, x, y, {**common, "images": images["key"]}, args, device, measured, record)
        if landscape:
            # files beside the results: RUN_DIR/final.landscape.npz, CKPT_NAME.landscape.npz, or with --out
            # OUT_DIR/RUN_NAME.final.landscape.npz
            name = Path(ckpt).stem if not is_run_dir else role if args.out is None else f"{Path(run).name}.{role}"
            entry = landscape_for(model, x, y, args, device, common, json_path.parent / f"{name}.landscape")
            saved["landscapes"] = [e for e in saved["landscapes"] if (e["run"], e["role"]) != (run, role)] + [entry]
            save_results(saved, json_path)
        model.cpu()
    return new_rows


# ----------------------------------------------------------------------------------------------
# Sanity checks (--sanity): is the evaluation itself trustworthy? A checklist against gradient masking and
# broken attacks (Carlini et al. 2019, "On Evaluating Adversarial Robustness"; Athalye et al. 2018;
# AutoAttack's flags; RobustBench's rules), run on one model and its test images.
# ----------------------------------------------------------------------------------------------

SANITY_EPSILONS = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # the epsilon sweep, 1/255 units
SANITY_HELP = """\
--sanity runs a checklist on --n-examples test images (default 500) of each checkpoint and prints one line per
check: PASS / WARN / FAIL, the numbers behind it, and for a WARN or FAIL what it means and what to do.
  model hygiene    eval mode honoured, two forward passes identical, logits rather than probabilities
  gradients        share of images whose input gradient (CE, CW margin) is exactly zero or non-finite
  eps sweep        PGD-20 at eps 0,2,4,8,16,32,64/255: eps 0 = clean, never rising, about 0 at the largest
  attack strength  PGD with 5x the steps and restarts, and one-step FGSM, against PGD-20
  loss choice      the CW margin against cross-entropy
  black box        Square (pyautoattack) against every white-box attack
  per example      robust implies correct clean; every x' within eps and in [0, 1], no NaN; the worst case
                   per example against the table's lowest number
A gap is flagged only when it exceeds its tolerance by two standard errors of its paired, per-example
difference. Results go to the JSON (a "sanity" entry per checkpoint), the figure (accuracy against eps and
against attack effort) to NAME.sanity.png beside it; exit status 0, or 1 on a FAIL with --strict.
Cost, in passes of PGD-20 over the same images: roughly 2 (PGD-20, CW-20, FGSM, gradients) + 5 x clean accuracy
(the sweep) + 15 x the share still robust after PGD-20 (3 restarts of PGD-100) + 17 x the share left by every
white-box attack (Square's 1000 queries, one forward pass each). Measured with python evaluate.py CKPT --sanity
on real CIFAR-10 images (a 2-core x86 VM (Intel Xeon), no GPU, torch 2.14, one thread, shared with other jobs):
5.8x for pyautoattack's undefended ResNet-18 (100 images, 0 % robust), 8.1x and 11.5x in two runs for a 3-epoch
PGD-AT small-cnn (500 images, 22 % PGD-20); a ResNet-18 at 80 % clean and 50 % robust accuracy comes to about 20x
(AutoAttack standard: ~50x)."""
SANITY_N = 500  # test images of the checklist when --n-examples is not given
Z = 2.0  # a gap is flagged only when it exceeds its tolerance by Z standard errors (one-sided, ~98 %)
# Tolerated accuracy gaps (WARN above the first, FAIL above the second): honest models show ~0-2 points
# for more PGD steps and restarts, ~0-1 for Square after the white-box attacks, and none for FGSM over PGD
# or a rise with epsilon; masked models differ by tens of points.
TOLERANCES = {"eps-monotone": (0.01, 0.05), "large-eps-zero": (0.02, 0.10), "more-steps-restarts": (0.03, 0.10),
              "fgsm-vs-pgd": (0.02, 0.05), "square-vs-white-box": (0.02, 0.05), "robust-within-clean": (0.005, 0.02),
              "worst-case-reported": (0.05, 0.10)}
# The CW margin against CE is judged relative to what the two attacks fool together, since that bounds the
# gap (a weak model has few examples to lose): of those, honest models leave 10-25 % to CW alone, a saturated
# softmax ~90 %. WARN/FAIL when the share (gap - Z*se over the fooled share) exceeds these, and the gap 2 points.
MARGIN_ONLY_SHARE, MARGIN_MIN_GAP = (1 / 3, 1 / 2), 0.02
LOGIT_TOLERANCE = {False: 1e-3, True: 3e-2}  # relative logit differences that are rounding (fp32 / bf16, TF32)


@dataclasses.dataclass(frozen=True)
class SanitySettings:
    """What the checklist runs; epsilon, step size and the sweep in 1/255 units, as the flags."""

    epsilon: float = 8.0
    step_size: float = 2.0
    epsilons: tuple = SANITY_EPSILONS
    long_steps: int = 100  # 5x PGD-20's steps, at half its step size
    restarts: int = 3
    square_queries: int = 1000
    batch_size: int = 250
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False  # the model runs under bf16 autocast: looser logit tolerances


def sanity_result(name, group, status, numbers, detail, meaning):
    """One line of the checklist: `detail` shows the numbers, `meaning` says what a WARN/FAIL means and what to do."""
    return {"name": name, "group": group, "status": status, "numbers": numbers, "detail": detail, "meaning": meaning}


def paired_gap(reference, other):
    """(mean(reference) - mean(other), its standard error) for 0/1 flags of the same examples: the noise of a
    paired difference is that of the examples on which the two disagree."""
    d = reference.float() - other.float()
    return d.mean().item(), (d.std(correction=0) / len(d) ** 0.5).item()


def gap_status(gap, se, name):
    """PASS, or WARN/FAIL when gap - Z*se exceeds the check's tolerance (TOLERANCES)."""
    warn, fail = TOLERANCES[name]
    lower = gap - Z * se
    return "FAIL" if lower > fail else "WARN" if lower > warn else "PASS"


def pct(fraction):
    return f"{100 * fraction:.1f}%"


def relative_difference(a, b):
    """max |a - b| / max |a| (inf when a or b is not finite)."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def predict(model, x, batch_size, device):
    """Logits of model on x (float, on the CPU), batch by batch; on the CPU."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


# ------------------------------------------------------------------------ 1-2: the model and its gradients


def check_eval_mode(model, x, settings):
    """BatchNorm and Dropout in eval mode: no module still training after model.eval(), a forward pass leaves
    the buffers (BatchNorm's running statistics) as they were, and an example's logits do not depend on the
    other images of its batch (here: 32 random images beside it) beyond what two passes alone differ by (a
    random model is the next check's). The model's state is restored afterwards."""
    model.eval()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    probe = x[:32].to(settings.device)
    others = torch.rand(probe.shape, generator=torch.Generator().manual_seed(settings.seed)).to(settings.device)
    with torch.no_grad():
        alone, again = model(probe).float(), model(probe).float()
        together = model(torch.cat([probe, others]))[: len(probe)].float()
    training = [name or "the model" for name, m in model.named_modules() if m.training]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    model.load_state_dict(before)
    diff, noise = relative_difference(alone, together), relative_difference(alone, again)
    ok = not training and not changed and diff <= max(LOGIT_TOLERANCE[settings.bf16], 3 * noise)
    detail = (f"{len(training)} modules training after eval(), {len(changed)} buffers changed by a forward pass, "
              f"logits change by {diff:.1e} (relative) with other images in the batch")
    return sanity_result("eval-mode", "model hygiene", "PASS" if ok else "FAIL",
                         {"training_modules": training[:10], "changed_buffers": changed[:10], "batch_dependence": diff},
                         detail, "the model does not evaluate in eval mode (BatchNorm batch statistics or Dropout on): "
                                 "numbers depend on the batch and attacks chase a moving target; make model.eval() "
                                 "stick (forward() must not switch modes or use batch statistics)")


def check_deterministic(model, x, settings):
    """Two forward passes of the same images give the same logits."""
    probe = x[:32].to(settings.device)
    with torch.no_grad():
        first, second = model(probe).float(), model(probe).float()
    diff = relative_difference(first, second)
    flips = int((first.argmax(1) != second.argmax(1)).sum())
    status = "PASS" if diff <= LOGIT_TOLERANCE[settings.bf16] else "FAIL"
    return sanity_result("deterministic", "model hygiene", status,
                         {"difference": diff, "flips": flips, "n": len(probe)},
                         f"two passes differ by {diff:.1e} (relative), {flips}/{len(probe)} predictions flip",
                         "a randomised forward pass (a randomised defence, or Dropout left on): one PGD run "
                         "under-attacks it; attack the expected logits with EoT (average the gradient over many "
                         "draws) or AutoAttack's rand version (--aa-version rand), and report accuracy over draws")


def check_logits(logits):
    """The outputs are logits: no row of finite values in [0, 1] summing to 1 (probabilities), nothing non-finite."""
    in_unit_interval = (logits >= -1e-6).all(1) & (logits <= 1 + 1e-6).all(1)
    rows_like_probabilities = ((logits.sum(1) - 1).abs() < 1e-3) & in_unit_interval
    share, finite = rows_like_probabilities.float().mean().item(), bool(torch.isfinite(logits).all())
    status = "PASS" if share < 0.5 and finite else "FAIL"
    return sanity_result("logits", "model hygiene", status, {"probability_rows": share, "finite": finite},
                         f"{pct(share)} of the rows are probability vectors (in [0, 1], summing to 1), outputs "
                         f"{'finite' if finite else 'NOT finite'}, range "
                         f"{logits.min().item():.3g}..{logits.max().item():.3g}",
                         "the model returns probabilities (or non-finite values), not logits: cross-entropy on "
                         "probabilities has flat, tiny gradients and PGD under-attacks; return the logits (drop the "
                         "final softmax) before evaluating")


def input_gradient_faults(model, x, y, settings):
    """Per example: the input gradient of the CE loss, and of the CW margin, is exactly zero; either is non-finite.
    A model whose output does not depend on its input through autograd has zero gradients."""
    zero_ce, zero_margin, nonfinite = [], [], []
    for i in range(0, len(x), settings.batch_size):
        xb = x[i : i + settings.batch_size].to(settings.device).requires_grad_(True)
        yb = y[i : i + settings.batch_size].to(settings.device)
        logits = model(xb).float()
        grads = []
        for objective in (F.cross_entropy(logits, yb, reduction="sum"), cw_margin(logits, yb).sum()):
            grad = (torch.autograd.grad(objective, xb, retain_graph=True, allow_unused=True)[0]
                    if objective.requires_grad else None)
            grads.append(torch.zeros_like(xb) if grad is None else grad.flatten(1))
        zero_ce.append((grads[0].abs().amax(1) == 0).cpu())
        zero_margin.append((grads[1].abs().amax(1) == 0).cpu())
        nonfinite.append((~torch.isfinite(grads[0]).all(1) | ~torch.isfinite(grads[1]).all(1)).cpu())
    return torch.cat(zero_ce), torch.cat(zero_margin), torch.cat(nonfinite)


def check_gradients(model, x, y, settings):
    """The share of examples whose input gradient (CE and CW margin, at the clean image) is exactly zero or
    non-finite: gradient attacks cannot move from there."""
    zero_ce, zero_margin, nonfinite = input_gradient_faults(model, x, y, settings)
    shares = {"zero_ce": zero_ce.float().mean().item(), "zero_margin": zero_margin.float().mean().item(),
              "nonfinite": nonfinite.float().mean().item()}
    worst = max(shares.values())
    status = "FAIL" if worst > 0.01 or shares["nonfinite"] > 0 else "WARN" if worst > 0 else "PASS"
    return sanity_result("gradients", "gradients", status, {**shares, "n": len(y)},
                         f"input gradient exactly zero for {pct(shares['zero_ce'])} (CE) and "
                         f"{pct(shares['zero_margin'])} (CW margin) of {len(y)} images, non-finite for "
                         f"{pct(shares['nonfinite'])}",
                         "gradient attacks cannot move from these images: zero for both losses means a "
                         "non-differentiable step (quantisation, detach, no_grad: attack with BPDA or Square/"
                         "AutoAttack), zero for CE alone a saturated softmax (logits too large: use the margin "
                         "loss, CW-20 or AutoAttack), non-finite a NaN/Inf in the model")


# ------------------------------------------------------------------------ the attacks, worst case per example


def perturbation_faults(x, x_adv, epsilon, logits):
    """Per example of a batch: x_adv outside the L-inf ball of radius epsilon around x, outside [0, 1], or NaN
    (in x_adv or in its logits); and the largest L-inf distance."""
    distance = (x_adv - x).flatten(1).abs().amax(1)
    faults = {"outside_ball": distance > epsilon + 1e-6,  # 1e-6: float32 rounding of (x + delta) - x
              "outside_box": ((x_adv < 0) | (x_adv > 1)).flatten(1).any(1),
              "nan": torch.isnan(x_adv).flatten(1).any(1) | ~torch.isfinite(logits).all(1)}
    return faults, distance.nan_to_num(0.0).max().item() if len(distance) else 0.0


def attack_examples(model, x, y, idx, attack, epsilon, settings, seed):
    """attack(x_batch, y_batch) -> x_adv on the examples idx of (x, y) (float, on the CPU), batch by batch on the
    device, re-seeded with `seed` first (every number reproducible on its own, as evaluate_checkpoint's). Returns:
    robust (model(x_adv) == y for those examples), the perturbation faults (counts), the first error an attack
    raised (that batch then keeps its clean images) and seconds."""
    start, robust, error, max_distance = time.time(), [], None, 0.0
    faults = {"outside_ball": 0, "outside_box": 0, "nan": 0}
    utils.seed_everything(seed)
    for i in range(0, len(idx), settings.batch_size):
        xb = x[idx[i : i + settings.batch_size]].to(settings.device)
        yb = y[idx[i : i + settings.batch_size]].to(settings.device)
        try:
            x_adv = attack(xb, yb)
        except RuntimeError as err:  # e.g. no gradient reaches the input: the attack cannot even start
            error, x_adv = error or (str(err).strip().splitlines() or [type(err).__name__])[0], xb
        with torch.no_grad():
            logits = model(x_adv).float()
        robust.append((logits.argmax(1) == yb).cpu())
        bad, distance = perturbation_faults(xb, x_adv, epsilon, logits)
        faults = {k: faults[k] + int(bad[k].sum()) for k in faults}
        max_distance = max(max_distance, distance)
    return {"epsilon_255": 255 * epsilon, "attacked": len(idx), "robust": torch.cat(robust) if robust else
            torch.zeros(0, dtype=torch.bool), **faults, "max_linf_255": 255 * max_distance, "error": error,
            "seconds": time.time() - start}


def square_attack(model, epsilon, settings):
    """Square (Andriushchenko et al. 2020), gradient-free, through pyautoattack: a function x, y -> x_adv."""
    from pyautoattack import AutoAttack

    def attack(x, y):
        adversary = AutoAttack(model, norm="Linf", eps=epsilon, version="custom", attacks=["square"],
                               seed=settings.seed, device=settings.device)
        adversary.square.n_queries = settings.square_queries
        log = logging.getLogger("auto-attack")
        level = log.level
        log.setLevel(logging.ERROR)  # its own checks repeat ours as warnings
        try:
            return adversary.run_standard_evaluation(x, y, batch_size=len(x))[0]
        finally:
            log.setLevel(level)

    return attack


def sanity_attacks(model, x, y, clean, settings):
    """Every attack of the checklist, the expensive ones only on the examples still robust (the worst case per
    example is what counts). Returns {name: record} (attack_examples), each record's "robust" over all n
    examples: an example an attack skipped counts as not robust, since an earlier attack fooled it."""
    eps, step, n = settings.epsilon / 255, settings.step_size / 255, len(y)
    records = {}

    def run(name, robust_before, attack, epsilon, seed=settings.seed):
        idx = robust_before.nonzero().flatten()
        record = attack_examples(model, x, y, idx, attack, epsilon, settings, seed)
        robust = torch.zeros(n, dtype=torch.bool)
        robust[idx] = record["robust"]
        records[name] = {**record, "robust": robust}
        return robust

    def pgd(epsilon, step_size, steps, loss="ce", random_start=True):
        return lambda xb, yb: pgd_attack(model, xb, yb, epsilon, step_size, steps, loss=loss, random_start=random_start)

    everyone = torch.ones(n, dtype=torch.bool)
    pgd20 = run("pgd20", everyone, pgd(eps, step, 20), eps)  # the table's PGD-20 and CW-20, bit for bit
    cw20 = run("cw20", everyone, pgd(eps, step, 20, "cw"), eps)
    fgsm = run("fgsm", everyone, pgd(eps, eps, 1, random_start=False), eps)
    run("eps0", everyone, pgd(0.0, 0.0, 1), 0.0)  # one step: at epsilon 0 every step is a no-op
    for e in sorted(set(settings.epsilons) - {0.0, settings.epsilon}):  # step size in proportion to epsilon
        run(f"pgd20@{e:g}", clean, pgd(e / 255, e / 255 * step / eps, 20), e / 255)
    survivors = clean & pgd20
    for r in range(settings.restarts):  # each restart its own random start
        survivors &= run(f"pgd{settings.long_steps}#{r + 1}", survivors, pgd(eps, step / 2, settings.long_steps),
                         eps, seed=settings.seed + r + 1)
    run("square", survivors & cw20 & fgsm, square_attack(model, eps, settings), eps)
    return records


# ------------------------------------------------------------------------ 3-7: what the attacks say


def check_sweep(records, clean, settings):
    """The epsilon sweep (PGD-20 on the cross-entropy, step size in proportion to epsilon): at 0 the clean
    accuracy, never rising with epsilon, about 0 at the largest."""
    n, eps0 = len(clean), records["eps0"]["robust"]
    flags = {0.0: clean}
    for e in sorted(set(settings.epsilons) - {0.0}):
        flags[e] = clean & records["pgd20" if e == settings.epsilon else f"pgd20@{e:g}"]["robust"]
    epsilons = list(flags)
    accuracy = [f.float().mean().item() for f in flags.values()]
    curve = {"epsilons_255": epsilons, "accuracy": accuracy, "n": n}
    differ = int((eps0 != clean).sum())
    results = [sanity_result(
        "eps0-equals-clean", "epsilon sweep", "PASS" if differ == 0 else "WARN" if differ <= 0.01 * n else "FAIL",
        {"clean": clean.float().mean().item(), "eps0": eps0.float().mean().item(), "differ": differ},
        f"accuracy at eps 0 {pct(eps0.float().mean().item())}, clean {pct(clean.float().mean().item())}, "
        f"{differ} examples differ", "the attack at eps 0 must return the clean images: a difference means a "
        "non-deterministic model or an attack that does not respect eps")]
    rises = [(paired_gap(flags[b], flags[a]), a, b) for i, a in enumerate(epsilons) for b in epsilons[i + 1 :]]
    (rise, se), a, b = max(rises, key=lambda r: r[0][0] - Z * r[0][1])
    results.append(sanity_result(
        "eps-monotone", "epsilon sweep", gap_status(rise, se, "eps-monotone"), {**curve, "max_rise": rise, "se": se},
        "accuracy " + " ".join(f"{e:g}:{100 * acc:.1f}" for e, acc in zip(epsilons, accuracy)) + " (eps/255:%); "
        f"largest rise {100 * rise:+.1f} ± {100 * se:.1f} points ({a:g} -> {b:g})",
        "accuracy rises as eps grows: the attack gets weaker with more room, a sign of gradient masking or of "
        "a step size that does not scale with eps; do not trust these numbers"))
    top = flags[epsilons[-1]]
    acc, se = paired_gap(top, torch.zeros_like(top))
    results.append(sanity_result(
        "large-eps-zero", "epsilon sweep", gap_status(acc, se, "large-eps-zero"),
        {"epsilon_255": epsilons[-1], "accuracy": acc, "se": se},
        f"accuracy {pct(acc)} ± {pct(se)} at eps {epsilons[-1]:g}/255",
        "accuracy stays above 0 at a radius that can turn any image into another: a plateau is the classic "
        "signature of gradient masking; attack with Square/AutoAttack or an adaptive attack"))
    return results


def check_strength(records, clean, settings):
    """PGD with 5x the steps and restarts against PGD-20; single-step FGSM against PGD-20."""
    pgd20 = clean & records["pgd20"]["robust"]
    long_runs = [records[f"pgd{settings.long_steps}#{r + 1}"]["robust"] for r in range(settings.restarts)]
    after = [pgd20 & torch.stack(long_runs[: r + 1]).all(0) for r in range(settings.restarts)]
    final = after[-1] if after else pgd20
    gap, se = paired_gap(pgd20, final)
    numbers = {"pgd20": pgd20.float().mean().item(), "long_steps": settings.long_steps,
               "step_size_255": settings.step_size / 2, "restarts": [a.float().mean().item() for a in after],
               "gap": gap, "se": se}
    results = [sanity_result(
        "more-steps-restarts", "attack strength", gap_status(gap, se, "more-steps-restarts"), numbers,
        f"PGD-20 {pct(numbers['pgd20'])}, PGD-{settings.long_steps} x {settings.restarts} restarts "
        f"{pct(final.float().mean().item())}: {100 * gap:.1f} ± {100 * se:.1f} points lower",
        f"more steps and restarts fool examples PGD-20 missed: PGD-20 has not converged and overstates robustness "
        f"by about {100 * gap:.0f} points; report a stronger attack (AutoAttack)")]
    fgsm = clean & records["fgsm"]["robust"]
    gap, se = paired_gap(pgd20, fgsm)
    results.append(sanity_result(
        "fgsm-vs-pgd", "attack strength", gap_status(gap, se, "fgsm-vs-pgd"),
        {"fgsm": fgsm.float().mean().item(), "pgd20": pgd20.float().mean().item(), "gap": gap, "se": se},
        f"FGSM {pct(fgsm.float().mean().item())}, PGD-20 {pct(pgd20.float().mean().item())}",
        "one FGSM step fools more than 20 PGD steps: the iterative attack is stuck (gradient masking near the "
        "data); do not trust PGD numbers, use Square/AutoAttack"))
    return results


def check_loss(records, clean):
    """The CW margin attack against the CE attack: what CW-20 fools that PGD-20 missed, as a share of all that
    the two fool together (MARGIN_ONLY_SHARE)."""
    ce = clean & records["pgd20"]["robust"]
    both = ce & records["cw20"]["robust"]
    gap, se = paired_gap(ce, both)
    fooled = (clean & ~both).float().mean().item()  # by CE or by CW
    share = max(gap - Z * se, 0.0) / fooled if fooled else 0.0
    warn, fail = MARGIN_ONLY_SHARE
    status = "PASS" if gap - Z * se <= MARGIN_MIN_GAP else "FAIL" if share > fail else "WARN" if share > warn else \
        "PASS"
    numbers = {"ce": ce.float().mean().item(), "cw": (clean & records["cw20"]["robust"]).float().mean().item(),
               "both": both.float().mean().item(), "gap": gap, "se": se, "fooled": fooled, "margin_only_share": share}
    return sanity_result(
        "margin-vs-ce", "loss choice", status, numbers,
        f"CE (PGD-20) {pct(numbers['ce'])}, CW margin (CW-20) {pct(numbers['cw'])}; CW fools "
        f"{100 * gap:.1f} ± {100 * se:.1f} points that CE missed, at least {pct(share)} of the {pct(fooled)} the two "
        "fool together",
        f"the margin loss fools examples cross-entropy does not: CE gradients vanish or mislead (logits too "
        f"large or aligned), so PGD-20 overstates robustness by about {100 * gap:.0f} points; report CW-20 or "
        "AutoAttack (its APGD-T/DLR losses)")


def white_box_worst_case(records, clean, settings):
    """Examples correct under every white-box attack at the evaluation epsilon."""
    flags = clean.clone()
    for name, record in records.items():
        if name != "square" and record["epsilon_255"] == settings.epsilon:
            flags &= record["robust"]
    return flags


def check_black_box(records, clean, settings):
    """Square (gradient-free) on the examples every white-box attack left robust."""
    white = white_box_worst_case(records, clean, settings)
    worst = white & records["square"]["robust"]
    gap, se = paired_gap(white, worst)
    return sanity_result(
        "square-vs-white-box", "black box", gap_status(gap, se, "square-vs-white-box"),
        {"white_box": white.float().mean().item(), "with_square": worst.float().mean().item(),
         "queries": settings.square_queries, "gap": gap, "se": se},
        f"white-box worst case {pct(white.float().mean().item())}, Square ({settings.square_queries} queries) "
        f"fools {100 * gap:.1f} ± {100 * se:.1f} points more",
        "a gradient-free attack fools examples every gradient attack missed: the gradients are masked; report "
        "AutoAttack (it includes Square) or an adaptive attack, not PGD")


def check_per_example(records, clean, settings):
    """Robust implies correct clean; every adversarial example valid; the worst case per example against the
    lowest number the table reports (PGD-20, CW-20)."""
    n = len(clean)
    full = [name for name, r in records.items() if r["attacked"] == n]  # the attacks run on every example
    violations = torch.zeros(n, dtype=torch.bool)
    for name in full:
        violations |= records[name]["robust"] & ~clean
    share, se = paired_gap(violations, torch.zeros_like(violations))
    results = [sanity_result(
        "robust-within-clean", "per example", gap_status(share, se, "robust-within-clean"),
        {"violations": int(violations.sum()), "attacks": full},
        f"{int(violations.sum())} of {n} examples robust under an attack ({', '.join(full)}) but wrong when clean",
        "examples the attack left correctly classified although they are wrong when clean: the attack moved "
        "them to the right class (a randomised model or a broken attack); count an example robust only when it "
        "is correct clean and under every attack")]
    attacks = {name: {k: v for k, v in r.items() if k != "robust"} | {"accuracy": r["robust"].float().mean().item()}
               for name, r in records.items()}
    bad = {k: sum(a[k] for a in attacks.values()) for k in ("outside_ball", "outside_box", "nan")}
    errors = {name: a["error"] for name, a in attacks.items() if a["error"]}
    adversarial = sum(a["attacked"] for a in attacks.values())
    excess = max(a["max_linf_255"] - a["epsilon_255"] for a in attacks.values() if a["attacked"])
    results.append(sanity_result(
        "valid-examples", "per example", "FAIL" if any(bad.values()) or errors else "PASS",
        {**bad, "errors": errors, "examples": adversarial, "attacks": attacks},
        f"{adversarial} adversarial examples of {len(attacks)} attacks: {bad['outside_ball']} outside their eps "
        f"ball (largest L-inf distance minus eps: {excess:+.1e}/255), {bad['outside_box']} outside [0, 1], "
        f"{bad['nan']} NaN; {len(errors)} attacks raised" + (f" ({next(iter(errors.values()))})" if errors else ""),
        "adversarial examples outside the eps ball or [0, 1], NaN, or an attack that crashed: the attack or "
        "the model is broken and every number from it is invalid; fix the projection/clamping or the NaN first"))
    table = {name: records[name]["robust"] for name in ("pgd20", "cw20")}  # what evaluate.py reports
    accuracy = {name: flags.float().mean().item() for name, flags in table.items()}
    lowest = min(table, key=accuracy.get)
    worst = white_box_worst_case(records, clean, settings) & records["square"]["robust"]
    gap, se = paired_gap(table[lowest], worst)
    results.append(sanity_result(
        "worst-case-reported", "per example", gap_status(gap, se, "worst-case-reported"),
        {"pgd20": accuracy["pgd20"], "cw20": accuracy["cw20"], "worst_case": worst.float().mean().item(),
         "gap": gap, "se": se},
        f"table: PGD-20 {pct(accuracy['pgd20'])}, CW-20 {pct(accuracy['cw20'])}; worst case per example over "
        f"{sum(r['epsilon_255'] == settings.epsilon for r in records.values())} attacks "
        f"{pct(worst.float().mean().item())} ({100 * gap:.1f} ± {100 * se:.1f} points below {lowest})",
        "different attacks fool different examples, and the table's lowest number is well above the worst case "
        "per example: report the worst case over attacks per example (as AutoAttack does), or AutoAttack itself"))
    return results


def run_sanity_checks(model, x, y, settings=SanitySettings()):
    """The checklist on `model` (any nn.Module taking [0, 1] images, put in eval mode here) and the test images
    x (float in [0, 1], on the CPU) with labels y: one result dict per check (sanity_result)."""
    model.eval()
    results = [check_eval_mode(model, x, settings), check_deterministic(model, x, settings)]
    logits = predict(model, x, settings.batch_size, settings.device)
    clean = logits.argmax(1) == y
    results += [check_logits(logits), check_gradients(model, x, y, settings)]
    records = sanity_attacks(model, x, y, clean, settings)
    results += check_sweep(records, clean, settings)
    results += check_strength(records, clean, settings)
    results += [check_loss(records, clean), check_black_box(records, clean, settings)]
    results += check_per_example(records, clean, settings)
    return results


# ------------------------------------------------------------------------ --sanity: checkpoints, JSON, figure


def sanity_settings(args, device):
    return SanitySettings(epsilon=args.epsilon, step_size=args.step_size,
                          epsilons=tuple(sorted({0.0, args.epsilon, *args.sanity_epsilons})),
                          long_steps=args.sanity_steps, restarts=args.sanity_restarts,
                          square_queries=args.sanity_square_queries, batch_size=args.batch_size, seed=args.seed,
                          device=str(device), bf16=args.amp)


def print_sanity(results, role):
    """One line per check: status, name, the numbers, and for a WARN or FAIL what it means."""
    for r in results:
        advice = "" if r["status"] == "PASS" else f"  -> {r['meaning']}"
        print(f"  {role:10s} {r['status']:4s}  {r['name']:20s} {r['detail']}{advice}", flush=True)
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "WARN", "FAIL")}
    print(f"  {role:10s} sanity: {counts['PASS']} PASS, {counts['WARN']} WARN, {counts['FAIL']} FAIL", flush=True)
    return counts


def plot_sanity(results, path, title):
    """Accuracy against epsilon (the sweep, +-1 standard error) and against attack effort (gradient steps per
    example: FGSM, PGD-20, then each long restart; CW-20 and the worst case with Square beside), saved
    atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = {r["name"]: r["numbers"] for r in results}
    sweep, strength = numbers["eps-monotone"], numbers["more-steps-restarts"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    acc = np.array(sweep["accuracy"])
    left.errorbar(sweep["epsilons_255"], 100 * acc, yerr=100 * np.sqrt(acc * (1 - acc) / sweep["n"]), marker="o",
                  capsize=3)
    left.set(xscale="symlog", xlabel="epsilon (1/255)", ylabel="accuracy (%)", ylim=(-2, 102),
             title="accuracy against epsilon (PGD-20, CE)")
    left.set_xticks(sweep["epsilons_255"], [f"{e:g}" for e in sweep["epsilons_255"]])
    steps = [20 + strength["long_steps"] * (r + 1) for r in range(len(strength["restarts"]))]
    right.plot([1, 20, *steps], [100 * numbers["fgsm-vs-pgd"]["fgsm"], 100 * strength["pgd20"],
                                 *[100 * a for a in strength["restarts"]]], marker="o", label="FGSM, PGD-20, "
               f"then PGD-{strength['long_steps']} restarts (CE)")
    right.plot([20], [100 * numbers["margin-vs-ce"]["cw"]], marker="s", linestyle="", label="CW-20 (margin)")
    right.axhline(100 * numbers["worst-case-reported"]["worst_case"], color="gray", linestyle="--",
                  label="worst case per example, Square included")
    right.axhline(100 * acc[0], color="black", linewidth=0.8, label="clean")
    right.set(xscale="log", xlabel="gradient steps per example", ylabel="accuracy (%)", ylim=(-2, 100 * acc[0] + 5),
              title="accuracy against attack effort")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def sanity_images(info, ckpt, args, cache):
    """The test images of the checklist: --n-examples, or the first/fixed SANITY_N when not given."""
    x, y, images = load_test_images(info, ckpt, args, cache)
    if args.n_examples is None and len(y) > SANITY_N:
        x, y, images = load_test_images(info, ckpt, argparse.Namespace(**{**vars(args), "n_examples": SANITY_N}),
                                        cache)
    return x, y, images


def sanity_run(run, checkpoints, json_path, is_run_dir, models, args, device, cache, checked):
    """The checklist on every checkpoint of one run folder (or one checkpoint file): printed, stored as a
    "sanity" entry per checkpoint in json_path, drawn beside it. `checked` remembers the entries by (weights,
    images, settings): identical weights are checked once. Returns the new entries."""
    saved, entries, settings = read_results(json_path), [], sanity_settings(args, device)
    saved.setdefault("sanity", [])
    for role, ckpt in checkpoints:
        model, info = models[str(ckpt)]
        x, y, images = sanity_images(info, ckpt, args, cache)
        print(f"{ckpt}: sanity checks of {info['arch']} ({info['method']}) on {len(y)} {images['dataset']} test "
              f"images, eps {args.epsilon:g}/255, {device}{', bf16 autocast' if args.amp else ''}")
        same = (info["fingerprint"], images["key"], settings)
        entry = {"run": run, "checkpoint": str(ckpt), "role": role, "kind": info["kind"], "method": info["method"],
                 "arch": info["arch"], "epoch": info["epoch"], "dataset": images["dataset"], "subset": images["subset"],
                 "n": len(y), "seed": args.seed, "device": str(device), "amp": args.amp,
                 "settings": dataclasses.asdict(settings)}
        if same in checked:
            earlier = checked[same]
            entry.update(checks=earlier["checks"], seconds=0.0, pgd20_seconds=earlier["pgd20_seconds"],
                         same_weights_as=earlier["checkpoint"])
        else:
            start = time.time()
            model.to(device)
            entry["checks"] = run_sanity_checks(Bf16Autocast(model) if args.amp else model, utils.to_float(x), y,
                                                settings)
            model.cpu()
            entry["seconds"] = time.time() - start
            entry["pgd20_seconds"] = next(c for c in entry["checks"] if c["name"] == "valid-examples")[
                "numbers"]["attacks"]["pgd20"]["seconds"]
            checked[same] = entry
        entry["counts"] = print_sanity(entry["checks"], role)
        entry["cost_vs_pgd20"] = entry["seconds"] / max(entry["pgd20_seconds"], 1e-9) if entry["seconds"] else None
        name = Path(ckpt).stem if not is_run_dir else role if args.out is None else f"{Path(run).name}.{role}"
        entry["png"] = str(json_path.parent / f"{name}.sanity.png")
        plot_sanity(entry["checks"], Path(entry["png"]), f"{info['method']} ({role}): sanity checks, {len(y)} "
                                                         f"{images['dataset']} images, eps {args.epsilon:g}/255")
        took = (f"{entry['seconds']:.0f} s, {entry['cost_vs_pgd20']:.1f}x its PGD-20 pass" if entry["seconds"]
                else f"same weights as {entry['same_weights_as']}")
        print(f"  {role:10s} wrote {entry['png']} ({took})")
        saved["sanity"] = [e for e in saved["sanity"] if (e["run"], e["role"]) != (run, role)] + [entry]
        save_results(saved, json_path)
        entries.append(entry)
    return entries


# ----------------------------------------------------------------------------------------------
# The flags (python evaluate.py --help), grouped as --help shows them
# ----------------------------------------------------------------------------------------------


def comma_list(allowed):
    """argparse `type=` for a comma-separated list whose items must come from `allowed`."""

    def parse(text):
        items = [item.strip().lower() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r} in {text!r}" if unknown else "empty list")
        return list(dict.fromkeys(items))  # drop repeats, keep the order

    parse.__name__ = "list"
    return parse


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=str, metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run folders (their best.pt and final.pt are evaluated), checkpoints of this project, plain "
                        "state_dicts (with --arch); with --table: run folders or the JSON files evaluate.py wrote")
    add_measure_arguments(p)
    add_data_arguments(p)
    add_foreign_arguments(p)
    add_run_arguments(p)
    add_landscape_arguments(p)
    add_sanity_arguments(p)
    args = p.parse_args(argv)
    validate(args)
    return args


def add_measure_arguments(p):
    g = p.add_argument_group("what to measure (epsilon and step size in 1/255 units)")
    g.add_argument("--attacks", type=comma_list(ATTACKS), default=None,
                   help=f"comma-separated, any of {','.join(ATTACKS)} (default: all of them, or none with --landscape)")
    g.add_argument("--epsilon", type=utils.pixel_units, default=8.0,
                   help="L-inf radius of every attack and of AutoAttack (default: %(default)s)")
    g.add_argument("--step-size", type=utils.pixel_units, default=2.0,
                   help="step size of PGD-20 and CW-20 (default: %(default)s)")
    g.add_argument("--aa-version", type=str, default="standard", choices=AA_VERSIONS,
                   help="AutoAttack version: standard (the paper's and RobustBench's), plus, rand, or custom "
                        "(--aa-attacks with pyautoattack's default settings of each, for quick looks)")
    g.add_argument("--aa-attacks", type=comma_list(AA_ATTACKS), default=None,
                   help=f"with --aa-version custom: any of {','.join(AA_ATTACKS)} (default: apgd-ce,apgd-t)")


def add_data_arguments(p):
    pos_int = utils.positive(int)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default=None, choices=utils.DATASETS,
                   help="test set to evaluate on (default: the checkpoint's own data set; cifar10 for plain "
                        "state_dicts)")
    g.add_argument("--data-dir", type=str, default=None,
                   help="where the data set lives (default: the checkpoint's own --data-dir, else ./data)")
    g.add_argument("--image-size", type=pos_int, default=None,
                   help="resize image-folder images to this size (default: the checkpoint's own --image-size)")
    g.add_argument("--n-examples", type=pos_int, default=None, help="evaluate N test images (default: all of them)")
    g.add_argument("--subset", type=str, default=None, choices=("first", "fixed"),
                   help="which N: the first N test images (default for cifar10/cifar100/svhn, as AutoAttack's eval.py "
                        "and RobustBench), or sorted(utils.fixed_subset(n_test, N)), the same for every seed (default "
                        "for imagefolder/synthetic, whose images are ordered by class)")
    g.add_argument("--batch-size", type=pos_int, default=250,
                   help="batch size of every attack, AutoAttack's included (250 is pyautoattack's own default)")


def add_foreign_arguments(p):
    pos_int = utils.positive(int)
    pos_float = utils.positive(float)
    g = p.add_argument_group("plain state_dicts from other projects")
    g.add_argument("--arch", type=str, default=None, choices=utils.ARCHS,
                   help="read the checkpoints as plain state_dicts of this network (bare, or under 'state_dict'/"
                        "'model'/'net', 'module.' prefixes stripped)")
    g.add_argument("--num-classes", type=pos_int, default=None,
                   help="outputs of that network (default: read from its last layer)")
    g.add_argument("--input-normalization", type=str, default=None, choices=tuple(NORMALIZATIONS),
                   help="how that network normalises its [0,1] input: none (default; TRADES, MART and AutoAttack's "
                        "example models take raw [0,1] images) or the channel statistics of a data set")
    g.add_argument("--mean", type=utils.finite(float), nargs=3, default=None, metavar=("R", "G", "B"),
                   help="explicit normalisation mean of that network (with --std), instead of --input-normalization")
    g.add_argument("--std", type=pos_float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="explicit normalisation standard deviation of that network")
    g.add_argument("--unsafe-load", action="store_true",
                   help="allow a plain checkpoint that pickles Python objects (torch.load weights_only=False): it can "
                        "run code, so only for files you trust")


def add_run_arguments(p):
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=utils.seed_number, default=0,
                   help="seed of the attacks' random starts and of AutoAttack (default: %(default)s; re-set before "
                        "every measurement, so each number does not depend on what was measured before it)")
    g.add_argument("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--amp", action="store_true",
                   help="run the model under bf16 autocast in every attack and AutoAttack (faster where bf16 "
                        "pays: CUDA, and CPUs with AMX). Off by default, unlike the training scripts' --amp: attack "
                        "gradients in bf16 are coarser and can miss adversarial examples, which flatters a model, and the numbers are not "
                        "the fp32 ones papers report; rows measured in bf16 are marked in the results")
    g.add_argument("--out", type=str, default=None,
                   help="JSON file for all numbers (default: RUN_DIR/eval.json, or CHECKPOINT's name with .eval.json); "
                        "with --table, the markdown file to write")
    g.add_argument("--table", action="store_true",
                   help="gather the JSON files of the given run folders into one markdown table shaped like Table I")
    g.add_argument("--worst-class", action="store_true",
                   help="with --table: also the worst class's accuracy of the best and the final checkpoint for "
                        "every attack (CFA's fairness measure; every row of the JSON holds it)")
    g.add_argument("--paper", type=str, default=None, choices=tuple(PAPER_TABLE_I),
                   help="with --table: the paper's Table I row (ResNet-18 on this data set) under each method it "
                        "reports (PGD-AT, ALP, TRADES, MART, MAIL, CFA, RAT, PIAT + NMSE)")


def epsilon_list(text):
    """argparse `type=` for a comma-separated list of non-negative numbers (1/255 units)."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(not v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"needs non-negative numbers: {text!r}")
    return values


def add_landscape_arguments(p):
    pos_int = utils.positive(int)
    nonneg_int = utils.non_negative(int)
    pos_float = utils.positive(float)
    g = p.add_argument_group("loss landscape (Fig. 8): L(theta + a*d1 + b*d2), PGD adversarial CE on a fixed batch")
    g.add_argument("--landscape", action="store_true",
                   help="compute it for final.pt of each run folder (or each given checkpoint); writes .npz and .png")
    g.add_argument("--landscape-steps", type=pos_int, default=21,
                   help="grid points along each direction (default: %(default)s)")
    g.add_argument("--landscape-range", type=pos_float, default=1.0,
                   help="a and b run over [-range, range] (default: %(default)s)")
    g.add_argument("--landscape-batch", type=pos_int, default=256,
                   help="the fixed batch: the first N of the evaluated test images (default: %(default)s)")
    g.add_argument("--landscape-pgd-steps", type=nonneg_int, default=20,
                   help="PGD steps of the landscape's attack (default: %(default)s)")


def add_sanity_arguments(p):
    pos_int = utils.positive(int)
    nonneg_int = utils.non_negative(int)
    g = p.add_argument_group("sanity checks: is the evaluation itself trustworthy? (gradient masking, broken attacks)",
                             SANITY_HELP)
    g.add_argument("--sanity", action="store_true",
                   help="run the checklist instead of the attacks (with --attacks given, after them)")
    g.add_argument("--strict", action="store_true",
                   help="with --sanity: exit with status 1 when any check FAILs, for CI pipelines (WARNs do not count)")
    g.add_argument("--sanity-epsilons", type=epsilon_list, default=list(SANITY_EPSILONS),
                   help="the eps sweep, comma-separated in 1/255 units; 0 and --epsilon are always added, the largest "
                        "must be at least 4x --epsilon (default: 0,2,4,8,16,32,64)")
    g.add_argument("--sanity-steps", type=pos_int, default=100,
                   help="steps of the long PGD run, at half of --step-size (default: %(default)s, 5x PGD-20's)")
    g.add_argument("--sanity-restarts", type=nonneg_int, default=3,
                   help="random restarts of the long PGD run on the examples still robust (default: %(default)s)")
    g.add_argument("--sanity-square-queries", type=pos_int, default=1000,
                   help="queries of the Square attack on the examples every white-box attack left robust "
                        "(default: %(default)s; AutoAttack's standard version uses 5000)")


def validate_sanity(args):
    if args.strict and not args.sanity:
        raise utils.UserError("--strict goes with --sanity")
    if not args.sanity:
        return
    if args.table:
        raise utils.UserError("--sanity checks checkpoints; --table only gathers results")
    if args.epsilon <= 0:
        raise utils.UserError("--sanity needs --epsilon above 0")
    if max(args.sanity_epsilons) < 4 * args.epsilon:
        raise utils.UserError(f"the largest of --sanity-epsilons ({max(args.sanity_epsilons):g}) must be at least 4x "
                              f"--epsilon ({args.epsilon:g}), where honest models are at about 0 % accuracy")


def validate(args):
    if args.attacks is None:
        args.attacks = [] if args.landscape or args.sanity else list(ATTACKS)
    if args.aa_version == "custom":
        args.aa_attacks = args.aa_attacks or ["apgd-ce", "apgd-t"]
    elif args.aa_attacks is not None:
        raise utils.UserError(f"--aa-attacks needs --aa-version custom (version {args.aa_version} runs its own set)")
    if (args.mean is None) != (args.std is None):
        raise utils.UserError("--mean and --std go together")
    if args.mean is not None and args.input_normalization is not None:
        raise utils.UserError("give either --input-normalization or --mean/--std, not both")
    foreign_flags = [flag for flag, value in (("--num-classes", args.num_classes), ("--mean", args.mean),
                                              ("--input-normalization", args.input_normalization)) if value is not None]
    if foreign_flags and args.arch is None and not args.table:
        raise utils.UserError(f"{foreign_flags[0]} describes a plain state_dict and needs --arch; checkpoints of this "
                              "project carry their own architecture and normalisation")
    validate_sanity(args)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        return table_mode(args)
    device = utils.pick_device(args.device)
    utils.seed_everything(args.seed)
    # every checkpoint is read first: bad input stops here, before any data is loaded or number computed
    jobs = resolve_inputs(args.paths, args.out)
    for run, _, _, is_run_dir in jobs:
        warn_if_unfinished(Path(run) if is_run_dir else Path(run).parent)
    models = {str(ckpt): load_model(ckpt, args) for _, checkpoints, _, _ in jobs for _, ckpt in checkpoints}
    cache, measured, new_rows, written, checked, sanity = {}, {}, [], [], {}, []
    for run, checkpoints, json_path, is_run_dir in jobs:
        new_rows += evaluate_run(run, checkpoints, json_path, is_run_dir, models, args, device, cache, measured)
        if args.sanity:
            sanity += sanity_run(run, checkpoints, json_path, is_run_dir, models, args, device, cache, checked)
        if json_path not in written:
            written.append(json_path)
        print(f"wrote {json_path}")
    if new_rows:
        runs = list(dict.fromkeys(r["run"] for r in new_rows))
        all_rows = [r for p in written for r in read_results(p)["results"] if r["run"] in runs]
        print(markdown_table(all_rows), end="")
    failed = sum(entry["counts"]["FAIL"] for entry in sanity)
    if args.strict and failed:
        print(f"evaluate.py: {failed} sanity checks FAILed (--strict)", file=sys.stderr)
        sys.exit(1)
    return {"rows": new_rows, "outputs": [str(p) for p in written], "sanity": sanity}


def save_results(saved, json_path):
    saved["script"] = "evaluate.py"
    table = table_i(saved["results"])
    for t in table.values():
        t["n"], t["notes"] = sorted(t["n"]), sorted(t["notes"])
    saved["table"] = table
    utils.save_json(saved, json_path)


def landscape_for(model, x, y, args, device, common, stem):
    """Compute, save (stem.npz and stem.png) and describe one checkpoint's loss landscape."""
    start = time.time()
    n = min(args.landscape_batch, len(x))
    xb, yb = utils.to_float(x[:n].to(device)), y[:n].to(device)
    coords = np.linspace(-args.landscape_range, args.landscape_range, args.landscape_steps)
    loss, accuracy = loss_landscape(model, xb, yb, args.epsilon / 255, args.step_size / 255, args.landscape_pgd_steps,
                                    coords, args.seed, args.batch_size, desc=f"{common['role']} landscape")
    npz, png = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".png")
    utils.atomic_write(npz, lambda f: np.savez(f, a=coords, b=coords, loss=loss, accuracy=accuracy,
                                         epsilon=args.epsilon / 255, pgd_steps=args.landscape_pgd_steps, n=n))
    plot_landscape(coords, loss, png, f"{common['method']} ({common['role']}): PGD-{args.landscape_pgd_steps} "
                                      f"CE, {n} images")
    center = len(coords) // 2
    entry = {**common, "npz": str(npz), "png": str(png), "steps": args.landscape_steps, "range": args.landscape_range,
             "batch": n, "pgd_steps": args.landscape_pgd_steps, "epsilon": args.epsilon / 255,
             "loss_min": float(loss.min()), "loss_max": float(loss.max()),
             "loss_center": float(loss[center, center]) if len(coords) % 2 else None, "seconds": time.time() - start}
    print(f"  landscape {args.landscape_steps}x{args.landscape_steps} in [-{args.landscape_range:g}, "
          f"{args.landscape_range:g}]^2: loss {entry['loss_min']:.3f}..{entry['loss_max']:.3f}, wrote {npz} and {png} "
          f"({entry['seconds']:.1f} s)")
    return entry


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit code of its own for each way it stops early
