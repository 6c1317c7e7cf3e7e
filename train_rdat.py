"""RDAT: Regularised Decoupled Adversarial Training, a reconstruction, beside PIAT for comparison.

Li et al., "RDAT: an efficient regularized decoupled adversarial training mechanism", IJMIR 2024. Only the
abstract is public: a *regularisation module* controls the distance between the output distributions of an
example before and after the attack, and a *decoupled training module* optimises clean and adversarial examples
separately. This script builds it on the decoupled design of Generalist (Wang & Wang, CVPR 2023, whose official
code it follows), with a KL regulariser on the robust learner. Every reconstructed constant is a flag; its default
is ours, not the paper's. As train() runs it:

    theta_R, theta_N: robust and natural learner (the same initial weights); ema_R, ema_N: their EMAs;
    theta_G: the global learner (starts as theta_N); s counts each EMA's updates
    for epoch t = 1 .. E (1-indexed here):
        for each batch (x, y):                                                                      (rdat_step_)
            x' <- PGD-10(theta_R, x, y)                               BatchNorm in eval mode, uniform random start
            theta_R <- SGD step on  CE(f_R(x'), y) + lam * KL(p_R(x) || p_R(x'))                      (regulariser)
            ema_R <- d * ema_R + (1 - d) * theta_R,                          d = min(0.999, (s + 1) / (s + 10))
            theta_N <- SGD step on  CE(f_N(x), y)                      (own optimiser, weight decay, BatchNorm)
            ema_N <- d * ema_N + (1 - d) * theta_N
            theta_G <- d * theta_G + (1 - d) * (beta * ema_R + (1 - beta) * ema_N)
                       beta = 1 until 2E/3, then linearly to 0.4 at E
            if t >= 75 and (t - 75) % 5 == 0:  theta_R, theta_N <- theta_G                     (every batch of it)
        [--piat: theta_R <- alpha_t * theta_R_prev + (1 - alpha_t) * theta_R,  theta_R_prev <- theta_R]
        evaluate the GLOBAL learner: clean and PGD-20 accuracy; keep the best and the final checkpoint

`--lam 0` is Generalist's plain robust learner (CE on x' only). The checkpoints' "model" is the global learner,
so evaluate.py rebuilds it like any train_piat.py checkpoint. The file reads top to bottom: the flags, the attack,
the regularisation module, the decoupled training module, PIAT, the training loop; docs/method.md §10 has every
equation and constant.
"""

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from utils import non_negative, non_negative_int, number, pixel_units, positive_int, unit_interval

SCRIPT = os.path.basename(__file__)
ARCH_DEFAULTS = {  # the paper's settings (Sec. V-A); small-cnn is ours, for CPUs
    "resnet18": {"epochs": 120, "lr": 0.01, "weight_decay": 3.5e-3},
    "wrn-32-10": {"epochs": 180, "lr": 0.1, "weight_decay": 7e-4},
    "small-cnn": {"epochs": 30, "lr": 0.05, "weight_decay": 5e-4}}
EVAL_COLUMNS = [f"{split}_{worst}{attack}_acc" for split in ("test", "val") for worst in ("", "worst_")
                for attack in ("clean", "pgd20")]
# the global learner's columns as train_piat.py names them (train_*: the natural and the robust learner's), then RDAT's
METRIC_FIELDS = ["epoch", "lr", "alpha", "train_loss", "train_clean_acc", "train_robust_acc", *EVAL_COLUMNS,
                 "epoch_seconds", "images_per_second", "beta", "natural_loss", "redistributed",
                 "robust_learner_clean_acc", "robust_learner_pgd20_acc"]


