"""PIAT: Parameter Interpolation Adversarial Training for CNNs, with the NMSE regulariser.

Liu, Yang, He & Hopcroft, "Parameter Interpolation Adversarial Training for Robust Image
Classification", IEEE TIFS 2025 (arXiv 2511.00836). Algorithm 1, as this script runs it:

    theta_prev <- theta_0
    for epoch t = 0 .. E-1:
        for each batch (x, y):
            x' <- PGD-10(x, y)                          BatchNorm in eval mode, uniform random start
            theta <- SGD step on  CE(f(x'), y) + lam * NMSE(f(x'), f(x), y)       (or --loss ...)
        alpha_t <- min(alpha_max, (t + a) / (t + b))                                      (Eq. 10)
        theta <- alpha_t * theta_prev + (1 - alpha_t) * theta   (parameters and BN statistics, Eq. 9)
        theta_prev <- theta
        evaluate clean and PGD-20 accuracy; keep the best and the final checkpoint

`--loss ce --no-piat` is plain PGD-AT (Madry et al. 2018); every --loss combines with --piat.
Parts marked (reconstruction) are our reading of equations the paper's text lost; see README.
"""

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import utils

LOSSES = ("ce", "nmse", "alp", "trades", "mart", "mail")
# The paper's settings (Sec. V-A); small-cnn is ours, for CPU runs.
ARCH_DEFAULTS = {
    "resnet18": {"epochs": 120, "lr": 0.01, "weight_decay": 3.5e-3},
    "wrn-32-10": {"epochs": 180, "lr": 0.1, "weight_decay": 7e-4},
    "small-cnn": {"epochs": 30, "lr": 0.05, "weight_decay": 5e-4},
}
LAM_DEFAULTS = {"nmse": 4.0, "alp": 0.5}


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
    g = p.add_argument_group("speed (multi-GPU: torchrun --nproc_per_node=N train_piat.py ...)")
    g.add_argument("--amp", action=utils.argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast for training and the training attack (default: on for CUDA, off on CPU); "
                        "the per-epoch evaluation always runs in fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (the attack runs compiled too)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="cifar10", choices=utils.DATASETS,
                   help="cifar10/cifar100/svhn are downloaded into --data-dir; imagefolder reads --data-dir/train and "
                        "--data-dir/test; synthetic is a small learnable set made in memory")
    g.add_argument("--data-dir", type=str, default=None,
                   help="where data sets are stored or downloaded (default: ./data, or the resumed run's)")
    g.add_argument("--image-size", type=pos_int, default=None, help="resize image-folder images to this size")
    g.add_argument("--train-size", type=pos_int, default=None, help="train on a fixed subset of N images")
    g.add_argument("--val-size", type=nonneg_int, default=0,
                   help="hold out N training images and select best.pt on their PGD-20 accuracy instead of the "
                        "test set's")
    g.add_argument("--eval-size", type=pos_int, default=1000,
                   help="evaluate after every epoch on a fixed subset of N test images")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="turn off random crop (4-pixel padding) and horizontal flip (never used for SVHN)")
    g = p.add_argument_group("model and optimiser")
    g.add_argument("--arch", type=str, default="resnet18", choices=utils.ARCHS, help="network")
    g.add_argument("--epochs", type=pos_int, default=None,
                   help="epochs (default: 120 resnet18, 180 wrn-32-10, 30 small-cnn)")
    g.add_argument("--batch-size", type=pos_int, default=128, help="training batch size")
    g.add_argument("--eval-batch-size", type=pos_int, default=256, help="batch size of the per-epoch evaluation")
    g.add_argument("--lr", type=nonneg_float, default=None,
                   help="initial learning rate, held for the first half of training, then linearly to lr/10 at 3/4 "
                        "and lr/100 at the end (default: 0.01 resnet18, 0.1 wrn-32-10, 0.05 small-cnn)")
    g.add_argument("--momentum", type=nonneg_float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help="weight decay (default: 3.5e-3 resnet18, 7e-4 wrn-32-10, 5e-4 small-cnn)")
    g = p.add_argument_group("attack (epsilon and step size in 1/255 units)")
    g.add_argument("--epsilon", type=nonneg_float, default=8.0,
                   help="L-inf radius of the training and evaluation attacks")
    g.add_argument("--step-size", type=nonneg_float, default=2.0, help="PGD step size")
    g.add_argument("--pgd-steps", type=nonneg_int, default=10, help="PGD steps of the training attack")
    g.add_argument("--eval-pgd-steps", type=nonneg_int, default=20, help="PGD steps of the per-epoch evaluation")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", type=str, default="nmse", choices=LOSSES,
                   help="ce: PGD-AT (Madry et al. 2018); nmse: CE(f(x'),y) + lam*NMSE (this paper, Eq. 12); "
                        "alp: CE(f(x'),y) + lam*mean||f(x')-f(x)||^2 (Kannan et al. 2018, Eq. 8); "
                        "trades: CE(f(x),y) + beta*KL(p(x)||p(x')), x' maximises the KL (Zhang et al. 2019); "
                        "mart: boosted BCE on x' + beta*KL*(1-p_y(x)) (Wang et al. 2020); "
                        "mail: margin-reweighted adversarial CE after a burn-in (Wang, Liu et al. 2021)")
    g.add_argument("--lam", type=nonneg_float, default=None,
                   help="weight of the NMSE or ALP term (default: 4.0 for nmse (reconstruction: the paper's value "
                        "was lost in extraction), 0.5 for alp (the official ALP release))")
    g.add_argument("--beta", type=nonneg_float, default=6.0, help="weight of the KL term of trades and mart")
    g.add_argument("--mail-bias", type=float, default=-1.5,
                   help="mail: weight = 3*sigmoid(slope*(bias - margin)), margin = p_y(x') - max_{j!=y} p_j(x')")
    g.add_argument("--mail-slope", type=float, default=1.0, help="mail: slope of that sigmoid")
    g.add_argument("--mail-burn-in", type=nonneg_int, default=None,
                   help="mail: epochs of plain adversarial CE before reweighting (default: 76 of 120, as in the "
                        "official code, scaled to --epochs)")
    g = p.add_argument_group("PIAT: theta <- alpha*theta_prev + (1-alpha)*theta after every epoch")
    g.add_argument("--piat", action=utils.argparse.BooleanOptionalAction, default=True,
                   help="interpolate the weights after every epoch (on by default)")
    g.add_argument("--alpha-max", type=nonneg_float, default=0.99,
                   help="alpha_t = min(alpha_max, (t+a)/(t+b)) (reconstruction of Eq. 10)")
    g.add_argument("--alpha-a", type=float, default=1.0, help="a in alpha_t (reconstruction)")
    g.add_argument("--alpha-b", type=float, default=10.0, help="b in alpha_t (reconstruction)")
    g.add_argument("--alpha-fixed", type=nonneg_float, default=None,
                   help="a constant alpha instead (the paper's Fig. 9)")
    args = p.parse_args(argv)
    validate_and_fill(args)
    return args


