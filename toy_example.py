"""The PIAT paper's 3-D toy study (Sec. III-A, Figs. 2-5): oscillating robustness under PGD-AT, and
what PIAT, ALP and NMSE do to it.

Liu, Yang, He & Hopcroft, "Parameter Interpolation Adversarial Training for Robust Image
Classification", IEEE TIFS 2025 (arXiv 2511.00836). The toy, as this script runs it:

    data   two classes on concentric circles in 3-D (reconstruction: the equations were lost):
               phi ~ U(0, 2 pi),  x1 = r cos(phi) + n1,  x2 = r sin(phi) + n2,  x3 = n3,
               n1, n2 ~ N(0, noise^2),  n3 ~ N(0, x3_noise^2),  r = r0 for class 0, r1 for class 1
    model  a one-hidden-layer MLP  3 -> hidden -> ReLU -> 2
    train  SGD lr 0.5, momentum 0.9, 50 epochs of mini-batches, on PGD-10 examples (L-inf, eps)
    methods, with the same seed, data, initial weights and batch order:
           pgd-at      CE(f(x'), y)                                            (Madry et al. 2018)
           piat        pgd-at, then theta <- a_t theta_prev + (1 - a_t) theta after every epoch
           alp         CE(f(x'), y) + lam_alp * mean ||f(x') - f(x)||^2        (Kannan et al. 2018)
           nmse        CE(f(x'), y) + lam_nmse * NMSE(f(x'), f(x), y)          (the paper's Eq. 12)
           piat+nmse   nmse with the interpolation
    after every epoch: clean and PGD-20 accuracy on the test set; the oscillation of a method is the
    mean |robust_acc[t] - robust_acc[t-1]| over consecutive epochs.

The PGD, losses, alpha schedule and interpolation are written inline (they are short) and agree
with train_piat.py's pgd_attack, nmse_loss, alp_loss, piat_alpha and interpolate_ (tests/test_toy.py
checks it). The toy's inputs are points, not images, so its PGD has no [0, 1] box unless `box=`
is given. The MLP has no BatchNorm, so train/eval mode does not matter.

    python toy_example.py                 # one seed, every figure and summary.json in runs/toy
    python toy_example.py --seeds 5       # mean +- std over 5 seeds (data, weights, batches)
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import utils

METHODS = ("pgd-at", "piat", "alp", "nmse", "piat+nmse")
# method -> (loss, interpolate after every epoch)
METHOD_SPECS = {"pgd-at": ("ce", False), "piat": ("ce", True), "alp": ("alp", False), "nmse": ("nmse", False),
                "piat+nmse": ("nmse", True)}
METHOD_LABELS = {"pgd-at": "PGD-AT", "piat": "PIAT", "alp": "ALP", "nmse": "NMSE", "piat+nmse": "PIAT+NMSE"}
METHOD_COLORS = {"pgd-at": "C3", "piat": "C0", "alp": "C2", "nmse": "C1", "piat+nmse": "C4"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    nonneg_float, pos_int, pos_float = utils.non_negative(float), utils.positive(int), utils.positive(float)
    nonneg_int = utils.non_negative(int)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=utils.seed_number, default=0,
                   help="first seed; seed s draws the data, the initial weights, the batch order and the attacks' "
                        "random starts")
    g.add_argument("--seeds", type=pos_int, default=1,
                   help="repeat with seeds seed .. seed+K-1 and report mean +- std (figures show the first seed)")
    g.add_argument("--out-dir", type=str, default="runs/toy", help="where the figures and summary.json go")
    g.add_argument("--methods", type=str, nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to train (Figs. 4-5 need pgd-at and piat)")
    g.add_argument("--threads", type=pos_int, default=1,
                   help="torch CPU threads (the MLP is tiny: one thread is fastest)")
    g = p.add_argument_group("data (reconstruction: the paper's equations were lost; defaults chosen so that "
                             "PGD-AT visibly oscillates)")
    g.add_argument("--r0", type=pos_float, default=1.0, help="radius of class 0 (the inner circle)")
    g.add_argument("--r1", type=pos_float, default=2.0, help="radius of class 1 (the outer circle)")
    g.add_argument("--noise", type=nonneg_float, default=0.2, help="std of the Gaussian noise on x1 and x2")
    g.add_argument("--x3-noise", type=nonneg_float, default=0.2,
                   help="std of the third coordinate x3 = N(0, x3_noise^2), uninformative about the class")
    g.add_argument("--train-size", type=pos_int, default=1000, help="training points (half per class)")
    g.add_argument("--test-size", type=pos_int, default=1000, help="test points (half per class)")
    g = p.add_argument_group("model and optimiser (the paper's: SGD lr 0.5, momentum 0.9, 50 epochs)")
    g.add_argument("--hidden", type=pos_int, default=32, help="width of the MLP's hidden layer")
    g.add_argument("--epochs", type=pos_int, default=50, help="epochs")
    g.add_argument("--batch-size", type=pos_int, default=50, help="mini-batch size (an epoch is one pass)")
    g.add_argument("--lr", type=nonneg_float, default=0.5, help="SGD learning rate (constant)")
    g.add_argument("--momentum", type=utils.unit_interval, default=0.9, help="SGD momentum")
    g = p.add_argument_group("attack (L-inf, in input units)")
    g.add_argument("--epsilon", type=nonneg_float, default=0.3, help="L-inf radius of the training and test attacks")
    g.add_argument("--step-size", type=nonneg_float, default=None,
                   help="PGD step size; None is epsilon/4, the paper's 2/255 for 8/255")
    g.add_argument("--pgd-steps", type=nonneg_int, default=10, help="PGD steps of the training attack")
    g.add_argument("--eval-pgd-steps", type=nonneg_int, default=20, help="PGD steps of the per-epoch test attack")
    g = p.add_argument_group("losses and PIAT (defaults as in train_piat.py)")
    g.add_argument("--lam-alp", type=nonneg_float, default=0.5, help="weight of ALP's logit-pairing term")
    g.add_argument("--lam-nmse", type=nonneg_float, default=4.0, help="weight of the NMSE term (reconstruction)")
    g.add_argument("--alpha-max", type=utils.unit_interval, default=0.99,
                   help="alpha_t = min(alpha_max, (t+a)/(t+b)) (reconstruction of Eq. 10); 0.10 at t=0, 0.85 at t=49")
    g.add_argument("--alpha-a", type=nonneg_float, default=1.0, help="a in alpha_t (reconstruction)")
    g.add_argument("--alpha-b", type=pos_float, default=10.0, help="b in alpha_t (reconstruction)")
    g.add_argument("--alpha-fixed", type=utils.unit_interval, default=None, help="a constant alpha instead")
    args = p.parse_args(argv)
    if args.step_size is None:
        args.step_size = args.epsilon / 4
    if args.r0 == args.r1:
        raise utils.UserError(f"--r0 and --r1 must differ (both {args.r0}): the classes would coincide")
    if args.train_size < 2 or args.test_size < 2:
        raise utils.UserError("--train-size and --test-size must be at least 2 (one point per class)")
    args.methods = list(dict.fromkeys(args.methods))  # de-duplicated, order kept
    return args


# ----------------------------------------------------------------------------------------------
# The data (reconstruction of the paper's Fig. 2)
# ----------------------------------------------------------------------------------------------


def make_toy_data(n, r0=1.0, r1=2.0, noise=0.2, x3_noise=0.2, generator=None):
    """n points (n//2 of class 0 on radius r0, the rest of class 1 on r1), shuffled.
    phi ~ U(0, 2 pi); x1 = r cos phi + n1, x2 = r sin phi + n2, x3 = n3 with n1, n2 ~ N(0, noise^2)
    and n3 ~ N(0, x3_noise^2). Returns x float32 (n, 3) and y int64 (n,)."""
    y = (torch.arange(n) >= n // 2).long()
    y = y[torch.randperm(n, generator=generator)]
    r = torch.where(y == 0, torch.tensor(float(r0)), torch.tensor(float(r1)))
    phi = torch.rand(n, generator=generator) * 2 * math.pi
    n12 = torch.randn(n, 2, generator=generator) * noise
    x3 = torch.randn(n, generator=generator) * x3_noise
    x = torch.stack([r * torch.cos(phi) + n12[:, 0], r * torch.sin(phi) + n12[:, 1], x3], dim=1)
    return x, y


def make_splits(args, seed):
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = make_toy_data(args.train_size, args.r0, args.r1, args.noise, args.x3_noise, gen)
    x_test, y_test = make_toy_data(args.test_size, args.r0, args.r1, args.noise, args.x3_noise, gen)
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def make_mlp(hidden, in_dim=3, num_classes=2):
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


# ----------------------------------------------------------------------------------------------
# The attack, the losses and PIAT, inline (the same definitions as train_piat.py)
# ----------------------------------------------------------------------------------------------


def pgd(model, x, y, epsilon, step_size, steps, random_start=True, box=None):
    """L-inf PGD on the cross-entropy (the paper's Eq. 3): start at x + U(-eps, eps) (or x),
    then `steps` times x' <- proj_{||x'-x|| <= eps}(x' + step_size * sign(grad)). `box=(lo, hi)`
    also clips x' into [lo, hi], as train_piat.pgd_attack does with (0, 1) for images; the toy's
    points are not images and have no box, so it is None by default."""
    x = x.detach()
    delta = torch.empty_like(x).uniform_(-epsilon, epsilon) if random_start else torch.zeros_like(x)
    if box is not None:
        delta = (x + delta).clamp_(*box) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp_(-epsilon, epsilon)
        if box is not None:
            delta = (x + delta).clamp_(*box) - x
    return (x + delta).detach()


def nmse(logits_adv, logits_clean, y):
    """mean_i (1 - p_y(x_i)) * || f(x'_i)/||f(x'_i)|| - f(x_i)/||f(x_i)|| ||^2 (Eq. 11; weight not detached)."""
    distance = (F.normalize(logits_adv, dim=1) - F.normalize(logits_clean, dim=1)).pow(2).sum(dim=1)
    weight = 1 - F.softmax(logits_clean, dim=1).gather(1, y[:, None]).squeeze(1)
    return (weight * distance).mean()


def alp(logits_adv, logits_clean):
    """mean_i ||f(x'_i) - f(x_i)||^2 (Eq. 8)."""
    return (logits_adv - logits_clean).pow(2).sum(dim=1).mean()


def alpha_at(epoch, alpha_max=0.99, a=1.0, b=10.0, fixed=None):
    """alpha_t = min(alpha_max, (t + a)/(t + b)) for t = 0, 1, ... (reconstruction of Eq. 10), or `fixed`."""
    return fixed if fixed is not None else min(alpha_max, (epoch + a) / (epoch + b))


@torch.no_grad()
def interpolate(model, prev_state, alpha):
    """theta <- alpha * theta_prev + (1 - alpha) * theta in place, every floating-point tensor (Eq. 9)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor.lerp_(prev_state[name], alpha)


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def method_loss(loss_name, model, x, y, x_adv, lam_alp, lam_nmse):
    """The training loss: CE(f(x'), y), plus lam_alp * ALP or lam_nmse * NMSE for those losses."""
    logits_adv = model(x_adv)
    loss = F.cross_entropy(logits_adv, y)
    if loss_name == "alp":
        loss = loss + lam_alp * alp(logits_adv, model(x))
    elif loss_name == "nmse":
        loss = loss + lam_nmse * nmse(logits_adv, model(x), y)
    return loss


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def evaluate(model, x, y, epsilon, step_size, steps):
    """(clean accuracy, PGD accuracy) on the whole set at once (uniform random start)."""
    x_adv = pgd(model, x, y, epsilon, step_size, steps)
    return accuracy(model, x, y), accuracy(model, x_adv, y)


# ----------------------------------------------------------------------------------------------
# Training one method
# ----------------------------------------------------------------------------------------------


def train_method(method, splits, args, seed):
    """Train `method` from seed `seed` (the same initial weights, batch order and attack starts for
    every method). Returns per-epoch lists `clean`, `robust`, `alpha`, `loss` and `snapshots`
    (state_dicts: index 0 the initial weights, index t the weights evaluated after epoch t)."""
    loss_name, use_piat = METHOD_SPECS[method]
    utils.seed_everything(seed)
    model = make_mlp(args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    prev_state = clone_state(model)
    x_train, y_train = splits["train"]
    x_test, y_test = splits["test"]
    out = {"clean": [], "robust": [], "alpha": [], "loss": [], "snapshots": [clone_state(model)]}
    for epoch in utils.progress(range(args.epochs), desc=f"{method} seed {seed}"):
        order = torch.randperm(len(x_train))
        loss_sum = 0.0
        for i in range(0, len(x_train), args.batch_size):
            idx = order[i : i + args.batch_size]
            x, y = x_train[idx], y_train[idx]
            x_adv = pgd(model, x, y, args.epsilon, args.step_size, args.pgd_steps)
            loss = method_loss(loss_name, model, x, y, x_adv, args.lam_alp, args.lam_nmse)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
        alpha = 0.0
        if use_piat:  # Eq. 9 with the previous epoch's interpolated weights; momentum is left as it is
            alpha = alpha_at(epoch, args.alpha_max, args.alpha_a, args.alpha_b, args.alpha_fixed)
            interpolate(model, prev_state, alpha)
            prev_state = clone_state(model)
        clean, robust = evaluate(model, x_test, y_test, args.epsilon, args.step_size, args.eval_pgd_steps)
        out["clean"].append(clean)
        out["robust"].append(robust)
        out["alpha"].append(alpha)
        out["loss"].append(loss_sum / len(x_train))
        out["snapshots"].append(clone_state(model))
    return out


def oscillation(values):
    """Mean absolute change between consecutive epochs (0 for fewer than two epochs)."""
    values = np.asarray(values, dtype=float)
    return float(np.abs(np.diff(values)).mean()) if len(values) > 1 else 0.0


def summarize(run):
    robust = run["robust"]
    best = int(np.argmax(robust))
    return {"final_robust": robust[-1], "best_robust": robust[best], "best_epoch": best + 1,
            "final_clean": run["clean"][-1], "oscillation": oscillation(robust),
            "clean_oscillation": oscillation(run["clean"])}


def largest_drop_epoch(robust):
    """The epoch t (1-based, t >= 2) whose robust accuracy fell most from epoch t-1's (1 for a one-epoch run)."""
    if len(robust) < 2:
        return 1
    return int(np.argmin(np.diff(robust))) + 2


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib is imported lazily, with the Agg backend)
# ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CLASS_COLORS = ("tab:red", "tab:blue")


def plot_data(splits, path, title=""):
    """Fig. 2: the training set in 2-D (x1, x2) and in 3-D."""
    plt = _pyplot()
    x, y = splits["train"]
    fig = plt.figure(figsize=(11, 4.8))
    ax2 = fig.add_subplot(1, 2, 1)
    ax3 = fig.add_subplot(1, 2, 2, projection="3d")
    for c in (0, 1):
        pts = x[y == c].numpy()
        ax2.scatter(pts[:, 0], pts[:, 1], s=6, color=CLASS_COLORS[c], label=f"class {c}")
        ax3.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=4, color=CLASS_COLORS[c], label=f"class {c}")
    ax2.set(xlabel="$x_1$", ylabel="$x_2$", title="2-D view", aspect="equal")
    ax2.legend(loc="upper right")
    ax3.set(xlabel="$x_1$", ylabel="$x_2$", zlabel="$x_3$", title="3-D view")
    span = x.max(dim=0).values - x.min(dim=0).values  # true proportions, but x3 at least 1/3 as tall
    ax3.set_box_aspect((1.0, float(span[1] / span[0]), max(1 / 3, float(span[2] / span[0]))))
    ax3.set_zticks(np.round(np.linspace(float(x[:, 2].min()), float(x[:, 2].max()), 3), 1))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(runs, path, drop_epoch=None, title=""):
    """Fig. 3: clean (left) and PGD (right) test accuracy per epoch for each method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for method, run in runs.items():
        epochs = range(1, len(run["robust"]) + 1)
        for ax, key in zip(axes, ("clean", "robust")):
            ax.plot(epochs, [100 * v for v in run[key]], color=METHOD_COLORS[method], marker=".", ms=3, lw=1.2,
                    label=f"{METHOD_LABELS[method]} (osc. {100 * oscillation(run['robust']):.1f})"
                    if key == "robust" else METHOD_LABELS[method])
    for ax, name in zip(axes, ("clean", "robust (PGD)")):
        if drop_epoch is not None:
            ax.axvline(drop_epoch, color="gray", ls=":", lw=1)
        ax.set(xlabel="epoch", ylabel=f"{name} test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_title("dotted: PGD-AT's largest drop (Figs. 4-5); osc. = mean |change| per epoch, points", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def decision_grid(state, hidden, lim, x3=0.0, resolution=200):
    """f_1 - f_0 of the MLP with weights `state` on a resolution x resolution grid over
    [-lim, lim]^2 in (x1, x2), at the slice x3 = `x3`. Returns (g1, g2, margin) as numpy arrays;
    the decision boundary is margin = 0 (class 1 where it is positive)."""
    model = make_mlp(hidden)
    model.load_state_dict(state)
    g = torch.linspace(-lim, lim, resolution)
    g1, g2 = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([g1.reshape(-1), g2.reshape(-1), torch.full((g1.numel(),), float(x3))], dim=1)
    with torch.no_grad():
        logits = model(pts)
    margin = (logits[:, 1] - logits[:, 0]).reshape(g1.shape)
    return g1.numpy(), g2.numpy(), margin.numpy()


def boundary_change(state_before, state_after, hidden, lim, x3=0.0, resolution=200):
    """The fraction of the slice [-lim, lim]^2 (at x3) whose predicted class differs between two
    weight sets: how far the decision boundary moved."""
    m0 = decision_grid(state_before, hidden, lim, x3, resolution)[2]
    m1 = decision_grid(state_after, hidden, lim, x3, resolution)[2]
    return float(((m0 > 0) != (m1 > 0)).mean())


def plot_limit(args):
    return 1.25 * max(args.r0, args.r1) + 2 * args.noise


def _draw_boundaries(ax, run, epoch, splits, args, lim, x3):
    x, y = splits["test"]
    for c in (0, 1):
        pts = x[y == c].numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=5, color=CLASS_COLORS[c], alpha=0.5, linewidths=0)
    handles = []
    for t, style, color in ((epoch - 1, "--", "k"), (epoch, "-", "darkorange")):
        g1, g2, margin = decision_grid(run["snapshots"][t], args.hidden, lim, x3)
        if margin.min() < 0 < margin.max():
            ax.contour(g1, g2, margin, levels=[0.0], colors=color, linestyles=style, linewidths=1.8)
        handles.append(ax.plot([], [], style, color=color,
                               label=f"after epoch {t}: robust {100 * run['robust'][t - 1]:.1f}%" if t > 0
                               else "initial weights")[0])
    mid = (args.r0 + args.r1) / 2  # the max-margin boundary of the noise-free data, for reference
    circle = torch.linspace(0, 2 * math.pi, 200)
    ax.plot(mid * torch.cos(circle), mid * torch.sin(circle), color="gray", lw=0.8, ls=":")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="$x_1$", ylabel="$x_2$")
    ax.legend(handles=handles, loc="upper right", fontsize=8)


def plot_boundaries(runs, methods, epoch, splits, args, path, title=""):
    """Figs. 4-5: the decision boundary in the slice x3 = 0 (the data's mean) before (dashed, after
    epoch-1) and after (solid, after `epoch`) the given epoch, one panel per method, over the test points."""
    plt = _pyplot()
    lim = plot_limit(args)
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 5), squeeze=False)
    for ax, method in zip(axes[0], methods):
        _draw_boundaries(ax, runs[method], epoch, splits, args, lim, x3=0.0)
        snapshots = runs[method]["snapshots"]
        moved = boundary_change(snapshots[epoch - 1], snapshots[epoch], args.hidden, lim)
        ax.set_title(f"{METHOD_LABELS[method]}: epoch {epoch - 1} (dashed) -> {epoch} (solid); "
                     f"{100 * moved:.1f}% of the slice changed class", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run_seed(args, seed):
    splits = make_splits(args, seed)
    runs = {m: train_method(m, splits, args, seed) for m in args.methods}
    return splits, runs


TABLE_COLUMNS = {"final_robust": "final robust", "best_robust": "best robust", "oscillation": "oscillation",
                 "final_clean": "final clean", "robust_change_at_drop": "robust chg @drop",
                 "boundary_change_at_drop": "boundary moved @drop"}


def print_table(summary, k):
    """One row per method, in percent; mean +- std (sample std) when k > 1 seeds."""
    keys = [key for key in TABLE_COLUMNS if key in next(iter(summary.values()))]
    widths = [max(len(TABLE_COLUMNS[key]), 16 if k > 1 else 8) for key in keys]
    print(f"\n{'method':<10} " + " ".join(f"{TABLE_COLUMNS[key]:>{w}}" for key, w in zip(keys, widths))
          + (f"   (%, mean +- std over {k} seeds)" if k > 1 else "   (%)"))
    for m, stats in summary.items():
        cells = [f"{100 * stats[key]['mean']:.2f} +- {100 * stats[key]['std']:.2f}" if k > 1
                 else f"{100 * stats[key]['mean']:.2f}" for key in keys]
        print(f"{METHOD_LABELS[m]:<10} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"toy: r0={args.r0} r1={args.r1} noise={args.noise} x3_noise={args.x3_noise} eps={args.epsilon} "
          f"hidden={args.hidden} lr={args.lr} momentum={args.momentum} {args.epochs} epochs, "
          f"methods {', '.join(args.methods)}, seeds {seeds}; writing {out_dir}")
    per_seed, first = [], None
    for seed in seeds:
        splits, runs = run_seed(args, seed)
        entry = {"seed": seed, "methods": {}}
        for m, run in runs.items():
            entry["methods"][m] = {**summarize(run), **{k: run[k] for k in ("clean", "robust", "alpha", "loss")}}
        if "pgd-at" in runs:  # how far each method's boundary moved in PGD-AT's worst epoch
            drop = entry["drop_epoch"] = largest_drop_epoch(runs["pgd-at"]["robust"])
            for m, run in runs.items():
                entry["methods"][m]["boundary_change_at_drop"] = boundary_change(
                    run["snapshots"][drop - 1], run["snapshots"][drop], args.hidden, plot_limit(args))
                entry["methods"][m]["robust_change_at_drop"] = run["robust"][drop - 1] - run["robust"][drop - 2]
        per_seed.append(entry)
        line = "  ".join(f"{METHOD_LABELS[m]} {100 * s['final_robust']:.1f}/{100 * s['oscillation']:.2f}"
                         for m, s in entry["methods"].items())
        print(f"seed {seed}: final robust / oscillation (%)  {line}  [{time.time() - start:.0f}s]", flush=True)
        if first is None:
            first = (splits, runs, entry)

    keys = ["final_robust", "best_robust", "oscillation", "final_clean", "clean_oscillation"]
    if "pgd-at" in args.methods:
        keys += ["robust_change_at_drop", "boundary_change_at_drop"]
    summary = {m: {key: mean_std([e["methods"][m][key] for e in per_seed]) for key in keys} for m in args.methods}
    print_table(summary, len(per_seed))

    # figures, from the first seed
    splits, runs, entry = first
    figures = {"fig2": out_dir / "fig2_data.png", "fig3": out_dir / "fig3_accuracy.png"}
    setting = (f"r0={args.r0}, r1={args.r1}, noise={args.noise}, eps={args.epsilon}, "
               f"lr={args.lr}, momentum={args.momentum}, seed {entry['seed']}")
    plot_data(splits, figures["fig2"], title=f"toy data: {len(splits['train'][0])} training points ({setting})")
    drop = entry.get("drop_epoch")
    plot_accuracy(runs, figures["fig3"], drop, title=f"test accuracy per epoch ({setting})")
    if drop is not None:
        figures["fig4"] = out_dir / "fig4_boundary_pgdat.png"
        plot_boundaries(runs, ["pgd-at"], drop, splits, args, figures["fig4"],
                        title=f"PGD-AT's largest robustness drop: epoch {drop} (slice x3 = 0)")
        if "piat" in runs:
            figures["fig5"] = out_dir / "fig5_boundary_pgdat_vs_piat.png"
            plot_boundaries(runs, ["pgd-at", "piat"], drop, splits, args, figures["fig5"],
                            title=f"the same epoch {drop} for PGD-AT and PIAT (slice x3 = 0)")
    else:
        print("note: Figs. 4-5 need pgd-at among --methods; skipped")
    elapsed = time.time() - start
    result = {"args": vars(args), "seeds": seeds, "summary": summary, "per_seed": per_seed,
              "figures": {k: str(v) for k, v in figures.items()}, "seconds": elapsed}
    utils.save_json(result, out_dir / "summary.json")
    print(f"done in {elapsed:.1f}s: {', '.join(p.name for p in figures.values())} and summary.json in {out_dir}")
    return result


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit code of its own for each way it stops early
