"""PIAT: Parameter Interpolation Adversarial Training for CNNs, with the NMSE regulariser.

Liu, Yang, He & Hopcroft, "Parameter Interpolation Adversarial Training for Robust Image
Classification", IEEE TIFS 2025 (arXiv 2511.00836). Algorithm 1, as train() runs it:

    theta_prev <- theta_0
    for epoch t = 0 .. E-1:
        for each batch (x, y):                                                  (train_one_epoch)
            x' <- PGD-10(x, y)                          BatchNorm in eval mode, uniform random start
            theta <- SGD step on  CE(f(x'), y) + lam * NMSE(f(x'), f(x), y)       (or --loss ...)
        alpha_t <- min(alpha_max, (t + a) / (t + b))                           (piat_step_, Eq. 10)
        theta <- alpha_t * theta_prev + (1 - alpha_t) * theta   (parameters and BN statistics, Eq. 9)
        theta_prev <- theta
        evaluate clean and PGD-20 accuracy; keep the best and the final checkpoint

`--loss ce --no-piat` is plain PGD-AT (Madry et al. 2018); every --loss combines with --piat.
Parts marked (reconstruction) are our reading of equations the paper's text lost: docs/method.md
lists every equation and constant. The file reads top to bottom: the attack, the losses, PIAT, one
epoch of training, the evaluation, train() (Algorithm 1), then the run's plumbing and the flags.
"""

import argparse
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
METRIC_FIELDS = ["epoch", "lr", "alpha", "train_loss", "train_clean_acc", "train_robust_acc", "test_clean_acc",
                 "test_pgd20_acc", "val_clean_acc", "val_pgd20_acc", "epoch_seconds", "images_per_second"]


# ----------------------------------------------------------------------------------------------
# The attack (Eq. 3; docs/method.md §2). Images live in [0, 1]; epsilon and step_size in [0, 1] units.
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
# Losses. NMSE is the paper's (Eq. 11-12, docs/method.md §4); the others are its baselines (§5).
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
# PIAT (Eq. 9-10; docs/method.md §3)
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


def piat_step_(model, prev_state, epoch, args):
    """The PIAT step after epoch t (Eq. 9-10): alpha_t from the schedule (or --alpha-fixed), then
    theta <- alpha_t * theta_prev + (1 - alpha_t) * theta in place, and theta_prev <- theta.
    Returns (alpha_t, the new theta_prev). Without --piat nothing changes and alpha is 0."""
    if not args.piat:
        return 0.0, prev_state
    alpha = args.alpha_fixed
    if alpha is None:
        alpha = piat_alpha(epoch, args.alpha_max, args.alpha_a, args.alpha_b)
    interpolate_(model, prev_state, alpha)
    return alpha, clone_state(model)


# ----------------------------------------------------------------------------------------------
# One epoch of training: for each batch, the attack, then an SGD step
# ----------------------------------------------------------------------------------------------


def attack_radius(args):
    """(epsilon, step size) in [0, 1] pixel units; the flags give them in 1/255 units."""
    return args.epsilon / 255, args.step_size / 255


def training_loss(net, x, y, args, epoch):
    """Generate x' with the attack each loss's paper uses, then return (loss, logits_adv, logits_clean).
    `net` is a utils.Network: the attack runs on net.for_attack with BatchNorm in eval mode, the
    training forward passes go through net.for_step."""
    eps, step = attack_radius(args)
    needs_clean = args.loss in ("nmse", "alp", "trades", "mart")
    net.model.eval()  # BatchNorm statistics frozen while attacking
    if args.loss == "trades":
        x_adv = pgd_attack(net.for_attack, x, y, eps, step, args.pgd_steps, loss="kl", random_start="normal")
    else:
        start = "normal" if args.loss in ("mart", "mail") else "uniform"
        x_adv = pgd_attack(net.for_attack, x, y, eps, step, args.pgd_steps, loss="ce", random_start=start)
    if not needs_clean:  # clean accuracy is still logged: one cheap forward in eval mode
        with torch.no_grad():
            logits_clean = net.for_attack(x)
    net.model.train()
    if needs_clean:
        logits_clean = net.for_step(x).float()  # the losses run in fp32 under --amp too
    logits_adv = net.for_step(x_adv).float()
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