def validate_and_fill(args):
    if args.data_dir is None and not args.resume:  # a resumed run keeps its own
        args.data_dir = "./data"
    for key, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lam is None:
        args.lam = LAM_DEFAULTS.get(args.loss, 0.0)
    if args.mail_burn_in is None:
        args.mail_burn_in = round(76 * args.epochs / 120)
    if args.alpha_fixed is not None and not args.alpha_fixed <= 1:
        raise utils.UserError(f"--alpha-fixed must lie in [0, 1], got {args.alpha_fixed}")
    if not args.alpha_max <= 1:
        raise utils.UserError(f"--alpha-max must lie in [0, 1], got {args.alpha_max}")


# ----------------------------------------------------------------------------------------------
# The attack (Eq. 3). Images live in [0, 1]; epsilon and step_size here are in [0, 1] units.
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
# Losses. NMSE is the paper's (Eq. 11-12); the others are the baselines it is combined with.
# ----------------------------------------------------------------------------------------------


def nmse_loss(logits_adv, logits_clean, y):
    """mean_i w_i * || f(x'_i)/||f(x'_i)|| - f(x_i)/||f(x_i)|| ||^2 with w_i = 1 - p_y(x_i) from the clean
    logits (Eq. 11): vulnerable clean examples weigh more. The weight is not detached, as in MART."""
    distance = (F.normalize(logits_adv, dim=1) - F.normalize(logits_clean, dim=1)).pow(2).sum(dim=1)
    weight = 1 - F.softmax(logits_clean, dim=1).gather(1, y[:, None]).squeeze(1)
    return (weight * distance).mean()


