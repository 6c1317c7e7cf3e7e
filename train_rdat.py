"""RDAT: Regularised Decoupled Adversarial Training, a reconstruction, beside PIAT for comparison.

Li et al., "RDAT: an efficient regularized decoupled adversarial training mechanism", IJMIR 2024. Only
the abstract is public: RDAT has a *regularisation module* that controls the distance between the
output distributions of an example before and after the attack, and a *decoupled training module*
that optimises clean and adversarial examples separately. This script builds it on the decoupled
design of Generalist (Wang & Wang, CVPR 2023, whose official code it follows) with a KL regulariser
on the robust learner. Every reconstructed constant is a flag; its default is OURS, not the paper's.

    theta_R, theta_N: robust and natural learner (the same initial weights); EMAs ema_R, ema_N of both;
    theta_G: the global learner (starts as theta_N); s counts the updates of each EMA
    for epoch t = 1 .. E (1-indexed here):
        for each batch (x, y):                                                       (rdat_step_)
            x' <- PGD-10(theta_R, x, y)                    BatchNorm in eval mode, uniform random start
            theta_R <- SGD step on  CE(f_R(x'), y) + lam * KL(p_R(x) || p_R(x'))          (regulariser)
            ema_R <- d * ema_R + (1 - d) * theta_R,              d = min(0.999, (s + 1) / (s + 10))
            theta_N <- SGD step on  CE(f_N(x), y)          (own optimiser, weight decay, BatchNorm)
            ema_N <- d * ema_N + (1 - d) * theta_N
            theta_G <- d * theta_G + (1 - d) * (beta * ema_R + (1 - beta) * ema_N)
                       beta = 1 until 2E/3, then linearly to 0.4 at E
            if t >= 75 and (t - 75) % 5 == 0:  theta_R, theta_N <- theta_G       (every batch of it)
        [--piat: theta_R <- alpha_t * theta_R_prev + (1 - alpha_t) * theta_R, theta_R_prev <- theta_R]
        evaluate the GLOBAL learner: clean and PGD-20 accuracy; keep the best and the final checkpoint

`--lam 0` is Generalist's plain robust learner (CE on x' only). The checkpoints' "model" is the global
learner, so evaluate.py and utils.build_model rebuild it like any train_piat.py checkpoint. The file reads
top to bottom: the attack, the regularisation module, the decoupled training module, PIAT, one epoch of
training (rdat_step_ is the inner loop above), the evaluation, train(), then the plumbing and the flags;
docs/method.md has every equation and constant.
"""

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import utils

# The PIAT paper's settings (Sec. V-A), as train_piat.py uses them; small-cnn is ours, for CPU runs.
ARCH_DEFAULTS = {
    "resnet18": {"epochs": 120, "lr": 0.01, "weight_decay": 3.5e-3},
    "wrn-32-10": {"epochs": 180, "lr": 0.1, "weight_decay": 7e-4},
    "small-cnn": {"epochs": 30, "lr": 0.05, "weight_decay": 5e-4},
}
# Generalist's communication: epochs 75, 80, ..., 120 of 120 (1-indexed); scaled to other --epochs.
REFERENCE_EPOCHS, REDISTRIBUTE_FROM, REDISTRIBUTE_EVERY = 120, 75, 5
REDISTRIBUTE_MODES = ("every-batch", "once", "off")
# train_piat.py's columns (accuracies of the GLOBAL learner, train_* of the base learners), then RDAT's own
METRIC_FIELDS = ["epoch", "lr", "alpha", "train_loss", "train_clean_acc", "train_robust_acc", "test_clean_acc",
                 "test_pgd20_acc", "val_clean_acc", "val_pgd20_acc", "epoch_seconds", "images_per_second",
                 "beta", "natural_loss", "redistributed", "robust_learner_clean_acc", "robust_learner_pgd20_acc"]


# ----------------------------------------------------------------------------------------------
# The attack (train_piat.py's, copied so that this script stands alone). Images live in [0, 1].
# ----------------------------------------------------------------------------------------------


def pgd_attack(model, x, y, epsilon, step_size, steps, loss="ce", random_start=True):
    """L-inf PGD maximising `loss` of `model` around x; returns x' with ||x'-x||_inf <= epsilon, x' in [0,1].

    loss: "ce" cross-entropy; "cw" the Carlini-Wagner margin max_{j!=y} f_j - f_y; "kl" TRADES's
    KL(p(x) || p(x')) (y unused). random_start: True or "uniform" draws U(-eps, eps) (Madry et al.);
    "normal" starts at 0.001*N(0, 1), as the official TRADES and MART code does; False starts at x.
    The caller chooses the model's mode (training puts BatchNorm in eval mode first)."""
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


