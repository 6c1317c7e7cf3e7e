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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

import utils

LOSSES = ("ce", "nmse", "alp", "trades", "mart", "mail", "cfa", "rat")
# The paper's settings (Sec. V-A); small-cnn is ours, for CPU runs.
ARCH_DEFAULTS = {
    "resnet18": {"epochs": 120, "lr": 0.01, "weight_decay": 3.5e-3},
    "wrn-32-10": {"epochs": 180, "lr": 0.1, "weight_decay": 7e-4},
    "small-cnn": {"epochs": 30, "lr": 0.05, "weight_decay": 5e-4},
}
LAM_DEFAULTS = {"nmse": 4.0, "alp": 0.5}
# CFA and RAT's official schedules are 200 epochs long: their epoch-count defaults scale with --epochs / 200
OFFICIAL_EPOCHS_CFA = 200
METRIC_FIELDS = ["epoch", "lr", "alpha", "train_loss", "train_clean_acc", "train_robust_acc", "test_clean_acc",
                 "test_pgd20_acc", "val_clean_acc", "val_pgd20_acc", "epoch_seconds", "images_per_second",
                 # the worst class (CFA's fairness measure), and with --ema/--swa-start/CFA the trained weights
                 "test_worst_clean_acc", "test_worst_pgd20_acc", "val_worst_pgd20_acc", "raw_test_clean_acc",
                 "raw_test_pgd20_acc", "raw_val_pgd20_acc", "raw_val_worst_pgd20_acc", "fawa_updated"]


# ----------------------------------------------------------------------------------------------
# The attack (Eq. 3; docs/method.md §2). Images live in [0, 1]; epsilon and step_size in [0, 1] units.
# ----------------------------------------------------------------------------------------------


def pgd_attack(model, x, y, epsilon, step_size, steps, loss="ce", random_start=True):
    """L-inf PGD maximising `loss` of `model` around x; returns x' with ||x'-x||_inf <= epsilon, x' in [0,1].

    epsilon: one radius, or one per example (a tensor of shape (N,): CFA's class-wise margins).
    loss: "ce" cross-entropy; "cw" the Carlini-Wagner margin max_{j!=y} f_j - f_y; "kl" TRADES's
    KL(p(x) || p(x')) (y unused). random_start: True or "uniform" draws U(-eps, eps) (Madry et al.);
    "normal" starts at 0.001*N(0, 1), as the official TRADES and MART code does; False starts at x.
    The caller chooses the model's mode (training puts BatchNorm in eval mode first)."""
    x = x.detach()
    if torch.is_tensor(epsilon):  # per example: broadcast over the image dimensions
        epsilon = epsilon.to(x.device, x.dtype).view(-1, *[1] * (x.dim() - 1))
    if loss == "kl":
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
    if random_start is True or random_start == "uniform":
        delta = (torch.empty_like(x).uniform_(-1, 1).mul_(epsilon) if torch.is_tensor(epsilon)
                 else torch.empty_like(x).uniform_(-epsilon, epsilon))
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


def cfa_trades_loss(logits_adv, logits_clean, y, class_beta):
    """CFA's TRADES objective with class-wise calibrated regularisation (CCR; Wei et al., CVPR 2023, Eq. 8):
    mean_i [CE(f(x_i), y_i) + beta_{y_i} * KL(p(x_i) || p(x'_i))] / (1 + beta_{y_i}); class_beta (K,) holds
    the per-class betas (all equal before the calibration starts: TRADES divided by 1 + beta)."""
    beta = class_beta[y]
    ce = F.cross_entropy(logits_clean, y, reduction="none")
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="none").sum(dim=1)
    return ((ce + beta * kl) / (1 + beta)).mean()


def cfa_calibration(class_robust_acc, epoch, args, num_classes, device=None):
    """CFA's class-wise calibrated margin and regularisation for this epoch (Wei et al., Eq. 6-7):
    eps_k = (lambda1 + t_k) * eps and beta_k = (lambda2 + t_k) * beta, where t_k is class k's training robust
    accuracy in the previous epoch (CCM with --cfa-ccm, CCR with --cfa-ccr); before --cfa-begin (or without
    that accuracy) every class gets eps and beta. Returns (eps per class in [0, 1] units, beta per class),
    two float tensors of shape (K,)."""
    eps = torch.full((num_classes,), args.epsilon / 255, device=device)
    beta = torch.full((num_classes,), float(args.beta), device=device)
    if class_robust_acc is None or epoch < args.cfa_begin:
        return eps, beta
    t = torch.as_tensor(class_robust_acc, dtype=torch.float32, device=device)
    if args.cfa_ccm:
        eps = (args.cfa_lambda1 + t) * eps
    if args.cfa_ccr:
        beta = (args.cfa_lambda2 + t) * beta
    return eps, beta


