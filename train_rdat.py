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
        for each batch (x, y):
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
learner, so evaluate.py and utils.build_model rebuild it like any train_piat.py checkpoint.
"""

import copy
import math
import os
import sys
import time
from pathlib import Path

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


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=utils.argparse.RawDescriptionHelpFormatter)
    nonneg_int, nonneg_float = utils.non_negative(int), utils.non_negative(float)
    pos_int = utils.positive(int)
    g = p.add_argument_group("run")
    g.add_argument("--exp-name", type=str, default=os.path.basename(__file__)[: -len(".py")],
                   help="name used in the run folder (default: the script's name)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random number generator")
    g.add_argument("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--out-dir", type=str, default=None,
                   help="run folder (default: runs/<dataset>__<exp-name>__<seed>__<unix time>)")
    g.add_argument("--resume", type=str, default=None, metavar="RUN_DIR",
                   help="continue the interrupted run in RUN_DIR from its final.pt, with the flags it was started with")
    g = p.add_argument_group("speed (multi-GPU: torchrun --nproc_per_node=N train_rdat.py ...)")
    g.add_argument("--amp", action=utils.argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast for both learners' training steps and the training attack (default: on "
                        "for CUDA, off on CPU); the EMAs, the mixing and the per-epoch evaluation always run in fp32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile both learners and the global learner (the attacks run compiled too)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, both learners' BatchNorm statistics over the global batch (SyncBatchNorm, "
                        "CUDA only)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="cifar10", choices=utils.DATASETS,
                   help="cifar10/cifar100/svhn are downloaded into --data-dir; imagefolder reads --data-dir/train and "
                        "--data-dir/test; synthetic is a small learnable set made in memory")
    g.add_argument("--data-dir", type=str, default=None,
                   help="where data sets are stored or downloaded (default: ./data, or the resumed run's)")
    g.add_argument("--image-size", type=pos_int, default=None, help="resize image-folder images to this size")
    g.add_argument("--train-size", type=pos_int, default=None, help="train on a fixed subset of N images")
    g.add_argument("--val-size", type=nonneg_int, default=0,
                   help="hold out N training images and select best.pt on the global learner's PGD-20 accuracy on "
                        "them instead of the test set's")
    g.add_argument("--eval-size", type=pos_int, default=1000,
                   help="evaluate the global learner after every epoch on a fixed subset of N test images")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="turn off random crop (4-pixel padding) and horizontal flip (never used for SVHN)")
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
    g.add_argument("--momentum", type=nonneg_float, default=0.9, help="SGD momentum of both learners")
    g.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help="the robust learner's weight decay (default: 3.5e-3 resnet18, 7e-4 wrn-32-10, 5e-4 small-cnn)")
    g.add_argument("--natural-weight-decay", type=nonneg_float, default=5e-4,
                   help="the natural learner's weight decay (default 5e-4: ours, from Generalist's official code)")
    g.add_argument("--natural-init", type=str, default="same", choices=("same", "independent"),
                   help="same: the natural learner starts as a copy of the robust learner (default, ours: Generalist's "
                        "official code deep-copies it); independent: its own random initialisation")
    g = p.add_argument_group("attack (epsilon and step size in 1/255 units)")
    g.add_argument("--epsilon", type=nonneg_float, default=8.0,
                   help="L-inf radius of the training and evaluation attacks")
    g.add_argument("--step-size", type=nonneg_float, default=2.0, help="PGD step size")
    g.add_argument("--pgd-steps", type=nonneg_int, default=10, help="PGD steps of the training attack")
    g.add_argument("--eval-pgd-steps", type=nonneg_int, default=20, help="PGD steps of the per-epoch evaluation")
    g.add_argument("--attack-loss", type=str, default="ce", choices=("ce", "kl"),
                   help="what the training attack on the robust learner maximises: ce, cross-entropy from a uniform "
                        "start (default, ours: Generalist's attack); kl, KL(p(x) || p(x')) from x + 0.001*N(0,1) "
                        "(TRADES's)")
    g = p.add_argument_group("RDAT (reconstruction: every default below is ours, not the RDAT paper's, whose text is "
                             "not public)")
    g.add_argument("--lam", type=nonneg_float, default=6.0,
                   help="the regularisation module: the robust learner's loss is CE(f(x'), y) + lam * KL(p(x) || "
                        "p(x')), p(x) from its own train-mode clean forward, not detached (TRADES's KL); default 6 "
                        "(ours: TRADES's weight); 0 gives Generalist's plain robust learner")
    g.add_argument("--ema-decay", type=nonneg_float, default=0.999,
                   help="maximum EMA decay: d = min(ema_decay, (s + 1) / (s + 10)), s the EMA's own update count, "
                        "updated every batch, for both EMAs and the global learner (default 0.999: ours, from "
                        "Generalist's official code)")
    g.add_argument("--beta-final", type=nonneg_float, default=0.4,
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
    g = p.add_argument_group("PIAT on the robust learner: theta_R <- alpha*theta_R_prev + (1-alpha)*theta_R "
                             "after every epoch (a combination neither paper tried)")
    g.add_argument("--piat", action=utils.argparse.BooleanOptionalAction, default=False,
                   help="interpolate the robust learner after every epoch (off by default: RDAT has no interpolation)")
    g.add_argument("--alpha-max", type=nonneg_float, default=0.99,
                   help="alpha_t = min(alpha_max, (t+a)/(t+b)), t the 0-indexed epoch (train_piat.py's reconstruction "
                        "of the PIAT paper's Eq. 10)")
    g.add_argument("--alpha-a", type=float, default=1.0, help="a in alpha_t (reconstruction)")
    g.add_argument("--alpha-b", type=float, default=10.0, help="b in alpha_t (reconstruction)")
    g.add_argument("--alpha-fixed", type=nonneg_float, default=None, help="a constant alpha instead")
    args = p.parse_args(argv)
    validate_and_fill(args)
    return args


def validate_and_fill(args):
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
    for flag in ("beta_final", "ema_decay", "alpha_max", "alpha_fixed"):
        value = getattr(args, flag)
        if value is not None and not value <= 1:
            raise utils.UserError(f"--{flag.replace('_', '-')} must lie in [0, 1], got {value}")
    # a label for tables (evaluate.py may read it): what this combination of flags is
    args.method = ("RDAT" if args.lam > 0 else "Generalist") + (" + PIAT" if args.piat else "")


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
# The regularisation module: the robust learner's loss
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


def robust_learner_loss(model, x, y, args, net=None):
    """Generate x' on the robust learner (BatchNorm in eval mode), then return (loss, logits_adv) of its
    training forward passes. The attack runs on `model` itself; the training forwards go through `net`,
    the model's DistributedDataParallel wrapper when there is one."""
    net = model if net is None else net
    eps, step = args.epsilon / 255, args.step_size / 255
    model.eval()
    if args.attack_loss == "kl":
        x_adv = pgd_attack(model, x, y, eps, step, args.pgd_steps, loss="kl", random_start="normal")
    else:
        x_adv = pgd_attack(model, x, y, eps, step, args.pgd_steps, loss="ce", random_start="uniform")
    model.train()
    logits_clean = net(x).float() if args.lam else None  # the losses run in fp32 under --amp too
    logits_adv = net(x_adv).float()
    return rdat_loss(logits_adv, logits_clean, y, args.lam), logits_adv