# ----------------------------------------------------------------------------------------------
# The regularisation module: the robust learner's loss (docs/method.md §10)
# ----------------------------------------------------------------------------------------------


def trades_kl(logits_adv, logits_clean):
    """Batch-mean KL(p(x) || p(x')) summed over classes; gradients flow through both, as in TRADES."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")


def rdat_loss(logits_adv, logits_clean, y, lam):
    """CE(f(x'), y) + lam * KL(p(x) || p(x')) (reconstruction): the adversarial CE of Generalist's robust
    learner plus RDAT's regulariser on the distance between the output distributions before and after
    the attack. lam = 0 (logits_clean may then be None) is Generalist's robust learner."""
    loss = F.cross_entropy(logits_adv, y)
    if lam:
        loss = loss + lam * trades_kl(logits_adv, logits_clean)
    return loss


def attack_radius(args):
    """(epsilon, step size) in [0, 1] pixel units; the flags give them in 1/255 units."""
    return args.epsilon / 255, args.step_size / 255


def robust_learner_loss(net, x, y, args):
    """Generate x' on the robust learner (a utils.Network; BatchNorm in eval mode, the attack on
    net.for_attack), then return (loss, logits_adv) of its training forward passes through net.for_step."""
    eps, step = attack_radius(args)
    net.model.eval()
    if args.attack_loss == "kl":
        x_adv = pgd_attack(net.for_attack, x, y, eps, step, args.pgd_steps, loss="kl", random_start="normal")
    else:
        x_adv = pgd_attack(net.for_attack, x, y, eps, step, args.pgd_steps, loss="ce", random_start="uniform")
    net.model.train()
    logits_clean = net.for_step(x).float() if args.lam else None  # the losses run in fp32 under --amp too
    logits_adv = net.for_step(x_adv).float()
    return rdat_loss(logits_adv, logits_clean, y, args.lam), logits_adv


# ----------------------------------------------------------------------------------------------
# The decoupled training module (docs/method.md §10): EMAs, the global learner, beta, redistribution
# ----------------------------------------------------------------------------------------------


def ema_decay(step, max_decay=0.999):
    """d = min(max_decay, (s + 1) / (s + 10)) for an EMA's update number s = 0, 1, ... (Generalist's ramp:
    0.1, 0.18, 0.25, ... up to 0.999 after ~9,000 updates)."""
    return min(max_decay, (step + 1) / (step + 10))


def _float_and_int_tensors(model):
    state = model.state_dict()
    floats = [k for k, v in state.items() if v.is_floating_point()]
    ints = [k for k, v in state.items() if not v.is_floating_point()]
    return state, floats, ints