def alp_loss(logits_adv, logits_clean):
    """Adversarial logit pairing (Eq. 8): mean_i ||f(x'_i) - f(x_i)||^2 over the absolute logits."""
    return (logits_adv - logits_clean).pow(2).sum(dim=1).mean()


def trades_kl(logits_adv, logits_clean):
    """Batch-mean KL(p(x) || p(x')) summed over classes; gradients flow through both, as in TRADES."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")


def mart_loss(logits_adv, logits_clean, y, beta):
    """MART (Wang et al., ICLR 2020), its official form: CE(f(x'), y) - log(1.0001 - max_{j!=y} p_j(x'))
    (the boosted BCE), plus beta * mean_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i))."""
    p_adv = F.softmax(logits_adv, dim=1)
    runner_up = cw_runner_up(p_adv, y)
    boosted_bce = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - runner_up + 1e-12).mean()
    p_clean = F.softmax(logits_clean, dim=1)
    kl = (p_clean * (torch.log(p_clean + 1e-12) - torch.log(p_adv + 1e-12))).sum(dim=1)
    p_true = p_clean.gather(1, y[:, None]).squeeze(1)
    return boosted_bce + beta * (kl * (1.0000001 - p_true)).mean()


def cw_runner_up(probs, y):
    """max_{j != y} p_j: the most likely wrong class's probability."""
    return probs.masked_fill(F.one_hot(y, probs.shape[1]).bool(), float("-inf")).amax(dim=1)


def mail_weights(logits_adv, y, bias=-1.5, slope=1.0):
    """MAIL's instance weights (Wang, Liu et al., NeurIPS 2021; official code): 3 * sigmoid(slope *
    (bias - margin)), margin = p_y(x') - max_{j!=y} p_j(x'). Small or negative margins (examples near
    or past the boundary) weigh more. Detached: the weights are not trained."""
    probs = F.softmax(logits_adv.detach(), dim=1)
    margin = probs.gather(1, y[:, None]).squeeze(1) - cw_runner_up(probs, y)
    return 3 * torch.sigmoid(slope * (bias - margin))


def mail_loss(logits_adv, y, bias=-1.5, slope=1.0):
    """MAIL-AT: mean_i w_i * CE(f(x'_i), y_i)."""
    return (mail_weights(logits_adv, y, bias, slope) * F.cross_entropy(logits_adv, y, reduction="none")).mean()


# ----------------------------------------------------------------------------------------------
# PIAT (Eq. 9-10)
# ----------------------------------------------------------------------------------------------


def piat_alpha(epoch, alpha_max=0.99, a=1.0, b=10.0):
    """alpha_t = min(alpha_max, (t + a) / (t + b)) (reconstruction of Eq. 10): 0.10 at t=0, 0.55 at
    t=10, 0.92 at t=100 with the defaults: trust the new weights early, the accumulated ones late."""
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
# One training step's loss, and the per-epoch evaluation
# ----------------------------------------------------------------------------------------------


