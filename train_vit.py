"""Adversarial fine-tuning of ImageNet-pretrained vision transformers on 32x32 images, with A&P (ARD + PRM),
PIAT and NMSE: the paper's Table IV (ConViT-B, ViT-B, DeiT-S x PGD-AT / TRADES / MART x A&P x PIAT).

Liu, Yang, He & Hopcroft, "Parameter Interpolation Adversarial Training for Robust Image
Classification", IEEE TIFS 2025 (arXiv 2511.00836), Sec. V-A, following Mo, Wu, Wang, Guo & Wang,
"When Adversarial Training Meets Vision Transformers: Recipes from Training to Architecture",
NeurIPS 2022 (official code: github.com/mo666666/When-Adversarial-Training-Meets-Vision-Transformers).

    net <- timm ViT at --img-size 32, --patch-size 4 (8x8 tokens), weights of the 224x224 ImageNet model
           adapted: 16x16 patch kernel sum-pooled to 4x4, 14x14 position grid bilinearly resized to 8x8
    theta_prev <- theta_0
    for epoch e = 0 .. E-1, for each batch (x, y), t = e + (step+1)/steps (train_one_epoch):
        p(t) <- max(0, 1 - t/warmup)                                         (A&P fades out, warm-up 10 of 40)
        x' <- PGD-10(x, y), where at every step                            (model in eval mode)
              PRM: delta is zeroed on int(p * #patches) random patches before the forward pass
              ARD: each block's attention-branch gradient is zeroed with probability p in the backward pass
        theta <- SGD step on the loss of x' (--loss), gradient norm clipped to 1; lr 0.1, /10 at 36 and 38
        after the epoch (piat_step_): theta <- alpha_t * theta_prev + (1 - alpha_t) * theta, theta_prev <- theta

`--loss ce --no-piat` is PGD-AT; `--ard --prm` adds A&P; `--piat` (the default) adds PIAT. The file
reads top to bottom: the attack, A&P, the losses, PIAT, one epoch of training, the evaluation, train(),
then the pretrained weights' adaptation, the run's plumbing and the flags; docs/method.md has every
equation and constant.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import utils

LOSSES = ("ce", "nmse", "trades", "mart")
LAM_DEFAULTS = {"nmse": 4.0}
# The ImageNet checkpoints Mo et al.'s code loads (timm 0.5.4 URLs), under their tags in timm >= 0.9:
# ViT-B/16 is Google's original (ImageNet-21k pre-training, ImageNet-1k fine-tuning), DeiT-S and ConViT-B
# are Facebook's ImageNet-1k models. Other timm names get timm's default tag; NAME.TAG picks another.
PRETRAINED_TAGS = {"vit_base_patch16_224": "orig_in21k_ft_in1k", "deit_small_patch16_224": "fb_in1k",
                   "convit_base": "fb_in1k"}
PAPER_EPOCHS = 40  # the schedule below is the paper's for 40 epochs; other --epochs scale it
METRIC_FIELDS = ["epoch", "lr", "alpha", "train_loss", "train_clean_acc", "train_robust_acc", "test_clean_acc",
                 "test_pgd20_acc", "val_clean_acc", "val_pgd20_acc", "epoch_seconds", "images_per_second"]


# ----------------------------------------------------------------------------------------------
# The attack (Eq. 3; docs/method.md §2), with PRM's mask hook. Images in [0, 1]; eps and step in [0, 1].
# ----------------------------------------------------------------------------------------------


def pgd_attack(model, x, y, epsilon, step_size, steps, loss="ce", random_start=True, delta_mask=None):
    """L-inf PGD maximising `loss` of `model` around x; returns x' with ||x'-x||_inf <= epsilon, x' in [0,1].

    loss: "ce" cross-entropy; "cw" the Carlini-Wagner margin max_{j!=y} f_j - f_y; "kl" TRADES's
    KL(p(x) || p(x')) (y unused). random_start: True or "uniform" draws U(-eps, eps) (Madry et al.);
    "normal" starts at 0.001*N(0, 1), as the official TRADES and MART code does; False starts at x.
    delta_mask: None, or a function called at every step that returns a 0/1 mask broadcastable to x
    (or None): delta is multiplied by it before the forward pass (PRM). As in Mo et al.'s code, the
    final update is not masked again. The caller chooses the model's mode."""
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
        mask = delta_mask() if delta_mask is not None else None
        if mask is not None:
            delta = delta * mask
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
# A&P (Mo et al.; docs/method.md §6): attention random dropping and perturbation random masking
# ----------------------------------------------------------------------------------------------


def ap_strength(progress, warmup):
    """1 - t/warmup for the fractional epoch t, 0 from the end of the warm-up on: ARD's probability of
    dropping a block's attention gradient and PRM's fraction of masked patches (Mo et al.'s
    drop_rate = t/n_w is the complement)."""
    return 0.0 if warmup <= 0 else max(0.0, 1.0 - progress / warmup)


def attention_modules(model):
    """The attention module of every transformer block: timm's Blocks compute x + ...(attn(norm1(x)))
    and x + ...(mlp(norm2(x))); the gradient through `attn` is the attention branch's."""
    return [m.attn for m in model.modules() if isinstance(getattr(m, "attn", None), nn.Module) and hasattr(m, "mlp")]


@contextlib.contextmanager
def attention_gradient_drop(model, p):
    """ARD: while inside, every backward pass through each block's attention module zeroes the gradient
    of its output (so nothing flows into the attention branch; the residual path still carries it) with
    probability p, drawn independently per block and pass. The hooks are removed on exit, whatever happens."""
    handles = []

    def drop(module, grad_output):
        if random.random() < p:
            return tuple(None if g is None else torch.zeros_like(g) for g in grad_output)
        return None

    try:
        if p > 0:
            for attn in attention_modules(model):
                handles.append(attn.register_full_backward_pre_hook(drop))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def patch_mask(image_size, patch_size, fraction, device):
    """PRM's mask: 1 everywhere except on int(fraction * #patches) random patch_size x patch_size patches,
    the same for every image and channel, shape (1, 1, H, W); None when no patch is masked."""
    h, w = image_size
    gh, gw = h // patch_size, w // patch_size
    n_masked = int(gh * gw * fraction)
    if n_masked <= 0:
        return None
    keep = torch.ones(gh * gw, device=device)
    keep[torch.randperm(gh * gw, device=device)[:n_masked]] = 0
    return keep.view(1, 1, gh, gw).repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


# ----------------------------------------------------------------------------------------------
# Losses: the same definitions as train_piat.py's
# ----------------------------------------------------------------------------------------------


def nmse_loss(logits_adv, logits_clean, y):
    """mean_i w_i * || f(x'_i)/||f(x'_i)|| - f(x_i)/||f(x_i)|| ||^2 with w_i = 1 - p_y(x_i) from the clean
    logits (Eq. 11): vulnerable clean examples weigh more. The weight is not detached, as in MART."""
    distance = (F.normalize(logits_adv, dim=1) - F.normalize(logits_clean, dim=1)).pow(2).sum(dim=1)
    weight = 1 - F.softmax(logits_clean, dim=1).gather(1, y[:, None]).squeeze(1)
    return (weight * distance).mean()


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
    parameter and buffer; integer buffers keep their current value."""
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
# One epoch of training: for each batch, the attack (with A&P), then an SGD step
# ----------------------------------------------------------------------------------------------


def attack_radius(args):
    """(epsilon, step size) in [0, 1] pixel units; the flags give them in 1/255 units."""
    return args.epsilon / 255, args.step_size / 255


def training_loss(net, x, y, args, progress):
    """Generate x' with each loss's attack plus A&P at strength ap_strength(progress), then return
    (loss, logits_adv, logits_clean). `net` is a utils.Network: ARD's hooks go on net.model, the attack
    runs on net.for_attack (the compiled model, with --compile) except while ARD's hooks are active, when
    it runs on net.model itself; the training forward passes go through net.for_step."""
    model = net.model
    eps, step = attack_radius(args)
    strength = ap_strength(progress, args.ap_warmup_epochs)
    p_drop = strength if args.ard else 0.0
    delta_mask = None
    if args.prm and strength > 0:
        def delta_mask():
            return patch_mask(x.shape[-2:], args.patch_size, strength, x.device)
    needs_clean = args.loss in ("nmse", "trades", "mart")
    model.eval()  # as Mo et al.: the attack sees the network in eval mode (dropout and drop-path off)
    with attention_gradient_drop(model, p_drop) as hooks:
        victim = model if hooks else net.for_attack
        if args.loss == "trades":
            x_adv = pgd_attack(victim, x, y, eps, step, args.pgd_steps, "kl", "normal", delta_mask)
        else:
            start = "normal" if args.loss == "mart" else "uniform"
            x_adv = pgd_attack(victim, x, y, eps, step, args.pgd_steps, "ce", start, delta_mask)
    if not needs_clean:  # clean accuracy is still logged: one cheap forward in eval mode
        with torch.no_grad():
            logits_clean = net.for_attack(x)
    model.train()
    if needs_clean:
        logits_clean = net.for_step(x).float()  # the losses run in fp32 under --amp too
    logits_adv = net.for_step(x_adv).float()
    if args.loss == "ce":
        loss = F.cross_entropy(logits_adv, y)
    elif args.loss == "nmse":
        loss = F.cross_entropy(logits_adv, y) + args.lam * nmse_loss(logits_adv, logits_clean, y)
    elif args.loss == "trades":
        loss = F.cross_entropy(logits_clean, y) + args.beta * trades_kl(logits_adv, logits_clean)
    else:
        loss = mart_loss(logits_adv, logits_clean, y, args.beta)
    return loss, logits_adv, logits_clean


def lr_at(progress, lr, milestones):
    """Mo et al.'s step schedule: lr, divided by 10 when each milestone epoch M begins (M counted from 1,
    as the paper's "36th and 38th epochs": from progress M - 1 on). `progress` is in epochs and may be
    fractional (the lr changes every step)."""
    return lr * 0.1 ** sum(progress >= m - 1 for m in milestones)


def train_one_epoch(net, optimizer, x_train, y_train, flip, args, epoch, rank=0, world_size=1):
    """The inner loop: for each batch, x' <- attack with A&P, then an SGD step on the loss (gradient norm
    clipped), the learning rate set every step. Returns the epoch's training columns of metrics.csv
    (summed over all ranks, whose floating-point buffers are then averaged)."""
    start = time.time()
    net.model.train()
    n_steps = utils.steps_per_epoch(len(x_train), args.batch_size, world_size)
    totals = torch.zeros(4, device=x_train.device)  # loss sum, clean correct, robust correct, images
    for i, x, y in utils.epoch_batches(x_train, y_train, args, epoch, flip, rank, world_size, channels_last=False):
        lr = lr_at(epoch + i / n_steps, args.lr, args.lr_milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
            # A&P's strength at the end of this step, as Mo et al.'s t = epoch - 1 + (step + 1) / steps
            loss, logits_adv, logits_clean = training_loss(net, x, y, args, epoch + (i + 1) / n_steps)
        utils.check_finite(epoch, i, training_loss=loss)  # a nan/inf loss stops the run (utils.Diverged)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.model.parameters(), args.grad_clip)
        optimizer.step()
        # accumulated on the device: no host synchronisation inside the loop
        totals[0] += loss.detach() * len(y)
        totals[1] += (logits_clean.argmax(1) == y).sum()
        totals[2] += (logits_adv.argmax(1) == y).sum()
        totals[3] += len(y)
    utils.all_reduce_sum_(totals)
    utils.average_buffers_(net.model)  # floating-point buffers identical on every rank before interpolating
    loss_sum, clean_correct, robust_correct, seen = totals.tolist()
    return {"lr": lr, "train_loss": loss_sum / seen, "train_clean_acc": clean_correct / seen,
            "train_robust_acc": robust_correct / seen, "images_per_second": seen / (time.time() - start)}


# ----------------------------------------------------------------------------------------------
# The per-epoch evaluation (without A&P)
# ----------------------------------------------------------------------------------------------


def evaluate(model, x_all, y_all, epsilon, step_size, steps, batch_size, desc="eval", rank=0, world_size=1):
    """Clean and PGD accuracy of uint8 images x_all (epsilon, step_size in [0, 1] units), in fp32, without
    A&P. Under torchrun each rank attacks its share and the counts are summed."""
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
# The run (the module docstring's loop)
# ----------------------------------------------------------------------------------------------


def train(args, resume, rank, world_size, device):
    """The module docstring's loop on this process's share of every batch; returns the run folder on rank 0."""
    is_main = rank == 0
    utils.resolve_amp(args, device)
    utils.check_processes(args, world_size, device)
    # set up: the data, the (pretrained) network, SGD, and theta_prev <- theta_0 (or the interrupted run's state)
    utils.seed_everything(args.seed)  # the same initial weights (and new head) on every rank
    data = utils.load_dataset(args.dataset, args.data_dir, args.image_size)
    check_sizes(args, data)
    split = utils.split_data(data, args, device)
    model, model_kwargs = build_network(args, data, verbose=is_main)
    if args.ard and not attention_modules(model):
        raise utils.UserError(f"--ard: {args.arch} has no transformer blocks with an attention branch (attn, mlp)")
    if world_size > 1:
        utils.seed_everything(args.seed + rank)  # augmentation and attack noise differ between ranks
    model = utils.prepare_module(model, args, device, world_size, channels_last=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    prev_state, metrics = clone_state(model), []  # theta_prev starts as the initial (pretrained) weights
    if resume is not None:
        prev_state, metrics = restore_training_state_(resume, model, optimizer, args, rank)
    run_dir = utils.open_run_dir(args, resume is not None, is_main)
    net = utils.wrap_network(model, args.compile, world_size)
    log = utils.MetricsLog(run_dir / "metrics.csv", METRIC_FIELDS, metrics, args) if is_main else None
    if is_main:
        announce(args, len(split["train"][0]), world_size, device, run_dir)

    for epoch in range(len(metrics), args.epochs):
        start = time.time()
        # for each batch: x' <- PGD(x) with A&P, then an SGD step on the loss of x'
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
            utils.write_epoch(run_dir, checkpoint_dict(model, model_kwargs, data, args, metrics), training_state,
                              metrics, utils.selection_metric(args), log, title=run_title(args))
            print_epoch(row, args)

    utils.check_ranks_agree([model], ["weights"], world_size)
    if not is_main:
        return None
    log.close()
    utils.report_done(metrics, utils.selection_metric(args), run_dir)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Pretrained weights and their adaptation to 32x32 inputs (Mo et al.'s checkpoint_filter_fn, our code)
# ----------------------------------------------------------------------------------------------


def pool_patch_kernel(weight, patch_size):
    """The (O, I, P, P) patch-embedding kernel of the 224x224 model as an (O, I, p, p) kernel: each
    (P/p) x (P/p) block is summed (Mo et al.). On an image whose (P/p) x (P/p) blocks are constant (the
    small image up-sampled by P/p), the pooled kernel on the small image gives the original's output.
    Sizes that do not divide (never the paper's 16 -> 4): each old kernel pixel is split between the new
    cells it overlaps, in proportion to the overlap, so the kernel's sum is kept (Mo et al. resample with
    nearest-neighbour interpolation there, which does not keep it)."""
    o, i, h, w = weight.shape
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if h % ph == 0 and w % pw == 0:
        return weight.reshape(o, i, ph, h // ph, pw, w // pw).sum(dim=(3, 5))

    def overlap(n_old, n_new):  # (n_new, n_old): how much of old pixel k falls into new cell a
        edges = torch.arange(n_new + 1, dtype=torch.float64) * n_old / n_new
        pixels = torch.arange(n_old + 1, dtype=torch.float64)
        upper = torch.minimum(edges[1:, None], pixels[None, 1:])
        return (upper - torch.maximum(edges[:-1, None], pixels[None, :-1])).clamp(min=0)

    pooled = torch.einsum("ah,oihw,bw->oiab", overlap(h, ph), weight.double(), overlap(w, pw))
    return pooled.to(weight.dtype)


def resample_pos_embed(pos_embed, grid_size, num_prefix_tokens):
    """(1, prefix + G*G, D) position embeddings -> (1, prefix + g_h*g_w, D): the prefix (class token)
    entries are kept, the G x G grid is bilinearly interpolated (align_corners=False), as Mo et al."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise utils.UserError(f"pretrained position embeddings of {grid.shape[1]} grid tokens are not a square grid")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(grid_size), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_size[0] * grid_size[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def adapt_pretrained_state(state, net):
    """The 224x224 model's state_dict `state`, made to fit `net` (the same timm model at another image
    and patch size): the patch kernel sum-pooled, the position grid resized (prefix tokens kept), the
    classifier left as `net` initialised it (a new head for the new classes). Anything else that does
    not fit is an error."""
    target = net.state_dict()
    grid = tuple(getattr(getattr(net, "patch_embed", None), "grid_size", None) or ())
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier", "head")
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    out, problems = {}, []
    for key, mine in target.items():
        if any(key == h or key.startswith(h + ".") for h in heads):
            out[key] = mine  # the new head
            continue
        if key not in state:
            problems.append(f"{key} missing")
            continue
        value = state[key]
        if value.shape != mine.shape:
            if key.endswith("pos_embed") and grid and value.dim() == 3 and value.shape[2] == mine.shape[2]:
                value = resample_pos_embed(value, grid, mine.shape[1] - grid[0] * grid[1])
            elif value.dim() == 4 and value.shape[:2] == mine.shape[:2]:  # the patch embedding's convolution
                value = pool_patch_kernel(value, mine.shape[2:])
            else:
                problems.append(f"{key} {tuple(value.shape)} vs {tuple(mine.shape)}")
                continue
        out[key] = value.to(mine.dtype)
    if problems:
        raise utils.UserError(f"the pretrained weights do not fit {type(net).__name__}: {'; '.join(problems[:3])}"
                              f"{'; ...' if len(problems) > 3 else ''}")
    return out


def _first_line(err):
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def pretrained_state(name, model_kwargs, pretrained_file=None, verbose=False):
    """The state_dict of timm model `name` (NAME or NAME.TAG) at its own 224x224 size with its ImageNet
    weights: from the Hugging Face hub through timm, or from `pretrained_file`. One UserError when they
    cannot be had."""
    import timm

    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise utils.UserError(f"--pretrained-file {path}: no such file")
        try:
            net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **model_kwargs)
        except Exception as err:
            raise utils.UserError(f"--pretrained-file {path} does not load into {name} (it must hold a state_dict "
                                  f"of the 224x224 model, .pth or .safetensors): {_first_line(err)}") from None
        return net.state_dict()
    if not timm.models.is_model_pretrained(name):
        raise utils.UserError(f"timm has no pretrained weights for {name}; pass --pretrained-file PATH or "
                              "--no-pretrained")
    if verbose:
        print(f"loading the ImageNet weights of {name} (Hugging Face hub, through timm's cache)", flush=True)
    hub_logger = logging.getLogger("huggingface_hub")  # its retry warnings would bury the one line below
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        net = timm.create_model(name, pretrained=True, **model_kwargs)
    except Exception as err:  # offline, a proxy, a firewall, a partial download: one line for all
        raise utils.UserError(f"the ImageNet weights of {name} could not be downloaded from the Hugging Face hub "
                              f"({_first_line(err)}); without network, pass --pretrained-file PATH (a .pth or "
                              ".safetensors state_dict of the 224x224 model) or --no-pretrained to train from "
                              "scratch") from None
    finally:
        hub_logger.setLevel(level)
    return net.state_dict()