def lr_at(progress, lr, epochs):
    """The paper's schedule: lr until half-way, then linearly to lr/10 at 3/4 and lr/100 at the end.
    `progress` is in epochs and may be fractional (the lr changes every step)."""
    knots = [(0.0, lr), (0.5 * epochs, lr), (0.75 * epochs, lr / 10), (float(epochs), lr / 100)]
    for (e0, v0), (e1, v1) in zip(knots, knots[1:]):
        if progress <= e1:
            return v0 if e1 == e0 else v0 + (v1 - v0) * (progress - e0) / (e1 - e0)
    return knots[-1][1]


def train_one_epoch(net, optimizer, x_train, y_train, flip, args, epoch, rank=0, world_size=1):
    """The inner loop of Algorithm 1: for each batch, x' <- attack, then an SGD step on the loss, the
    learning rate set every step. Returns the epoch's training columns of metrics.csv (summed over
    all ranks, whose BatchNorm statistics are then averaged so every rank holds the same weights)."""
    start = time.time()
    net.model.train()
    n_steps = utils.steps_per_epoch(len(x_train), args.batch_size, world_size)
    totals = torch.zeros(4, device=x_train.device)  # loss sum, clean correct, robust correct, images
    for i, x, y in utils.epoch_batches(x_train, y_train, args, epoch, flip, rank, world_size):
        lr = lr_at(epoch + i / n_steps, args.lr, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss, logits_adv, logits_clean = training_loss(net, x, y, args, epoch)
        utils.check_finite(epoch, i, training_loss=loss)  # a nan/inf loss stops the run (utils.Diverged)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # accumulated on the device: no host synchronisation inside the loop
        totals[0] += loss.detach() * len(y)
        totals[1] += (logits_clean.argmax(1) == y).sum()
        totals[2] += (logits_adv.argmax(1) == y).sum()
        totals[3] += len(y)
    utils.all_reduce_sum_(totals)
    utils.average_buffers_(net.model)  # identical BatchNorm statistics on every rank before interpolating
    loss_sum, clean_correct, robust_correct, seen = totals.tolist()
    return {"lr": lr, "train_loss": loss_sum / seen, "train_clean_acc": clean_correct / seen,
            "train_robust_acc": robust_correct / seen, "images_per_second": seen / (time.time() - start)}


# ----------------------------------------------------------------------------------------------
# The per-epoch evaluation
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


def evaluate_epoch(model, split, args, rank=0, world_size=1):
    """The evaluation columns of metrics.csv: clean and PGD-20 accuracy of the test subset, and of the
    held-out images with --val-size."""
    eps, step = attack_radius(args)
    setting = dict(epsilon=eps, step_size=step, steps=args.eval_pgd_steps, batch_size=args.eval_batch_size,
                   rank=rank, world_size=world_size)
    row = dict(zip(("test_clean_acc", "test_pgd20_acc"), evaluate(model, *split["test"], desc="test", **setting)))
    if args.val_size:
        row.update(zip(("val_clean_acc", "val_pgd20_acc"), evaluate(model, *split["val"], desc="val", **setting)))
    return row


# ----------------------------------------------------------------------------------------------
# Algorithm 1
# ----------------------------------------------------------------------------------------------


def train(args, resume, rank, world_size, device):
    """Algorithm 1 (the module docstring) on this process's share of every batch; returns the run
    folder on rank 0."""
    is_main = rank == 0
    utils.resolve_amp(args, device)
    utils.check_processes(args, world_size, device)
    # set up: the data, the network, SGD, and theta_prev <- theta_0 (or the interrupted run's state)
    utils.seed_everything(args.seed)  # the same initial weights on every rank
    data = utils.load_dataset(args.dataset, args.data_dir, args.image_size)
    split = utils.split_data(data, args, device)
    model = utils.build_model(args.arch, data.num_classes, data.mean, data.std)
    if world_size > 1:
        utils.seed_everything(args.seed + rank)  # augmentation and attack noise differ between ranks
    model = utils.prepare_module(model, args, device, world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    prev_state, metrics = clone_state(model), []
    if resume is not None:
        prev_state, metrics = restore_training_state_(resume, model, optimizer, args, rank)
    run_dir = utils.open_run_dir(args, resume is not None, is_main)
    net = utils.wrap_network(model, args.compile, world_size)
    log = utils.MetricsLog(run_dir / "metrics.csv", METRIC_FIELDS, metrics) if is_main else None
    if is_main:
        announce(args, len(split["train"][0]), world_size, device, run_dir)

    for epoch in range(len(metrics), args.epochs):
        start = time.time()
        # for each batch: x' <- PGD(x), then an SGD step on the loss of x'
        trained = train_one_epoch(net, optimizer, *split["train"], data.flip, args, epoch, rank, world_size)
        # PIAT: interpolate with the previous epoch's interpolated weights (Eq. 9-10)
        alpha, prev_state = piat_step_(model, prev_state, epoch, args)
        # evaluate the interpolated weights, which the next epoch starts from
        row = {"epoch": epoch + 1, "lr": trained.pop("lr"), "alpha": alpha, **trained,
               **evaluate_epoch(net.for_attack, split, args, rank, world_size)}
        row["epoch_seconds"] = time.time() - start
        metrics.append(row)
        utils.check_finite_weights(epoch, model=model)  # never save weights that are not finite
        # keep the best and the final checkpoint (final.pt with everything --resume needs)
        training_state = {"optimizer": optimizer.state_dict(), "prev_state": prev_state,
                          "rng": utils.all_rng_states()}
        if is_main:
            utils.write_epoch(run_dir, checkpoint_dict(model, data, args, metrics), training_state, metrics,
                              utils.selection_metric(args), log, title=run_title(args))
            print_epoch(row, args)

    utils.check_ranks_agree([model], ["weights"], world_size)
    if not is_main:
        return None
    log.close()
    utils.report_done(metrics, utils.selection_metric(args), run_dir)
    return run_dir


# ----------------------------------------------------------------------------------------------
# The run's plumbing: resume, checkpoints, messages
# ----------------------------------------------------------------------------------------------


def restore_training_state_(resume, model, optimizer, args, rank):
    """Load an interrupted run's weights, optimizer and RNG states; returns (theta_prev, metrics so far)."""
    utils.load_resumed_state(model, resume["model"], args)
    optimizer.load_state_dict(resume["resume"]["optimizer"])
    utils.restore_rng_states(resume["resume"]["rng"], rank)
    if rank == 0:
        print(f"resuming {Path(args.resume)} after epoch {resume['epoch']} of {args.epochs}")
    return resume["resume"]["prev_state"], resume["metrics"]


def checkpoint_dict(model, data, args, metrics):
    """What best.pt and final.pt hold: enough for evaluate.py to rebuild the model alone."""
    return {"model": model.state_dict(), "arch": args.arch, "model_kwargs": {}, "num_classes": data.num_classes,
            "mean": data.mean, "std": data.std, "image_shape": data.image_shape, "args": vars(args), "metrics": metrics,
            "epoch": len(metrics), "script": "train_piat.py"}


def run_title(args):
    return f"{args.arch} {args.dataset} {args.loss}{' + PIAT' if args.piat else ''}"


def announce(args, n_train, world_size, device, run_dir):
    print(f"{args.arch} on {args.dataset}: {n_train} training images, loss {args.loss}, "
          f"PIAT {'on' if args.piat else 'off'}, {args.epochs} epochs on {world_size} x {device}"
          f"{', bf16' if args.amp else ''}{', compiled' if args.compile else ''}; writing {run_dir}")


def print_epoch(row, args):
    print(f"epoch {row['epoch']:3d}  lr {row['lr']:.5f}  alpha {row['alpha']:.3f}  loss {row['train_loss']:.4f}  "
          f"train clean/robust {row['train_clean_acc']:.3f}/{row['train_robust_acc']:.3f}  "
          f"test clean/PGD-{args.eval_pgd_steps} {row['test_clean_acc']:.3f}/{row['test_pgd20_acc']:.3f}  "
          f"{row['epoch_seconds']:.1f}s", flush=True)


# ----------------------------------------------------------------------------------------------
# The flags (python train_piat.py --help), grouped as --help shows them
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_run_arguments(p, exp_name=os.path.basename(__file__)[: -len(".py")])
    add_speed_arguments(p)
    utils.add_data_arguments(p)
    add_model_arguments(p)
    add_attack_arguments(p)
    add_loss_arguments(p)
    add_piat_arguments(p)
    args = p.parse_args(argv)
    fill_defaults(args)
    return args


def add_speed_arguments(p):
    g = p.add_argument_group("speed (multi-GPU: torchrun --nproc_per_node=N train_piat.py ...)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast for training and the training attack (default: on for CUDA, off on CPU); "
                        "the per-epoch evaluation always runs in fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (the attack runs compiled too)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only)")


def add_model_arguments(p):
    pos_int, nonneg_float = utils.positive(int), utils.non_negative(float)
    g = p.add_argument_group("model and optimiser")
    g.add_argument("--arch", type=str, default="resnet18", choices=utils.ARCHS, help="network")
    g.add_argument("--epochs", type=pos_int, default=None,
                   help="epochs (default: 120 resnet18, 180 wrn-32-10, 30 small-cnn)")
    g.add_argument("--batch-size", type=pos_int, default=128, help="training batch size")
    g.add_argument("--eval-batch-size", type=pos_int, default=256, help="batch size of the per-epoch evaluation")
    g.add_argument("--lr", type=nonneg_float, default=None,
                   help="initial learning rate, held for the first half of training, then linearly to lr/10 at 3/4 "
                        "and lr/100 at the end (default: 0.01 resnet18, 0.1 wrn-32-10, 0.05 small-cnn)")
    g.add_argument("--momentum", type=utils.unit_interval, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help="weight decay (default: 3.5e-3 resnet18, 7e-4 wrn-32-10, 5e-4 small-cnn)")


def add_attack_arguments(p):
    nonneg_int = utils.non_negative(int)
    g = p.add_argument_group("attack (epsilon and step size in 1/255 units)")
    g.add_argument("--epsilon", type=utils.pixel_units, default=8.0,
                   help="L-inf radius of the training and evaluation attacks")
    g.add_argument("--step-size", type=utils.pixel_units, default=2.0, help="PGD step size")
    g.add_argument("--pgd-steps", type=nonneg_int, default=10, help="PGD steps of the training attack")
    g.add_argument("--eval-pgd-steps", type=nonneg_int, default=20, help="PGD steps of the per-epoch evaluation")


def add_loss_arguments(p):
    nonneg_int, nonneg_float = utils.non_negative(int), utils.non_negative(float)
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
    g.add_argument("--mail-bias", type=utils.finite(float), default=-1.5,
                   help="mail: weight = 3*sigmoid(slope*(bias - margin)), margin = p_y(x') - max_{j!=y} p_j(x')")
    g.add_argument("--mail-slope", type=utils.finite(float), default=1.0, help="mail: slope of that sigmoid")
    g.add_argument("--mail-burn-in", type=nonneg_int, default=None,
                   help="mail: epochs of plain adversarial CE before reweighting (default: 76 of 120, as in the "
                        "official code, scaled to --epochs)")


def add_piat_arguments(p):
    g = p.add_argument_group("PIAT: theta <- alpha*theta_prev + (1-alpha)*theta after every epoch")
    g.add_argument("--piat", action=argparse.BooleanOptionalAction, default=True,
                   help="interpolate the weights after every epoch (on by default)")
    g.add_argument("--alpha-max", type=utils.unit_interval, default=0.99,
                   help="alpha_t = min(alpha_max, (t+a)/(t+b)) (reconstruction of Eq. 10)")
    g.add_argument("--alpha-a", type=utils.non_negative(float), default=1.0, help="a in alpha_t (reconstruction)")
    g.add_argument("--alpha-b", type=utils.positive(float), default=10.0, help="b in alpha_t (reconstruction)")
    g.add_argument("--alpha-fixed", type=utils.unit_interval, default=None,
                   help="a constant alpha instead (the paper's Fig. 9)")


def fill_defaults(args):
    """Defaults that depend on other flags, and the checks argparse cannot make."""
    if args.data_dir is None and not args.resume:  # a resumed run keeps its own
        args.data_dir = "./data"
    for key, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lam is None:
        args.lam = LAM_DEFAULTS.get(args.loss, 0.0)
    if args.mail_burn_in is None:
        args.mail_burn_in = round(76 * args.epochs / 120)


def main(argv=None):
    args = parse_args(argv)
    resume = None
    if args.resume:  # the interrupted run's own flags, its model and training state
        args, resume = utils.resume_run(args, "train_piat.py")
    rank, world_size, device = utils.setup_distributed(args.device)
    try:
        with utils.run_guard(__file__):  # stop signals, and status.json when the run stops early
            return train(args, resume, rank, world_size, device)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit code of its own for each way a run stops early
