"""PIAT: Parameter Interpolation Adversarial Training for CNNs, with the NMSE regulariser.

Liu, Yang, He & Hopcroft, "Parameter Interpolation Adversarial Training for Robust Image Classification",
IEEE TIFS 2025 (arXiv 2511.00836). Algorithm 1, as train() runs it:

    theta_prev <- theta_0
    for epoch t = 0 .. E-1:
        for each batch (x, y):
            x' <- PGD-10(x, y)                                     BatchNorm in eval mode, uniform random start
            theta <- SGD step on  CE(f(x'), y) + lam * NMSE(f(x'), f(x), y)              (or another --loss)
        alpha_t <- min(alpha_max, (t + a) / (t + b))                                              (Eq. 10)
        theta <- alpha_t * theta_prev + (1 - alpha_t) * theta       (parameters and BN statistics, Eq. 9)
        theta_prev <- theta
        evaluate clean and PGD-20 accuracy; keep the best and the final checkpoint

`--loss ce --no-piat` is plain PGD-AT (Madry et al. 2018); every --loss combines with --piat. The file reads top
to bottom: the flags, the attack, NMSE, PIAT, the training loop, then the baselines (ALP, TRADES, MART, MAIL,
CFA, RAT) and the weight averages (EMA, SWA). Parts marked (reconstruction) are our reading of equations the
paper's text lost; docs/method.md has every equation and constant.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

import utils
from utils import non_negative, non_negative_int, number, pixel_units, positive_int, unit_interval

SCRIPT = os.path.basename(__file__)
LOSSES = ("ce", "nmse", "alp", "trades", "mart", "mail", "cfa", "rat")
ARCH_DEFAULTS = {  # the paper's settings (Sec. V-A); small-cnn is ours, for CPUs
    "resnet18": {"epochs": 120, "lr": 0.01, "weight_decay": 3.5e-3},
    "wrn-32-10": {"epochs": 180, "lr": 0.1, "weight_decay": 7e-4},
    "small-cnn": {"epochs": 30, "lr": 0.05, "weight_decay": 5e-4}}
EVAL_COLUMNS = [f"{split}_{worst}{attack}_acc" for split in ("test", "val") for worst in ("", "worst_")
                for attack in ("clean", "pgd20")]
METRIC_FIELDS = ["epoch", "lr", "alpha", "train_loss", "train_clean_acc", "train_robust_acc", *EVAL_COLUMNS,
                 *[f"raw_{c}" for c in EVAL_COLUMNS], "fawa_updated", "epoch_seconds", "images_per_second"]


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
    g = p.add_argument_group("model and optimiser (defaults per --arch: the paper's Sec. V-A)")
    g.add_argument("--arch", type=str, default="resnet18", choices=utils.ARCHS, help="network")
    g.add_argument("--epochs", type=positive_int, default=None, help="120 resnet18, 180 wrn-32-10, 30 small-cnn")
    g.add_argument("--lr", type=non_negative, default=None,
                   help="held for half the epochs, then linearly to lr/10 at 3/4 and lr/100 at the end (0.01 "
                        "resnet18, 0.1 wrn-32-10, 0.05 small-cnn)")
    g.add_argument("--weight-decay", type=non_negative, default=None, help="3.5e-3 resnet18, 7e-4 wrn, 5e-4 small")
    g.add_argument("--momentum", type=unit_interval, default=0.9, help="SGD momentum")
    g.add_argument("--batch-size", type=positive_int, default=128, help="training batch (global, under torchrun)")
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
    g = p.add_argument_group("loss")
    g.add_argument("--loss", type=str, default="nmse", choices=LOSSES,
                   help="nmse: CE(f(x'),y) + lam*NMSE (the paper's Eq. 12); ce: PGD-AT; the baselines alp, trades, "
                        "mart, mail, cfa, rat (docs/method.md §5)")
    g.add_argument("--lam", type=non_negative, default=None,
                   help="weight of NMSE (default 4, reconstruction: the paper's value was lost) or ALP (0.5)")
    g.add_argument("--beta", type=non_negative, default=6.0, help="weight of the KL term of trades, mart, cfa, rat")
    g = p.add_argument_group("PIAT: theta <- alpha*theta_prev + (1-alpha)*theta after every epoch")
    g.add_argument("--piat", action=argparse.BooleanOptionalAction, default=True, help="interpolate (default: on)")
    g.add_argument("--alpha-max", type=unit_interval, default=0.99,
                   help="alpha_t = min(alpha_max, (t+a)/(t+b)) (reconstruction of Eq. 10)")
    g.add_argument("--alpha-a", type=non_negative, default=1.0, help="a in alpha_t (reconstruction)")
    g.add_argument("--alpha-b", type=number(float, 0, open_bounds=True), default=10.0, help="b in alpha_t")
    g.add_argument("--alpha-fixed", type=unit_interval, default=None, help="a constant alpha instead (Fig. 9)")
    g.add_argument("--piat-every", type=positive_int, default=None, metavar="N",
                   help="interpolate after every N optimiser steps instead, alpha_t at the fractional epoch")
    g = p.add_argument_group("weight averages: evaluated and saved instead of the trained weights, never fed back")
    g.add_argument("--ema", type=number(float, 0, 1, open_bounds=True), default=None, metavar="DECAY",
                   help="exponential moving average of the weights, updated every step (e.g. 0.999)")
    g.add_argument("--swa-start", type=positive_int, default=None, metavar="EPOCH",
                   help="equal-weight average of the end-of-epoch weights from this epoch on, BatchNorm recomputed")
    g = p.add_argument_group("baselines (docs/method.md §5; epochs of CFA and RAT's 200-epoch recipes scale with "
                             "--epochs)")
    g.add_argument("--mail-bias", type=number(float), default=-1.5, help="MAIL: 3*sigmoid(slope*(bias - margin))")
    g.add_argument("--mail-slope", type=number(float), default=1.0, help="MAIL: the sigmoid's slope")
    g.add_argument("--mail-burn-in", type=non_negative_int, default=None, help="MAIL: plain CE first (76 of 120)")
    g.add_argument("--cfa-base", type=str, default="trades", choices=("trades", "at"), help="CFA on TRADES or PGD-AT")
    g.add_argument("--cfa-ccm", action=argparse.BooleanOptionalAction, default=True,
                   help="class-wise margins eps_k = (lambda1 + t_k) eps, t_k: class k's train robust accuracy")
    g.add_argument("--cfa-ccr", action=argparse.BooleanOptionalAction, default=True,
                   help="class-wise regularisation beta_k = (lambda2 + t_k) beta")
    g.add_argument("--cfa-fawa", action=argparse.BooleanOptionalAction, default=True,
                   help="fairness-aware weight averaging, on 2%% held-out images (--val-size)")
    g.add_argument("--cfa-lambda1", type=non_negative, default=None, help="0.3 on trades, 0.5 on at (the paper's)")
    g.add_argument("--cfa-lambda2", type=non_negative, default=0.5, help="lambda2 of the regularisation")
    g.add_argument("--cfa-begin", type=non_negative_int, default=None, help="uncalibrated epochs first (10 of 200)")
    g.add_argument("--cfa-decay", type=unit_interval, default=0.85, help="FAWA's decay (the paper's; code: 0.88)")
    g.add_argument("--cfa-threshold", type=unit_interval, default=0.2,
                   help="FAWA takes an epoch when its worst class's val PGD-20 accuracy reaches this (code: 0.24)")
    g.add_argument("--cfa-fawa-start", type=positive_int, default=None, help="first epoch FAWA may take (50 of 200)")
    g.add_argument("--rat-alpha", type=unit_interval, default=0.2, help="RAT: weight of the first-order term")
    g.add_argument("--rat-second-weight", type=non_negative, default=None,
                   help="RAT: weight of the second-order term (0.08 resnet18 and small-cnn, 0.1 wrn-32-10: the "
                        "official scripts)")
    g.add_argument("--rat-noise-std", type=non_negative, default=1e-4,
                   help="RAT: N(0, std^2) noise on every convolution weight of the attacked model (0: off)")
    g.add_argument("--rat-target-mass", type=unit_interval, default=None,
                   help="RAT: soft-label mass spread over the wrong classes (default 1 - 2/K, the official)")
    args = p.parse_args(argv)
    # defaults that depend on other flags, and the checks argparse cannot make
    utils.attack_units(p, args, l2_step=15 / 255)
    for key, value in ARCH_DEFAULTS[args.arch].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.data_dir = args.data_dir or (None if args.resume else "./data")  # a resumed run keeps its own
    args.lam = {"nmse": 4.0, "alp": 0.5}.get(args.loss, 0.0) if args.lam is None else args.lam
    scale = args.epochs / 200  # CFA and RAT's official schedules are 200 epochs long
    for key, value in (("mail_burn_in", round(76 * args.epochs / 120)), ("cfa_begin", round(10 * scale)),
                       ("cfa_fawa_start", max(1, round(50 * scale))), ("cfa_lambda1", 0.3 if args.cfa_base ==
                                                                       "trades" else 0.5),
                       ("rat_second_weight", 0.1 if args.arch == "wrn-32-10" else 0.08)):
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if not args.piat and (args.alpha_fixed is not None or args.piat_every is not None):
        p.error(f"{'--alpha-fixed' if args.alpha_fixed is not None else '--piat-every'} needs --piat")
    if args.swa_start is not None and args.swa_start > args.epochs:
        p.error(f"--swa-start {args.swa_start} is after the last epoch ({args.epochs})")
    averages = [f for f, on in (("--ema", args.ema), ("--swa-start", args.swa_start),
                                ("CFA's FAWA", args.loss == "cfa" and args.cfa_fawa or None)) if on is not None]
    if len(averages) > 1:
        p.error(f"{' and '.join(averages)} are two weight averages; keep one (--no-cfa-fawa drops CFA's)")
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


# === NMSE (Eq. 11-12; docs/method.md §4)


def nmse_loss(logits_adv, logits_clean, y):
    """mean_i w_i * || f(x'_i)/||f(x'_i)|| - f(x_i)/||f(x_i)|| ||^2 with w_i = 1 - p_y(x_i) from the clean logits
    (Eq. 11): the directions of the logits are aligned, not their size, and vulnerable clean examples weigh more.
    The weight is not detached, as in MART."""
    distance = (F.normalize(logits_adv, dim=1) - F.normalize(logits_clean, dim=1)).pow(2).sum(dim=1)
    weight = 1 - F.softmax(logits_clean, dim=1).gather(1, y[:, None]).squeeze(1)
    return (weight * distance).mean()


# === PIAT (Eq. 9-10; docs/method.md §3)


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


# === Training: Algorithm 1


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


def train(args, checkpoint, rank, world_size, device, stop):
    """Algorithm 1 on this process's share of every batch; the run folder on rank 0."""
    if args.batch_size % world_size:
        raise utils.UserError(f"--batch-size {args.batch_size} (the global batch) must divide among {world_size} "
                              "processes")
    if args.sync_bn and device.type != "cuda":
        raise utils.UserError("--sync-bn needs one CUDA device per process")
    # set up: the data, the network, SGD, and theta_prev <- theta_0 (or the interrupted run's state)
    utils.seed_everything(args.seed)  # the same initial weights on every rank
    data = utils.load_dataset(args.dataset, args.data_dir, args.image_size)
    if args.loss == "cfa" and args.cfa_fawa and not args.val_size:  # its official code holds out 2 % of CIFAR-10
        args.val_size = max(data.num_classes, round(0.02 * len(data.x_train)))
    args.rat_target_mass = 1 - 2 / data.num_classes if args.rat_target_mass is None else args.rat_target_mass
    split = utils.split_data(data, args, device)
    model = utils.build_model(args.arch, data.num_classes, data.mean, data.std).to(device)
    model = model.to(memory_format=torch.channels_last)  # faster convolutions on CUDA and on CPUs
    if args.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    average = make_average(model, args)  # --ema, --swa-start or CFA's FAWA: what is reported; else None
    theta_prev, metrics = clone_state(model), []
    if checkpoint is not None:  # --resume: the weights, optimiser, theta_prev and average of the last saved epoch
        state = checkpoint["resume"]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        theta_prev, metrics = state["theta_prev"], checkpoint["metrics"]
        if average is not None:
            average.load_state_dict(state["average"])
    precision = utils.settle_amp(args, device, model, (args.batch_size // world_size, *data.image_shape))
    run_dir = Path(args.resume) if args.resume else utils.make_run_dir(args, SCRIPT) if rank == 0 else None
    stop.start(run_dir, world_size)
    if args.compile:
        model.compile()
    train_model = utils.data_parallel(model) if world_size > 1 else model
    column = "val_pgd20_acc" if args.val_size else "test_pgd20_acc"  # what best.pt is chosen on
    log = utils.MetricsLog(run_dir, METRIC_FIELDS, metrics, args) if rank == 0 else None
    (epsilon, step_size), classes = utils.radii(args), data.num_classes
    if rank == 0:
        print(f"{utils.method_name(args, SCRIPT)}, {args.arch} on {args.dataset}: {len(split['train'][0])} training "
              f"images, {utils.threat_model(args.norm, args.epsilon)}, {args.epochs} epoch{'s' * (args.epochs != 1)} "
              f"on {world_size} x {device}, {precision}"
              f"{', compiled' if args.compile else ''}; writing {run_dir}", flush=True)

    for epoch in range(len(metrics), args.epochs):
        utils.seed_everything(args.seed, epoch, rank)  # this epoch's draws: the same after --resume
        start, alpha = time.time(), 0.0
        calibration = (cfa_calibration(metrics[-1]["train_class_robust_acc"] if metrics else None, epoch, args, classes,
                                       device) if args.loss == "cfa" else None)
        totals = torch.zeros(4, device=device)  # loss sum, clean correct, robust correct, images
        class_robust = torch.zeros(2, classes, device=device)  # robust correct, images, per class (CFA)
        model.train()
        for i, steps, x, y in utils.epoch_batches(*split["train"], args, epoch, data.flip, rank, world_size):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch + i / steps, args.lr, args.epochs)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                # x' <- PGD-10(x, y) with BatchNorm in eval mode (each baseline: its own paper's attack)
                model.eval()
                if args.loss in ("ce", "nmse"):
                    x_adv = pgd_attack(model, x, y, epsilon, step_size, args.pgd_steps, norm=args.norm)
                else:
                    x_adv = baseline_attack(model, x, y, args, calibration)
                model.train()
                # theta <- SGD step on CE(f(x'), y) + lam * NMSE(f(x'), f(x), y); the losses run in fp32
                logits_adv = train_model(x_adv).float()
                if args.loss == "nmse":
                    logits_clean = train_model(x).float()
                    loss = F.cross_entropy(logits_adv, y) + args.lam * nmse_loss(logits_adv, logits_clean, y)
                elif args.loss == "ce":  # PGD-AT; the clean logits only for the logged accuracy
                    loss, logits_clean = F.cross_entropy(logits_adv, y), eval_logits(model, x)
                else:
                    loss, logits_clean = baseline_loss(train_model, model, x, y, logits_adv, args, epoch, calibration)
            utils.check_finite(epoch, i, training_loss=loss)  # a nan or inf loss stops the run before it saves
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if args.ema is not None:
                average.update_parameters(model)
            if args.piat and args.piat_every and (epoch * steps + i + 1) % args.piat_every == 0:
                alpha, theta_prev = piat_step_(model, theta_prev, epoch + (i + 1) / steps - 1, args)
            robust = logits_adv.argmax(1) == y  # summed on the device: no host synchronisation in the loop
            totals += torch.stack([loss.detach() * len(y), (logits_clean.argmax(1) == y).sum(), robust.sum(),
                                   torch.tensor(len(y), device=device)]).float()
            class_robust.index_add_(1, y, torch.stack([robust.float(), torch.ones_like(robust.float())]))
        loss_sum, clean_correct, robust_correct, seen = utils.all_reduce_sum_(totals).tolist()
        utils.all_reduce_sum_(class_robust)
        for module in (model, average.module if average is not None else None):
            if module is not None:
                utils.average_buffers_(module)  # identical BatchNorm statistics on every rank
        # PIAT (Eq. 9-10): interpolate with the previous epoch's interpolated weights
        if args.piat and not args.piat_every:
            alpha, theta_prev = piat_step_(model, theta_prev, epoch, args)
        # evaluate the weights the next epoch starts from; an average only observes them (docs/method.md §11)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "alpha": alpha,
               "train_loss": loss_sum / seen, "train_clean_acc": clean_correct / seen,
               "train_robust_acc": robust_correct / seen, "images_per_second": seen / (time.time() - start),
               "train_class_robust_acc": (class_robust[0] / class_robust[1].clamp_min(1)).tolist()}
        trained, trained_per_image = evaluate_epoch(model, split, args, epoch, rank, world_size)
        row.update(trained)
        per_image = trained_per_image
        if average is not None:  # logged beside the trained weights' columns, as raw_*
            row.update({f"raw_{k}": v for k, v in trained.items()})
            row.update(update_average_(average, model, trained, split, args, epoch))
            if average.n_averaged > 0:
                reported, per_image = evaluate_epoch(average.module, split, args, epoch, rank, world_size, " (average)")
                row.update(reported)
        row["epoch_seconds"] = time.time() - start
        metrics.append(row)
        # keep the best and the final checkpoint, never with weights that are not finite
        utils.check_finite_weights(epoch, model=model, weight_average=average.module if average else None)
        if rank == 0:
            reported = average.module if average is not None and average.n_averaged > 0 else model
            saved = {"model": reported.state_dict(), "arch": args.arch, "model_kwargs": {},
                     "num_classes": classes, "mean": data.mean, "std": data.std, "image_shape": data.image_shape,
                     "args": vars(args), "metrics": metrics, "epoch": epoch + 1, "script": SCRIPT,
                     "weights": average_kind(args) if reported is not model else "trained",
                     "per_image": {"indices": split["test_indices"].tolist(), **per_image}}
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "theta_prev": theta_prev,
                     "average": average.state_dict() if average is not None else None}
            utils.save_epoch(run_dir, saved, state, column, log, last=epoch + 1 == args.epochs or stop.signum)
            if average is not None:
                save_trained_weights(run_dir, saved, model, trained_per_image, column)
            print(f"epoch {epoch + 1:3d}  lr {row['lr']:.5f}  alpha {alpha:.3f}  loss {row['train_loss']:.4f}  "
                  f"train clean/robust {row['train_clean_acc']:.3f}/{row['train_robust_acc']:.3f}  test clean/"
                  f"PGD-{args.eval_pgd_steps} {row['test_clean_acc']:.3f}/{row['test_pgd20_acc']:.3f}  "
                  f"{row['epoch_seconds']:.1f}s", flush=True)
        stop.check(epoch, args.epochs, device)  # a stop signal ends the run here, the epoch saved

    utils.check_ranks_agree(weights=model, **({"weight_average": average.module} if average is not None else {}))
    if rank == 0:
        log.close()
        best = max(metrics, key=lambda m: m[column])
        print(f"done: best {column} {best[column]:.4f} at epoch {best['epoch']}, final {metrics[-1][column]:.4f}; "
              f"outputs in {run_dir}")
    return run_dir