def build_network(args, data, verbose=False):
    """The model (utils.build_model, so evaluate.py rebuilds it from the checkpoint) with the adapted
    ImageNet weights when --pretrained. Returns (model, model_kwargs)."""
    model_kwargs = {"img_size": args.img_size, "patch_size": args.patch_size, **args.model_kwargs}
    try:
        model = utils.build_model(args.arch, data.num_classes, data.mean, data.std, **model_kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise utils.UserError(f"timm cannot build {args.arch} with {model_kwargs}: {_first_line(err)}") from None
    if args.pretrained and not args.resume:
        state = pretrained_state(args.pretrained_weights if not args.pretrained_file else args.model,
                                 args.model_kwargs, args.pretrained_file, verbose)
        model.net.load_state_dict(adapt_pretrained_state(state, model.net))
    return model, model_kwargs


# ----------------------------------------------------------------------------------------------
# The run's plumbing: sizes, resume, checkpoints, messages
# ----------------------------------------------------------------------------------------------


def check_sizes(args, data):
    """--img-size (default: the data's) must be the data's size and a multiple of --patch-size."""
    height, width = data.image_shape[1:]
    if height != width:
        raise utils.UserError(f"the {args.dataset} images are {height}x{width}; pass --image-size to make them square")
    if args.img_size is None:
        args.img_size = height
    if args.img_size != height:
        raise utils.UserError(f"--img-size {args.img_size} but the {args.dataset} images are {height}x{width}; "
                              f"pass --img-size {height} (or --image-size {args.img_size} for an image folder)")
    if args.img_size % args.patch_size:
        raise utils.UserError(f"--patch-size {args.patch_size} does not divide --img-size {args.img_size}")


def restore_training_state_(resume, model, optimizer, args, rank):
    """Load an interrupted run's weights, optimizer and RNG states; returns (theta_prev, metrics so far)."""
    utils.load_resumed_state(model, resume["model"], args)
    optimizer.load_state_dict(resume["resume"]["optimizer"])
    utils.restore_rng_states(resume["resume"]["rng"], rank)
    if rank == 0:
        print(f"resuming {Path(args.resume)} after epoch {resume['epoch']} of {args.epochs}")
    return resume["resume"]["prev_state"], resume["metrics"]


def checkpoint_dict(model, model_kwargs, data, args, metrics):
    """What best.pt and final.pt hold: enough for evaluate.py to rebuild the model alone (timm name and kwargs)."""
    return {"model": model.state_dict(), "arch": args.arch, "model_kwargs": model_kwargs,
            "num_classes": data.num_classes, "mean": data.mean, "std": data.std, "image_shape": data.image_shape,
            "args": vars(args), "metrics": metrics, "epoch": len(metrics), "script": "train_vit.py"}


def run_title(args):
    ap = "".join(f" + {name}" for name, on in (("ARD", args.ard), ("PRM", args.prm)) if on)
    return f"{args.arch} {args.dataset} {args.loss}{ap}{' + PIAT' if args.piat else ''}"


def announce(args, n_train, world_size, device, run_dir):
    ap = "+".join(name for name, on in (("ARD", args.ard), ("PRM", args.prm)) if on) or "off"
    start = f"from {args.pretrained_weights}" if args.pretrained_weights else "from scratch"
    print(f"{args.arch} ({args.img_size}x{args.img_size}, patch {args.patch_size}, {start}) on {args.dataset}: "
          f"{n_train} training images, loss {args.loss}, A&P {ap} (warm-up {args.ap_warmup_epochs:g} epochs), "
          f"PIAT {'on' if args.piat else 'off'}, {args.epochs} epochs on {world_size} x {device}"
          f", {utils.precision(args.amp, device)}{', compiled' if args.compile else ''}; writing {run_dir}")


def print_epoch(row, args):
    print(f"epoch {row['epoch']:3d}  lr {row['lr']:.5f}  alpha {row['alpha']:.3f}  loss {row['train_loss']:.4f}  "
          f"train clean/robust {row['train_clean_acc']:.3f}/{row['train_robust_acc']:.3f}  "
          f"test clean/PGD-{args.eval_pgd_steps} {row['test_clean_acc']:.3f}/{row['test_pgd20_acc']:.3f}  "
          f"{row['epoch_seconds']:.1f}s", flush=True)


# ----------------------------------------------------------------------------------------------
# The flags (python train_vit.py --help), grouped as --help shows them
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_run_arguments(p, exp_name=os.path.basename(__file__)[: -len(".py")])
    add_speed_arguments(p)
    utils.add_data_arguments(p)
    add_model_arguments(p)
    add_optimiser_arguments(p)
    add_attack_arguments(p)
    add_ap_arguments(p)
    add_loss_arguments(p)
    add_piat_arguments(p)
    args = p.parse_args(argv)
    fill_defaults(args)
    return args


def add_speed_arguments(p):
    g = p.add_argument_group("speed (multi-GPU: torchrun --nproc_per_node=N train_vit.py ...)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast for training and the training attack (default: on where it pays: CUDA, "
                        "and CPUs with AMX; fp32 elsewhere, also on CPUs with only AVX512_BF16, where it measured "
                        "slower; --amp and --no-amp force it); the per-epoch evaluation always runs in fp32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (the attack runs compiled too, except while ARD's backward hooks "
                        "are active: those attack steps run eagerly)")


def add_model_arguments(p):
    pos_int = utils.positive(int)
    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="vit_base_patch16_224", metavar="NAME[.TAG]",
                   help="any timm model name; the paper's are vit_base_patch16_224 (ViT-B, the default, as in Mo et "
                        "al.'s code), deit_small_patch16_224 (DeiT-S) and convit_base (ConViT-B). A .TAG picks "
                        "other pretrained weights (default: the checkpoints Mo et al. load, timm's default otherwise)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the ImageNet weights, downloaded from the Hugging Face hub by timm and adapted "
                        "to --img-size/--patch-size (default: on); --no-pretrained trains from scratch")
    g.add_argument("--pretrained-file", type=str, default=None, metavar="PATH",
                   help="load the ImageNet weights from a local file instead (a .pth or .safetensors state_dict of "
                        "the 224x224 model, as timm or the original authors publish it): for machines without network")
    g.add_argument("--img-size", type=pos_int, default=None,
                   help="input size of the network (default: the data's, 32 for CIFAR and SVHN; no resizing)")
    g.add_argument("--patch-size", type=pos_int, default=4,
                   help="patch size at --img-size (default 4: an 8x8 token grid on 32x32 images, as Mo et al.)")
    g.add_argument("--model-kwargs", type=str, default="{}", metavar="JSON",
                   help="further keyword arguments of timm.create_model, e.g. '{\"drop_path_rate\": 0.1}' or a tiny "
                        "test model '{\"depth\": 2, \"embed_dim\": 32, \"num_heads\": 2}'")