# ----------------------------------------------------------------------------------------------
# The decoupled training module: EMAs, the global learner, the beta schedule, redistribution
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


# ----------------------------------------------------------------------------------------------
# The per-epoch evaluation and the learning rate (train_piat.py's, copied)
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


def lr_at(progress, lr, epochs):
    """The PIAT paper's schedule: lr until half-way, then linearly to lr/10 at 3/4 and lr/100 at the end.
    `progress` is in epochs and may be fractional (the lr changes every step)."""
    knots = [(0.0, lr), (0.5 * epochs, lr), (0.75 * epochs, lr / 10), (float(epochs), lr / 100)]
    for (e0, v0), (e1, v1) in zip(knots, knots[1:]):
        if progress <= e1:
            return v0 if e1 == e0 else v0 + (v1 - v0) * (progress - e0) / (e1 - e0)
    return knots[-1][1]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

# train_piat.py's columns (accuracies of the GLOBAL learner, train_* of the base learners), then RDAT's own
METRIC_FIELDS = ["epoch", "lr", "alpha", "train_loss", "train_clean_acc", "train_robust_acc", "test_clean_acc",
                 "test_pgd20_acc", "val_clean_acc", "val_pgd20_acc", "epoch_seconds", "images_per_second",
                 "beta", "natural_loss", "redistributed", "robust_learner_clean_acc", "robust_learner_pgd20_acc"]