def eval_logits(model, x):
    """Logits of x in eval mode, without a gradient (the logged clean accuracy of losses that need no clean pass)."""
    model.eval()
    with torch.no_grad():
        logits = model(x).float()
    model.train()
    return logits


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


# === The baselines PIAT is combined with (docs/method.md §5): ALP, TRADES, MART, MAIL, CFA, RAT


def baseline_attack(model, x, y, args, calibration=None):
    """x' with the attack each baseline's paper uses (the caller sets BatchNorm's mode). calibration: CFA's
    (eps per class, beta per class)."""
    eps, step = utils.radii(args)
    if args.loss == "cfa":  # class-wise calibrated margins: each example within its class's eps
        eps = calibration[0][y]
        if args.cfa_base == "at":
            return pgd_attack(model, x, y, eps, step, args.pgd_steps, norm=args.norm)
    if args.loss in ("trades", "cfa", "rat"):  # RAT attacks the model with fresh noise on its convolutions
        victim = with_noisy_convolutions(model, args.rat_noise_std) if args.loss == "rat" else model
        return pgd_attack(victim, x, y, eps, step, args.pgd_steps, loss="kl", random_start="normal", norm=args.norm)
    return pgd_attack(model, x, y, eps, step, args.pgd_steps, random_start="normal" if args.loss in ("mart", "mail")
                      else "uniform", norm=args.norm)


