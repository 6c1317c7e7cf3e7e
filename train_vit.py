"""Adversarial fine-tuning of ImageNet-pretrained vision transformers on 32x32 images with A&P, PIAT and NMSE: the
paper's Table IV (ConViT-B, ViT-B, DeiT-S x PGD-AT / TRADES / MART x A&P x PIAT).

Liu, Yang, He & Hopcroft, "Parameter Interpolation Adversarial Training for Robust Image Classification",
IEEE TIFS 2025 (arXiv 2511.00836), Sec. V-A, following Mo, Wu, Wang, Guo & Wang, "When Adversarial Training Meets
Vision Transformers: Recipes from Training to Architecture", NeurIPS 2022 (official code:
github.com/mo666666/When-Adversarial-Training-Meets-Vision-Transformers). As train() runs it:

    net <- timm ViT at --img-size 32, --patch-size 4 (8x8 tokens), with the 224x224 ImageNet model's weights:
           the 16x16 patch kernel sum-pooled to 4x4, the 14x14 position grid bilinearly resized to 8x8, a new head
    theta_prev <- theta_0
    for epoch e = 0 .. E-1:
        for each batch (x, y), at the fractional epoch t = e + (step + 1) / steps:
            p <- max(0, 1 - t / warmup)                                     A&P fades out (warm-up: 10 of 40 epochs)
            x' <- PGD-10(x, y), the model in eval mode, where at every step
                  PRM: delta is zeroed on int(p * #patches) random patches before the forward pass
                  ARD: each block's attention-branch gradient is zeroed with probability p in the backward pass
            theta <- SGD step on the loss of x' (--loss), gradient norm clipped to 1; lr 0.1, /10 at epochs 36, 38
        theta <- alpha_e * theta_prev + (1 - alpha_e) * theta,  theta_prev <- theta                 (PIAT, Eq. 9-10)
        evaluate clean and PGD-20 accuracy; keep the best and the final checkpoint

`--loss ce --no-piat` is PGD-AT; `--ard --prm` adds A&P; --piat (the default) adds PIAT. The file reads top to
bottom: the flags, the attack, A&P, NMSE, PIAT, the training loop, the baselines (TRADES, MART), then the network
and the adaptation of its pretrained weights; docs/method.md has every equation and constant (A&P: §6).
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
from utils import non_negative, non_negative_int, number, pixel_units, positive_int, unit_interval

SCRIPT = os.path.basename(__file__)
LOSSES = ("ce", "nmse", "trades", "mart")
# The ImageNet checkpoints Mo et al.'s code loads (timm 0.5.4 URLs), under their tags in timm >= 0.9: ViT-B/16 is
# Google's original (ImageNet-21k pre-training, ImageNet-1k fine-tuning), DeiT-S and ConViT-B are Facebook's
# ImageNet-1k models: the paper's Table IV. Other timm names get timm's default tag; --model NAME.TAG picks another.
PRETRAINED_TAGS = {"vit_base_patch16_224": "orig_in21k_ft_in1k", "deit_small_patch16_224": "fb_in1k",
                   "convit_base": "fb_in1k"}
PAPER_EPOCHS = 40  # the lr milestones and A&P's warm-up are the paper's for 40 epochs; other --epochs scale them
EVAL_COLUMNS = [f"{split}_{worst}{attack}_acc" for split in ("test", "val") for worst in ("", "worst_")
                for attack in ("clean", "pgd20")]
METRIC_FIELDS = ["epoch", "lr", "alpha", "train_loss", "train_clean_acc", "train_robust_acc", *EVAL_COLUMNS,
                 "epoch_seconds", "images_per_second"]


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
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (the attacks run compiled too, eagerly while ARD's hooks are on)")
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
    g = p.add_argument_group("model (a timm model, fed the images at their own size)")
    g.add_argument("--model", type=str, default="vit_base_patch16_224", metavar="NAME[.TAG]",
                   help="the paper's: vit_base_patch16_224 (ViT-B), deit_small_patch16_224 (DeiT-S), convit_base "
                        "(ConViT-B); .TAG picks other pretrained weights than Mo et al.'s")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the ImageNet weights (the Hugging Face hub, through timm), adapted to the sizes")
    g.add_argument("--pretrained-file", type=str, default=None, metavar="PATH",
                   help="those weights from a file instead: a .pth or .safetensors state_dict of the 224x224 model")
    g.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the images')")
    g.add_argument("--patch-size", type=positive_int, default=4, help="patch size (4: 8x8 tokens on 32x32, Mo et al.)")
    g.add_argument("--model-kwargs", type=str, default="{}", metavar="JSON",
                   help="more timm.create_model arguments, e.g. '{\"drop_path_rate\": 0.1}'")
    g = p.add_argument_group("optimiser (Mo et al.'s settings, which the paper follows)")
    g.add_argument("--epochs", type=positive_int, default=PAPER_EPOCHS, help="epochs (the paper's 40)")
    g.add_argument("--lr", type=non_negative, default=0.1, help="SGD's learning rate, divided by 10 at each milestone")
    g.add_argument("--lr-milestones", type=non_negative, nargs="*", default=None, metavar="EPOCH",
                   help="epochs (from 1) at whose start the lr is divided by 10 (default: 36 38 scaled to --epochs)")
    g.add_argument("--weight-decay", type=non_negative, default=1e-4, help="SGD weight decay")
    g.add_argument("--momentum", type=unit_interval, default=0.9, help="SGD momentum")
    g.add_argument("--grad-clip", type=non_negative, default=1.0, help="clip the gradient's L2 norm to this (0: off)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="training batch (the global one under torchrun)")
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
    g = p.add_argument_group("A&P (Mo et al.): in the training attack, at strength p = 1 - t/warmup (t: the epoch)")
    g.add_argument("--ard", action=argparse.BooleanOptionalAction, default=False,
                   help="attention random dropping: each block's attention gradient zeroed with probability p")
    g.add_argument("--prm", action=argparse.BooleanOptionalAction, default=False,
                   help="perturbation random masking: delta zeroed on a fraction p of the patches at every step")
    g.add_argument("--ap-warmup-epochs", type=non_negative, default=None,
                   help="epochs until A&P is off (default: 10 of 40, scaled to --epochs)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", type=str, default="ce", choices=LOSSES,
                   help="ce: PGD-AT; nmse: CE(f(x'),y) + lam*NMSE (the paper's Eq. 12); trades, mart (docs/method.md "
                        "§5)")
    g.add_argument("--lam", type=non_negative, default=None,
                   help="weight of NMSE (default 4, reconstruction: the paper's value was lost)")
    g.add_argument("--beta", type=non_negative, default=6.0, help="weight of the KL term of trades and mart")
    g = p.add_argument_group("PIAT: theta <- alpha*theta_prev + (1-alpha)*theta after every epoch")
    g.add_argument("--piat", action=argparse.BooleanOptionalAction, default=True, help="interpolate (default: on)")
    g.add_argument("--alpha-max", type=unit_interval, default=0.99,
                   help="alpha_t = min(alpha_max, (t+a)/(t+b)) (reconstruction of Eq. 10)")
    g.add_argument("--alpha-a", type=non_negative, default=1.0, help="a in alpha_t (reconstruction)")
    g.add_argument("--alpha-b", type=number(float, 0, open_bounds=True), default=10.0, help="b in alpha_t")
    g.add_argument("--alpha-fixed", type=unit_interval, default=None, help="a constant alpha instead (Fig. 9)")
    args = p.parse_args(argv)
    # defaults that depend on other flags, and the checks argparse cannot make
    utils.attack_units(p, args, l2_step=15 / 255)
    args.data_dir = args.data_dir or (None if args.resume else "./data")  # a resumed run keeps its own
    args.lam = (4.0 if args.loss == "nmse" else 0.0) if args.lam is None else args.lam
    scale = args.epochs / PAPER_EPOCHS
    if args.lr_milestones is None:
        args.lr_milestones = [round(1 + 35 * scale, 6), round(1 + 37 * scale, 6)]
    if args.ap_warmup_epochs is None:
        args.ap_warmup_epochs = round(10 * scale, 6)
    if args.pretrained_file and not args.pretrained:
        p.error("--pretrained-file and --no-pretrained contradict each other; drop one")
    if not args.piat and args.alpha_fixed is not None:
        p.error("--alpha-fixed needs --piat")
    try:
        args.model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        p.error(f"--model-kwargs is not JSON ({err}): e.g. '{{\"drop_path_rate\": 0.1}}'")
    if not isinstance(args.model_kwargs, dict) or {"img_size", "patch_size", "num_classes"} & set(args.model_kwargs):
        p.error("--model-kwargs must be a JSON object without img_size, patch_size or num_classes (their own flags)")
    import timm  # here, not at import time: it takes seconds

    args.arch, tag = timm.models.split_model_name_tag(args.model)
    if not timm.is_model(args.arch):
        p.error(f"--model {args.model}: timm has no model {args.arch!r} (the paper's: {', '.join(PRETRAINED_TAGS)})")
    # what the network starts from, recorded in args.json
    tag = tag or PRETRAINED_TAGS.get(args.arch, "")
    args.pretrained_weights = (None if not args.pretrained else args.pretrained_file if args.pretrained_file
                               else f"{args.arch}.{tag}" if tag else args.arch)
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


# === A&P (Mo et al.; docs/method.md §6): attention random dropping (ARD) and perturbation random masking (PRM)


def ap_strength(progress, warmup):
    """1 - t/warmup at the fractional epoch t, 0 from the end of the warm-up on: ARD's probability of dropping a
    block's attention gradient and PRM's fraction of masked patches (Mo et al.'s drop_rate t/n_w is the complement)."""
    return 0.0 if warmup <= 0 else max(0.0, 1.0 - progress / warmup)


def attention_modules(model):
    """The attention module of every transformer block: timm's blocks compute x + ...(attn(norm1(x))) and
    x + ...(mlp(norm2(x))); the gradient through `attn` is the attention branch's."""
    return [m.attn for m in model.modules() if isinstance(getattr(m, "attn", None), nn.Module) and hasattr(m, "mlp")]


@contextlib.contextmanager
def attention_gradient_drop(model, p):
    """ARD: inside, every backward pass through each block's attention module zeroes the gradient of its output
    (nothing flows into the attention branch; the residual path still carries it) with probability p, drawn per
    block and pass. Yields the hooks, which are removed on exit, whatever happens."""
    handles = []

    def drop(module, grad_output):
        if random.random() < p:
            return tuple(None if g is None else torch.zeros_like(g) for g in grad_output)
        return None

    try:
        handles += [attn.register_full_backward_pre_hook(drop) for attn in attention_modules(model)] if p > 0 else []
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def patch_mask(image_size, patch_size, fraction, device):
    """PRM's mask: 1 except on int(fraction * #patches) random patch_size x patch_size patches, the same for every
    image and channel, shape (1, 1, H, W); None when no patch is masked."""
    grid_h, grid_w = image_size[0] // patch_size, image_size[1] // patch_size
    n_masked = int(grid_h * grid_w * fraction)
    if n_masked <= 0:
        return None
    keep = torch.ones(grid_h * grid_w, device=device)
    keep[torch.randperm(grid_h * grid_w, device=device)[:n_masked]] = 0
    return keep.view(1, 1, grid_h, grid_w).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


def ap_attack(model, x, y, args, progress):
    """The training attack at the fractional epoch `progress`: PGD on each loss's paper's objective and start
    (trades: the KL from 0.001 N(0, 1); mart: CE from it; ce, nmse: CE from U(-eps, eps)), with A&P at strength
    ap_strength(progress). While ARD's hooks are on it attacks through model.forward, the eager forward, so that the
    hooks on the attention modules fire under --compile too. The caller sets the model's mode."""
    strength = ap_strength(progress, args.ap_warmup_epochs)
    delta_mask = ((lambda: patch_mask(x.shape[-2:], args.patch_size, strength, x.device))  # new patches every step
                  if args.prm and strength > 0 else None)
    with attention_gradient_drop(model, strength if args.ard else 0.0) as hooks:
        return pgd_attack(model.forward if hooks else model, x, y, *utils.radii(args), args.pgd_steps,
                          loss="kl" if args.loss == "trades" else "ce", delta_mask=delta_mask,
                          random_start="normal" if args.loss in ("trades", "mart") else "uniform", norm=args.norm)


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


# === Training: the module docstring's loop


def step_lr_at(progress, lr, milestones):
    """Mo et al.'s step schedule at the fractional epoch `progress`: lr, divided by 10 when each milestone epoch M
    begins (M counted from 1, as the paper's "36th and 38th epochs": from progress M - 1 on)."""
    return lr * 0.1 ** sum(progress >= m - 1 for m in milestones)


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
    """The module docstring's loop on this process's share of every batch; the run folder on rank 0."""
    if args.batch_size % world_size:
        raise utils.UserError(f"--batch-size {args.batch_size} (the global batch) must divide among {world_size} "
                              "processes")
    # set up: the data, the (pretrained) network, SGD, and theta_prev <- theta_0 (or the interrupted run's state)
    utils.seed_everything(args.seed)  # the same initial weights (and new head) on every rank
    data = utils.load_dataset(args.dataset, args.data_dir, args.image_size)
    check_image_size(args, data)
    split = utils.split_data(data, args, device)
    model, model_kwargs = build_vit(args, data, pretrained=args.pretrained and checkpoint is None, verbose=rank == 0)
    model = model.to(device)
    if args.ard and not attention_modules(model):
        raise utils.UserError(f"--ard: {args.arch} has no transformer blocks with an attention branch (attn, mlp)")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    theta_prev, metrics = clone_state(model), []  # theta_0: the adapted pretrained weights
    if checkpoint is not None:  # --resume: the weights, optimiser and theta_prev of the last saved epoch
        state = checkpoint["resume"]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        theta_prev, metrics = state["theta_prev"], checkpoint["metrics"]
    precision = utils.settle_amp(args, device, model, (args.batch_size // world_size, *data.image_shape),
                                 channels_last=False)
    run_dir = Path(args.resume) if args.resume else utils.make_run_dir(args, SCRIPT) if rank == 0 else None
    stop.start(run_dir, world_size)
    if args.compile:
        model.compile()
    train_model = utils.data_parallel(model) if world_size > 1 else model
    column = "val_pgd20_acc" if args.val_size else "test_pgd20_acc"  # what best.pt is chosen on
    log = utils.MetricsLog(run_dir, METRIC_FIELDS, metrics, args) if rank == 0 else None
    if rank == 0:
        print(f"{utils.method_name(args, SCRIPT)} ({args.img_size}x{args.img_size}, patch {args.patch_size}, "
              f"{'from ' + args.pretrained_weights if args.pretrained_weights else 'from scratch'}) on {args.dataset}: "
              f"{len(split['train'][0])} training images, A&P warm-up {args.ap_warmup_epochs:g} "
              f"epochs, {utils.threat_model(args.norm, args.epsilon)}, {args.epochs} epoch{'s' * (args.epochs != 1)} "
              f"on {world_size} x {device}, {precision}"
              f"{', compiled' if args.compile else ''}; writing {run_dir}", flush=True)

    for epoch in range(len(metrics), args.epochs):
        utils.seed_everything(args.seed, epoch, rank)  # this epoch's draws: the same after --resume
        start, alpha = time.time(), 0.0
        totals = torch.zeros(4, device=device)  # loss sum, clean correct, robust correct, images
        model.train()
        for i, steps, x, y in utils.epoch_batches(*split["train"], args, epoch, data.flip, rank, world_size,
                                                  channels_last=False):
            for group in optimizer.param_groups:
                group["lr"] = step_lr_at(epoch + i / steps, args.lr, args.lr_milestones)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                # x' <- PGD-10(x, y) with A&P at this step's end, t = epoch + (step + 1) / steps as Mo et al.'s;
                # in eval mode (dropout and drop-path off), as their code
                model.eval()
                x_adv = ap_attack(model, x, y, args, epoch + (i + 1) / steps)
                model.train()
                # theta <- SGD step on the loss of x'; the losses run in fp32
                logits_adv = train_model(x_adv).float()
                if args.loss == "ce":  # PGD-AT; the clean logits only for the logged accuracy
                    loss, logits_clean = F.cross_entropy(logits_adv, y), eval_logits(model, x)
                else:
                    logits_clean = train_model(x).float()
                    if args.loss == "nmse":
                        loss = F.cross_entropy(logits_adv, y) + args.lam * nmse_loss(logits_adv, logits_clean, y)
                    elif args.loss == "trades":
                        loss = F.cross_entropy(logits_clean, y) + args.beta * trades_kl(logits_adv, logits_clean)
                    else:
                        loss = mart_loss(logits_adv, logits_clean, y, args.beta)
            utils.check_finite(epoch, i, training_loss=loss)  # a nan or inf loss stops the run before it saves
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            totals += torch.stack([loss.detach() * len(y), (logits_clean.argmax(1) == y).sum(),  # no host sync
                                   (logits_adv.argmax(1) == y).sum(), torch.tensor(len(y), device=device)]).float()
        loss_sum, clean_correct, robust_correct, seen = utils.all_reduce_sum_(totals).tolist()
        utils.average_buffers_(model)  # identical floating-point buffers on every rank before interpolating
        # PIAT (Eq. 9-10): interpolate with the previous epoch's interpolated weights
        if args.piat:
            alpha, theta_prev = piat_step_(model, theta_prev, epoch, args)
        # evaluate the weights the next epoch starts from
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "alpha": alpha,
               "train_loss": loss_sum / seen, "train_clean_acc": clean_correct / seen,
               "train_robust_acc": robust_correct / seen, "images_per_second": seen / (time.time() - start)}
        columns, per_image = evaluate_epoch(model, split, args, epoch, rank, world_size)
        row.update(columns, epoch_seconds=time.time() - start)
        metrics.append(row)
        # keep the best and the final checkpoint (with the timm name and kwargs evaluate.py rebuilds the model from)
        utils.check_finite_weights(epoch, model=model)
        if rank == 0:
            saved = {"model": model.state_dict(), "arch": args.arch, "model_kwargs": model_kwargs,
                     "num_classes": data.num_classes, "mean": data.mean, "std": data.std,
                     "image_shape": data.image_shape, "args": vars(args), "metrics": metrics, "epoch": epoch + 1,
                     "script": SCRIPT, "weights": "trained",
                     "per_image": {"indices": split["test_indices"].tolist(), **per_image}}
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "theta_prev": theta_prev}
            utils.save_epoch(run_dir, saved, state, column, log, last=epoch + 1 == args.epochs or stop.signum)
            print(f"epoch {epoch + 1:3d}  lr {row['lr']:.5f}  alpha {alpha:.3f}  loss {row['train_loss']:.4f}  "
                  f"train clean/robust {row['train_clean_acc']:.3f}/{row['train_robust_acc']:.3f}  test clean/"
                  f"PGD-{args.eval_pgd_steps} {row['test_clean_acc']:.3f}/{row['test_pgd20_acc']:.3f}  "
                  f"{row['epoch_seconds']:.1f}s", flush=True)
        stop.check(epoch, args.epochs, device)  # a stop signal ends the run here, the epoch saved

    utils.check_ranks_agree(weights=model)
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