def training_loss(model, x, y, args, epoch, net=None):
    """Generate x' with the attack each loss's paper uses, then return (loss, logits_adv, logits_clean).
    The attack runs on `model` itself; the training forward passes go through `net`, the model's
    DistributedDataParallel wrapper when there is one, so that DDP's gradient hooks see only them."""
    net = model if net is None else net
    eps, step = args.epsilon / 255, args.step_size / 255
    needs_clean = args.loss in ("nmse", "alp", "trades", "mart")
    model.eval()  # BatchNorm statistics frozen while attacking
    if args.loss == "trades":
        x_adv = pgd_attack(model, x, y, eps, step, args.pgd_steps, loss="kl", random_start="normal")
    else:
        start = "normal" if args.loss in ("mart", "mail") else "uniform"
        x_adv = pgd_attack(model, x, y, eps, step, args.pgd_steps, loss="ce", random_start=start)
    if not needs_clean:  # clean accuracy is still logged: one cheap forward in eval mode
        with torch.no_grad():
            logits_clean = model(x)
    model.train()
    if needs_clean:
        logits_clean = net(x).float()  # the losses run in fp32 under --amp too
    logits_adv = net(x_adv).float()
    if args.loss == "ce" or (args.loss == "mail" and epoch < args.mail_burn_in):
        loss = F.cross_entropy(logits_adv, y)
    elif args.loss == "nmse":
        loss = F.cross_entropy(logits_adv, y) + args.lam * nmse_loss(logits_adv, logits_clean, y)
    elif args.loss == "alp":
        loss = F.cross_entropy(logits_adv, y) + args.lam * alp_loss(logits_adv, logits_clean)
    elif args.loss == "trades":
        loss = F.cross_entropy(logits_clean, y) + args.beta * trades_kl(logits_adv, logits_clean)
    elif args.loss == "mart":
        loss = mart_loss(logits_adv, logits_clean, y, args.beta)
    else:
        loss = mail_loss(logits_adv, y, args.mail_bias, args.mail_slope)
    return loss, logits_adv, logits_clean


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
    """The paper's schedule: lr until half-way, then linearly to lr/10 at 3/4 and lr/100 at the end.
    `progress` is in epochs and may be fractional (the lr changes every step)."""
    knots = [(0.0, lr), (0.5 * epochs, lr), (0.75 * epochs, lr / 10), (float(epochs), lr / 100)]
    for (e0, v0), (e1, v1) in zip(knots, knots[1:]):
        if progress <= e1:
            return v0 if e1 == e0 else v0 + (v1 - v0) * (progress - e0) / (e1 - e0)
    return knots[-1][1]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

METRIC_FIELDS = ["epoch", "lr", "alpha", "train_loss", "train_clean_acc", "train_robust_acc", "test_clean_acc",
                 "test_pgd20_acc", "val_clean_acc", "val_pgd20_acc", "epoch_seconds", "images_per_second"]


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
    return {"model": model.state_dict(), "arch": args.arch, "model_kwargs": {}, "num_classes": data.num_classes,
            "mean": data.mean, "std": data.std, "image_shape": data.image_shape, "args": vars(args), "metrics": metrics,
            "epoch": epoch, "script": "train_piat.py"}