def split_data(data, args, device):
    """Fixed subsets (the same for every seed): validation images held out of training, training
    subset, and the evaluation subset of the test set. Moved to `device` once, as uint8."""
    order = utils.fixed_subset(len(data.x_train), None)
    if args.val_size >= len(order):
        raise utils.UserError(f"--val-size {args.val_size} leaves no training images (the set has {len(order)})")
    val_idx, train_idx = order[: args.val_size], order[args.val_size :]
    if args.train_size is not None:
        train_idx = train_idx[: args.train_size]
    test_idx = utils.fixed_subset(len(data.x_test), args.eval_size)
    return {"train": (data.x_train[train_idx].to(device), data.y_train[train_idx].to(device)),
            "val": (data.x_train[val_idx].to(device), data.y_train[val_idx].to(device)),
            "test": (data.x_test[test_idx].to(device), data.y_test[test_idx].to(device))}


def make_run_dir(args):
    if args.out_dir is None:
        args.out_dir = f"runs/{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.out_dir)
    if (run_dir / "final.pt").exists():
        raise utils.UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                              "or choose another --out-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def checkpoint_dict(model, data, args, metrics, epoch):
    """`model` is the global learner: what evaluate.py and utils.build_model rebuild."""
    return {"model": model.state_dict(), "arch": args.arch, "model_kwargs": {}, "num_classes": data.num_classes,
            "mean": data.mean, "std": data.std, "image_shape": data.image_shape, "args": vars(args), "metrics": metrics,
            "epoch": epoch, "script": "train_rdat.py"}


def main(argv=None):
    args = parse_args(argv)
    resume = None
    if args.resume:  # the interrupted run's own flags, its model and training state
        args, resume = utils.resume_run(args, "train_rdat.py")
    rank, world_size, device = utils.setup_distributed(args.device)
    try:
        return train(args, resume, rank, world_size, device)
    finally:
        utils.cleanup_distributed()


def load_state(model, state, args, what):
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise utils.UserError(f"{args.resume}/final.pt: the {what} does not fit a {args.arch}: "
                              f"{str(err).splitlines()[0]}") from None