def baseline_loss(train_model, model, x, y, logits_adv, args, epoch, calibration=None):
    """(the baseline's loss, the clean logits) from the adversarial logits."""
    needs_clean = args.loss in ("alp", "trades", "mart", "rat") or (args.loss == "cfa" and args.cfa_base == "trades")
    logits_clean = train_model(x).float() if needs_clean else eval_logits(model, x)
    if args.loss == "alp":
        return F.cross_entropy(logits_adv, y) + args.lam * alp_loss(logits_adv, logits_clean), logits_clean
    if args.loss == "trades":
        return F.cross_entropy(logits_clean, y) + args.beta * trades_kl(logits_adv, logits_clean), logits_clean
    if args.loss == "mart":
        return mart_loss(logits_adv, logits_clean, y, args.beta), logits_clean
    if args.loss == "mail" and epoch >= args.mail_burn_in:
        return mail_loss(logits_adv, y, args.mail_bias, args.mail_slope), logits_clean
    if args.loss == "cfa" and args.cfa_base == "trades":
        return cfa_trades_loss(logits_adv, logits_clean, y, calibration[1]), logits_clean
    if args.loss == "rat":
        first, second = rat_taylor_terms(logits_adv, logits_clean, y, last_linear(model).weight, args.rat_target_mass)
        return ((1 - args.rat_alpha) * F.cross_entropy(logits_clean, y)
                + args.beta * trades_kl(logits_adv, logits_clean)
                + args.rat_alpha * first + args.rat_second_weight * second), logits_clean
    return F.cross_entropy(logits_adv, y), logits_clean  # MAIL's burn-in, CFA on PGD-AT