@torch.no_grad()
def ema_update_(ema_model, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, in place, over every floating-point parameter
    and buffer (BatchNorm's running statistics too); integer buffers (num_batches_tracked) are copied."""
    ema, floats, ints = _float_and_int_tensors(ema_model)
    src = model.state_dict()
    torch._foreach_lerp_([ema[k] for k in floats], [src[k].to(ema[k].dtype) for k in floats], 1.0 - decay)
    for k in ints:
        ema[k].copy_(src[k])


@torch.no_grad()
def mix_global_(global_model, ema_robust, ema_natural, beta, decay):
    """theta_G <- decay * theta_G + (1 - decay) * (beta * ema_R + (1 - beta) * ema_N), in place, over every
    floating-point parameter and buffer; integer buffers take the robust EMA's value."""
    glob, floats, ints = _float_and_int_tensors(global_model)
    r, n = ema_robust.state_dict(), ema_natural.state_dict()
    target = torch._foreach_lerp([n[k] for k in floats], [r[k] for k in floats], beta)  # n + beta * (r - n)
    torch._foreach_lerp_([glob[k] for k in floats], list(target), 1.0 - decay)
    for k in ints:
        glob[k].copy_(r[k])


@torch.no_grad()
def redistribute_(global_model, *learners):
    """Generalist's communication: copy the global learner (parameters and buffers) into each learner.
    The learners' optimiser state (momentum) is left as it is, as in the official code."""
    state = global_model.state_dict()
    for learner in learners:
        learner.load_state_dict(state)


def beta_at(progress, epochs, beta_final=0.4):
    """Weight of the robust EMA in the global learner: 1 until 2E/3, then linearly to beta_final at E
    (Generalist's np.interp(t, [0, E/3, 2E/3, E], [1, 1, 1, 0.4])). `progress` is in epochs and may be
    fractional: 1 at 0 and at 2E/3, (1 + beta_final)/2 at 5E/6, beta_final at E."""
    knee = 2 * epochs / 3
    if progress <= knee:
        return 1.0
    return 1.0 + (beta_final - 1.0) * min(1.0, (progress - knee) / (epochs - knee))


def scaled_redistribution(epochs, start=REDISTRIBUTE_FROM, every=REDISTRIBUTE_EVERY, reference=REFERENCE_EPOCHS):
    """Generalist's (from, every) = (75, 5) of 120 epochs, scaled to `epochs` and rounded half up:
    (floor(75*E/120 + 0.5), max(1, floor(5*E/120 + 0.5))): (75, 5) at 120, (8, 1) at 12, (19, 1) at 30,
    (113, 8) at 180."""
    return max(1, math.floor(start * epochs / reference + 0.5)), max(1, math.floor(every * epochs / reference + 0.5))


def is_redistribution_epoch(epoch, start, every):
    """Whether the (1-indexed) epoch is one on which the global learner is copied back into both learners:
    epoch >= start and (epoch - start) % every == 0 (Generalist: epoch >= 75 and epoch % 5 == 0)."""
    return epoch >= start and (epoch - start) % every == 0


def redistribution_epochs(epochs, start, every):
    """The 1-indexed redistribution epochs of a run of `epochs` epochs: [75, 80, ..., 120] for (120, 75, 5)."""
    return [e for e in range(1, epochs + 1) if is_redistribution_epoch(e, start, every)]


# ----------------------------------------------------------------------------------------------
# PIAT (train_piat.py's, copied), applied to the robust learner with --piat
# ----------------------------------------------------------------------------------------------


def piat_alpha(epoch, alpha_max=0.99, a=1.0, b=10.0):
    """alpha_t = min(alpha_max, (t + a) / (t + b)) (reconstruction of the PIAT paper's Eq. 10): 0.10 at
    t=0, 0.55 at t=10, 0.92 at t=100 with the defaults."""
    return min(alpha_max, (epoch + a) / (epoch + b))


@torch.no_grad()
def interpolate_(model, prev_state, alpha):
    """theta <- alpha * theta_prev + (1 - alpha) * theta, in place (Eq. 9), over every floating-point
    parameter and buffer (so BatchNorm's running statistics too); integer buffers such as
    num_batches_tracked keep their current value."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor.lerp_(prev_state[name].to(tensor.device, tensor.dtype), alpha)


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def piat_step_(model, prev_state, epoch, args):
    """With --piat, the PIAT step after epoch t (Eq. 9-10 of the PIAT paper): alpha_t from the schedule (or
    --alpha-fixed), theta <- alpha_t * theta_prev + (1 - alpha_t) * theta in place, theta_prev <- theta.
    Returns (alpha_t, the new theta_prev). Without --piat nothing changes and alpha is 0."""
    if not args.piat:
        return 0.0, prev_state
    alpha = args.alpha_fixed
    if alpha is None:
        alpha = piat_alpha(epoch, args.alpha_max, args.alpha_a, args.alpha_b)
    interpolate_(model, prev_state, alpha)
    return alpha, clone_state(model)


# ----------------------------------------------------------------------------------------------
# One epoch of training: for each batch, both learners' steps, the EMAs and the global learner
# ----------------------------------------------------------------------------------------------


class Learners(NamedTuple):
    """RDAT's five models. The robust and natural learners are trained (each a utils.Network: the module,
    the module the attacks call, the module the training step calls); their EMAs are averaged copies;
    the global learner mixes the EMAs and is what is evaluated, logged and saved."""

    robust: utils.Network
    natural: utils.Network
    ema_robust: torch.nn.Module
    ema_natural: torch.nn.Module
    global_: utils.Network


def lr_at(progress, lr, epochs):
    """The PIAT paper's schedule: lr until half-way, then linearly to lr/10 at 3/4 and lr/100 at the end.
    `progress` is in epochs and may be fractional (the lr changes every step)."""
    knots = [(0.0, lr), (0.5 * epochs, lr), (0.75 * epochs, lr / 10), (float(epochs), lr / 100)]
    for (e0, v0), (e1, v1) in zip(knots, knots[1:]):
        if progress <= e1:
            return v0 if e1 == e0 else v0 + (v1 - v0) * (progress - e0) / (e1 - e0)
    return knots[-1][1]


def rdat_step_(learners, optimizers, ema_steps, x, y, args, beta, redistribute):
    """One batch of RDAT, in the order of the module docstring. `ema_steps` (each EMA's update count s) is
    advanced in place. Returns (robust loss, natural loss, robust learner's logits_adv, natural logits)."""
    optimizer, natural_optimizer = optimizers
    # the robust learner: PGD examples, CE + lam * KL (the regularisation module), then its EMA
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        loss, logits_adv = robust_learner_loss(learners.robust, x, y, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema_update_(learners.ema_robust, learners.robust.model, ema_decay(ema_steps["robust"], args.ema_decay))
    ema_steps["robust"] += 1
    # the natural learner: clean examples only, then its EMA
    learners.natural.model.train()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        logits_natural = learners.natural.for_step(x).float()
        natural_loss = F.cross_entropy(logits_natural, y)
    natural_optimizer.zero_grad(set_to_none=True)
    natural_loss.backward()
    natural_optimizer.step()
    ema_update_(learners.ema_natural, learners.natural.model, ema_decay(ema_steps["natural"], args.ema_decay))
    ema_steps["natural"] += 1
    # the global learner, and its copy back into both learners on redistribution epochs
    mix_global_(learners.global_.model, learners.ema_robust, learners.ema_natural, beta,
                ema_decay(ema_steps["global"], args.ema_decay))
    ema_steps["global"] += 1
    if redistribute:
        redistribute_(learners.global_.model, learners.robust.model, learners.natural.model)
    return loss, natural_loss, logits_adv, logits_natural


def train_one_epoch(learners, optimizers, ema_steps, x_train, y_train, flip, args, epoch, rank=0, world_size=1):
    """The inner loop: rdat_step_ on every batch, both learners at the same learning rate, beta at the
    fractional epoch after the step. Returns the epoch's training columns of metrics.csv (summed over all
    ranks, whose floating-point buffers are then averaged so every rank holds the same five models)."""
    start = time.time()
    redistributing = args.redistribute_mode != "off" and is_redistribution_epoch(
        epoch + 1, args.redistribute_from, args.redistribute_every)
    n_steps = utils.steps_per_epoch(len(x_train), args.batch_size, world_size)
    # robust loss sum, natural clean correct, robust adversarial correct, images, natural loss sum
    totals = torch.zeros(5, device=x_train.device)
    for i, x, y in utils.epoch_batches(x_train, y_train, args, epoch, flip, rank, world_size):
        lr = lr_at(epoch + i / n_steps, args.lr, args.epochs)
        beta = beta_at(epoch + (i + 1) / n_steps, args.epochs, args.beta_final)
        for group in optimizers[0].param_groups + optimizers[1].param_groups:
            group["lr"] = lr  # both learners get the same lr every step (Generalist)
        redistribute = redistributing and (args.redistribute_mode == "every-batch" or i == n_steps - 1)
        loss, natural_loss, logits_adv, logits_natural = rdat_step_(learners, optimizers, ema_steps, x, y, args,
                                                                    beta, redistribute)
        # a nan/inf loss stops the run (utils.Diverged); checked after rdat_step_'s steps, which only touch the
        # weights in memory: nothing of this epoch is saved yet, so the checkpoints keep the last finite weights
        utils.check_finite(epoch, i, robust_learner_loss=loss, natural_learner_loss=natural_loss)
        # accumulated on the device: no host synchronisation inside the loop
        totals[0] += loss.detach() * len(y)
        totals[1] += (logits_natural.argmax(1) == y).sum()
        totals[2] += (logits_adv.argmax(1) == y).sum()
        totals[3] += len(y)
        totals[4] += natural_loss.detach() * len(y)
    utils.all_reduce_sum_(totals)
    for model in (learners.robust.model, learners.natural.model, learners.ema_robust, learners.ema_natural,
                  learners.global_.model):
        utils.average_buffers_(model)  # identical BatchNorm statistics on every rank
    loss_sum, clean_correct, robust_correct, seen, natural_loss_sum = totals.tolist()
    return {"lr": lr, "train_loss": loss_sum / seen, "train_clean_acc": clean_correct / seen,
            "train_robust_acc": robust_correct / seen, "beta": beta, "natural_loss": natural_loss_sum / seen,
            "redistributed": int(redistributing), "images_per_second": seen / (time.time() - start)}


# ----------------------------------------------------------------------------------------------
# The per-epoch evaluation (train_piat.py's, copied)
# ----------------------------------------------------------------------------------------------


def evaluate(model, x_all, y_all, epsilon, step_size, steps, batch_size, desc="eval", rank=0, world_size=1):
    """Clean and PGD accuracy of uint8 images x_all (epsilon, step_size in [0, 1] units), in fp32.
    Under torchrun each rank attacks its share and the counts are summed."""
    model.eval()
    x_all, y_all = x_all[rank::world_size], y_all[rank::world_size]
    counts = torch.zeros(3, device=x_all.device)  # clean correct, robust correct, images
    for i in utils.progress(range(0, len(x_all), batch_size), desc=desc, disable=rank != 0 or None):
        x, y = utils.to_float(x_all[i : i + batch_size]), y_all[i : i + batch_size]
        with torch.no_grad():
            counts[0] += (model(x).argmax(1) == y).sum()
        x_adv = pgd_attack(model, x, y, epsilon, step_size, steps)
        with torch.no_grad():
            counts[1] += (model(x_adv).argmax(1) == y).sum()
        counts[2] += len(y)
    clean, robust, n = utils.all_reduce_sum_(counts).tolist()
    return clean / max(n, 1), robust / max(n, 1)


def evaluate_epoch(learners, split, args, rank=0, world_size=1):
    """The evaluation columns of metrics.csv: the GLOBAL learner's clean and PGD-20 accuracy on the test
    subset (and the held-out images with --val-size); with --eval-robust-learner, the robust learner's too."""
    eps, step = attack_radius(args)
    setting = dict(epsilon=eps, step_size=step, steps=args.eval_pgd_steps, batch_size=args.eval_batch_size,
                   rank=rank, world_size=world_size)
    evaluated = learners.global_.for_attack
    row = dict(zip(("test_clean_acc", "test_pgd20_acc"), evaluate(evaluated, *split["test"], desc="test", **setting)))
    if args.val_size:
        row.update(zip(("val_clean_acc", "val_pgd20_acc"), evaluate(evaluated, *split["val"], desc="val", **setting)))
    if args.eval_robust_learner:
        accuracies = evaluate(learners.robust.for_attack, *split["test"], desc="test (robust learner)", **setting)
        row.update(zip(("robust_learner_clean_acc", "robust_learner_pgd20_acc"), accuracies))
    return row


# ----------------------------------------------------------------------------------------------
# The run (the module docstring's loop)
# ----------------------------------------------------------------------------------------------


def train(args, resume, rank, world_size, device):
    """The module docstring's loop on this process's share of every batch; returns the run folder on rank 0."""
    is_main = rank == 0
    utils.resolve_amp(args, device)
    utils.check_processes(args, world_size, device)
    # set up: the data; both learners, their EMAs and the global learner; two optimisers; theta_prev
    utils.seed_everything(args.seed)  # the same initial weights on every rank
    data = utils.load_dataset(args.dataset, args.data_dir, args.image_size)
    split = utils.split_data(data, args, device)
    robust, natural = build_learners(args, data, device, rank, world_size)
    # the EMAs start as copies of their learners, the global learner as a copy of the natural one (Generalist)
    ema_robust, ema_natural, global_model = (copy.deepcopy(m).requires_grad_(False).eval()
                                             for m in (robust, natural, natural))
    optimizers = make_optimizers(robust, natural, args)
    prev_state = clone_state(robust) if args.piat else None  # theta_prev starts as the initial weights
    ema_steps, metrics = {"robust": 0, "natural": 0, "global": 0}, []  # each EMA's own update counter s
    if resume is not None:
        prev_state, ema_steps, metrics = restore_training_state_(
            resume, (global_model, robust, natural, ema_robust, ema_natural), optimizers, args, rank)
    run_dir = utils.open_run_dir(args, resume is not None, is_main)
    learners = Learners(utils.wrap_network(robust, args.compile, world_size),
                        utils.wrap_network(natural, args.compile, world_size), ema_robust, ema_natural,
                        utils.wrap_network(global_model, args.compile))
    log = utils.MetricsLog(run_dir / "metrics.csv", METRIC_FIELDS, metrics, args) if is_main else None
    if is_main:
        announce(args, len(split["train"][0]), world_size, device, run_dir)

    for epoch in range(len(metrics), args.epochs):
        start = time.time()
        # for each batch: both learners' steps, their EMAs, the global learner, redistribution
        trained = train_one_epoch(learners, optimizers, ema_steps, *split["train"], data.flip, args, epoch, rank,
                                  world_size)
        # --piat: interpolate the robust learner with its previous epoch's interpolated weights
        alpha, prev_state = piat_step_(robust, prev_state, epoch, args)
        # evaluate the global learner
        row = {"epoch": epoch + 1, "lr": trained.pop("lr"), "alpha": alpha, **trained,
               **evaluate_epoch(learners, split, args, rank, world_size)}
        row["epoch_seconds"] = time.time() - start
        metrics.append(row)
        # never save weights that are not finite
        utils.check_finite_weights(epoch, global_learner=global_model, robust_learner=robust, natural_learner=natural)
        # keep the best and the final checkpoint of the global learner (final.pt with all five models)
        training_state = {"robust": robust.state_dict(), "natural": natural.state_dict(),
                          "ema_robust": ema_robust.state_dict(), "ema_natural": ema_natural.state_dict(),
                          "ema_steps": dict(ema_steps), "optimizer": optimizers[0].state_dict(),
                          "natural_optimizer": optimizers[1].state_dict(), "prev_state": prev_state,
                          "rng": utils.all_rng_states()}
        if is_main:
            utils.write_epoch(run_dir, checkpoint_dict(global_model, data, args, metrics), training_state, metrics,
                              utils.selection_metric(args), log, title=f"{run_title(args)} (global learner)")
            print_epoch(row, args)

    # every rank must end with the same weights: the global learner (what is saved) and both base learners
    utils.check_ranks_agree([global_model, robust, natural], ["global learner", "robust learner", "natural learner"],
                            world_size)
    if not is_main:
        return None
    log.close()
    utils.report_done(metrics, utils.selection_metric(args), run_dir)
    return run_dir


# ----------------------------------------------------------------------------------------------
# The run's plumbing: the learners, resume, checkpoints, messages
# ----------------------------------------------------------------------------------------------


def build_learners(args, data, device, rank, world_size):
    """The robust and the natural learner (the same initial weights with --natural-init same), on `device`."""
    robust = utils.build_model(args.arch, data.num_classes, data.mean, data.std)
    if args.natural_init == "same":
        natural = copy.deepcopy(robust)  # Generalist's official code: model_st = deepcopy(model_at)
    else:
        natural = utils.build_model(args.arch, data.num_classes, data.mean, data.std)
    if world_size > 1:
        utils.seed_everything(args.seed + rank)  # augmentation and attack noise differ between ranks
    return (utils.prepare_module(robust, args, device, world_size),
            utils.prepare_module(natural, args, device, world_size))


def make_optimizers(robust, natural, args):
    """One SGD per learner: the same learning rate and momentum, each its own weight decay."""
    return (torch.optim.SGD(robust.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay),
            torch.optim.SGD(natural.parameters(), lr=args.lr, momentum=args.momentum,
                            weight_decay=args.natural_weight_decay))


def restore_training_state_(resume, models, optimizers, args, rank):
    """Load an interrupted run's five models (global, robust, natural, robust EMA, natural EMA), both
    optimizers and the RNG states; returns (theta_prev, the EMA counters, metrics so far)."""
    state = resume["resume"]
    global_model, *others = models
    utils.load_resumed_state(global_model, resume["model"], args, "global learner")
    for model, key in zip(others, ("robust", "natural", "ema_robust", "ema_natural")):
        utils.load_resumed_state(model, state.get(key), args, key.replace("_", " ") + " learner")
    optimizers[0].load_state_dict(state["optimizer"])
    optimizers[1].load_state_dict(state["natural_optimizer"])
    utils.restore_rng_states(state["rng"], rank)
    if rank == 0:
        print(f"resuming {Path(args.resume)} after epoch {resume['epoch']} of {args.epochs}")
    return state["prev_state"], dict(state["ema_steps"]), resume["metrics"]


def checkpoint_dict(model, data, args, metrics):
    """`model` is the global learner: what evaluate.py and utils.build_model rebuild."""
    return {"model": model.state_dict(), "arch": args.arch, "model_kwargs": {}, "num_classes": data.num_classes,
            "mean": data.mean, "std": data.std, "image_shape": data.image_shape, "args": vars(args), "metrics": metrics,
            "epoch": len(metrics), "script": "train_rdat.py"}


def run_title(args):
    return f"{args.arch} {args.dataset} {args.method}"


def announce(args, n_train, world_size, device, run_dir):
    schedule = redistribution_epochs(args.epochs, args.redistribute_from, args.redistribute_every)
    shown = ", ".join(map(str, schedule[:4])) + (f", ..., {schedule[-1]}" if len(schedule) > 4 else "")
    print(f"{args.arch} on {args.dataset}: {n_train} training images, {args.method} (lam {args.lam:g}), "
          f"redistribution {args.redistribute_mode}"
          f"{f' on epochs {shown}' if args.redistribute_mode != 'off' and schedule else ''}, {args.epochs} epochs "
          f"on {world_size} x {device}, {utils.precision(args.amp, device)}{', compiled' if args.compile else ''}; "
          f"writing {run_dir}")


def print_epoch(row, args):
    print(f"epoch {row['epoch']:3d}  lr {row['lr']:.5f}  beta {row['beta']:.3f}  alpha {row['alpha']:.3f}"
          f"{'  redistributed' if row['redistributed'] else ''}  loss R/N {row['train_loss']:.4f}/"
          f"{row['natural_loss']:.4f}  train N clean/R robust {row['train_clean_acc']:.3f}/"
          f"{row['train_robust_acc']:.3f}  global test clean/PGD-{args.eval_pgd_steps} "
          f"{row['test_clean_acc']:.3f}/{row['test_pgd20_acc']:.3f}  {row['epoch_seconds']:.1f}s", flush=True)


# ----------------------------------------------------------------------------------------------
# The flags (python train_rdat.py --help), grouped as --help shows them
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_run_arguments(p, exp_name=os.path.basename(__file__)[: -len(".py")])
    add_speed_arguments(p)
    utils.add_data_arguments(p)
    add_model_arguments(p)
    add_attack_arguments(p)
    add_rdat_arguments(p)
    add_piat_arguments(p)
    args = p.parse_args(argv)
    fill_defaults(args)
    return args


def add_speed_arguments(p):
    g = p.add_argument_group("speed (multi-GPU: torchrun --nproc_per_node=N train_rdat.py ...)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast for both learners' training steps and the training attack (default: on "
                        "where it pays: CUDA, and CPUs with AMX; fp32 elsewhere, also on CPUs with only AVX512_BF16, "
                        "where it measured slower; --amp and --no-amp force it); the EMAs, the mixing and the "
                        "per-epoch evaluation always run in fp32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile both learners and the global learner (the attacks run compiled too)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, both learners' BatchNorm statistics over the global batch (SyncBatchNorm, "
                        "CUDA only)")


def add_model_arguments(p):
    pos_int = utils.positive(int)
    nonneg_float = utils.non_negative(float)
    g = p.add_argument_group("model and optimisers (both learners: SGD, the same learning rate every step)")
    g.add_argument("--arch", type=str, default="resnet18", choices=utils.ARCHS, help="network of all five models")
    g.add_argument("--epochs", type=pos_int, default=None,
                   help="epochs (default: 120 resnet18, 180 wrn-32-10, 30 small-cnn)")
    g.add_argument("--batch-size", type=pos_int, default=128,
                   help="training batch size (both learners see the same batch)")
    g.add_argument("--eval-batch-size", type=pos_int, default=256, help="batch size of the per-epoch evaluation")
    g.add_argument("--lr", type=nonneg_float, default=None,
                   help="initial learning rate of both learners, held for the first half of training, then linearly "
                        "to lr/10 at 3/4 and lr/100 at the end (train_piat.py's schedule, ours for RDAT; default: "
                        "0.01 resnet18, 0.1 wrn-32-10, 0.05 small-cnn)")
    g.add_argument("--momentum", type=utils.unit_interval, default=0.9, help="SGD momentum of both learners")
    g.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help="the robust learner's weight decay (default: 3.5e-3 resnet18, 7e-4 wrn-32-10, 5e-4 small-cnn)")
    g.add_argument("--natural-weight-decay", type=nonneg_float, default=5e-4,
                   help="the natural learner's weight decay (default 5e-4: ours, from Generalist's official code)")
    g.add_argument("--natural-init", type=str, default="same", choices=("same", "independent"),
                   help="same: the natural learner starts as a copy of the robust learner (default, ours: Generalist's "
                        "official code deep-copies it); independent: its own random initialisation")


def add_attack_arguments(p):
    nonneg_int = utils.non_negative(int)
    g = p.add_argument_group("attack (epsilon and step size in 1/255 units)")
    g.add_argument("--epsilon", type=utils.pixel_units, default=8.0,
                   help="L-inf radius of the training and evaluation attacks")
    g.add_argument("--step-size", type=utils.pixel_units, default=2.0, help="PGD step size")
    g.add_argument("--pgd-steps", type=nonneg_int, default=10, help="PGD steps of the training attack")
    g.add_argument("--eval-pgd-steps", type=nonneg_int, default=20, help="PGD steps of the per-epoch evaluation")
    g.add_argument("--attack-loss", type=str, default="ce", choices=("ce", "kl"),
                   help="what the training attack on the robust learner maximises: ce, cross-entropy from a uniform "
                        "start (default, ours: Generalist's attack); kl, KL(p(x) || p(x')) from x + 0.001*N(0,1) "
                        "(TRADES's)")


def add_rdat_arguments(p):
    pos_int = utils.positive(int)
    nonneg_float = utils.non_negative(float)
    g = p.add_argument_group("RDAT (reconstruction: every default below is ours, not the RDAT paper's, whose text is "
                             "not public)")
    g.add_argument("--lam", type=nonneg_float, default=6.0,
                   help="the regularisation module: the robust learner's loss is CE(f(x'), y) + lam * KL(p(x) || "
                        "p(x')), p(x) from its own train-mode clean forward, not detached (TRADES's KL); default 6 "
                        "(ours: TRADES's weight); 0 gives Generalist's plain robust learner")
    g.add_argument("--ema-decay", type=utils.unit_interval, default=0.999,
                   help="maximum EMA decay: d = min(ema_decay, (s + 1) / (s + 10)), s the EMA's own update count, "
                        "updated every batch, for both EMAs and the global learner (default 0.999: ours, from "
                        "Generalist's official code)")
    g.add_argument("--beta-final", type=utils.unit_interval, default=0.4,
                   help="weight of the robust EMA in the global learner: beta = 1 until 2E/3, then linearly to "
                        "beta_final at E, evaluated every step at the fractional epoch after the step (default 0.4: "
                        "ours, from Generalist's official code)")
    g.add_argument("--redistribute-from", type=pos_int, default=None,
                   help="first (1-indexed) epoch on which the global learner is copied back into both learners "
                        "(default: ours, Generalist's 75 of 120 epochs scaled to E: floor(75*E/120 + 0.5); a given "
                        "value is used as is)")
    g.add_argument("--redistribute-every", type=pos_int, default=None,
                   help="then every this many epochs: epochs t >= from with (t - from) %% every == 0 (default: ours, "
                        "Generalist's 5 of 120 epochs scaled to E: max(1, floor(5*E/120 + 0.5)); a given value is "
                        "used as is)")
    g.add_argument("--redistribute-mode", type=str, default="every-batch", choices=REDISTRIBUTE_MODES,
                   help="every-batch: the copy happens after EVERY batch of a redistribution epoch (default, ours: "
                        "what Generalist's official code does); once: once per redistribution epoch, after its last "
                        "batch; off: never")
    g.add_argument("--eval-robust-learner", action="store_true",
                   help="also evaluate the robust learner alone every epoch (columns robust_learner_clean_acc and "
                        "robust_learner_pgd20_acc; doubles the evaluation time)")


def add_piat_arguments(p):
    g = p.add_argument_group("PIAT on the robust learner: theta_R <- alpha*theta_R_prev + (1-alpha)*theta_R "
                             "after every epoch (a combination neither paper tried)")
    g.add_argument("--piat", action=argparse.BooleanOptionalAction, default=False,
                   help="interpolate the robust learner after every epoch (off by default: RDAT has no interpolation)")
    g.add_argument("--alpha-max", type=utils.unit_interval, default=0.99,
                   help="alpha_t = min(alpha_max, (t+a)/(t+b)), t the 0-indexed epoch (train_piat.py's reconstruction "
                        "of the PIAT paper's Eq. 10)")
    g.add_argument("--alpha-a", type=utils.non_negative(float), default=1.0, help="a in alpha_t (reconstruction)")
    g.add_argument("--alpha-b", type=utils.positive(float), default=10.0, help="b in alpha_t (reconstruction)")
    g.add_argument("--alpha-fixed", type=utils.unit_interval, default=None, help="a constant alpha instead")


def fill_defaults(args):
    if args.data_dir is None and not args.resume:  # a resumed run keeps its own
        args.data_dir = "./data"
    for key, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    start, every = scaled_redistribution(args.epochs)
    if args.redistribute_from is None:
        args.redistribute_from = start
    if args.redistribute_every is None:
        args.redistribute_every = every
    # a label for tables (evaluate.py may read it): what this combination of flags is
    args.method = ("RDAT" if args.lam > 0 else "Generalist") + (" + PIAT" if args.piat else "")


def main(argv=None):
    args = parse_args(argv)
    resume = None
    if args.resume:  # the interrupted run's own flags, its model and training state
        args, resume = utils.resume_run(args, "train_rdat.py")
    rank, world_size, device = utils.setup_distributed(args.device)
    try:
        with utils.run_guard(__file__):  # stop signals, and status.json when the run stops early
            return train(args, resume, rank, world_size, device)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit code of its own for each way a run stops early
