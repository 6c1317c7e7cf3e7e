"""The PIAT paper's 3-D toy study (Sec. III-A, Figs. 2-5): oscillating robustness under PGD-AT, and what PIAT,
ALP and NMSE do to it (Liu, Yang, He & Hopcroft, IEEE TIFS 2025, arXiv 2511.00836). As this script runs it:

    data   two classes on concentric circles in 3-D (reconstruction: the equations were lost): phi ~ U(0, 2 pi),
           x1 = r cos(phi) + n1, x2 = r sin(phi) + n2, x3 = n3, n1, n2 ~ N(0, noise^2), n3 ~ N(0, x3_noise^2),
           r = r0 for class 0, r1 for class 1
    model  a one-hidden-layer MLP 3 -> hidden -> ReLU -> 2 (no BatchNorm: train and eval mode agree)
    train  SGD lr 0.5, momentum 0.9, 50 epochs of mini-batches on PGD-10 examples (L-inf, eps); every method
           with the same seed, data, initial weights, batch order and attack starts:
           pgd-at CE(f(x'), y) (Madry et al. 2018);  piat: pgd-at, then theta <- a_t theta_prev + (1 - a_t) theta
           after every epoch;  alp: CE + lam_alp * mean ||f(x') - f(x)||^2 (Kannan et al. 2018);
           nmse: CE + lam_nmse * NMSE(f(x'), f(x), y) (the paper's Eq. 12);  piat+nmse: nmse, interpolated
    after every epoch: clean and PGD-20 test accuracy; a method's oscillation is the mean |robust_acc[t] -
    robust_acc[t-1]| over consecutive epochs.

NMSE, ALP, the alpha schedule and the interpolation are train_piat.py's own code; the attack is its PGD without
the [0, 1] clamp (pgd_unboxed), as the inputs are points, not images.

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
from utils import non_negative, number, positive_int, unit_interval

METHODS = {"pgd-at": ("ce", False, "C3"), "piat": ("ce", True, "C0"), "alp": ("alp", False, "C2"),
           "nmse": ("nmse", False, "C1"), "piat+nmse": ("nmse", True, "C4")}  # (loss, interpolated, colour)
CLASS_COLORS = ("tab:red", "tab:blue")
TOY_MARKER = ".toy_example"  # in every folder this script writes: the only non-empty folders it writes into


# === The flags: every default in one block


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive, size, steps = number(float, 0, open_bounds=True), number(int, 2, 10**6), number(int, 0, 1000)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=utils.seed_number, default=0, metavar="S", help="first seed (%(default)s)")
    g.add_argument("--seeds", type=number(int, 1, 1000), default=1, metavar="K", help="seeds S..S+K-1 (%(default)s)")
    g.add_argument("--out-dir", type=str, default="runs/toy", metavar="DIR", help="output folder (%(default)s)")
    g.add_argument("--methods", type=str, nargs="+", default=list(METHODS), choices=METHODS, metavar="M",
                   help=f"any of {' '.join(METHODS)} (all)")
    g.add_argument("--threads", type=number(int, 1, 1024), default=1, metavar="N", help="CPU threads (%(default)s)")
    g = p.add_argument_group("data (reconstruction, chosen so that PGD-AT visibly oscillates)")
    g.add_argument("--r0", type=positive, default=1.0, metavar="R", help="radius of class 0 (%(default)s)")
    g.add_argument("--r1", type=positive, default=2.0, metavar="R", help="radius of class 1 (%(default)s)")
    g.add_argument("--noise", type=non_negative, default=0.2, metavar="SD", help="noise std of x1, x2 (%(default)s)")
    g.add_argument("--x3-noise", type=non_negative, default=0.2, metavar="SD", help="std of x3 (%(default)s)")
    g.add_argument("--train-size", type=size, default=1000, metavar="N", help="training points (%(default)s)")
    g.add_argument("--test-size", type=size, default=1000, metavar="N", help="test points (%(default)s)")
    g = p.add_argument_group("model and optimiser (the paper's)")
    g.add_argument("--hidden", type=number(int, 1, 4096), default=32, metavar="N", help="hidden width (%(default)s)")
    g.add_argument("--epochs", type=number(int, 1, 10_000), default=50, metavar="N", help="epochs (%(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=50, metavar="N", help="batch size (%(default)s)")
    g.add_argument("--lr", type=non_negative, default=0.5, metavar="LR", help="constant SGD lr (%(default)s)")
    g.add_argument("--momentum", type=unit_interval, default=0.9, metavar="M", help="SGD momentum (%(default)s)")
    g = p.add_argument_group("attack (L-inf PGD, in input units)")
    g.add_argument("--epsilon", type=non_negative, default=0.3, metavar="EPS", help="attack radius (%(default)s)")
    g.add_argument("--step-size", type=non_negative, default=None, metavar="S", help="PGD step size (EPS/4)")
    g.add_argument("--pgd-steps", type=steps, default=10, metavar="N", help="training steps (%(default)s)")
    g.add_argument("--eval-pgd-steps", type=steps, default=20, metavar="N", help="test steps (%(default)s)")
    g = p.add_argument_group("losses and PIAT: alpha_t = min(A, (t+a)/(t+b)) (train_piat.py's defaults)")
    g.add_argument("--lam-alp", type=non_negative, default=0.5, metavar="L", help="weight of ALP (%(default)s)")
    g.add_argument("--lam-nmse", type=non_negative, default=4.0, metavar="L", help="weight of NMSE (%(default)s)")
    g.add_argument("--alpha-max", type=unit_interval, default=0.99, metavar="A", help="A in alpha_t (%(default)s)")
    g.add_argument("--alpha-a", type=non_negative, default=1.0, metavar="a", help="a in alpha_t (%(default)s)")
    g.add_argument("--alpha-b", type=positive, default=10.0, metavar="b", help="b in alpha_t (%(default)s)")
    g.add_argument("--alpha-fixed", type=unit_interval, default=None, metavar="A", help="a constant alpha instead")
    args = p.parse_args(argv)
    args.step_size = args.epsilon / 4 if args.step_size is None else args.step_size  # 2/255 for 8/255
    if args.r0 == args.r1:
        raise utils.UserError(f"--r0 and --r1 must differ (both {args.r0}): the classes would coincide")
    if args.epsilon >= max(args.r0, args.r1):  # a ball that reaches the origin moves any point into either class
        p.error(f"argument --epsilon: {args.epsilon:g} is not below the outer radius {max(args.r0, args.r1):g}: "
                "every point could be moved into either class")
    if args.seed + args.seeds - 1 > 2**32 - 1:
        p.error(f"argument --seeds: seeds {args.seed}..{args.seed + args.seeds - 1} pass 4294967295, the largest seed")
    args.methods = list(dict.fromkeys(args.methods))  # de-duplicated, order kept
    return args


# === The data (reconstruction of the paper's Fig. 2), the model, and the attack: PGD on points (no [0, 1] box)


def make_toy_data(n, r0=1.0, r1=2.0, noise=0.2, x3_noise=0.2, generator=None):
    """n shuffled points of the docstring's data, n//2 of class 0: x float32 (n, 3), y int64 (n,)."""
    y = (torch.arange(n) >= n // 2).long()[torch.randperm(n, generator=generator)]
    r = torch.tensor([float(r0), float(r1)])[y]
    phi = torch.rand(n, generator=generator) * 2 * math.pi
    n12 = torch.randn(n, 2, generator=generator) * noise
    x3 = torch.randn(n, generator=generator) * x3_noise
    return torch.stack([r * torch.cos(phi) + n12[:, 0], r * torch.sin(phi) + n12[:, 1], x3], dim=1), y


def make_splits(args, seed):
    gen = torch.Generator().manual_seed(seed)
    return {split: make_toy_data(n, args.r0, args.r1, args.noise, args.x3_noise, gen)
            for split, n in (("train", args.train_size), ("test", args.test_size))}


def make_mlp(hidden, in_dim=3, num_classes=2):
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def pgd_unboxed(model, x, y, epsilon, step_size, steps, random_start=True):
    """L-inf PGD on the cross-entropy (Eq. 3) for inputs that are not images: train_piat.pgd_attack's uniform
    random start and steps without its clamp to [0, 1] (tests/test_toy.py checks that they agree inside the box)."""
    x = x.detach()
    delta = torch.empty_like(x).uniform_(-epsilon, epsilon) if random_start else torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp_(-epsilon, epsilon)
    return (x + delta).detach()


# === NMSE, ALP and PIAT: train_piat.py's own code


def nmse_loss(logits_adv, logits_clean, y):
    """mean_i w_i * || f(x'_i)/||f(x'_i)|| - f(x_i)/||f(x_i)|| ||^2 with w_i = 1 - p_y(x_i) from the clean logits
    (Eq. 11): the directions of the logits are aligned, not their size, and vulnerable clean examples weigh more.
    The weight is not detached, as in MART."""
    distance = (F.normalize(logits_adv, dim=1) - F.normalize(logits_clean, dim=1)).pow(2).sum(dim=1)
    weight = 1 - F.softmax(logits_clean, dim=1).gather(1, y[:, None]).squeeze(1)
    return (weight * distance).mean()


def alp_loss(logits_adv, logits_clean):
    """Adversarial logit pairing (Eq. 8): mean_i ||f(x'_i) - f(x_i)||^2 over the absolute logits."""
    return (logits_adv - logits_clean).pow(2).sum(dim=1).mean()


def piat_alpha(epoch, alpha_max=0.99, a=1.0, b=10.0):
    """alpha_t = min(alpha_max, (t + a) / (t + b)) (reconstruction of Eq. 10): 0.10 at t=0, 0.55 at t=10, 0.92 at
    t=100 with the defaults: trust the new weights early, the accumulated ones late."""
    return min(alpha_max, (epoch + a) / (epoch + b))


@torch.no_grad()
def interpolate_(model, theta_prev, alpha):
    """theta <- alpha * theta_prev + (1 - alpha) * theta in place (Eq. 9), over every floating-point parameter and
    buffer (BatchNorm's running statistics too); integer buffers (num_batches_tracked) keep their current value."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor.lerp_(theta_prev[name].to(tensor.device, tensor.dtype), alpha)


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def piat_step_(model, theta_prev, t, args):
    """The PIAT step after (fractional) epoch t: alpha_t (or --alpha-fixed), theta <- alpha_t * theta_prev +
    (1 - alpha_t) * theta, theta_prev <- theta. Returns (alpha_t, the new theta_prev)."""
    alpha = args.alpha_fixed if args.alpha_fixed is not None else piat_alpha(t, args.alpha_max, args.alpha_a,
                                                                               args.alpha_b)
    interpolate_(model, theta_prev, alpha)
    return alpha, clone_state(model)


# === Training one method, and its numbers: oscillation, the largest drop, mean +- std over seeds


def method_loss(loss_name, model, x, y, x_adv, lam_alp, lam_nmse):
    """The training loss: CE(f(x'), y), plus lam_alp * ALP or lam_nmse * NMSE for those losses."""
    logits_adv = model(x_adv)
    loss = F.cross_entropy(logits_adv, y)
    if loss_name == "alp":
        loss = loss + lam_alp * alp_loss(logits_adv, model(x))
    elif loss_name == "nmse":
        loss = loss + lam_nmse * nmse_loss(logits_adv, model(x), y)
    return loss


def train_method(method, splits, args, seed):
    """Train `method` from `seed` (every method: the same initial weights, batch order and attack starts). Per-epoch
    lists clean, robust, alpha, loss, and snapshots (state_dicts: [0] the initial weights, [t] those after epoch t)."""
    loss_name, use_piat, _ = METHODS[method]
    utils.seed_everything(seed)
    model = make_mlp(args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    theta_prev = clone_state(model)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    out = {"clean": [], "robust": [], "alpha": [], "loss": [], "snapshots": [clone_state(model)]}
    for epoch in utils.progress(range(args.epochs), desc=f"{method} seed {seed}"):
        order, loss_sum = torch.randperm(len(x_train)), 0.0
        for i in range(0, len(x_train), args.batch_size):
            x, y = x_train[order[i : i + args.batch_size]], y_train[order[i : i + args.batch_size]]
            x_adv = pgd_unboxed(model, x, y, args.epsilon, args.step_size, args.pgd_steps)
            loss = method_loss(loss_name, model, x, y, x_adv, args.lam_alp, args.lam_nmse)
            utils.check_finite(epoch, i // args.batch_size, training_loss=loss)  # nothing is written then
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
        # Eq. 9 with the previous epoch's interpolated weights; momentum is left as it is
        alpha, theta_prev = piat_step_(model, theta_prev, epoch, args) if use_piat else (0.0, theta_prev)
        x_adv = pgd_unboxed(model, x_test, y_test, args.epsilon, args.step_size, args.eval_pgd_steps)
        with torch.no_grad():  # clean and PGD accuracy on the whole test set at once
            clean, robust = ((model(inputs).argmax(1) == y_test).float().mean().item() for inputs in (x_test, x_adv))
        for key, value in zip(out, (clean, robust, alpha, loss_sum / len(x_train), clone_state(model))):
            out[key].append(value)
    return out


def oscillation(values):
    """Mean absolute change between consecutive epochs (0 for fewer than two epochs)."""
    return float(np.abs(np.diff(np.asarray(values, dtype=float))).mean()) if len(values) > 1 else 0.0


def largest_drop_epoch(robust):
    """The epoch t (1-based, t >= 2) whose robust accuracy fell most from epoch t-1's (1 for a one-epoch run)."""
    return int(np.argmin(np.diff(robust))) + 2 if len(robust) > 1 else 1


def mean_and_std(values):
    """{"mean", "std"} of the per-seed values; the std is the sample one (ddof=1; 0 for a single value)."""
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


# === The figures (matplotlib's Figure, no pyplot: nothing to close, no display needed)


def save_figure(fig, path, title):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_data(splits, path, title=""):
    """Fig. 2: the training set in 2-D (x1, x2) and in 3-D."""
    from matplotlib.figure import Figure

    x, y = splits["train"]
    fig = Figure(figsize=(11, 4.8))
    ax2, ax3 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2, projection="3d")
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
    save_figure(fig, path, title)


def plot_accuracy(runs, path, drop_epoch=None, title=""):
    """Fig. 3: clean (left) and PGD (right) test accuracy per epoch for each method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2, sharex=True)
    for method, run in runs.items():
        epochs = range(1, len(run["robust"]) + 1)
        for ax, key in zip(axes, ("clean", "robust")):
            ax.plot(epochs, [100 * v for v in run[key]], color=METHODS[method][2], marker=".", ms=3, lw=1.2,
                    label=f"{method.upper()} (osc. {100 * oscillation(run['robust']):.1f})"
                    if key == "robust" else method.upper())
    for ax, name in zip(axes, ("clean", "robust (PGD)")):
        if drop_epoch is not None:
            ax.axvline(drop_epoch, color="gray", ls=":", lw=1)
        ax.set(xlabel="epoch", ylabel=f"{name} test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_title("dotted: PGD-AT's largest drop (Figs. 4-5); osc. = mean |change| per epoch, points", fontsize=8)
    save_figure(fig, path, title)


@torch.no_grad()
def decision_grid(state, hidden, lim, x3=0.0, resolution=200):
    """f_1 - f_0 of the MLP `state` on a grid over [-lim, lim]^2 in (x1, x2) at x3: (g1, g2, margin) in numpy."""
    model = make_mlp(hidden)
    model.load_state_dict(state)
    g = torch.linspace(-lim, lim, resolution)
    g1, g2 = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([g1.reshape(-1), g2.reshape(-1), torch.full((g1.numel(),), float(x3))], dim=1)
    logits = model(pts)
    return g1.numpy(), g2.numpy(), (logits[:, 1] - logits[:, 0]).reshape(g1.shape).numpy()


def boundary_change(state_before, state_after, hidden, lim, x3=0.0, resolution=200):
    """How far the decision boundary moved: the fraction of the slice whose predicted class differs."""
    m0, m1 = (decision_grid(state, hidden, lim, x3, resolution)[2] for state in (state_before, state_after))
    return float(((m0 > 0) != (m1 > 0)).mean())


def plot_limit(args):
    return 1.25 * max(args.r0, args.r1) + 2 * args.noise


def plot_boundaries(runs, methods, epoch, splits, args, path, title=""):
    """Figs. 4-5: per method, the test points and the boundary at x3 = 0 after epoch-1 (dashed) and `epoch`."""
    from matplotlib.figure import Figure

    lim, (x, y) = plot_limit(args), splits["test"]
    fig = Figure(figsize=(5.2 * len(methods), 5))
    for ax, method in zip(fig.subplots(1, len(methods), squeeze=False)[0], methods):
        run, handles = runs[method], []
        for c in (0, 1):
            ax.scatter(x[y == c, 0], x[y == c, 1], s=5, color=CLASS_COLORS[c], alpha=0.5, linewidths=0)
        for t, style, color in ((epoch - 1, "--", "k"), (epoch, "-", "darkorange")):
            g1, g2, margin = decision_grid(run["snapshots"][t], args.hidden, lim)
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
        moved = boundary_change(run["snapshots"][epoch - 1], run["snapshots"][epoch], args.hidden, lim)
        ax.set_title(f"{method.upper()}: epoch {epoch - 1} (dashed) -> {epoch} (solid); "
                     f"{100 * moved:.1f}% of the slice changed class", fontsize=9)
    save_figure(fig, path, title)


# === The run

SUMMARY_COLUMNS = {  # summary.json's statistics, in order, with their heading in the table (None: not shown)
    "final_robust": "final robust", "best_robust": "best robust", "oscillation": "oscillation",
    "final_clean": "final clean", "clean_oscillation": None, "robust_change_at_drop": "robust chg @drop",
    "boundary_change_at_drop": "boundary moved @drop"}


def run_seed(args, seed):
    """Every method on seed `seed`: (the data, the runs, the seed's entry of summary.json)."""
    splits = make_splits(args, seed)
    runs = {m: train_method(m, splits, args, seed) for m in args.methods}
    entry = {"seed": seed, "methods": {}}
    if "pgd-at" in runs:
        drop = entry["drop_epoch"] = largest_drop_epoch(runs["pgd-at"]["robust"])
    for m, run in runs.items():
        robust, best = run["robust"], int(np.argmax(run["robust"]))
        stats = entry["methods"][m] = {
            "final_robust": robust[-1], "best_robust": robust[best], "best_epoch": best + 1,
            "final_clean": run["clean"][-1], "oscillation": oscillation(robust),
            "clean_oscillation": oscillation(run["clean"]), **{k: run[k] for k in ("clean", "robust", "alpha", "loss")}}
        if "drop_epoch" in entry:  # how far each method's boundary moved in PGD-AT's worst epoch
            stats["boundary_change_at_drop"] = boundary_change(run["snapshots"][drop - 1], run["snapshots"][drop],
                                                               args.hidden, plot_limit(args))
            stats["robust_change_at_drop"] = robust[drop - 1] - robust[drop - 2]
    return splits, runs, entry


def draw_figures(splits, runs, entry, args, out_dir):
    """Figs. 2-5 of one seed into out_dir; {figure: path}."""
    figures = {"fig2": out_dir / "fig2_data.png", "fig3": out_dir / "fig3_accuracy.png"}
    setting = (f"r0={args.r0}, r1={args.r1}, noise={args.noise}, eps={args.epsilon}, "
               f"lr={args.lr}, momentum={args.momentum}, seed {entry['seed']}")
    plot_data(splits, figures["fig2"], title=f"toy data: {len(splits['train'][0])} training points ({setting})")
    drop = entry.get("drop_epoch")
    plot_accuracy(runs, figures["fig3"], drop, title=f"test accuracy per epoch ({setting})")
    if drop is None:
        print("note: Figs. 4-5 need pgd-at among --methods; skipped")
        return figures
    figures["fig4"] = out_dir / "fig4_boundary_pgdat.png"
    plot_boundaries(runs, ["pgd-at"], drop, splits, args, figures["fig4"],
                    title=f"PGD-AT's largest robustness drop: epoch {drop} (slice x3 = 0)")
    if "piat" in runs:
        figures["fig5"] = out_dir / "fig5_boundary_pgdat_vs_piat.png"
        plot_boundaries(runs, ["pgd-at", "piat"], drop, splits, args, figures["fig5"],
                        title=f"the same epoch {drop} for PGD-AT and PIAT (slice x3 = 0)")
    return figures


def toy_out_dir(path, create=False):
    """The output folder: a new or empty one, or one this script made (its marker file is there), created with the
    marker when `create`. Anything else is refused: the toy never writes into a user's folder or a training run's."""
    out_dir = Path(path)
    if not (out_dir / TOY_MARKER).is_file():
        utils.check_out_dir(out_dir)
    if create:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / TOY_MARKER).write_text("toy_example.py wrote this folder and may rewrite its files\n")
        except OSError as err:
            raise utils.UserError(f"--out-dir {out_dir} cannot be written: {err.strerror or err}") from None
    return out_dir


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = toy_out_dir(args.out_dir)  # refused before any work; made only once every seed trained
    start = time.time()
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"toy: r0={args.r0} r1={args.r1} noise={args.noise} x3_noise={args.x3_noise} eps={args.epsilon} "
          f"hidden={args.hidden} lr={args.lr} momentum={args.momentum} {args.epochs} epochs, "
          f"methods {', '.join(args.methods)}, seeds {seeds}; writing {out_dir}")
    per_seed, first = [], None
    for seed in seeds:
        splits, runs, entry = run_seed(args, seed)
        per_seed.append(entry)
        line = "  ".join(f"{m.upper()} {100 * s['final_robust']:.1f}/{100 * s['oscillation']:.2f}"
                         for m, s in entry["methods"].items())
        print(f"seed {seed}: final robust / oscillation (%)  {line}  [{time.time() - start:.0f}s]", flush=True)
        first = first or (splits, runs, entry)  # the figures show the first seed
    keys = [key for key in SUMMARY_COLUMNS if key in entry["methods"][args.methods[0]]]
    summary = {m: {key: mean_and_std([e["methods"][m][key] for e in per_seed]) for key in keys} for m in args.methods}
    several, shown = len(seeds) > 1, [key for key in keys if SUMMARY_COLUMNS[key]]  # the table: in %, +- std
    widths = [max(len(SUMMARY_COLUMNS[key]), 16 if several else 8) for key in shown]
    print(f"\n{'method':<10} " + " ".join(f"{SUMMARY_COLUMNS[key]:>{w}}" for key, w in zip(shown, widths))
          + (f"   (%, mean +- std over {len(seeds)} seeds)" if several else "   (%)"))
    for m, stats in summary.items():
        cells = [f"{100 * stats[key]['mean']:.2f}" + (f" +- {100 * stats[key]['std']:.2f}" if several else "")
                 for key in shown]
        print(f"{m.upper():<10} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    figures = draw_figures(*first, args, toy_out_dir(out_dir, create=True))
    elapsed = time.time() - start
    result = {"args": vars(args), "seeds": seeds, "summary": summary, "per_seed": per_seed,
              "figures": {k: str(v) for k, v in figures.items()}, "seconds": elapsed}
    utils.save_json(result, out_dir / "summary.json")
    print(f"done in {elapsed:.1f}s: {', '.join(p.name for p in figures.values())} and summary.json in {out_dir}")
    return result


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit status for every way it can end early