def alp_loss(logits_adv, logits_clean):
    """Adversarial logit pairing (Eq. 8): mean_i ||f(x'_i) - f(x_i)||^2 over the absolute logits."""
    return (logits_adv - logits_clean).pow(2).sum(dim=1).mean()


def trades_kl(logits_adv, logits_clean):
    """Batch-mean KL(p(x) || p(x')) summed over classes; gradients flow through both, as in TRADES."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")


def cw_runner_up(probs, y):
    """max_{j != y} p_j: the most likely wrong class's probability."""
    return probs.masked_fill(F.one_hot(y, probs.shape[1]).bool(), float("-inf")).amax(dim=1)


def mart_loss(logits_adv, logits_clean, y, beta):
    """MART (Wang et al., ICLR 2020), its official form: CE(f(x'), y) - log(1.0001 - max_{j!=y} p_j(x')) (the
    boosted BCE), plus beta * mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i))."""
    p_adv, p_clean = F.softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1)
    boosted_bce = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - cw_runner_up(p_adv, y) + 1e-12).mean()
    kl = (p_clean * (torch.log(p_clean + 1e-12) - torch.log(p_adv + 1e-12))).sum(dim=1)
    return boosted_bce + beta * (kl * (1.0000001 - p_clean.gather(1, y[:, None]).squeeze(1))).mean()