def last_linear(model):
    """The model's classifier: its last nn.Linear."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def rat_soft_targets(gap, mass):
    """RAT's soft labels from a per-class gap (K,) (Jin et al., CVPR 2023, official code): the gap is shifted to
    >= 0 and normalised; row r of the (K, K) result gives the true class r probability 1 - mass and spreads
    `mass` over the other classes in proportion to their gap. A constant gap spreads it evenly."""
    k = gap.numel()
    gap = gap - gap.min()
    gap = gap / gap.sum() if gap.sum() > 0 else torch.ones_like(gap) / k
    off_diagonal = 1 - torch.eye(k, device=gap.device, dtype=gap.dtype)
    spread = gap[None, :] * off_diagonal
    spread = spread / spread.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return mass * spread + (1 - mass) * torch.eye(k, device=gap.device, dtype=gap.dtype)


def rat_taylor_terms(logits_adv, logits_clean, y, classifier_weight, mass):
    """RAT's first- and second-order Taylor terms as its official code approximates them: the per-class row sums
    s of the classifier's weight gradient of CE on clean (s_nat) and adversarial (s_adv) logits give the gaps
    |s_nat| - |s_adv| (first order) and s_adv^2 - s_nat^2 (second order, the Hadamard form of the Kronecker
    product); each becomes soft labels (rat_soft_targets) that the logits are pulled towards with a KL:
        first  = (KL(T1[y] || p(x')) + KL(T1'[y] || p(x))) / 2,  T1 from |s_nat| - |s_adv|, T1' its negation
        second = (KL(T2[y] || p(x')) + KL(T2[y] || p(x))) / 2,   T2 from s_adv^2 - s_nat^2
    The gaps are constants (no gradient flows through them). Returns (first, second)."""
    grad_nat, grad_adv = (torch.autograd.grad(F.cross_entropy(logits, y), classifier_weight, retain_graph=True)[0]
                          for logits in (logits_clean, logits_adv))
    s_nat, s_adv = grad_nat.sum(dim=1).float(), grad_adv.sum(dim=1).float()
    t1 = rat_soft_targets(s_nat.abs() - s_adv.abs(), mass)
    t1_clean = rat_soft_targets(s_adv.abs() - s_nat.abs(), mass)
    t2 = rat_soft_targets(s_adv.pow(2) - s_nat.pow(2), mass)
    log_p_adv, log_p_clean = F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1)
    first = (F.kl_div(log_p_adv, t1[y], reduction="batchmean") + F.kl_div(log_p_clean, t1_clean[y],
                                                                           reduction="batchmean")) / 2
    second = (F.kl_div(log_p_adv, t2[y], reduction="batchmean") + F.kl_div(log_p_clean, t2[y],
                                                                           reduction="batchmean")) / 2
    return first, second


def rat_loss(logits_adv, logits_clean, y, classifier_weight, args):
    """RAT on TRADES (its official code): (1 - alpha) * CE(f(x), y) + beta * KL(p(x) || p(x'))
    + alpha * first + w2 * second (rat_taylor_terms)."""
    first, second = rat_taylor_terms(logits_adv, logits_clean, y, classifier_weight, args.rat_target_mass)
    return ((1 - args.rat_alpha) * F.cross_entropy(logits_clean, y) + args.beta * trades_kl(logits_adv, logits_clean)
            + args.rat_alpha * first + args.rat_second_weight * second)


def with_noisy_convolutions(model, std):
    """RAT's randomised weights: a callable that runs `model` with N(0, std^2) noise added to every convolution
    weight, drawn afresh for this call's lifetime (one draw per batch). The model's own weights are never
    touched (torch.func.functional_call), so the noise only shapes the attack, as in RAT's official code."""
    noisy = {f"{name}.weight": module.weight.detach() + std * torch.randn_like(module.weight)
             for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)}

    def forward(x):
        return torch.func.functional_call(model, noisy, (x,))

    return forward


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


def piat_step_(model, prev_state, t, args):
    """The PIAT step (Eq. 9-10) after epoch t (0-based; fractional with --piat-every): alpha_t from the
    schedule (or --alpha-fixed), then theta <- alpha_t * theta_prev + (1 - alpha_t) * theta in place, and
    theta_prev <- theta. Returns (alpha_t, the new theta_prev). Without --piat nothing changes, alpha is 0."""
    if not args.piat:
        return 0.0, prev_state
    alpha = args.alpha_fixed
    if alpha is None:
        alpha = piat_alpha(t, args.alpha_max, args.alpha_a, args.alpha_b)
    interpolate_(model, prev_state, alpha)
    return alpha, clone_state(model)


# ----------------------------------------------------------------------------------------------
# Weight averages a run can report instead of its trained weights (docs/method.md §11). Unlike PIAT,
# an average is a separate copy: it never feeds back into training.
# ----------------------------------------------------------------------------------------------


def make_average(model, args):
    """The weight average this run evaluates and saves (a torch.optim.swa_utils.AveragedModel), or None:
    --ema DECAY   exponential moving average of the parameters and BatchNorm buffers, updated every step
                  (Gowal et al. 2020, Rebuffi et al. 2021);
    --swa-start E equal-weight average of the end-of-epoch parameters from epoch E on, its BatchNorm
                  statistics recomputed on the training images (SWA, Izmailov et al. 2018);
    CFA's FAWA    moving average (--cfa-decay) of the end-of-epoch parameters and buffers, updated only after
                  epochs whose worst class clears --cfa-threshold on the validation images (Wei et al. 2023)."""
    if args.ema is not None:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    if args.swa_start is not None:
        return AveragedModel(model)  # parameters only: update_bn recomputes the BatchNorm statistics
    if args.loss == "cfa" and args.cfa_fawa:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.cfa_decay), use_buffers=True)
    return None


def average_kind(args):
    """Which weights best.pt and final.pt hold: "ema", "swa", "fawa" or "trained"."""
    if args.ema is not None:
        return "ema"
    if args.swa_start is not None:
        return "swa"
    return "fawa" if args.loss == "cfa" and args.cfa_fawa else "trained"


def reported_model(model, average):
    """What is evaluated and saved: the average once it holds weights, the trained model before that."""
    return average.module if average is not None and average.n_averaged > 0 else model


def swa_update_(average, model, x_train, batch_size):
    """End of an SWA epoch: add the weights to the equal-weight average, then recompute the average's
    BatchNorm statistics with one pass over the (unaugmented) training images (swa_utils.update_bn)."""
    average.update_parameters(model)
    update_bn((utils.to_float(x_train[i : i + batch_size]) for i in range(0, len(x_train), batch_size)),
              average.module)


def fawa_update_(average, model, worst_val_robust_acc, epoch, args):
    """End of a CFA epoch: FAWA takes the weights (a copy the first time, then decay * average + (1 - decay) *
    weights) only from --cfa-fawa-start on and when the worst class's validation robust accuracy of the
    trained weights is at least --cfa-threshold. Returns whether it did."""
    if epoch + 1 < args.cfa_fawa_start or worst_val_robust_acc < args.cfa_threshold:
        return False
    average.update_parameters(model)
    return True


# ----------------------------------------------------------------------------------------------
# One epoch of training: for each batch, the attack, then an SGD step
# ----------------------------------------------------------------------------------------------


def attack_radius(args):
    """(epsilon, step size) in [0, 1] pixel units; the flags give them in 1/255 units."""
    return args.epsilon / 255, args.step_size / 255


def adversarial_examples(net, x, y, args, calibration=None):
    """x' with the attack each loss's paper uses (BatchNorm in eval mode; the caller sets the mode).
    calibration: CFA's (eps per class, beta per class) from cfa_calibration."""
    eps, step = attack_radius(args)
    if args.loss == "cfa":  # class-wise calibrated margins: each example attacked within its class's eps
        eps = calibration[0][y]
        if args.cfa_base == "at":
            return pgd_attack(net.for_attack, x, y, eps, step, args.pgd_steps, loss="ce", random_start="uniform")
    if args.loss in ("trades", "cfa", "rat"):
        # RAT attacks the model with freshly noised convolution weights (its randomised weights)
        victim = with_noisy_convolutions(net.model, args.rat_noise_std) if args.loss == "rat" else net.for_attack
        return pgd_attack(victim, x, y, eps, step, args.pgd_steps, loss="kl", random_start="normal")
    start = "normal" if args.loss in ("mart", "mail") else "uniform"
    return pgd_attack(net.for_attack, x, y, eps, step, args.pgd_steps, loss="ce", random_start=start)


def training_loss(net, x, y, args, epoch, calibration=None):
    """Generate x' (adversarial_examples), then return (loss, logits_adv, logits_clean). `net` is a
    utils.Network: the attack runs on net.for_attack with BatchNorm in eval mode, the training forward
    passes go through net.for_step."""
    needs_clean = args.loss in ("nmse", "alp", "trades", "mart", "rat") or (
        args.loss == "cfa" and args.cfa_base == "trades")
    net.model.eval()  # BatchNorm statistics frozen while attacking
    x_adv = adversarial_examples(net, x, y, args, calibration)
    if not needs_clean:  # clean accuracy is still logged: one cheap forward in eval mode
        with torch.no_grad():
            logits_clean = net.for_attack(x)
    net.model.train()
    if needs_clean:
        logits_clean = net.for_step(x).float()  # the losses run in fp32 under --amp too
    logits_adv = net.for_step(x_adv).float()
    if args.loss == "ce" or (args.loss == "mail" and epoch < args.mail_burn_in) or (
            args.loss == "cfa" and args.cfa_base == "at"):
        loss = F.cross_entropy(logits_adv, y)
    elif args.loss == "nmse":
        loss = F.cross_entropy(logits_adv, y) + args.lam * nmse_loss(logits_adv, logits_clean, y)
    elif args.loss == "alp":
        loss = F.cross_entropy(logits_adv, y) + args.lam * alp_loss(logits_adv, logits_clean)
    elif args.loss == "trades":
        loss = F.cross_entropy(logits_clean, y) + args.beta * trades_kl(logits_adv, logits_clean)
    elif args.loss == "mart":
        loss = mart_loss(logits_adv, logits_clean, y, args.beta)
    elif args.loss == "mail":
        loss = mail_loss(logits_adv, y, args.mail_bias, args.mail_slope)
    elif args.loss == "cfa":
        loss = cfa_trades_loss(logits_adv, logits_clean, y, calibration[1])
    else:
        loss = rat_loss(logits_adv, logits_clean, y, last_linear(net.model).weight, args)
    return loss, logits_adv, logits_clean


def lr_at(progress, lr, epochs):
    """The paper's schedule: lr until half-way, then linearly to lr/10 at 3/4 and lr/100 at the end.
    `progress` is in epochs and may be fractional (the lr changes every step)."""
    knots = [(0.0, lr), (0.5 * epochs, lr), (0.75 * epochs, lr / 10), (float(epochs), lr / 100)]
    for (e0, v0), (e1, v1) in zip(knots, knots[1:]):
        if progress <= e1:
            return v0 if e1 == e0 else v0 + (v1 - v0) * (progress - e0) / (e1 - e0)
    return knots[-1][1]


def train_one_epoch(net, optimizer, average, prev_state, data, train_images, args, epoch, calibration=None,
                    rank=0, world_size=1):
    """The inner loop of Algorithm 1: for each batch, x' <- attack, then an SGD step on the loss, the learning
    rate set every step; then --ema's update, and with --piat-every N the PIAT step after every N-th step.
    Returns (the epoch's training columns of metrics.csv, theta_prev). The sums are all-reduced over the
    ranks, whose BatchNorm statistics are then averaged so every rank holds the same weights."""
    start = time.time()
    net.model.train()
    x_train, y_train = train_images
    n_steps = utils.steps_per_epoch(len(x_train), args.batch_size, world_size)
    totals = torch.zeros(4, device=x_train.device)  # loss sum, clean correct, robust correct, images
    per_class = torch.zeros(2, data.num_classes, device=x_train.device)  # robust correct, images
    alpha = 0.0
    for i, x, y in utils.epoch_batches(x_train, y_train, args, epoch, data.flip, rank, world_size):
        lr = lr_at(epoch + i / n_steps, args.lr, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss, logits_adv, logits_clean = training_loss(net, x, y, args, epoch, calibration)
        utils.check_finite(epoch, i, training_loss=loss)  # a nan/inf loss stops the run (utils.Diverged)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.ema is not None:
            average.update_parameters(net.model)
        step = epoch * n_steps + i + 1
        if args.piat_every is not None and step % args.piat_every == 0:  # alpha at the fractional epoch
            alpha, prev_state = piat_step_(net.model, prev_state, step / n_steps - 1, args)
        # accumulated on the device: no host synchronisation inside the loop
        robust = logits_adv.argmax(1) == y
        totals[0] += loss.detach() * len(y)
        totals[1] += (logits_clean.argmax(1) == y).sum()
        totals[2] += robust.sum()
        totals[3] += len(y)
        per_class[0].index_add_(0, y, robust.float())
        per_class[1].index_add_(0, y, torch.ones_like(y, dtype=per_class.dtype))
    utils.all_reduce_sum_(totals)
    utils.all_reduce_sum_(per_class)
    for module in (net.model, average.module if average is not None else None):
        if module is not None:
            utils.average_buffers_(module)  # identical BatchNorm statistics on every rank
    loss_sum, clean_correct, robust_correct, seen = totals.tolist()
    row = {"lr": lr, "alpha": alpha, "train_loss": loss_sum / seen, "train_clean_acc": clean_correct / seen,
           "train_robust_acc": robust_correct / seen, "images_per_second": seen / (time.time() - start)}
    if args.loss == "cfa":  # CFA calibrates the next epoch on it; kept in the checkpoint's metrics for --resume
        row["train_class_robust_acc"] = (per_class[0] / per_class[1].clamp_min(1)).tolist()
    return row, prev_state


# ----------------------------------------------------------------------------------------------
# The per-epoch evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(model, x_all, y_all, epsilon, step_size, steps, batch_size, num_classes, desc="eval", rank=0,
             world_size=1):
    """Clean and PGD accuracy of uint8 images x_all (epsilon, step_size in [0, 1] units), in fp32, overall
    and of the worst class (CFA's fairness measure; classes without images are skipped). Returns
    {"clean", "robust", "worst_clean", "worst_robust"}. Under torchrun each rank attacks its share and the
    counts are summed."""
    model.eval()
    x_all, y_all = x_all[rank::world_size], y_all[rank::world_size]
    counts = torch.zeros(3, num_classes, device=x_all.device)  # clean correct, robust correct, images per class
    for i in utils.progress(range(0, len(x_all), batch_size), desc=desc, disable=rank != 0 or None):
        x, y = utils.to_float(x_all[i : i + batch_size]), y_all[i : i + batch_size]
        with torch.no_grad():
            counts[0].index_add_(0, y, (model(x).argmax(1) == y).float())
        x_adv = pgd_attack(model, x, y, epsilon, step_size, steps)
        with torch.no_grad():
            counts[1].index_add_(0, y, (model(x_adv).argmax(1) == y).float())
        counts[2].index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
    counts = utils.all_reduce_sum_(counts)
    seen = counts[2] > 0
    per_class = counts[:2, seen] / counts[2, seen]
    n = max(counts[2].sum().item(), 1)
    return {"clean": counts[0].sum().item() / n, "robust": counts[1].sum().item() / n,
            "worst_clean": per_class[0].min().item() if seen.any() else 0.0,
            "worst_robust": per_class[1].min().item() if seen.any() else 0.0}


def evaluate_epoch(model, split, args, num_classes, which="", rank=0, world_size=1):
    """The evaluation columns of metrics.csv for `model`: clean and PGD-20 accuracy of the test subset, overall
    and of its worst class, and of the held-out images with --val-size (`which` labels the progress bars)."""
    eps, step = attack_radius(args)
    setting = dict(epsilon=eps, step_size=step, steps=args.eval_pgd_steps, batch_size=args.eval_batch_size,
                   num_classes=num_classes, rank=rank, world_size=world_size)
    test = evaluate(model, *split["test"], desc=f"test{which}", **setting)
    row = {"test_clean_acc": test["clean"], "test_pgd20_acc": test["robust"],
           "test_worst_clean_acc": test["worst_clean"], "test_worst_pgd20_acc": test["worst_robust"]}
    if args.val_size:
        val = evaluate(model, *split["val"], desc=f"val{which}", **setting)
        row.update(val_clean_acc=val["clean"], val_pgd20_acc=val["robust"], val_worst_pgd20_acc=val["worst_robust"])
    return row


def average_and_evaluate(net, average, averaged_net, split, args, epoch, num_classes, rank=0, world_size=1):
    """End of an epoch, after PIAT: update SWA or CFA's FAWA, then return the evaluation columns of the
    reported model (the average once it holds weights, else the trained weights) and, when the run keeps an
    average, those of the trained weights under raw_* names (FAWA's gate reads their worst validation class)."""

    def columns(module, which=""):
        return evaluate_epoch(module, split, args, num_classes, which, rank, world_size)

    row, trained = {}, None
    if average_kind(args) == "fawa":
        trained = columns(net.for_attack, " (trained weights)")
        row["fawa_updated"] = int(fawa_update_(average, net.model, trained["val_worst_pgd20_acc"], epoch, args))
    if args.swa_start is not None and epoch + 1 >= args.swa_start:
        swa_update_(average, net.model, split["train"][0], args.eval_batch_size)
    if reported_model(net.model, average) is net.model:
        reported = trained = trained or columns(net.for_attack)
    else:
        reported = columns(averaged_net.for_attack, " (average)")
    if average is not None:
        row.update({"raw_" + k: v for k, v in (trained or columns(net.for_attack, " (trained weights)")).items()})
    return {**row, **reported}


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
    fill_data_defaults(args, data)
    split = utils.split_data(data, args, device)
    model = utils.build_model(args.arch, data.num_classes, data.mean, data.std)
    if world_size > 1:
        utils.seed_everything(args.seed + rank)  # augmentation and attack noise differ between ranks
    model = utils.prepare_module(model, args, device, world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    average = make_average(model, args)  # --ema, --swa-start or CFA's FAWA: what is reported, else None
    prev_state, metrics = clone_state(model), []  # theta_prev <- theta_0
    if resume is not None:
        prev_state, metrics = restore_training_state_(resume, model, optimizer, average, args, rank)
    run_dir = utils.open_run_dir(args, resume is not None, is_main)
    net = utils.wrap_network(model, args.compile, world_size)
    averaged_net = utils.wrap_network(average.module, args.compile) if average is not None else None
    log = utils.MetricsLog(run_dir / "metrics.csv", METRIC_FIELDS, metrics, args) if is_main else None
    if is_main:
        announce(args, len(split["train"][0]), world_size, device, run_dir)

    for epoch in range(len(metrics), args.epochs):
        start = time.time()
        # CFA: this epoch's class-wise margins and regularisation, from the last epoch's class accuracies
        calibration = (cfa_calibration(metrics[-1]["train_class_robust_acc"] if metrics else None, epoch, args,
                                       data.num_classes, device) if args.loss == "cfa" else None)
        # for each batch: x' <- PGD(x), then an SGD step on the loss of x'
        row, prev_state = train_one_epoch(net, optimizer, average, prev_state, data, split["train"], args, epoch,
                                          calibration, rank, world_size)
        # PIAT: interpolate with the previous epoch's interpolated weights (Eq. 9-10)
        if args.piat_every is None:
            row["alpha"], prev_state = piat_step_(model, prev_state, epoch, args)
        # evaluate the weights the next epoch starts from (or the average the run reports)
        row.update(average_and_evaluate(net, average, averaged_net, split, args, epoch, data.num_classes, rank,
                                        world_size))
        row = {"epoch": epoch + 1, **row, "epoch_seconds": time.time() - start}
        metrics.append(row)
        # never save weights that are not finite
        utils.check_finite_weights(epoch, model=model, weight_average=average.module if average is not None else None)
        # keep the best and the final checkpoint (final.pt with everything --resume needs)
        training_state = {"optimizer": optimizer.state_dict(), "prev_state": prev_state, "rng": utils.all_rng_states()}
        if average is not None:  # the checkpoint's "model" may be the average: keep the trained weights too
            training_state.update(model=model.state_dict(), average=average.state_dict())
        if is_main:
            reported = reported_model(model, average)
            utils.write_epoch(run_dir, checkpoint_dict(reported, data, args, metrics, reported is not model),
                              training_state, metrics, utils.selection_metric(args), log, title=run_title(args))
            print_epoch(row, args)

    utils.check_ranks_agree([model, average], ["weights", "weight average"], world_size)
    if not is_main:
        return None
    log.close()
    utils.report_done(metrics, utils.selection_metric(args), run_dir)
    return run_dir


# ----------------------------------------------------------------------------------------------
# The run's plumbing: resume, checkpoints, messages
# ----------------------------------------------------------------------------------------------


def restore_training_state_(resume, model, optimizer, average, args, rank):
    """Load an interrupted run's weights, optimizer, weight average and RNG states; returns (theta_prev,
    metrics so far)."""
    state = resume["resume"]
    utils.load_resumed_state(model, state.get("model", resume["model"]), args)
    optimizer.load_state_dict(state["optimizer"])
    if average is not None:
        utils.load_resumed_state(average, state["average"], args, "weight average")
    utils.restore_rng_states(state["rng"], rank)
    if rank == 0:
        print(f"resuming {Path(args.resume)} after epoch {resume['epoch']} of {args.epochs}")
    return state["prev_state"], resume["metrics"]


def checkpoint_dict(model, data, args, metrics, averaged):
    """What best.pt and final.pt hold: enough for evaluate.py to rebuild the model alone. "weights" says which:
    the trained weights, or the average the run reports (ema, swa, fawa)."""
    return {"model": model.state_dict(), "arch": args.arch, "model_kwargs": {}, "num_classes": data.num_classes,
            "mean": data.mean, "std": data.std, "image_shape": data.image_shape, "args": vars(args), "metrics": metrics,
            "epoch": len(metrics), "script": "train_piat.py", "weights": average_kind(args) if averaged else "trained"}


def run_title(args):
    extra = {"ema": " + EMA", "swa": " + SWA", "fawa": "", "trained": ""}[average_kind(args)]
    return f"{args.arch} {args.dataset} {args.loss}{' + PIAT' if args.piat else ''}{extra}"


def announce(args, n_train, world_size, device, run_dir):
    kind = average_kind(args)
    average = (f", EMA {args.ema:g}" if kind == "ema" else f", SWA from epoch {args.swa_start}" if kind == "swa"
               else ", FAWA" if kind == "fawa" else "")
    every = f" every {args.piat_every} steps" if args.piat and args.piat_every else ""
    print(f"{args.arch} on {args.dataset}: {n_train} training images, loss {args.loss}, "
          f"PIAT {'on' if args.piat else 'off'}{every}{average}, {args.epochs} epochs on {world_size} x {device}"
          f", {utils.precision(args.amp, device)}{', compiled' if args.compile else ''}; writing {run_dir}")


def print_epoch(row, args):
    raw = f" (trained weights {row['raw_test_pgd20_acc']:.3f})" if "raw_test_pgd20_acc" in row else ""
    print(f"epoch {row['epoch']:3d}  lr {row['lr']:.5f}  alpha {row['alpha']:.3f}  loss {row['train_loss']:.4f}  "
          f"train clean/robust {row['train_clean_acc']:.3f}/{row['train_robust_acc']:.3f}  "
          f"test clean/PGD-{args.eval_pgd_steps} {row['test_clean_acc']:.3f}/{row['test_pgd20_acc']:.3f}{raw}  "
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
    add_cfa_arguments(p)
    add_rat_arguments(p)
    add_piat_arguments(p)
    add_averaging_arguments(p)
    args = p.parse_args(argv)
    fill_defaults(args)
    return args


def add_speed_arguments(p):
    g = p.add_argument_group("speed (multi-GPU: torchrun --nproc_per_node=N train_piat.py ...)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast for training and the training attack (default: on where it pays: CUDA, "
                        "and CPUs with AMX; fp32 elsewhere, also on CPUs with only AVX512_BF16, where it measured "
                        "slower; --amp and --no-amp force it); the per-epoch evaluation always runs in fp32")
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
                        "mail: margin-reweighted adversarial CE after a burn-in (Wang, Liu et al. 2021); "
                        "cfa: TRADES with class-wise calibrated margins and regularisation, and fairness-aware weight "
                        "averaging (Wei et al. 2023; --cfa-*); rat: TRADES with randomised weights in the attack and "
                        "Taylor-expansion terms (Jin et al. 2023; --rat-*)")
    g.add_argument("--lam", type=nonneg_float, default=None,
                   help="weight of the NMSE or ALP term (default: 4.0 for nmse (reconstruction: the paper's value "
                        "was lost in extraction), 0.5 for alp (the official ALP release))")
    g.add_argument("--beta", type=nonneg_float, default=6.0, help="weight of the KL term of trades, mart, cfa and rat")
    g.add_argument("--mail-bias", type=utils.finite(float), default=-1.5,
                   help="mail: weight = 3*sigmoid(slope*(bias - margin)), margin = p_y(x') - max_{j!=y} p_j(x')")
    g.add_argument("--mail-slope", type=utils.finite(float), default=1.0, help="mail: slope of that sigmoid")
    g.add_argument("--mail-burn-in", type=nonneg_int, default=None,
                   help="mail: epochs of plain adversarial CE before reweighting (default: 76 of 120, as in the "
                        "official code, scaled to --epochs)")


def add_cfa_arguments(p):
    nonneg_int, nonneg_float, pos_int = utils.non_negative(int), utils.non_negative(float), utils.positive(int)
    g = p.add_argument_group("CFA (--loss cfa; Wei et al., CVPR 2023, official code PKU-ML/CFA; paper values where "
                             "paper and code differ)")
    g.add_argument("--cfa-base", type=str, default="trades", choices=("trades", "at"),
                   help="the adversarial training CFA calibrates: trades (default: the paper's best variant, and the "
                        "one the PIAT paper's CFA numbers match) or at (PGD-AT; no regularisation to calibrate)")
    g.add_argument("--cfa-ccm", action=argparse.BooleanOptionalAction, default=True,
                   help="class-wise calibrated margin: class k is attacked within eps_k = (lambda1 + t_k) * eps, "
                        "t_k its training robust accuracy in the previous epoch (on by default)")
    g.add_argument("--cfa-ccr", action=argparse.BooleanOptionalAction, default=True,
                   help="class-wise calibrated regularisation (trades base): beta_k = (lambda2 + t_k) * beta in "
                        "[CE + beta_y * KL] / (1 + beta_y) (on by default)")
    g.add_argument("--cfa-fawa", action=argparse.BooleanOptionalAction, default=True,
                   help="fairness-aware weight averaging: best.pt/final.pt hold a moving average of the end-of-epoch "
                        "weights that only takes epochs whose worst validation class clears --cfa-threshold (on by "
                        "default; needs held-out images: --val-size defaults to 2%% of the training set)")
    g.add_argument("--cfa-lambda1", type=nonneg_float, default=None,
                   help="lambda1 of the margin (default: 0.3 for the trades base, 0.5 for at: the paper's)")
    g.add_argument("--cfa-lambda2", type=nonneg_float, default=0.5, help="lambda2 of the regularisation (default 0.5)")
    g.add_argument("--cfa-begin", type=nonneg_int, default=None,
                   help="epochs of uncalibrated training first (default: the official 10 of 200 epochs, scaled to "
                        "--epochs)")
    g.add_argument("--cfa-decay", type=utils.unit_interval, default=0.85,
                   help="FAWA's decay: average <- decay * average + (1 - decay) * weights (default 0.85, the paper's; "
                        "the official code uses 0.88)")
    g.add_argument("--cfa-threshold", type=utils.unit_interval, default=0.2,
                   help="FAWA takes an epoch only when the worst class's validation PGD-20 accuracy of the trained "
                        "weights is at least this (default 0.2, the paper's; the official code uses 0.24)")
    g.add_argument("--cfa-fawa-start", type=pos_int, default=None,
                   help="first (1-indexed) epoch FAWA may take (default: the paper's epoch 50 of 200, scaled to "
                        "--epochs)")


def add_rat_arguments(p):
    nonneg_float = utils.non_negative(float)
    g = p.add_argument_group("RAT (--loss rat; Jin et al., CVPR 2023, official code Alexkael/Randomized-Adversarial-"
                             "Training, its TRADES variant)")
    g.add_argument("--rat-alpha", type=utils.unit_interval, default=0.2,
                   help="(1 - alpha) * CE(f(x), y) + beta * KL + alpha * first-order term + w2 * second-order term "
                        "(default 0.2, the official)")
    g.add_argument("--rat-second-weight", type=nonneg_float, default=None,
                   help="w2 (default: 0.04 for resnet18 and small-cnn, as the official ResNet-18 script; 0.1 for "
                        "wrn-32-10, as its WideResNet scripts)")
    g.add_argument("--rat-noise-std", type=nonneg_float, default=1e-4,
                   help="standard deviation of the Gaussian noise added to every convolution weight of the model the "
                        "training attack runs on, drawn afresh every batch; the trained weights never carry it "
                        "(default 1e-4, the official; 0 turns the randomised weights off)")
    g.add_argument("--rat-target-mass", type=utils.unit_interval, default=None,
                   help="probability the Taylor terms' soft labels spread over the wrong classes (default: 1 - 2/K, "
                        "the official 0.8 for 10 classes and 0.98 for 100)")


def add_piat_arguments(p):
    pos_int = utils.positive(int)
    g = p.add_argument_group("PIAT: theta <- alpha*theta_prev + (1-alpha)*theta after every epoch")
    g.add_argument("--piat", action=argparse.BooleanOptionalAction, default=True,
                   help="interpolate the weights after every epoch (on by default)")
    g.add_argument("--alpha-max", type=utils.unit_interval, default=0.99,
                   help="alpha_t = min(alpha_max, (t+a)/(t+b)) (reconstruction of Eq. 10)")
    g.add_argument("--alpha-a", type=utils.non_negative(float), default=1.0, help="a in alpha_t (reconstruction)")
    g.add_argument("--alpha-b", type=utils.positive(float), default=10.0, help="b in alpha_t (reconstruction)")
    g.add_argument("--alpha-fixed", type=utils.unit_interval, default=None,
                   help="a constant alpha instead (the paper's Fig. 9)")
    g.add_argument("--piat-every", type=pos_int, default=None, metavar="N",
                   help="interpolate after every N optimiser steps instead of once per epoch, alpha_t taken at the "
                        "fractional epoch t (default: once per epoch, the paper's; small N is Lookahead-like)")


def add_averaging_arguments(p):
    pos_int = utils.positive(int)
    g = p.add_argument_group("weight averaging (evaluated and saved instead of the trained weights, which keep "
                             "training; compare with PIAT, which feeds its interpolation back)")
    g.add_argument("--ema", type=utils.unit_interval, default=None, metavar="DECAY",
                   help="exponential moving average of the parameters and BatchNorm buffers, updated after every "
                        "optimiser step (Gowal et al. 2020 and Rebuffi et al. 2021 use 0.995-0.999)")
    g.add_argument("--swa-start", type=pos_int, default=None, metavar="EPOCH",
                   help="stochastic weight averaging: the equal-weight average of the end-of-epoch weights from this "
                        "(1-indexed) epoch on, its BatchNorm statistics recomputed on the training images")


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
    scale = args.epochs / OFFICIAL_EPOCHS_CFA
    if args.cfa_lambda1 is None:
        args.cfa_lambda1 = 0.3 if args.cfa_base == "trades" else 0.5
    if args.cfa_begin is None:
        args.cfa_begin = round(10 * scale)
    if args.cfa_fawa_start is None:
        args.cfa_fawa_start = max(1, round(50 * scale))
    if args.rat_second_weight is None:
        args.rat_second_weight = 0.1 if args.arch == "wrn-32-10" else 0.04
    if args.swa_start is not None and args.swa_start > args.epochs:
        raise utils.UserError(f"--swa-start {args.swa_start} is after the last epoch ({args.epochs})")
    averages = [flag for flag, on in (("--ema", args.ema is not None), ("--swa-start", args.swa_start is not None),
                                      ("CFA's FAWA", args.loss == "cfa" and args.cfa_fawa)) if on]
    if len(averages) > 1:
        raise utils.UserError(f"{' and '.join(averages)} are two weight averages; keep one (--no-cfa-fawa drops "
                              "CFA's)")


def fill_data_defaults(args, data):
    """Defaults that depend on the data set, settled once per run (before args.json is written): CFA's held-out
    images (2% of the training set, as its official code holds out 2% of CIFAR-10) and RAT's soft-label mass."""
    if args.loss == "cfa" and args.cfa_fawa and not args.val_size:
        args.val_size = max(data.num_classes, round(0.02 * len(data.x_train)))
    if args.rat_target_mass is None:
        args.rat_target_mass = 1 - 2 / data.num_classes


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