def add_optimiser_arguments(p):
    pos_int = utils.positive(int)
    nonneg_float = utils.non_negative(float)
    g = p.add_argument_group("optimiser (Mo et al.'s settings, which the paper follows)")
    g.add_argument("--epochs", type=pos_int, default=PAPER_EPOCHS, help="epochs (default 40, the paper's)")
    g.add_argument("--batch-size", type=pos_int, default=64, help="training batch size (Mo et al.'s code: 64)")
    g.add_argument("--eval-batch-size", type=pos_int, default=256,
                   help="batch size of the per-epoch evaluation (default 256)")
    g.add_argument("--lr", type=nonneg_float, default=0.1, help="initial learning rate of SGD (default 0.1)")
    g.add_argument("--lr-milestones", type=nonneg_float, nargs="*", default=None, metavar="EPOCH",
                   help="the lr is divided by 10 when each of these epochs begins, counted from 1 as in metrics.csv "
                        "(default: 36 38, the paper's, scaled to --epochs as 1 + 35/40*E and 1 + 37/40*E; Mo et al.'s "
                        "code divides at 36 and 39); it changes every step")
    g.add_argument("--momentum", type=utils.unit_interval, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=nonneg_float, default=1e-4, help="weight decay (default 1e-4)")
    g.add_argument("--grad-clip", type=nonneg_float, default=1.0,
                   help="clip the gradient's global L2 norm to this before every step (Mo et al.); 0: no clipping")