def mail_weights(logits_adv, y, bias=-1.5, slope=1.0):
    """MAIL's instance weights (Wang, Liu et al., NeurIPS 2021; official code): 3 * sigmoid(slope * (bias -
    margin)), margin = p_y(x') - max_{j!=y} p_j(x'): examples near or past the boundary weigh more. Detached."""
    probs = F.softmax(logits_adv.detach(), dim=1)
    return 3 * torch.sigmoid(slope * (bias - (probs.gather(1, y[:, None]).squeeze(1) - cw_runner_up(probs, y))))


def mail_loss(logits_adv, y, bias=-1.5, slope=1.0):
    """MAIL-AT: mean_i w_i * CE(f(x'_i), y_i)."""
    return (mail_weights(logits_adv, y, bias, slope) * F.cross_entropy(logits_adv, y, reduction="none")).mean()


def cfa_trades_loss(logits_adv, logits_clean, y, class_beta):
    """CFA's TRADES objective with class-wise calibrated regularisation (Wei et al., CVPR 2023, Eq. 8):
    mean_i [CE(f(x_i), y_i) + beta_{y_i} * KL(p(x_i) || p(x'_i))] / (1 + beta_{y_i})."""
    beta = class_beta[y]
    ce = F.cross_entropy(logits_clean, y, reduction="none")
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="none").sum(dim=1)
    return ((ce + beta * kl) / (1 + beta)).mean()