# === The flags: every default in one block


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--exp-name", type=str, default=SCRIPT[: -len(".py")], help="name in the default run folder")
    g.add_argument("--seed", type=utils.seed_number, default=0, help="seed of every random number generator")
    g.add_argument("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--out-dir", type=str, default=None,
                   help="a new or empty run folder (default: runs/<dataset>__<exp-name>__<seed>__<unix time>)")
    g.add_argument("--resume", type=str, default=None, metavar="RUN",
                   help="continue RUN (a run folder, or its final.pt) with the flags it was started with")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast of the training step and attack (default: on CUDA, and on a CPU where bf16 "
                        "measures >= 1.2x fp32 on this model); the per-epoch evaluation runs in fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (the attacks run compiled too)")
    g.add_argument("--sync-bn", action="store_true", help="under torchrun: SyncBatchNorm over the global batch")
    g.add_argument("--track", action="store_true", help="also log to Weights & Biases (TensorBoard: always)")
    g.add_argument("--wandb-project", type=str, default="piat", help="W&B project of --track")
    g.add_argument("--wandb-entity", type=str, default=None, help="W&B team or user of --track")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="cifar10", choices=utils.DATASETS,
                   help="cifar10/cifar100/svhn are downloaded into --data-dir; imagefolder reads --data-dir/train and "
                        "--data-dir/test; synthetic is a small learnable set made in memory")
    g.add_argument("--data-dir", type=str, default=None, help="where data sets live (default: ./data)")
    g.add_argument("--image-size", type=positive_int, default=None, help="resize image-folder images to this size")
    g.add_argument("--train-size", type=positive_int, default=None, help="train on a fixed subset of N images")
    g.add_argument("--val-size", type=non_negative_int, default=0,
                   help="hold out N training images; best.pt is chosen on their PGD-20 accuracy, not the test set's")
    g.add_argument("--eval-size", type=positive_int, default=None,
                   help="test images evaluated after every epoch (default 1000, or all when fewer)")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop and flip")
    g = p.add_argument_group("model and optimisers (both learners: SGD at the same lr; defaults per --arch as "
                             "train_piat.py's)")
    g.add_argument("--arch", type=str, default="resnet18", choices=utils.ARCHS, help="network of all five models")
    g.add_argument("--epochs", type=positive_int, default=None, help="120 resnet18, 180 wrn-32-10, 30 small-cnn")
    g.add_argument("--lr", type=non_negative, default=None,
                   help="both learners': held for half the epochs, then linearly to lr/10 at 3/4 and lr/100 at the "
                        "end (0.01 resnet18, 0.1 wrn-32-10, 0.05 small-cnn)")
    g.add_argument("--weight-decay", type=non_negative, default=None,
                   help="the robust learner's (3.5e-3 resnet18, 7e-4 wrn, 5e-4 small)")
    g.add_argument("--natural-weight-decay", type=non_negative, default=5e-4,
                   help="the natural learner's (reconstruction: ours, from Generalist's code)")
    g.add_argument("--natural-init", type=str, default="same", choices=("same", "independent"),
                   help="same: the natural learner starts as a copy of the robust one, as Generalist's code does "
                        "(reconstruction: ours, not the paper's); independent: its own initialisation")
    g.add_argument("--momentum", type=unit_interval, default=0.9, help="SGD momentum")
    g.add_argument("--batch-size", type=positive_int, default=128,
                   help="training batch of both learners (the global one under torchrun)")
    g.add_argument("--eval-batch-size", type=positive_int, default=256, help="batch of the per-epoch evaluation")
    g = p.add_argument_group("attack (--norm linf: --epsilon and --step-size in 1/255 units; l2: in [0, 1] units)")
    g.add_argument("--norm", type=str, default="linf", choices=tuple(utils.NORM_UNITS),
                   help="threat model of the training and test attacks: the L-inf or the L2 ball")
    g.add_argument("--epsilon", type=pixel_units, default=None,
                   help="radius of the training and test attacks (default: 8/255 under linf, 0.5 under l2)")
    g.add_argument("--step-size", type=pixel_units, default=None,
                   help="PGD step size (default: 2/255 under linf; under l2 15/255 = 0.0588, Rice et al.'s)")
    g.add_argument("--pgd-steps", type=non_negative_int, default=10, help="steps of the training attack")
    g.add_argument("--eval-pgd-steps", type=non_negative_int, default=20, help="steps of the per-epoch test attack")
    g.add_argument("--attack-loss", type=str, default="ce", choices=("ce", "kl"),
                   help="the training attack's: ce from a uniform start (Generalist's), kl KL(p(x)||p(x')) from "
                        "0.001*N(0,1) (TRADES's) (reconstruction: ours, not the paper's)")
    g = p.add_argument_group("RDAT (reconstruction: ours, not the paper's, whose text is not public)")
    g.add_argument("--lam", type=non_negative, default=6.0,
                   help="robust learner's loss CE(f(x'),y) + lam*KL(p(x)||p(x')) (6: TRADES's weight); 0: Generalist")
    g.add_argument("--ema-decay", type=unit_interval, default=0.999,
                   help="d = min(ema_decay, (s+1)/(s+10)) of both EMAs and the global learner, every batch")
    g.add_argument("--beta-final", type=unit_interval, default=0.4,
                   help="robust EMA's weight in the global learner: 1 until 2E/3, then linearly to this at E")
    g.add_argument("--redistribute-from", type=positive_int, default=None,
                   help="first epoch (1-indexed) that copies the global learner into both (75 of 120, scaled)")
    g.add_argument("--redistribute-every", type=positive_int, default=None,
                   help="then every N epochs (5 of 120, scaled: max(1, floor(5E/120 + 0.5)))")
    g.add_argument("--redistribute-mode", type=str, default="every-batch", choices=("every-batch", "once", "off"),
                   help="copy after every batch of those epochs (Generalist's code), once after their last, or never")
    g.add_argument("--eval-robust-learner", action="store_true",
                   help="also evaluate the robust learner every epoch (robust_learner_* columns; twice the time)")
    g = p.add_argument_group("PIAT on the robust learner: theta_R <- alpha*theta_R_prev + (1-alpha)*theta_R after "
                             "every epoch (a combination neither paper tried)")
    g.add_argument("--piat", action=argparse.BooleanOptionalAction, default=False, help="interpolate (default: off)")
    g.add_argument("--alpha-max", type=unit_interval, default=0.99,
                   help="alpha_t = min(alpha_max, (t+a)/(t+b)) (reconstruction of Eq. 10)")
    g.add_argument("--alpha-a", type=non_negative, default=1.0, help="a in alpha_t (reconstruction)")
    g.add_argument("--alpha-b", type=number(float, 0, open_bounds=True), default=10.0, help="b in alpha_t")
    g.add_argument("--alpha-fixed", type=unit_interval, default=None, help="a constant alpha instead")
    args = p.parse_args(argv)
    # defaults that depend on other flags, and the checks argparse cannot make
    utils.attack_units(p, args, l2_step=15 / 255)
    for key, value in ARCH_DEFAULTS[args.arch].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.data_dir = args.data_dir or (None if args.resume else "./data")  # a resumed run keeps its own
    for flag in ("redistribute_from", "redistribute_every"):
        if args.redistribute_mode == "off" and getattr(args, flag) is not None:
            p.error(f"--{flag.replace('_', '-')} needs --redistribute-mode every-batch or once")
    start, every = scaled_redistribution(args.epochs)
    args.redistribute_from = start if args.redistribute_from is None else args.redistribute_from
    args.redistribute_every = every if args.redistribute_every is None else args.redistribute_every
    if not args.piat and args.alpha_fixed is not None:
        p.error("--alpha-fixed needs --piat")
    if args.lr == 0 and not args.resume:
        print(f"{SCRIPT}: warning: --lr 0 trains nothing", file=sys.stderr)
    return args