def add_attack_arguments(p):
    nonneg_int = utils.non_negative(int)
    g = p.add_argument_group("attack (epsilon and step size in 1/255 units)")
    g.add_argument("--epsilon", type=utils.pixel_units, default=8.0,
                   help="L-inf radius of the training and evaluation attacks (default 8)")
    g.add_argument("--step-size", type=utils.pixel_units, default=2.0, help="PGD step size (default 2)")
    g.add_argument("--pgd-steps", type=nonneg_int, default=10, help="PGD steps of the training attack (default 10)")
    g.add_argument("--eval-pgd-steps", type=nonneg_int, default=20,
                   help="PGD steps of the per-epoch evaluation (default 20)")


def add_ap_arguments(p):
    nonneg_float = utils.non_negative(float)
    g = p.add_argument_group("A&P (Mo et al.): only while the training attack runs, fading out over the warm-up")
    g.add_argument("--ard", action=argparse.BooleanOptionalAction, default=False,
                   help="attention random dropping: in each attack backward pass, every block's attention-branch "
                        "gradient is zeroed with probability 1 - t/warmup (t: fractional epoch); default off")
    g.add_argument("--prm", action=argparse.BooleanOptionalAction, default=False,
                   help="perturbation random masking: at every attack step, delta is zeroed on a random fraction "
                        "1 - t/warmup of the patches (the same patches for the whole batch) before the forward pass; "
                        "default off")
    g.add_argument("--ap-warmup-epochs", type=nonneg_float, default=None,
                   help="epochs over which ARD and PRM fade out (default: 10, Mo et al.'s n_w, scaled to --epochs "
                        "as 10/40*E)")