def cfa_calibration(class_robust_acc, epoch, args, num_classes, device=None):
    """CFA's class-wise margin and regularisation for this epoch (Wei et al., Eq. 6-7): eps_k = (lambda1 + t_k) eps
    (--cfa-ccm) and beta_k = (lambda2 + t_k) beta (--cfa-ccr), t_k class k's training robust accuracy in the last
    epoch; every class gets eps and beta before --cfa-begin. (eps per class in [0, 1] units, beta per class)."""
    eps = torch.full((num_classes,), utils.radii(args)[0], device=device)
    beta = torch.full((num_classes,), float(args.beta), device=device)
    if class_robust_acc is None or epoch < args.cfa_begin:
        return eps, beta
    t = torch.as_tensor(class_robust_acc, dtype=torch.float32, device=device)
    return ((args.cfa_lambda1 + t) * eps if args.cfa_ccm else eps,
            (args.cfa_lambda2 + t) * beta if args.cfa_ccr else beta)


def last_linear(model):
    """The model's classifier: its last nn.Linear."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def rat_soft_targets(gap, mass):
    """RAT's soft labels from a per-class gap (K,) (Jin et al., CVPR 2023, official code): the gap shifted to >= 0
    and normalised; row r of the (K, K) result gives class r probability 1 - mass and spreads `mass` over the
    others in proportion to their gap (evenly for a constant gap)."""
    k = gap.numel()
    gap = gap - gap.min()
    gap = gap / gap.sum() if gap.sum() > 0 else torch.ones_like(gap) / k
    eye = torch.eye(k, device=gap.device, dtype=gap.dtype)
    spread = gap[None, :] * (1 - eye)
    return mass * spread / spread.sum(dim=1, keepdim=True).clamp_min(1e-12) + (1 - mass) * eye


def rat_taylor_terms(logits_adv, logits_clean, y, classifier_weight, mass):
    """RAT's first- and second-order Taylor terms as its official code approximates them: the per-class row sums s
    of the classifier's weight gradient of CE on clean (s_nat) and adversarial (s_adv) logits give the gaps
    |s_nat| - |s_adv| and s_adv^2 - s_nat^2, each made soft labels (rat_soft_targets) the logits are pulled to:
        first  = (KL(T1[y] || p(x')) + KL(T1'[y] || p(x))) / 2,  T1 from |s_nat| - |s_adv|, T1' its negation
        second = (KL(T2[y] || p(x')) + KL(T2[y] || p(x))) / 2,   T2 from s_adv^2 - s_nat^2
    The gaps are constants (no gradient flows through them)."""
    s_nat, s_adv = (torch.autograd.grad(F.cross_entropy(logits, y), classifier_weight, retain_graph=True)[0]
                    .sum(dim=1).float() for logits in (logits_clean, logits_adv))
    t1, t1_clean = rat_soft_targets(s_nat.abs() - s_adv.abs(), mass), rat_soft_targets(s_adv.abs() - s_nat.abs(), mass)
    t2 = rat_soft_targets(s_adv.pow(2) - s_nat.pow(2), mass)
    log_p_adv, log_p_clean = F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1)
    first = (F.kl_div(log_p_adv, t1[y], reduction="batchmean") + F.kl_div(log_p_clean, t1_clean[y],
                                                                           reduction="batchmean")) / 2
    second = (F.kl_div(log_p_adv, t2[y], reduction="batchmean") + F.kl_div(log_p_clean, t2[y],
                                                                           reduction="batchmean")) / 2
    return first, second


def with_noisy_convolutions(model, std):
    """RAT's randomised weights: `model` run with N(0, std^2) noise on every convolution weight, drawn once per call
    of this function (one draw per batch); the model's own weights are never touched (functional_call)."""
    noisy = {f"{name}.weight": module.weight.detach() + std * torch.randn_like(module.weight)
             for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    return lambda x: torch.func.functional_call(model, noisy, (x,))


# === Weight averages a run reports instead of its trained weights (docs/method.md §11): observers that never
# feed back into training, unlike PIAT


def make_average(model, args):
    """The torch.optim.swa_utils.AveragedModel this run evaluates and saves, or None: --ema (parameters and
    BatchNorm buffers, every step), --swa-start (the end-of-epoch parameters, BatchNorm recomputed) or CFA's FAWA
    (a moving average of the end-of-epoch weights, gated by the worst class)."""
    if args.ema is not None:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    if args.swa_start is not None:
        return AveragedModel(model)
    if args.loss == "cfa" and args.cfa_fawa:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.cfa_decay), use_buffers=True)
    return None


def save_trained_weights(run_dir, saved, model, per_image, column):
    """With a weight average, RUN/trained is the run without it: the trained weights' own best.pt and final.pt,
    chosen on their own (raw_*) columns, with the flags of a run without the average. The average only observes, so
    those are exactly that run's checkpoints (one PGD-AT + EMA run is also a PGD-AT run), and evaluate.py,
    --compare and sweep.py read RUN/trained as a run folder of its own."""
    metrics = [{**m, **{c: m[f"raw_{c}"] for c in EVAL_COLUMNS if f"raw_{c}" in m}} for m in saved["metrics"]]
    args = {**saved["args"], "ema": None, "swa_start": None, **({"cfa_fawa": False} if saved["args"]["loss"] == "cfa"
                                                                 else {})}
    checkpoint = {**saved, "model": model.state_dict(), "args": args, "metrics": metrics, "weights": "trained",
                  "per_image": {**saved["per_image"], **per_image}}
    (run_dir / "trained").mkdir(exist_ok=True)
    utils.save_epoch(run_dir / "trained", checkpoint, None, column, None, last=False)


def average_kind(args):
    return "ema" if args.ema is not None else "swa" if args.swa_start is not None else "fawa"


@torch.no_grad()
def update_average_(average, model, trained, split, args, epoch):
    """End of an epoch: SWA takes the weights from --swa-start on and recomputes its BatchNorm statistics on the
    training images; CFA's FAWA takes them from --cfa-fawa-start on when the worst class's validation PGD-20
    accuracy of the trained weights (`trained`'s columns) reaches --cfa-threshold. Returns metrics.csv's columns."""
    if args.swa_start is not None and epoch + 1 >= args.swa_start:
        average.update_parameters(model)
        x_train = split["train"][0]
        update_bn((utils.to_float(x_train[i : i + args.eval_batch_size]) for i in range(0, len(x_train),
                                                                                          args.eval_batch_size)),
                  average.module)
    if args.loss == "cfa" and args.cfa_fawa:
        taken = epoch + 1 >= args.cfa_fawa_start and trained["val_worst_pgd20_acc"] >= args.cfa_threshold
        if taken:
            average.update_parameters(model)
        return {"fawa_updated": int(taken)}
    return {}


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit status for every way a run can end early