def main(argv=None):
    args = parse_args(argv)
    resume = None
    if args.resume:  # the interrupted run's own flags, its model and training state
        args, resume = utils.resume_run(args, "train_piat.py")
    rank, world_size, device = utils.setup_distributed(args.device)
    try:
        return train(args, resume, rank, world_size, device)
    finally:
        utils.cleanup_distributed()


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
    model = utils.build_model(args.arch, data.num_classes, data.mean, data.std).to(device)
    if world_size > 1:
        utils.seed_everything(args.seed + rank)  # augmentation and attack noise differ between ranks
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    prev_state = clone_state(model)  # theta_prev starts as the initial weights
    metrics, start_epoch = [], 0
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as err:
            reason = str(err).splitlines()[0]
            raise utils.UserError(f"{args.resume}/final.pt does not fit a {args.arch}: {reason}") from None
        optimizer.load_state_dict(resume["resume"]["optimizer"])
        prev_state = resume["resume"]["prev_state"]
        metrics, start_epoch = resume["metrics"], resume["epoch"]
        utils.restore_rng_states(resume["resume"]["rng"], rank)
        run_dir = Path(args.resume)
        if is_main:
            print(f"resuming {run_dir} after epoch {start_epoch} of {args.epochs}")
    elif is_main:
        run_dir = make_run_dir(args)
        utils.save_json(vars(args), run_dir / "args.json")
    # the attack runs on the model itself, the training step through DDP; both may be compiled
    attacked = net = torch.compile(model) if args.compile else model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        net = torch.compile(net) if args.compile else net
    log = utils.MetricsLog(run_dir / "metrics.csv", METRIC_FIELDS, metrics) if is_main else None
    select_on = "val_pgd20_acc" if args.val_size else "test_pgd20_acc"
    best = max((m[select_on] for m in metrics), default=-1.0)
    eps, step = args.epsilon / 255, args.step_size / 255
    # under torchrun every rank takes the same number of equal steps: drop the last partial batch
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size) if world_size == 1 else len(x_train) // args.batch_size
    if is_main:
        print(f"{args.arch} on {args.dataset}: {len(x_train)} training images, loss {args.loss}, "
              f"PIAT {'on' if args.piat else 'off'}, {args.epochs} epochs on {world_size} x {device}"
              f"{', bf16' if args.amp else ''}{', compiled' if args.compile else ''}; writing {run_dir}")

    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        model.train()
        totals = torch.zeros(4, device=device)  # loss sum, clean correct, robust correct, images
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
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss, logits_adv, logits_clean = training_loss(attacked, x, y, args, epoch, net)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # accumulated on the device: no host synchronisation inside the loop
            totals[0] += loss.detach() * len(y)
            totals[1] += (logits_clean.argmax(1) == y).sum()
            totals[2] += (logits_adv.argmax(1) == y).sum()
            totals[3] += len(y)
        utils.all_reduce_sum_(totals)
        utils.average_buffers_(model)  # identical BatchNorm statistics on every rank before interpolating
        train_seconds = time.time() - start

        # PIAT: interpolate with the previous epoch's interpolated weights (Eq. 9)
        alpha = 0.0
        if args.piat:
            alpha = args.alpha_fixed
            if alpha is None:
                alpha = piat_alpha(epoch, args.alpha_max, args.alpha_a, args.alpha_b)
            interpolate_(model, prev_state, alpha)
            prev_state = clone_state(model)

        loss_sum, clean_correct, robust_correct, seen = totals.tolist()
        row = {"epoch": epoch + 1, "lr": lr, "alpha": alpha, "train_loss": loss_sum / seen,
               "train_clean_acc": clean_correct / seen, "train_robust_acc": robust_correct / seen}
        evaluation = dict(epsilon=eps, step_size=step, steps=args.eval_pgd_steps, batch_size=args.eval_batch_size,
                          rank=rank, world_size=world_size)
        row["test_clean_acc"], row["test_pgd20_acc"] = evaluate(attacked, *split["test"], desc="test", **evaluation)
        if args.val_size:
            row["val_clean_acc"], row["val_pgd20_acc"] = evaluate(attacked, *split["val"], desc="val", **evaluation)
        row["epoch_seconds"] = time.time() - start
        row["images_per_second"] = seen / train_seconds
        metrics.append(row)
        rng_states = utils.all_rng_states()  # every rank's, for --resume

        if is_main:  # checkpoints first (atomically), then the log: a crash never leaves a row without its weights
            checkpoint = checkpoint_dict(model, data, args, metrics, epoch + 1)
            if row[select_on] > best:
                best = row[select_on]
                utils.save_checkpoint(checkpoint, run_dir / "best.pt")
            checkpoint["resume"] = {"optimizer": optimizer.state_dict(), "prev_state": prev_state, "rng": rng_states}
            utils.save_checkpoint(checkpoint, run_dir / "final.pt")
            log.write(row)
            utils.plot_curves(metrics, run_dir / "curves.png",
                              title=f"{args.arch} {args.dataset} {args.loss}{' + PIAT' if args.piat else ''}")
            print(f"epoch {epoch + 1:3d}  lr {lr:.5f}  alpha {alpha:.3f}  loss {row['train_loss']:.4f}  "
                  f"train clean/robust {row['train_clean_acc']:.3f}/{row['train_robust_acc']:.3f}  "
                  f"test clean/PGD-{args.eval_pgd_steps} {row['test_clean_acc']:.3f}/{row['test_pgd20_acc']:.3f}  "
                  f"{row['epoch_seconds']:.1f}s", flush=True)

    fingerprints = utils.gather_objects(utils.state_fingerprint(model))
    if not is_main:
        return None
    log.close()
    if world_size > 1:
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"the {world_size} ranks ended with different weights: {fingerprints}")
        print(f"weights identical on all {world_size} ranks (sha256 {fingerprints[0][:16]})")
    best_row = max(metrics, key=lambda m: m[select_on])
    print(f"done: best {select_on} {best_row[select_on]:.4f} at epoch {best_row['epoch']}, "
          f"final {metrics[-1][select_on]:.4f}; outputs in {run_dir}")
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except utils.UserError as err:
        sys.exit(f"{os.path.basename(__file__)}: error: {err}")