def train(args, resume, rank, world_size, device):
    if args.amp is None:
        args.amp = device.type == "cuda"
    if args.batch_size % world_size:
        raise utils.UserError(f"--batch-size {args.batch_size} (the global batch) must divide among "
                              f"{world_size} processes")
    if args.sync_bn and device.type != "cuda":
        raise utils.UserError("--sync-bn needs one CUDA device per process")
    utils.seed_everything(args.seed)  # the same initial weights on every rank
    is_main = rank == 0

    data = utils.load_dataset(args.dataset, args.data_dir, args.image_size)
    split = split_data(data, args, device)
    x_train, y_train = split["train"]
    robust = utils.build_model(args.arch, data.num_classes, data.mean, data.std).to(device)
    if args.natural_init == "same":
        natural = copy.deepcopy(robust)  # Generalist's official code: model_st = deepcopy(model_at)
    else:
        natural = utils.build_model(args.arch, data.num_classes, data.mean, data.std).to(device)
    if world_size > 1:
        utils.seed_everything(args.seed + rank)  # augmentation and attack noise differ between ranks
    if device.type == "cuda":
        robust = robust.to(memory_format=torch.channels_last)
        natural = natural.to(memory_format=torch.channels_last)
    if args.sync_bn and world_size > 1:
        robust = torch.nn.SyncBatchNorm.convert_sync_batchnorm(robust)
        natural = torch.nn.SyncBatchNorm.convert_sync_batchnorm(natural)
    # the EMAs start as copies of their learners, the global learner as a copy of the natural one (Generalist)
    ema_robust, ema_natural, global_model = (copy.deepcopy(m).requires_grad_(False).eval()
                                             for m in (robust, natural, natural))
    optimizer = torch.optim.SGD(robust.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    natural_optimizer = torch.optim.SGD(natural.parameters(), lr=args.lr, momentum=args.momentum,
                                        weight_decay=args.natural_weight_decay)
    prev_state = clone_state(robust) if args.piat else None  # theta_prev starts as the initial weights
    ema_steps = {"robust": 0, "natural": 0, "global": 0}  # each EMA's own update counter s
    metrics, start_epoch = [], 0
    if resume is not None:
        state = resume["resume"]
        load_state(global_model, resume["model"], args, "global learner")
        for model, key in ((robust, "robust"), (natural, "natural"), (ema_robust, "ema_robust"),
                           (ema_natural, "ema_natural")):
            load_state(model, state.get(key), args, key.replace("_", " ") + " learner")
        optimizer.load_state_dict(state["optimizer"])
        natural_optimizer.load_state_dict(state["natural_optimizer"])
        prev_state, ema_steps = state["prev_state"], dict(state["ema_steps"])
        metrics, start_epoch = resume["metrics"], resume["epoch"]
        utils.restore_rng_states(state["rng"], rank)
        run_dir = Path(args.resume)
        if is_main:
            print(f"resuming {run_dir} after epoch {start_epoch} of {args.epochs}")
    elif is_main:
        run_dir = make_run_dir(args)
        utils.save_json(vars(args), run_dir / "args.json")
    # the attack runs on the robust learner itself, the training steps through DDP; all may be compiled
    attacked = robust_net = torch.compile(robust) if args.compile else robust
    natural_net = torch.compile(natural) if args.compile else natural
    evaluated = torch.compile(global_model) if args.compile else global_model
    if world_size > 1:
        robust_net = torch.nn.parallel.DistributedDataParallel(robust, broadcast_buffers=False)
        natural_net = torch.nn.parallel.DistributedDataParallel(natural, broadcast_buffers=False)
        if args.compile:
            robust_net, natural_net = torch.compile(robust_net), torch.compile(natural_net)
    log = utils.MetricsLog(run_dir / "metrics.csv", METRIC_FIELDS, metrics) if is_main else None
    select_on = "val_pgd20_acc" if args.val_size else "test_pgd20_acc"
    best = max((m[select_on] for m in metrics), default=-1.0)
    eps, step = args.epsilon / 255, args.step_size / 255
    # under torchrun every rank takes the same number of equal steps: drop the last partial batch
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size) if world_size == 1 else len(x_train) // args.batch_size
    schedule = redistribution_epochs(args.epochs, args.redistribute_from, args.redistribute_every)
    if is_main:
        shown = ", ".join(map(str, schedule[:4])) + (f", ..., {schedule[-1]}" if len(schedule) > 4 else "")
        print(f"{args.arch} on {args.dataset}: {len(x_train)} training images, {args.method} (lam {args.lam:g}), "
              f"redistribution {args.redistribute_mode}"
              f"{f' on epochs {shown}' if args.redistribute_mode != 'off' and schedule else ''}, {args.epochs} epochs "
              f"on {world_size} x {device}{', bf16' if args.amp else ''}{', compiled' if args.compile else ''}; "
              f"writing {run_dir}")

    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        redistributing = args.redistribute_mode != "off" and is_redistribution_epoch(
            epoch + 1, args.redistribute_from, args.redistribute_every)
        # robust loss sum, natural clean correct, robust adversarial correct, images, natural loss sum
        totals = torch.zeros(5, device=device)
        # one order per epoch, the same on every rank (and after --resume) without saving any state
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        order = order.to(device)
        quiet = not is_main or None  # one progress bar, rank 0's
        for i in utils.progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=quiet):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size][rank::world_size]
            x = x_train[idx]
            x = utils.to_float(utils.augment(x, flip=data.flip) if args.augment else x)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = y_train[idx]
            lr = lr_at(epoch + i / steps_per_epoch, args.lr, args.epochs)
            beta = beta_at(epoch + (i + 1) / steps_per_epoch, args.epochs, args.beta_final)
            for group in optimizer.param_groups + natural_optimizer.param_groups:
                group["lr"] = lr  # both learners get the same lr every step (Generalist)

            # the robust learner: PGD examples, CE + lam * KL
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss, logits_adv = robust_learner_loss(attacked, x, y, args, robust_net)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema_update_(ema_robust, robust, ema_decay(ema_steps["robust"], args.ema_decay))
            ema_steps["robust"] += 1

            # the natural learner: clean examples only
            natural.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                logits_natural = natural_net(x).float()
                natural_loss = F.cross_entropy(logits_natural, y)
            natural_optimizer.zero_grad(set_to_none=True)
            natural_loss.backward()
            natural_optimizer.step()
            ema_update_(ema_natural, natural, ema_decay(ema_steps["natural"], args.ema_decay))
            ema_steps["natural"] += 1

            # the global learner, and its copy back into both learners on redistribution epochs
            mix_global_(global_model, ema_robust, ema_natural, beta, ema_decay(ema_steps["global"], args.ema_decay))
            ema_steps["global"] += 1
            if redistributing and (args.redistribute_mode == "every-batch" or i == steps_per_epoch - 1):
                redistribute_(global_model, robust, natural)

            # accumulated on the device: no host synchronisation inside the loop
            totals[0] += loss.detach() * len(y)
            totals[1] += (logits_natural.argmax(1) == y).sum()
            totals[2] += (logits_adv.argmax(1) == y).sum()
            totals[3] += len(y)
            totals[4] += natural_loss.detach() * len(y)
        utils.all_reduce_sum_(totals)
        for model in (robust, natural, ema_robust, ema_natural, global_model):
            utils.average_buffers_(model)  # identical BatchNorm statistics on every rank
        train_seconds = time.time() - start

        # --piat: interpolate the robust learner with its previous epoch's interpolated weights
        alpha = 0.0
        if args.piat:
            alpha = args.alpha_fixed
            if alpha is None:
                alpha = piat_alpha(epoch, args.alpha_max, args.alpha_a, args.alpha_b)
            interpolate_(robust, prev_state, alpha)
            prev_state = clone_state(robust)

        loss_sum, clean_correct, robust_correct, seen, natural_loss_sum = totals.tolist()
        row = {"epoch": epoch + 1, "lr": lr, "alpha": alpha, "train_loss": loss_sum / seen,
               "train_clean_acc": clean_correct / seen, "train_robust_acc": robust_correct / seen,
               "beta": beta, "natural_loss": natural_loss_sum / seen, "redistributed": int(redistributing)}
        evaluation = dict(epsilon=eps, step_size=step, steps=args.eval_pgd_steps, batch_size=args.eval_batch_size,
                          rank=rank, world_size=world_size)
        row["test_clean_acc"], row["test_pgd20_acc"] = evaluate(evaluated, *split["test"], desc="test", **evaluation)
        if args.val_size:
            row["val_clean_acc"], row["val_pgd20_acc"] = evaluate(evaluated, *split["val"], desc="val", **evaluation)
        if args.eval_robust_learner:
            row["robust_learner_clean_acc"], row["robust_learner_pgd20_acc"] = evaluate(
                attacked, *split["test"], desc="test (robust learner)", **evaluation)
        row["epoch_seconds"] = time.time() - start
        row["images_per_second"] = seen / train_seconds
        metrics.append(row)
        rng_states = utils.all_rng_states()  # every rank's, for --resume

        if is_main:  # checkpoints first (atomically), then the log: a crash never leaves a row without its weights
            checkpoint = checkpoint_dict(global_model, data, args, metrics, epoch + 1)
            if row[select_on] > best:
                best = row[select_on]
                utils.save_checkpoint(checkpoint, run_dir / "best.pt")
            checkpoint["resume"] = {
                "robust": robust.state_dict(), "natural": natural.state_dict(), "ema_robust": ema_robust.state_dict(),
                "ema_natural": ema_natural.state_dict(), "ema_steps": dict(ema_steps),
                "optimizer": optimizer.state_dict(),
                "natural_optimizer": natural_optimizer.state_dict(), "prev_state": prev_state,
                "rng": rng_states}
            utils.save_checkpoint(checkpoint, run_dir / "final.pt")
            log.write(row)
            utils.plot_curves(metrics, run_dir / "curves.png",
                              title=f"{args.arch} {args.dataset} {args.method} (global learner)")
            print(f"epoch {epoch + 1:3d}  lr {lr:.5f}  beta {beta:.3f}  alpha {alpha:.3f}"
                  f"{'  redistributed' if redistributing else ''}  loss R/N {row['train_loss']:.4f}/"
                  f"{row['natural_loss']:.4f}  train N clean/R robust {row['train_clean_acc']:.3f}/"
                  f"{row['train_robust_acc']:.3f}  global test clean/PGD-{args.eval_pgd_steps} "
                  f"{row['test_clean_acc']:.3f}/{row['test_pgd20_acc']:.3f}  {row['epoch_seconds']:.1f}s", flush=True)

    # every rank must end with the same weights: the global learner (what is saved) and both base learners
    fingerprints = utils.gather_objects(tuple(utils.state_fingerprint(m) for m in (global_model, robust, natural)))
    if not is_main:
        return None
    log.close()
    if world_size > 1:
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"the {world_size} ranks ended with different weights (global, robust, natural "
                               f"learner): {fingerprints}")
        print(f"global learner identical on all {world_size} ranks (sha256 {fingerprints[0][0][:16]}), "
              "and both base learners too")
    best_row = max(metrics, key=lambda m: m[select_on])
    print(f"done: best {select_on} {best_row[select_on]:.4f} at epoch {best_row['epoch']}, "
          f"final {metrics[-1][select_on]:.4f}; outputs in {run_dir}")
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except utils.UserError as err:
        sys.exit(f"{os.path.basename(__file__)}: error: {err}")