def add_loss_arguments(p):
    nonneg_float = utils.non_negative(float)
    g = p.add_argument_group("loss")
    g.add_argument("--loss", type=str, default="ce", choices=LOSSES,
                   help="default ce (Table IV combines PIAT with PGD-AT, TRADES and MART). ce: PGD-AT (Madry et al. "
                        "2018); nmse: CE(f(x'),y) + lam*NMSE (this paper, Eq. 12); "
                        "trades: CE(f(x),y) + beta*KL(p(x)||p(x')), x' maximises the KL (Zhang et al. 2019); "
                        "mart: boosted BCE on x' + beta*KL*(1-p_y(x)) (Wang et al. 2020)")
    g.add_argument("--lam", type=nonneg_float, default=None,
                   help="weight of the NMSE term (default 4.0, reconstruction: the paper's value was lost in "
                        "extraction)")
    g.add_argument("--beta", type=nonneg_float, default=6.0,
                   help="weight of the KL term of trades and mart (default 6)")


def add_piat_arguments(p):
    g = p.add_argument_group("PIAT: theta <- alpha*theta_prev + (1-alpha)*theta after every epoch")
    g.add_argument("--piat", action=argparse.BooleanOptionalAction, default=True,
                   help="interpolate all floating-point weights after every epoch (on by default)")
    g.add_argument("--alpha-max", type=utils.unit_interval, default=0.99,
                   help="alpha_t = min(alpha_max, (t+a)/(t+b)) (reconstruction of Eq. 10)")
    g.add_argument("--alpha-a", type=utils.non_negative(float), default=1.0, help="a in alpha_t (reconstruction)")
    g.add_argument("--alpha-b", type=utils.positive(float), default=10.0, help="b in alpha_t (reconstruction)")
    g.add_argument("--alpha-fixed", type=utils.unit_interval, default=None,
                   help="a constant alpha instead (the paper's Fig. 9)")