# === The attack (Eq. 3; docs/method.md §2). Images live in [0, 1]; epsilon and step_size in [0, 1] units.


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


# === The regularisation module: the robust learner's loss (reconstruction; docs/method.md §10)


def trades_kl(logits_adv, logits_clean):
    """Batch-mean KL(p(x) || p(x')) summed over classes; gradients flow through both, as in TRADES."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")


def rdat_loss(logits_adv, logits_clean, y, lam):
    """CE(f(x'), y) + lam * KL(p(x) || p(x')) (reconstruction): the adversarial CE of Generalist's robust learner
    plus RDAT's regulariser on the distance between the output distributions before and after the attack.
    lam = 0 (logits_clean may then be None) is Generalist's robust learner."""
    loss = F.cross_entropy(logits_adv, y)
    return loss + lam * trades_kl(logits_adv, logits_clean) if lam else loss


def robust_learner_loss(model, train_model, x, y, args):
    """(loss, logits of x') of the robust learner: x' from PGD on `model` with BatchNorm in eval mode (--attack-loss),
    then rdat_loss of the training forward passes through `train_model`, in fp32."""
    model.eval()
    x_adv = pgd_attack(model, x, y, *utils.radii(args), args.pgd_steps, loss=args.attack_loss,
                       random_start="normal" if args.attack_loss == "kl" else "uniform", norm=args.norm)
    model.train()
    logits_clean = train_model(x).float() if args.lam else None  # p(x): its own train-mode pass, not detached
    logits_adv = train_model(x_adv).float()
    return rdat_loss(logits_adv, logits_clean, y, args.lam), logits_adv