# === The baselines PIAT is combined with in Table IV (docs/method.md §5): TRADES and MART


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


# === The network: a timm model at the images' size, with the 224x224 ImageNet weights adapted to it (Mo et al.'s
# checkpoint_filter_fn; our code)


def check_image_size(args, data):
    """--img-size (default: the data's) must be the images' size and a multiple of --patch-size."""
    height, width = data.image_shape[1:]
    if height != width:
        raise utils.UserError(f"the {args.dataset} images are {height}x{width}; pass --image-size to make them square")
    args.img_size = args.img_size or height
    if args.img_size != height:
        raise utils.UserError(f"--img-size {args.img_size} but the {args.dataset} images are {height}x{width}; "
                              f"pass --img-size {height} (or --image-size {args.img_size} for an image folder)")
    if args.img_size % args.patch_size:
        raise utils.UserError(f"--patch-size {args.patch_size} does not divide --img-size {args.img_size}")


def build_vit(args, data, pretrained, verbose=False):
    """(the model, its model_kwargs): utils.build_model, as evaluate.py rebuilds it from a checkpoint, with the
    adapted ImageNet weights when `pretrained`."""
    model_kwargs = {"img_size": args.img_size, "patch_size": args.patch_size, **args.model_kwargs}
    try:
        model = utils.build_model(args.arch, data.num_classes, data.mean, data.std, **model_kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise utils.UserError(f"timm cannot build {args.arch} with {model_kwargs}: {error_line(err)}") from None
    if pretrained:
        state = pretrained_state(args.model if args.pretrained_file else args.pretrained_weights, args.model_kwargs,
                                 args.pretrained_file, verbose)
        model.net.load_state_dict(adapt_pretrained_state(state, model.net))
    return model, model_kwargs


def pool_patch_kernel(weight, patch_size):
    """The (O, I, P, P) patch-embedding kernel of the 224x224 model as an (O, I, p, p) kernel: each (P/p) x (P/p)
    block summed (Mo et al.). On an image whose (P/p) x (P/p) blocks are constant (the small image up-sampled by
    P/p), the pooled kernel on the small image gives the original's output. Sizes that do not divide (never the
    paper's 16 -> 4): each old kernel pixel is split between the new cells it overlaps, in proportion to the
    overlap, so the kernel's sum is kept (Mo et al.'s nearest-neighbour resampling does not keep it)."""
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
    """(1, prefix + G*G, D) position embeddings -> (1, prefix + g_h*g_w, D): the prefix (class token) entries kept,
    the G x G grid bilinearly interpolated (align_corners=False), as Mo et al."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise utils.UserError(f"pretrained position embeddings of {grid.shape[1]} grid tokens are not a square grid")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(grid_size), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_size[0] * grid_size[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def adapt_pretrained_state(state, net):
    """The 224x224 model's state_dict `state`, made to fit `net` (the same timm model at another image and patch
    size): the patch kernel sum-pooled, the position grid resized (prefix tokens kept), the classifier left as `net`
    initialised it (a new head for the new classes). Anything else that does not fit is a UserError."""
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


def pretrained_state(name, model_kwargs, pretrained_file=None, verbose=False):
    """The state_dict of timm model `name` (NAME or NAME.TAG) at its own 224x224 size with its ImageNet weights:
    from the Hugging Face hub through timm, or from `pretrained_file`. One UserError when they cannot be had."""
    import timm

    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise utils.UserError(f"--pretrained-file {pretrained_file}: no such file")
        try:
            overlay = {"file": str(pretrained_file)}
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs).state_dict()
        except Exception as err:
            raise utils.UserError(f"--pretrained-file {pretrained_file} does not load into {name} (it must hold the "
                                  f"224x224 model's state_dict, .pth or .safetensors): {error_line(err)}") from None
    if not timm.models.is_model_pretrained(name):
        raise utils.UserError(f"timm has no pretrained weights for {name}; pass --pretrained-file PATH or "
                              "--no-pretrained")
    if verbose:
        print(f"loading the ImageNet weights of {name} (Hugging Face hub, through timm's cache)", flush=True)
    hub_logger = logging.getLogger("huggingface_hub")  # its retry warnings would bury the one line below
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        return timm.create_model(name, pretrained=True, **model_kwargs).state_dict()
    except Exception as err:  # offline, a proxy, a firewall, a partial download: one line for all
        raise utils.UserError(f"the ImageNet weights of {name} could not be downloaded from the Hugging Face hub "
                              f"({error_line(err)}); without network, pass --pretrained-file PATH (a .pth or "
                              ".safetensors state_dict of the 224x224 model) or --no-pretrained to train from "
                              "scratch") from None
    finally:
        hub_logger.setLevel(level)


def error_line(err):
    return f"{type(err).__name__}: {utils.first_line(err)}"


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit status for every way a run can end early