def fill_defaults(args):
    """Defaults that depend on other flags, and the checks argparse cannot make; all before any work."""
    if args.data_dir is None and not args.resume:  # a resumed run keeps its own
        args.data_dir = "./data"
    if args.lam is None:
        args.lam = LAM_DEFAULTS.get(args.loss, 0.0)
    scale = args.epochs / PAPER_EPOCHS
    if args.lr_milestones is None:
        args.lr_milestones = [round(1 + 35 * scale, 6), round(1 + 37 * scale, 6)]
    if args.ap_warmup_epochs is None:
        args.ap_warmup_epochs = round(10 * scale, 6)
    if args.pretrained_file and not args.pretrained:
        raise utils.UserError("--pretrained-file and --no-pretrained contradict each other; drop one")
    try:
        extra = json.loads(args.model_kwargs) if isinstance(args.model_kwargs, str) else args.model_kwargs
    except json.JSONDecodeError as err:
        raise utils.UserError(f"--model-kwargs is not JSON ({err}): e.g. '{{\"drop_path_rate\": 0.1}}'") from None
    if not isinstance(extra, dict) or {"img_size", "patch_size", "num_classes"} & set(extra):
        raise utils.UserError("--model-kwargs must be a JSON object without img_size, patch_size or num_classes "
                              "(those have their own flags)")
    args.model_kwargs = extra
    import timm
    from timm.models import split_model_name_tag

    args.arch, tag = split_model_name_tag(args.model)
    if not timm.is_model(args.arch):
        raise utils.UserError(f"--model {args.model}: timm has no model {args.arch!r} (the paper's: "
                              f"{', '.join(utils.VIT_ARCHS)})")
    # the Table IV row label evaluate.py --table shows, e.g. "deit_small_patch16_224: PIAT + TRADES + A&P"
    augment = {(True, True): " + A&P", (True, False): " + ARD", (False, True): " + PRM"}.get((args.ard, args.prm), "")
    loss = {"ce": "PGD-AT", "nmse": "NMSE", "trades": "TRADES", "mart": "MART"}[args.loss]
    args.method = f"{args.arch}: {'PIAT + ' if args.piat else ''}{loss}{augment}"
    # what the network starts from, recorded in args.json
    if not args.pretrained:
        args.pretrained_weights = None
    elif args.pretrained_file:
        args.pretrained_weights = str(args.pretrained_file)
    else:
        tag = tag or PRETRAINED_TAGS.get(args.arch, "")
        args.pretrained_weights = f"{args.arch}.{tag}" if tag else args.arch


def main(argv=None):
    args = parse_args(argv)
    resume = None
    if args.resume:  # the interrupted run's own flags, its model and training state
        args, resume = utils.resume_run(args, "train_vit.py")
    rank, world_size, device = utils.setup_distributed(args.device)
    try:
        with utils.run_guard(__file__):  # stop signals, and status.json when the run stops early
            return train(args, resume, rank, world_size, device)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit code of its own for each way a run stops early