# === The decoupled training module (docs/method.md §10): the EMAs, the global learner, beta, redistribution


def ema_decay(step, max_decay=0.999):
    """d = min(max_decay, (s + 1) / (s + 10)) for an EMA's update number s = 0, 1, ... (Generalist's ramp: 0.1,
    0.18, 0.25, ... up to 0.999 after about 9,000 updates)."""
    return min(max_decay, (step + 1) / (step + 10))


@torch.no_grad()
def ema_update_(ema_model, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta in place, over every floating-point parameter and buffer
    (BatchNorm's running statistics too); integer buffers (num_batches_tracked) are copied."""
    ema, new = ema_model.state_dict(), model.state_dict()
    floats = [k for k, v in ema.items() if v.is_floating_point()]
    torch._foreach_lerp_([ema[k] for k in floats], [new[k] for k in floats], 1.0 - decay)
    for k in ema.keys() - set(floats):
        ema[k].copy_(new[k])


@torch.no_grad()
def mix_global_(global_model, ema_robust, ema_natural, beta, decay):
    """theta_G <- decay * theta_G + (1 - decay) * (beta * ema_R + (1 - beta) * ema_N) in place, over every
    floating-point parameter and buffer; integer buffers take the robust EMA's value."""
    glob, r, n = global_model.state_dict(), ema_robust.state_dict(), ema_natural.state_dict()
    floats = [k for k, v in glob.items() if v.is_floating_point()]
    target = torch._foreach_lerp([n[k] for k in floats], [r[k] for k in floats], beta)  # n + beta * (r - n)
    torch._foreach_lerp_([glob[k] for k in floats], list(target), 1.0 - decay)
    for k in glob.keys() - set(floats):
        glob[k].copy_(r[k])


@torch.no_grad()
def redistribute_(global_model, *learners):
    """Generalist's communication: the global learner's parameters and buffers copied into each learner; their
    optimisers' momentum is left as it is, as in the official code."""
    for learner in learners:
        learner.load_state_dict(global_model.state_dict())


def beta_at(progress, epochs, beta_final=0.4):
    """Weight of the robust EMA in the global learner at the fractional epoch `progress`: 1 until 2E/3, then
    linearly to beta_final at E (Generalist's np.interp(t, [0, E/3, 2E/3, E], [1, 1, 1, 0.4]))."""
    knee = 2 * epochs / 3
    return 1.0 if progress <= knee else 1.0 + (beta_final - 1.0) * min(1.0, (progress - knee) / (epochs - knee))


def scaled_redistribution(epochs):
    """Generalist's redistribution (from, every) = (75, 5) of 120 epochs scaled to `epochs`, rounded half up:
    (75, 5) at 120, (8, 1) at 12, (19, 1) at 30, (113, 8) at 180."""
    return max(1, math.floor(75 * epochs / 120 + 0.5)), max(1, math.floor(5 * epochs / 120 + 0.5))


def is_redistribution_epoch(epoch, start, every):
    """Whether the 1-indexed epoch copies the global learner into both learners: epoch >= start and
    (epoch - start) % every == 0 (Generalist: epoch >= 75 and epoch % 5 == 0)."""
    return epoch >= start and (epoch - start) % every == 0


def redistribution_epochs(epochs, start, every):
    """The 1-indexed redistribution epochs of a run: [75, 80, ..., 120] for (120, 75, 5)."""
    return [e for e in range(1, epochs + 1) if is_redistribution_epoch(e, start, every)]


# === PIAT (Eq. 9-10; docs/method.md §3), on the robust learner with --piat


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


# === Training: the module docstring's loop


def lr_at(progress, lr, epochs):
    """The paper's schedule at the fractional epoch `progress`: lr until half-way, then linearly to lr/10 at 3/4
    and lr/100 at the end."""
    knots = [(0.0, lr), (0.5 * epochs, lr), (0.75 * epochs, lr / 10), (float(epochs), lr / 100)]
    for (e0, v0), (e1, v1) in zip(knots, knots[1:]):
        if progress <= e1:
            return v0 if e1 == e0 else v0 + (v1 - v0) * (progress - e0) / (e1 - e0)
    return knots[-1][1]


def evaluate_epoch(model, split, args, epoch, rank=0, world_size=1, desc=""):
    """(metrics.csv's columns, the test images' per-image correctness) of `model`: clean and PGD accuracy of the
    test subset and of the --val-size images, overall and of the worst class. Each rank attacks its share; the
    random starts come from a generator of their own seeded by (seed, epoch), so every model of an epoch is
    attacked from the same starts and evaluating more (an average, held-out images) never shifts training."""
    columns, per_image = {}, {}
    for name in ("test", "val") if args.val_size else ("test",):
        x, y = split[name]
        generator = torch.Generator(x.device).manual_seed(args.seed * 1_000_003 + epoch)
        for attack, loss in (("clean", None), ("pgd20", "ce")):
            mine = attack_flags(model, x[rank::world_size], y[rank::world_size], loss, *utils.radii(args),
                                args.eval_pgd_steps, args.eval_batch_size, x.device, generator,
                                f"{name} {attack}{desc}" if rank == 0 else "", args.norm)
            flags = torch.zeros(len(y), device=x.device)
            flags[rank::world_size] = mine.float()
            flags = utils.all_reduce_sum_(flags)
            columns[f"{name}_{attack}_acc"] = flags.mean().item()
            columns[f"{name}_worst_{attack}_acc"] = min(flags[y == c].mean().item() for c in y.unique())
            per_image.setdefault(name, {})[attack] = flags.bool().tolist()
    return columns, per_image["test"]


def rdat_step_(models, optimizers, ema_steps, x, y, args, beta, redistribute):
    """One batch of RDAT, the docstring's inner loop. models: the five by name ("robust", "natural", "ema_robust",
    "ema_natural", "global") and "train_robust", "train_natural", what the training passes go through
    (DistributedDataParallel under torchrun). ema_steps (each EMA's update count s) advances in place. Returns
    (robust loss, natural loss, the robust learner's logits of x', the natural learner's of x)."""
    robust_optimizer, natural_optimizer = optimizers
    # the robust learner: x' <- PGD, an SGD step on CE + lam * KL (the regularisation module), then its EMA
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        loss, logits_adv = robust_learner_loss(models["robust"], models["train_robust"], x, y, args)
    robust_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    robust_optimizer.step()
    ema_update_(models["ema_robust"], models["robust"], ema_decay(ema_steps["robust"], args.ema_decay))
    ema_steps["robust"] += 1
    # the natural learner: an SGD step on the clean images' CE, then its EMA
    models["natural"].train()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        logits_natural = models["train_natural"](x).float()
        natural_loss = F.cross_entropy(logits_natural, y)
    natural_optimizer.zero_grad(set_to_none=True)
    natural_loss.backward()
    natural_optimizer.step()
    ema_update_(models["ema_natural"], models["natural"], ema_decay(ema_steps["natural"], args.ema_decay))
    ema_steps["natural"] += 1
    # the global learner mixes the EMAs, and is copied back into both learners on redistribution epochs
    mix_global_(models["global"], models["ema_robust"], models["ema_natural"], beta,
                ema_decay(ema_steps["global"], args.ema_decay))
    ema_steps["global"] += 1
    if redistribute:
        redistribute_(models["global"], models["robust"], models["natural"])
    return loss, natural_loss, logits_adv, logits_natural


def train(args, checkpoint, rank, world_size, device, stop):
    """The module docstring's loop on this process's share of every batch; the run folder on rank 0."""
    if args.batch_size % world_size:
        raise utils.UserError(f"--batch-size {args.batch_size} (the global batch) must divide among {world_size} "
                              "processes")
    if args.sync_bn and device.type != "cuda":
        raise utils.UserError("--sync-bn needs one CUDA device per process")
    # set up: the data; both learners, their EMAs and the global learner; two optimisers; theta_prev
    utils.seed_everything(args.seed)  # the same initial weights on every rank
    data = utils.load_dataset(args.dataset, args.data_dir, args.image_size)
    split = utils.split_data(data, args, device)
    robust = utils.build_model(args.arch, data.num_classes, data.mean, data.std)
    # Generalist's official code: model_st = deepcopy(model_at); --natural-init independent draws its own weights
    natural = copy.deepcopy(robust) if args.natural_init == "same" else utils.build_model(
        args.arch, data.num_classes, data.mean, data.std)
    robust, natural = (m.to(device).to(memory_format=torch.channels_last) for m in (robust, natural))
    if args.sync_bn and world_size > 1:
        robust, natural = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (robust, natural))
    # the EMAs start as copies of their learners, the global learner as a copy of the natural one (Generalist)
    ema_robust, ema_natural, global_model = (copy.deepcopy(m).requires_grad_(False).eval()
                                             for m in (robust, natural, natural))
    optimizers = (torch.optim.SGD(robust.parameters(), lr=args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay),
                  torch.optim.SGD(natural.parameters(), lr=args.lr, momentum=args.momentum,
                                  weight_decay=args.natural_weight_decay))
    theta_prev, metrics = clone_state(robust) if args.piat else None, []
    ema_steps = {"robust": 0, "natural": 0, "global": 0}  # each EMA's own update count s
    if checkpoint is not None:  # --resume: the five models, both optimisers, the counters and theta_prev
        state = checkpoint["resume"]
        global_model.load_state_dict(checkpoint["model"])
        for model, key in ((robust, "robust"), (natural, "natural"), (ema_robust, "ema_robust"),
                           (ema_natural, "ema_natural")):
            model.load_state_dict(state[key])
        for optimizer, key in zip(optimizers, ("robust_optimizer", "natural_optimizer")):
            optimizer.load_state_dict(state[key])
        theta_prev, ema_steps, metrics = state["theta_prev"], dict(state["ema_steps"]), checkpoint["metrics"]
    precision = utils.settle_amp(args, device, robust, (args.batch_size // world_size, *data.image_shape))
    run_dir = Path(args.resume) if args.resume else utils.make_run_dir(args, SCRIPT) if rank == 0 else None
    stop.start(run_dir, world_size)
    if args.compile:
        for model in (robust, natural, global_model):
            model.compile()
    models = {"robust": robust, "natural": natural, "ema_robust": ema_robust, "ema_natural": ema_natural,
              "global": global_model}
    for name in ("robust", "natural"):  # the training passes; the attacks and the EMAs use the models themselves
        models[f"train_{name}"] = utils.data_parallel(models[name]) if world_size > 1 else models[name]
    column = "val_pgd20_acc" if args.val_size else "test_pgd20_acc"  # what best.pt is chosen on
    log = utils.MetricsLog(run_dir, METRIC_FIELDS, metrics, args) if rank == 0 else None
    if rank == 0:
        schedule = redistribution_epochs(args.epochs, args.redistribute_from, args.redistribute_every)
        shown = ", ".join(map(str, schedule[:4])) + (f", ..., {schedule[-1]}" if len(schedule) > 4 else "")
        print(f"{utils.method_name(args, SCRIPT)} (lam {args.lam:g}), {args.arch} on {args.dataset}: "
              f"{len(split['train'][0])} training images, {utils.threat_model(args.norm, args.epsilon)}, "
              f"redistribution {args.redistribute_mode}"
              f"{f' on epochs {shown}' if args.redistribute_mode != 'off' and schedule else ''}, {args.epochs} "
              f"epoch{'s' * (args.epochs != 1)} on {world_size} x {device}, {precision}"
              f"{', compiled' if args.compile else ''}; writing {run_dir}", flush=True)

    for epoch in range(len(metrics), args.epochs):
        utils.seed_everything(args.seed, epoch, rank)  # this epoch's draws: the same after --resume
        start, alpha = time.time(), 0.0
        redistributing = args.redistribute_mode != "off" and is_redistribution_epoch(
            epoch + 1, args.redistribute_from, args.redistribute_every)
        totals = torch.zeros(5, device=device)  # robust loss sum, clean correct, robust correct, images, natural loss
        for i, steps, x, y in utils.epoch_batches(*split["train"], args, epoch, data.flip, rank, world_size):
            for group in optimizers[0].param_groups + optimizers[1].param_groups:
                group["lr"] = lr_at(epoch + i / steps, args.lr, args.epochs)  # the same for both (Generalist)
            beta = beta_at(epoch + (i + 1) / steps, args.epochs, args.beta_final)  # at the epoch after the step
            redistribute = redistributing and (args.redistribute_mode == "every-batch" or i == steps - 1)
            loss, natural_loss, logits_adv, logits_natural = rdat_step_(models, optimizers, ema_steps, x, y, args,
                                                                        beta, redistribute)
            # a nan or inf loss stops the run: the steps only touched the weights in memory, nothing is saved
            utils.check_finite(epoch, i, robust_learner_loss=loss, natural_learner_loss=natural_loss)
            totals += torch.stack([loss.detach() * len(y), (logits_natural.argmax(1) == y).sum(),
                                   (logits_adv.argmax(1) == y).sum(), torch.tensor(len(y), device=device),
                                   natural_loss.detach() * len(y)]).float()  # no host synchronisation in the loop
        loss_sum, clean_correct, robust_correct, seen, natural_loss_sum = utils.all_reduce_sum_(totals).tolist()
        for model in (robust, natural, ema_robust, ema_natural, global_model):
            utils.average_buffers_(model)  # identical BatchNorm statistics on every rank
        # --piat: interpolate the robust learner with its previous epoch's interpolated weights
        if args.piat:
            alpha, theta_prev = piat_step_(robust, theta_prev, epoch, args)
        # evaluate the global learner (and with --eval-robust-learner the robust one, from the same random starts)
        row = {"epoch": epoch + 1, "lr": optimizers[0].param_groups[0]["lr"], "alpha": alpha,
               "train_loss": loss_sum / seen, "train_clean_acc": clean_correct / seen,
               "train_robust_acc": robust_correct / seen, "images_per_second": seen / (time.time() - start),
               "beta": beta, "natural_loss": natural_loss_sum / seen, "redistributed": int(redistributing)}
        columns, per_image = evaluate_epoch(global_model, split, args, epoch, rank, world_size)
        row.update(columns)
        if args.eval_robust_learner:
            columns, _ = evaluate_epoch(robust, split, args, epoch, rank, world_size, " (robust learner)")
            row.update(robust_learner_clean_acc=columns["test_clean_acc"],
                       robust_learner_pgd20_acc=columns["test_pgd20_acc"])
        row["epoch_seconds"] = time.time() - start
        metrics.append(row)
        # keep the best and the final checkpoint of the global learner, never with weights that are not finite
        utils.check_finite_weights(epoch, global_learner=global_model, robust_learner=robust, natural_learner=natural)
        if rank == 0:
            saved = {"model": global_model.state_dict(), "arch": args.arch, "model_kwargs": {},
                     "num_classes": data.num_classes, "mean": data.mean, "std": data.std,
                     "image_shape": data.image_shape, "args": vars(args), "metrics": metrics, "epoch": epoch + 1,
                     "script": SCRIPT, "weights": "global learner",
                     "per_image": {"indices": split["test_indices"].tolist(), **per_image}}
            state = {"robust": robust.state_dict(), "natural": natural.state_dict(),
                     "ema_robust": ema_robust.state_dict(), "ema_natural": ema_natural.state_dict(),
                     "robust_optimizer": optimizers[0].state_dict(), "natural_optimizer": optimizers[1].state_dict(),
                     "ema_steps": dict(ema_steps), "theta_prev": theta_prev}
            utils.save_epoch(run_dir, saved, state, column, log, last=epoch + 1 == args.epochs or stop.signum)
            print(f"epoch {epoch + 1:3d}  lr {row['lr']:.5f}  beta {beta:.3f}  alpha {alpha:.3f}"
                  f"{'  redistributed' if redistributing else ''}  loss R/N {row['train_loss']:.4f}/"
                  f"{row['natural_loss']:.4f}  train N clean/R robust {row['train_clean_acc']:.3f}/"
                  f"{row['train_robust_acc']:.3f}  global test clean/PGD-{args.eval_pgd_steps} "
                  f"{row['test_clean_acc']:.3f}/{row['test_pgd20_acc']:.3f}  {row['epoch_seconds']:.1f}s", flush=True)
        stop.check(epoch, args.epochs, device)  # a stop signal ends the run here, the epoch saved

    # every rank must end with the same weights: the global learner (what is saved) and both learners
    utils.check_ranks_agree(global_learner=global_model, robust_learner=robust, natural_learner=natural)
    if rank == 0:
        log.close()
        best = max(metrics, key=lambda m: m[column])
        print(f"done: best {column} {best[column]:.4f} at epoch {best['epoch']}, final {metrics[-1][column]:.4f}; "
              f"outputs in {run_dir}")
    return run_dir


def main(argv=None):
    args = parse_args(argv)
    checkpoint = None
    if args.resume:  # the interrupted run's own flags and its final.pt
        args, checkpoint = utils.resume_args(args, SCRIPT)
    elif args.out_dir:
        utils.check_out_dir(args.out_dir)  # refused before any work
    rank, world_size, device = utils.setup_distributed(args.device)
    try:
        with utils.StopSignals(__file__) as stop:
            return train(args, checkpoint, rank, world_size, device, stop)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit status for every way a run can end early
