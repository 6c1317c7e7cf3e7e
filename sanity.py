"""evaluate.py --sanity: is the evaluation itself trustworthy? A checklist against gradient masking and broken attacks
(Carlini et al. 2019, "On Evaluating Adversarial Robustness"; Athalye et al. 2018; AutoAttack's flags; RobustBench's
rules) on one model and its test images; each check a PASS, WARN or FAIL with its numbers and, unless it passes, what
it means and what to do:
  model hygiene    eval mode honoured, two forward passes identical, logits rather than probabilities
  gradients        share of images whose input gradient (CE, CW margin) is exactly zero or non-finite; per image and
                   coordinate (partial masking): exactly-zero coordinates the output still moves along, and autograd's
                   directional derivative against a finite difference (float64)
  eps sweep        PGD-20 at eps 0,2,4,8,16,32,64/255 (L2: 0,0.125,...,4): eps 0 = clean, never rising, about 0
                   at the largest
  attack strength  PGD with 5x the steps and restarts, and one-step FGSM, against PGD-20
  loss choice      the CW margin against cross-entropy
  black box        Square (pyautoattack) against every white-box attack
  per example      robust implies correct clean; every x' within eps and in [0, 1], no NaN; the worst case per
                   example against the table's lowest number (and EOT-PGD-20 when the model is randomised)
A gap is flagged only when it exceeds its tolerance by two standard errors of its paired, per-example difference.
From Python: run_sanity_checks(model, x, y, SanitySettings(device="cuda")). Cost, in passes of PGD-20 over the same
images: about 2 + 5 x clean accuracy (the sweep) + 15 x the share robust to PGD-20 (3 restarts of PGD-100) + 17 x the
share robust to every white-box attack (Square's 1000 queries) + the gradient probe (a float64 copy, 9-11 passes on
at most 100 images, more for a model that rounds; 0.2-0.3x at 200 images was measured when it took 5-7, one step h) +
for a randomised model eot_draws x clean accuracy (EOT-PGD-20); measured on CIFAR-10 (2 CPU cores): 5.8x for an
undefended ResNet-18, 8-12x for a PGD-AT small-cnn at 22 % PGD-20, about 20x for a ResNet-18 at 50 % (AutoAttack:
~50x)."""

import copy
import dataclasses
import functools
import logging
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

SANITY_EPSILONS = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # the eps sweep, 1/255 units; L2: 1/16 of it (evaluate.py's)
SANITY_N = 500  # test images of the checklist when --n-examples is not given
Z = 2.0  # a gap is flagged only when it exceeds its tolerance by Z standard errors (one-sided, ~98 %)
# Tolerated accuracy gaps (WARN above the first, FAIL above the second): honest models show ~0-2 points
# for more PGD steps and restarts, ~0-1 for Square after the white-box attacks, and none for FGSM over PGD
# or a rise with epsilon; masked models differ by tens of points.
TOLERANCES = {"eps-monotone": (0.01, 0.05), "large-eps-zero": (0.02, 0.10), "more-steps-restarts": (0.03, 0.10),
              "fgsm-vs-pgd": (0.02, 0.05), "square-vs-white-box": (0.02, 0.05), "robust-within-clean": (0.005, 0.02),
              "worst-case-reported": (0.05, 0.10), "zero-coordinates": (0.02, 0.10), "finite-difference": (0.05, 0.20)}
# The CW margin against CE is judged relative to what the two attacks fool together, since that bounds the
# gap (a weak model has few examples to lose): of those, honest models leave 10-25 % to CW alone, a saturated
# softmax ~90 %. WARN/FAIL when the share (gap - Z*se over the fooled share) exceeds these, and the gap 2 points.
MARGIN_ONLY_SHARE, MARGIN_MIN_GAP = (1 / 3, 1 / 2), 0.02
LOGIT_TOLERANCE = {False: 1e-3, True: 3e-2}  # relative logit differences that are rounding (fp32 / bf16, TF32)
# The gradient probe (first PROBE_N images, CW margin, at x moved by U(-PROBE_JITTER, PROBE_JITTER): flat image
# regions tie in max-pooling windows, a kink exactly at x). An image is flagged when autograd's directional
# derivatives along FD_DIRECTIONS random sign directions miss central differences by more than FD_DISAGREE (relative;
# honest models measured at most 2e-3 in float64, 0.37 in float32; partial masking 0.2-1), or when ZERO_SHARE of its
# gradient's coordinates are exactly zero (honest: none) and an eps/4 step along them moves the margin by ZERO_LIVE x
# a step along all coordinates (pixels a model ignores do not move it at all). The difference is taken at the first of
# FD_STEPS at which steps h and 2h agree within FD_SETTLED (relative): a model that computes in lower precision than
# the probe (bf16 or fp16 inside, an input cast to float32) rounds small steps away, and is judged at a larger step
# with FD_ROUNDED (its autograd rounds too: on tests/test_sanity.py's small-cnn under bf16 autocast or in fp16, about
# 1 % of the images above it honestly, 9 % behind a straight-through estimator (bf16): rounding hides most of a replaced
# gradient, which the model in float32 shows at once); an image whose differences never settle
# (rounding below, kinks above) is not judged. In float64, a difference that is exactly zero at the first step (the
# function is flat where autograd says it moves) is judged there; in float32 such flatness may be the model's own
# bf16/fp16 rounding, so the probe goes on to larger steps.
PROBE_N, PROBE_JITTER, FD_DIRECTIONS, FD_SETTLED = 100, 1e-3, 2, 0.2
FD_STEPS = {torch.float64: (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2), torch.float32: (1e-4, 1e-3, 1e-2)}
FD_DISAGREE, FD_ROUNDED = {torch.float64: 0.1, torch.float32: 0.5}, 0.6
ZERO_SHARE, ZERO_LIVE = 0.01, 1e-3


@dataclasses.dataclass(frozen=True)
class SanitySettings:
    """What the checklist runs; epsilon, step size and the sweep in --norm's units, as the flags (L-inf: 1/255, L2:
    [0, 1]), by default evaluate.py's."""

    norm: str = "linf"
    epsilon: float = None  # 8/255 (L-inf), 0.5 (L2)
    step_size: float = None  # 2/255 (L-inf), eps/4 (L2)
    epsilons: tuple = None  # SANITY_EPSILONS (L-inf), SANITY_EPSILONS / 16 (L2): 0 ... 4
    long_steps: int = 100  # 5x PGD-20's steps, at half its step size
    restarts: int = 3
    square_queries: int = 1000
    batch_size: int = 250
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False  # the model runs under bf16 autocast: looser logit tolerances
    eot_draws: int = 8  # a randomised model: EOT-PGD-20 averages the gradient over this many draws per step

    def __post_init__(self):  # frozen: the norm's defaults set through object.__setattr__
        linf, set_ = self.norm == "linf", functools.partial(object.__setattr__, self)
        set_("epsilon", utils.EPSILONS[self.norm] if self.epsilon is None else self.epsilon)
        set_("step_size", (2.0 if linf else self.epsilon / 4) if self.step_size is None else self.step_size)
        set_("epsilons", tuple(e / (1 if linf else 16) for e in SANITY_EPSILONS) if self.epsilons is None else
             tuple(self.epsilons))


def sanity_result(name, group, status, numbers, detail, meaning):
    """One line of the checklist: `detail` shows the numbers, `meaning` says what a WARN/FAIL means and what to do."""
    return {"name": name, "group": group, "status": status, "numbers": numbers, "detail": detail, "meaning": meaning}


def paired_gap(reference, other):
    """(mean(reference) - mean(other), its standard error) for 0/1 flags of the same examples: the noise of a
    paired difference is that of the examples on which the two disagree."""
    d = reference.float() - other.float()
    return d.mean().item(), (d.std(correction=0) / len(d) ** 0.5).item()


def gap_status(gap, se, name):
    """PASS, or WARN/FAIL when gap - Z*se exceeds the check's tolerance (TOLERANCES)."""
    warn, fail = TOLERANCES[name]
    lower = gap - Z * se
    return "FAIL" if lower > fail else "WARN" if lower > warn else "PASS"


def pct(fraction):
    return f"{100 * fraction:.1f}%"


def relative_difference(a, b):
    """max |a - b| / max |a| (inf when a or b is not finite)."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def predict(model, x, batch_size, device):
    """Logits of model on x (float, on the CPU), batch by batch; on the CPU."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


# === The attacks, written inline as in evaluate.py and the training scripts (sanity.py needs utils.py only)


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


class ExpectedLogits(nn.Module):
    """EOT (Athalye et al. 2018) for a model whose forward pass is random: while the attack takes gradients, the
    logits averaged over `draws` passes, so PGD follows the expected gradient; without autograd (the prediction
    that is counted) one pass, the model as deployed."""

    def __init__(self, model, draws):
        super().__init__()
        self.model, self.draws = model, draws

    def forward(self, x):
        if not torch.is_grad_enabled():
            return self.model(x)
        return torch.stack([self.model(x) for _ in range(self.draws)]).mean(0)


class Bf16Autocast(nn.Module):
    """`model` under bf16 autocast with fp32 logits out (--amp): every attack, AutoAttack's too, runs in bf16
    without knowing it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


# === 1-2: the model and its gradients


def check_eval_mode(model, x, settings):
    """BatchNorm and Dropout in eval mode: no module still training after model.eval(), a forward pass leaves
    the buffers (BatchNorm's running statistics) as they were, and an example's logits do not depend on the
    other images of its batch (here: 32 random images beside it) beyond what two passes alone differ by (a
    random model is the next check's). The model's state is restored afterwards."""
    model.eval()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    probe = x[:32].to(settings.device)
    others = torch.rand(probe.shape, generator=torch.Generator().manual_seed(settings.seed)).to(settings.device)
    with torch.no_grad():
        alone, again = model(probe).float(), model(probe).float()
        together = model(torch.cat([probe, others]))[: len(probe)].float()
    training = [name or "the model" for name, m in model.named_modules() if m.training]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    model.load_state_dict(before)
    diff, noise = relative_difference(alone, together), relative_difference(alone, again)
    ok = not training and not changed and diff <= max(LOGIT_TOLERANCE[settings.bf16], 3 * noise)
    detail = (f"{len(training)} modules training after eval(), {len(changed)} buffers changed by a forward pass, "
              f"logits change by {diff:.1e} (relative) with other images in the batch")
    return sanity_result("eval-mode", "model hygiene", "PASS" if ok else "FAIL",
                         {"training_modules": training[:10], "changed_buffers": changed[:10], "batch_dependence": diff},
                         detail, "the model does not evaluate in eval mode (BatchNorm batch statistics or Dropout on): "
                                 "numbers depend on the batch and attacks chase a moving target; make model.eval() "
                                 "stick (forward() must not switch modes or use batch statistics)")


def check_deterministic(model, x, settings):
    """Two forward passes of the same images give the same logits."""
    probe = x[:32].to(settings.device)
    with torch.no_grad():
        first, second = model(probe).float(), model(probe).float()
    diff = relative_difference(first, second)
    flips = int((first.argmax(1) != second.argmax(1)).sum())
    status = "PASS" if diff <= LOGIT_TOLERANCE[settings.bf16] else "FAIL"
    return sanity_result("deterministic", "model hygiene", status,
                         {"difference": diff, "flips": flips, "n": len(probe)},
                         f"two passes differ by {diff:.1e} (relative), {flips}/{len(probe)} predictions flip",
                         "a randomised forward pass (a randomised defence, or Dropout left on): one PGD run "
                         "under-attacks it; attack it with EOT (the gradient averaged over draws: EOT-PGD-20 under "
                         "worst-case-reported) or AutoAttack's rand version (--aa-version rand), and report accuracy "
                         "over draws")


def check_logits(logits):
    """The outputs are logits: no row of finite values in [0, 1] summing to 1 (probabilities), nothing non-finite."""
    in_unit_interval = (logits >= -1e-6).all(1) & (logits <= 1 + 1e-6).all(1)
    rows_like_probabilities = ((logits.sum(1) - 1).abs() < 1e-3) & in_unit_interval
    share, finite = rows_like_probabilities.float().mean().item(), bool(torch.isfinite(logits).all())
    status = "PASS" if share < 0.5 and finite else "FAIL"
    return sanity_result("logits", "model hygiene", status, {"probability_rows": share, "finite": finite},
                         f"{pct(share)} of the rows are probability vectors (in [0, 1], summing to 1), outputs "
                         f"{'finite' if finite else 'NOT finite'}, range "
                         f"{logits.min().item():.3g}..{logits.max().item():.3g}",
                         "the model returns probabilities (or non-finite values), not logits: cross-entropy on "
                         "probabilities has flat, tiny gradients and PGD under-attacks; return the logits (drop the "
                         "final softmax) before evaluating")


def check_gradients(model, x, y, settings):
    """The share of examples whose input gradient (CE and CW margin, at the clean image) is exactly zero or
    non-finite: gradient attacks cannot move from there. A model whose output does not depend on its input through
    autograd has zero gradients."""
    zero_ce, zero_margin, nonfinite = [], [], []
    for i in range(0, len(x), settings.batch_size):
        xb = x[i : i + settings.batch_size].to(settings.device).requires_grad_(True)
        yb = y[i : i + settings.batch_size].to(settings.device)
        logits, grads = model(xb).float(), []
        for objective in (F.cross_entropy(logits, yb, reduction="sum"), cw_margin(logits, yb).sum()):
            grad = (torch.autograd.grad(objective, xb, retain_graph=True, allow_unused=True)[0]
                    if objective.requires_grad else None)
            grads.append(torch.zeros_like(xb) if grad is None else grad.flatten(1))
        zero_ce.append((grads[0].abs().amax(1) == 0).cpu())
        zero_margin.append((grads[1].abs().amax(1) == 0).cpu())
        nonfinite.append((~torch.isfinite(grads[0]).all(1) | ~torch.isfinite(grads[1]).all(1)).cpu())
    shares = {name: torch.cat(flags).float().mean().item() for name, flags in
              (("zero_ce", zero_ce), ("zero_margin", zero_margin), ("nonfinite", nonfinite))}
    worst = max(shares.values())
    status = "FAIL" if worst > 0.01 or shares["nonfinite"] > 0 else "WARN" if worst > 0 else "PASS"
    return sanity_result("gradients", "gradients", status, {**shares, "n": len(y)},
                         f"input gradient exactly zero for {pct(shares['zero_ce'])} (CE) and "
                         f"{pct(shares['zero_margin'])} (CW margin) of {len(y)} images, non-finite for "
                         f"{pct(shares['nonfinite'])}",
                         "gradient attacks cannot move from these images: zero for both losses means a "
                         "non-differentiable step (quantisation, detach, no_grad: attack with BPDA or Square/"
                         "AutoAttack), zero for CE alone a saturated softmax (logits too large: use the margin "
                         "loss, CW-20 or AutoAttack), non-finite a NaN/Inf in the model")


def probe_precision(model, x, settings):
    """(model, dtype) for the gradient probe: a float64 copy when the model copies, casts and returns float64 logits;
    else the model itself in float32 (bf16 autocast removed: its rounding is not what the probe asks about)."""
    model = model.model if isinstance(model, Bf16Autocast) else model
    try:
        double = copy.deepcopy(model).double()
        with torch.no_grad():
            if double(x[:1].to(settings.device, torch.float64)).dtype == torch.float64:
                return double, torch.float64
    except Exception:  # a model that cannot be copied or cast, whatever its error: float32
        pass
    return model, torch.float32


def sign_directions(shape, block, generator):
    """Random +-1 per pixel (block 1) or per block x block square, float64 on the CPU."""
    small = torch.randint(0, 2, (*shape[:2], -(-shape[2] // block), -(-shape[3] // block)), generator=generator)
    return F.interpolate(2 * small.double() - 1, scale_factor=block, mode="nearest")[..., : shape[2], : shape[3]]


def gradient_probe(model, x, y, settings):
    """Autograd against central finite differences of the CW margin on the first PROBE_N images, jittered off x, in
    float64 where the model allows; every pass draws the same random numbers (a randomised model is probed one draw
    at a time). Per image: the share of exactly-zero gradient coordinates, whether the margin moves along them (an
    eps/4 step), the relative error along FD_DIRECTIONS random sign directions (per pixel, in 4x4 blocks, by turns)."""
    net, dtype = probe_precision(model, x, settings)
    gen = torch.Generator().manual_seed(settings.seed)
    far = radius(settings.epsilon, settings) / 4 / (x[0].numel() ** 0.5 if settings.norm == "l2" else 1)  # eps/4 long
    exact = dtype == torch.float64  # the whole model in float64: a margin flat at the first step is no rounding
    x, y = x[:PROBE_N].double(), y[:PROBE_N]
    x = x.clamp(2 * PROBE_JITTER, 1 - 2 * PROBE_JITTER) + PROBE_JITTER * (2 * torch.rand(x.shape, generator=gen,
                                                                                         dtype=x.dtype) - 1)

    def margin(xb, yb):
        utils.seed_everything(settings.seed)
        return cw_margin(net(xb.to(settings.device, dtype)), yb.to(settings.device))

    def change(xb, yb, v, step):  # margin(x + step v) - margin(x - step v), float64 on the CPU
        with torch.no_grad():
            return (margin((xb + step * v).clamp(0, 1), yb) - margin((xb - step * v).clamp(0, 1), yb)).double().cpu()

    zero, live, error, steps = [], [], [], []
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        for i in range(0, len(x), settings.batch_size):
            xb, yb = x[i : i + settings.batch_size], y[i : i + settings.batch_size]
            xg = xb.to(settings.device, dtype).requires_grad_(True)
            objective = margin(xg, yb).sum()
            grad = torch.autograd.grad(objective, xg, allow_unused=True)[0] if objective.requires_grad else None
            grad = torch.zeros_like(xb) if grad is None else grad.double().cpu()
            directions = [sign_directions(xb.shape, 4 if k % 2 else 1, gen) for k in range(FD_DIRECTIONS)]
            autograd = torch.stack([(grad * v).flatten(1).sum(1) for v in directions])
            err, used = (torch.full((len(xb),), float("nan"), dtype=torch.float64) for _ in range(2))
            for rung, h in enumerate(FD_STEPS[dtype]):  # the first step at which the difference settles
                todo = err.isnan().nonzero().flatten()
                fd, fd2 = (torch.stack([change(xb[todo], yb[todo], v[todo], s) / (2 * s) for v in directions])
                           for s in (h, 2 * h))
                size, scale = torch.maximum(fd.norm(dim=0), fd2.norm(dim=0)), torch.maximum(
                    autograd[:, todo].norm(dim=0), fd.norm(dim=0))
                ok = ((fd - fd2).norm(dim=0) <= FD_SETTLED * size) & ((size > 0) | (rung == 0 and exact))
                err[todo[ok]] = torch.where(scale > 0, (autograd[:, todo] - fd).norm(dim=0) / scale, 0.0)[ok]
                used[todo[ok]] = h
                if not err.isnan().any():
                    break
            error.append(err)
            steps.append(used)
            zero.append((grad == 0).flatten(1).double().mean(1))
            live.append(torch.zeros(len(xb), dtype=torch.bool))
            idx = (zero[-1] >= ZERO_SHARE).nonzero().flatten()
            if len(idx):  # only images with zero coordinates: does the margin move along them?
                v = sign_directions(xb[idx].shape, 1, gen)
                live[-1][idx] = (change(xb[idx], yb[idx], v * (grad[idx] == 0), far).abs() >
                                 ZERO_LIVE * change(xb[idx], yb[idx], v, far).abs())
    return {"zero_share": torch.cat(zero), "zero_live": torch.cat(live), "error": torch.cat(error), "dtype": dtype,
            "step": torch.cat(steps)}


def check_probe(probe):
    """The gradient probe's two checks: exactly-zero coordinates along which the margin moves, and autograd's
    directional derivative against a finite difference. Both judged on the share of images flagged."""
    n, zero, error, dtype = len(probe["error"]), probe["zero_share"], probe["error"], probe["dtype"]
    precision, judged = str(dtype).replace("torch.", ""), error[~error.isnan()]
    steps = {f"{h:g}": int((probe["step"] == h).sum()) for h in FD_STEPS[dtype] if (probe["step"] == h).any()}
    disagree = error > torch.where(probe["step"] == FD_STEPS[dtype][0], FD_DISAGREE[dtype], FD_ROUNDED)
    rounded = int((probe["step"] > FD_STEPS[dtype][0]).sum())  # the model rounds below the probe's precision
    unjudged = (f"; {rounded} judged at larger steps (the model rounds below {precision}, or kinks): a weaker check, "
                f"so check a {precision} version of the model too where there is one" if rounded else "") + (
                f"; {n - len(judged)} not judged (their differences settle at no step up to {FD_STEPS[dtype][-1]:g}: "
                f"the model rounds below {precision}, or kinks)" if len(judged) < n else "")
    fix = ("attack with BPDA (straight-through: the identity, or a smooth approximation, as the backward of the "
           "offending step) or with Square/AutoAttack; for a randomised step average the gradient over draws (EOT)")
    results = []
    for name, flags, numbers, detail, meaning in (
        ("zero-coordinates", probe["zero_live"],
         {"zero_share": zero.mean().item(), "max_zero_share": zero.max().item(),
          "images_with_zeros": (zero >= ZERO_SHARE).double().mean().item()},
         f"{pct(zero.mean().item())} of the input-gradient coordinates exactly zero (CW margin, {n} images; "
         f"{pct(zero.max().item())} at most in one); {int(probe['zero_live'].sum())} images with at least "
         f"{pct(ZERO_SHARE)} zero whose margin moves along them",
         "part of the input reaches the output around autograd: a detached path (x.detach(), no_grad), a "
         "non-differentiable step (quantisation, rounding) or a gradient cut per pixel or channel; PGD ignores those "
         "coordinates and overstates robustness (partial gradient masking); " + fix),
        ("finite-difference", disagree,
         {"median_error": judged.median().item() if len(judged) else None,
          "max_error": judged.max().item() if len(judged) else None, "threshold": FD_DISAGREE[dtype],
          "judged": len(judged), "directions": FD_DIRECTIONS},
         f"autograd's directional derivative (CW margin) differs from a central difference ({precision}, images "
         f"per step: {', '.join(f'{h}: {k}' for h, k in steps.items()) or 'none'}) by more than "
         f"{FD_DISAGREE[dtype]:g} (relative; {FD_ROUNDED:g} at a larger step) for "
         f"{int(disagree.sum())} of {n} images; median error "
         f"{judged.median().item() if len(judged) else float('nan'):.1e}{unjudged}",
         "the input gradient is not the derivative of the function the model computes: a detached or replaced "
         "backward (x = low.detach() + (x - low), a straight-through estimator, a custom autograd.Function) or "
         "shattered/obfuscated gradients; PGD follows the wrong direction and overstates robustness; " + fix)):
        share, se = paired_gap(flags, torch.zeros_like(flags))
        status = "WARN" if name == "finite-difference" and not len(judged) else gap_status(share, se, name)
        results.append(sanity_result(name, "gradients", status, {"flagged": share, "se": se, **numbers, "n": n,
                                                                  "precision": precision, "steps": steps},
                                     detail, meaning))
    return results


# === The attacks, worst case per example


def perturbation_faults(x, x_adv, epsilon, logits, norm="linf"):
    """Per example of a batch: x_adv outside the `norm` ball of radius epsilon around x, outside [0, 1], or NaN
    (in x_adv or in its logits); and the largest distance in that norm."""
    delta = (x_adv - x).flatten(1)
    distance = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    slack = 1e-6 * (1 if norm == "linf" else delta.shape[1] ** 0.5)  # float32 rounding of (x + delta) - x
    faults = {"outside_ball": distance > epsilon + slack,
              "outside_box": ((x_adv < 0) | (x_adv > 1)).flatten(1).any(1),
              "nan": torch.isnan(x_adv).flatten(1).any(1) | ~torch.isfinite(logits).all(1)}
    return faults, distance.nan_to_num(0.0).max().item() if len(distance) else 0.0


def radius(value, settings):
    """An epsilon or step size of the settings (the flags' units) in [0, 1] units, the attacks' own."""
    return value / utils.NORM_UNITS[settings.norm]


def attack_examples(model, x, y, idx, attack, epsilon, settings, seed, name="attack"):
    """attack(x_batch, y_batch) -> x_adv on the examples idx of (x, y) (float, on the CPU), batch by batch on the
    device, re-seeded with `seed` first (every number reproducible on its own, as in evaluate.py's table); epsilon
    in the settings' units. Returns: robust (model(x_adv) == y for those examples), the perturbation faults (counts),
    the largest distance (the settings' units), the first error an attack raised (that batch then keeps its clean
    images) and seconds."""
    start, robust, error, max_distance = time.time(), [], None, 0.0
    faults = {"outside_ball": 0, "outside_box": 0, "nan": 0}
    utils.seed_everything(seed)
    for i in utils.progress(range(0, len(idx), settings.batch_size), desc=f"sanity {name}"):
        xb = x[idx[i : i + settings.batch_size]].to(settings.device)
        yb = y[idx[i : i + settings.batch_size]].to(settings.device)
        try:
            x_adv = attack(xb, yb)
        except RuntimeError as err:  # an attack that cannot run on this model: reported, never a crash
            error, x_adv = error or utils.first_line(err), xb
        with torch.no_grad():
            logits = model(x_adv).float()
        robust.append((logits.argmax(1) == yb).cpu())
        bad, distance = perturbation_faults(xb, x_adv, radius(epsilon, settings), logits, settings.norm)
        faults = {k: faults[k] + int(bad[k].sum()) for k in faults}
        max_distance = max(max_distance, distance)
    return {"epsilon": epsilon, "attacked": len(idx), "robust": torch.cat(robust) if robust else
            torch.zeros(0, dtype=torch.bool), **faults, "max_distance": max_distance * utils.NORM_UNITS[settings.norm],
            "error": error, "seconds": time.time() - start}


def square_attack(model, epsilon, settings):
    """Square (Andriushchenko et al. 2020), gradient-free, through pyautoattack: a function x, y -> x_adv."""
    from pyautoattack import AutoAttack

    def attack(x, y):
        adversary = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[settings.norm], eps=epsilon,
                               version="custom", attacks=["square"],
                               seed=settings.seed, device=settings.device)
        adversary.square.n_queries = settings.square_queries
        log = logging.getLogger("auto-attack")
        level = log.level
        log.setLevel(logging.ERROR)  # its own checks repeat ours as warnings
        try:
            return adversary.run_standard_evaluation(x, y, batch_size=len(x))[0]
        finally:
            log.setLevel(level)

    return attack


def sanity_attacks(model, x, y, clean, settings, randomised=False):
    """Every attack of the checklist, the expensive ones only on the examples still robust (the worst case per
    example is what counts); a randomised model also gets EOT-PGD-20 on the examples correct when clean. Returns
    {name: record} (attack_examples), each record's "robust" over all n examples: an example an attack skipped
    counts as not robust, since an earlier attack fooled it (or it is wrong when clean)."""
    eps, step, n = radius(settings.epsilon, settings), radius(settings.step_size, settings), len(y)
    records = {}

    def run(name, robust_before, attack, epsilon, seed=settings.seed):
        idx = robust_before.nonzero().flatten()
        record = attack_examples(model, x, y, idx, attack, epsilon, settings, seed, name)
        robust = torch.zeros(n, dtype=torch.bool)
        robust[idx] = record["robust"]
        records[name] = {**record, "robust": robust}
        return robust

    def pgd(epsilon, step_size, steps, loss="ce", random_start="uniform", attacked=model):
        return lambda xb, yb: pgd_attack(attacked, xb, yb, epsilon, step_size, steps, loss=loss,
                                         random_start=random_start, norm=settings.norm)

    everyone, e0 = torch.ones(n, dtype=torch.bool), settings.epsilon  # records name eps in the flags' units
    pgd20 = run("pgd20", everyone, pgd(eps, step, 20), e0)  # the table's PGD-20 and CW-20, bit for bit
    cw20 = run("cw20", everyone, pgd(eps, step, 20, "cw"), e0)
    fgsm = run("fgsm", everyone, pgd(eps, eps, 1, random_start=None), e0)  # one step of eps (L2: normalised)
    white = cw20 & fgsm
    if randomised:
        white &= run("eot-pgd", clean, pgd(eps, step, 20, attacked=ExpectedLogits(model, settings.eot_draws)), e0)
    run("eps0", everyone, pgd(0.0, 0.0, 1), 0.0)  # one step: at epsilon 0 every step is a no-op
    for e in sorted(set(settings.epsilons) - {0.0, settings.epsilon}):  # step size in proportion to epsilon
        run(f"pgd20@{e:g}", clean, pgd(radius(e, settings), radius(e, settings) * step / eps, 20), e)
    survivors = clean & pgd20
    for r in range(settings.restarts):  # each restart its own random start
        survivors &= run(f"pgd{settings.long_steps}#{r + 1}", survivors, pgd(eps, step / 2, settings.long_steps),
                         e0, seed=(settings.seed + r + 1) % 2**32)
    run("square", survivors & white, square_attack(model, eps, settings), e0)
    return records


# === 3-7: what the attacks say


def check_sweep(records, clean, settings):
    """The epsilon sweep (PGD-20 on the cross-entropy, step size in proportion to epsilon): at 0 the clean
    accuracy, never rising with epsilon, about 0 at the largest."""
    n, eps0 = len(clean), records["eps0"]["robust"]
    flags = {0.0: clean}
    for e in sorted(set(settings.epsilons) - {0.0}):
        flags[e] = clean & records["pgd20" if e == settings.epsilon else f"pgd20@{e:g}"]["robust"]
    epsilons = list(flags)
    accuracy = [f.float().mean().item() for f in flags.values()]
    curve = {"norm": settings.norm, "epsilons": epsilons, "accuracy": accuracy, "n": n}
    differ = int((eps0 != clean).sum())
    results = [sanity_result(
        "eps0-equals-clean", "epsilon sweep", "PASS" if differ == 0 else "WARN" if differ <= 0.01 * n else "FAIL",
        {"clean": clean.float().mean().item(), "eps0": eps0.float().mean().item(), "differ": differ},
        f"accuracy at eps 0 {pct(eps0.float().mean().item())}, clean {pct(clean.float().mean().item())}, "
        f"{differ} examples differ", "the attack at eps 0 must return the clean images: a difference means a "
        "non-deterministic model or an attack that does not respect eps")]
    rises = [(paired_gap(flags[b], flags[a]), a, b) for i, a in enumerate(epsilons) for b in epsilons[i + 1 :]]
    (rise, se), a, b = max(rises, key=lambda r: r[0][0] - Z * r[0][1])
    results.append(sanity_result(
        "eps-monotone", "epsilon sweep", gap_status(rise, se, "eps-monotone"), {**curve, "max_rise": rise, "se": se},
        "accuracy " + " ".join(f"{e:g}:{100 * acc:.1f}" for e, acc in zip(epsilons, accuracy))
        + f" ({'eps/255' if settings.norm == 'linf' else 'L2 eps'}:%); "
        f"largest rise {100 * rise:+.1f} ± {100 * se:.1f} points ({a:g} -> {b:g})",
        "accuracy rises as eps grows: the attack gets weaker with more room, a sign of gradient masking or of "
        "a step size that does not scale with eps; do not trust these numbers"))
    top = flags[epsilons[-1]]
    acc, se = paired_gap(top, torch.zeros_like(top))
    results.append(sanity_result(
        "large-eps-zero", "epsilon sweep", gap_status(acc, se, "large-eps-zero"),
        {"epsilon": epsilons[-1], "accuracy": acc, "se": se},
        f"accuracy {pct(acc)} ± {pct(se)} at {utils.threat_model(settings.norm, epsilons[-1])}",
        "accuracy stays above 0 at a radius that can turn any image into another: a plateau is the classic "
        "signature of gradient masking; attack with Square/AutoAttack or an adaptive attack"))
    return results


def check_strength(records, clean, settings):
    """PGD with 5x the steps and restarts against PGD-20; single-step FGSM against PGD-20."""
    pgd20 = clean & records["pgd20"]["robust"]
    long_runs = [records[f"pgd{settings.long_steps}#{r + 1}"]["robust"] for r in range(settings.restarts)]
    after = [pgd20 & torch.stack(long_runs[: r + 1]).all(0) for r in range(settings.restarts)]
    final = after[-1] if after else pgd20
    gap, se = paired_gap(pgd20, final)
    numbers = {"pgd20": pgd20.float().mean().item(), "long_steps": settings.long_steps,
               "step_size": settings.step_size / 2, "restarts": [a.float().mean().item() for a in after],
               "gap": gap, "se": se}
    results = [sanity_result(
        "more-steps-restarts", "attack strength", gap_status(gap, se, "more-steps-restarts"), numbers,
        f"PGD-20 {pct(numbers['pgd20'])}, PGD-{settings.long_steps} x {settings.restarts} restarts "
        f"{pct(final.float().mean().item())}: {100 * gap:.1f} ± {100 * se:.1f} points lower",
        f"more steps and restarts fool examples PGD-20 missed: PGD-20 has not converged and overstates robustness "
        f"by about {100 * gap:.0f} points; report a stronger attack (AutoAttack)")]
    fgsm = clean & records["fgsm"]["robust"]
    gap, se = paired_gap(pgd20, fgsm)
    results.append(sanity_result(
        "fgsm-vs-pgd", "attack strength", gap_status(gap, se, "fgsm-vs-pgd"),
        {"fgsm": fgsm.float().mean().item(), "pgd20": pgd20.float().mean().item(), "gap": gap, "se": se},
        f"FGSM {pct(fgsm.float().mean().item())}, PGD-20 {pct(pgd20.float().mean().item())}",
        "one FGSM step fools more than 20 PGD steps: the iterative attack is stuck (gradient masking near the "
        "data); do not trust PGD numbers, use Square/AutoAttack"))
    return results


def check_loss(records, clean):
    """The CW margin attack against the CE attack: what CW-20 fools that PGD-20 missed, as a share of all that
    the two fool together (MARGIN_ONLY_SHARE)."""
    ce = clean & records["pgd20"]["robust"]
    both = ce & records["cw20"]["robust"]
    gap, se = paired_gap(ce, both)
    fooled = (clean & ~both).float().mean().item()  # by CE or by CW
    share = max(gap - Z * se, 0.0) / fooled if fooled else 0.0
    warn, fail = MARGIN_ONLY_SHARE
    status = "PASS" if gap - Z * se <= MARGIN_MIN_GAP else "FAIL" if share > fail else "WARN" if share > warn else \
        "PASS"
    numbers = {"ce": ce.float().mean().item(), "cw": (clean & records["cw20"]["robust"]).float().mean().item(),
               "both": both.float().mean().item(), "gap": gap, "se": se, "fooled": fooled, "margin_only_share": share}
    return sanity_result(
        "margin-vs-ce", "loss choice", status, numbers,
        f"CE (PGD-20) {pct(numbers['ce'])}, CW margin (CW-20) {pct(numbers['cw'])}; CW fools "
        f"{100 * gap:.1f} ± {100 * se:.1f} points that CE missed, at least {pct(share)} of the {pct(fooled)} the two "
        "fool together",
        f"the margin loss fools examples cross-entropy does not: CE gradients vanish or mislead (logits too "
        f"large or aligned), so PGD-20 overstates robustness by about {100 * gap:.0f} points; report CW-20 or "
        "AutoAttack (its APGD-T/DLR losses)")


def white_box_worst_case(records, clean, settings):
    """Examples correct under every white-box attack at the evaluation epsilon."""
    flags = clean.clone()
    for name, record in records.items():
        if name != "square" and record["epsilon"] == settings.epsilon:
            flags &= record["robust"]
    return flags


def check_black_box(records, clean, settings):
    """Square (gradient-free) on the examples every white-box attack left robust."""
    white = white_box_worst_case(records, clean, settings)
    worst = white & records["square"]["robust"]
    gap, se = paired_gap(white, worst)
    return sanity_result(
        "square-vs-white-box", "black box", gap_status(gap, se, "square-vs-white-box"),
        {"white_box": white.float().mean().item(), "with_square": worst.float().mean().item(),
         "queries": settings.square_queries, "gap": gap, "se": se},
        f"white-box worst case {pct(white.float().mean().item())}, Square ({settings.square_queries} queries) "
        f"fools {100 * gap:.1f} ± {100 * se:.1f} points more",
        "a gradient-free attack fools examples every gradient attack missed: the gradients are masked; report "
        "AutoAttack (it includes Square) or an adaptive attack, not PGD")


def check_per_example(records, clean, settings):
    """Robust implies correct clean; every adversarial example valid; the worst case per example against the
    lowest number the table reports (PGD-20, CW-20; EOT-PGD-20 for a randomised model)."""
    n = len(clean)
    full = [name for name, r in records.items() if r["attacked"] == n]  # the attacks run on every example
    violations = torch.zeros(n, dtype=torch.bool)
    for name in full:
        violations |= records[name]["robust"] & ~clean
    share, se = paired_gap(violations, torch.zeros_like(violations))
    results = [sanity_result(
        "robust-within-clean", "per example", gap_status(share, se, "robust-within-clean"),
        {"violations": int(violations.sum()), "attacks": full},
        f"{int(violations.sum())} of {n} examples robust under an attack ({', '.join(full)}) but wrong when clean",
        "examples the attack left correctly classified although they are wrong when clean: the attack moved "
        "them to the right class (a randomised model or a broken attack); count an example robust only when it "
        "is correct clean and under every attack")]
    attacks = {name: {k: v for k, v in r.items() if k != "robust"} | {"accuracy": r["robust"].float().mean().item()}
               for name, r in records.items()}
    bad = {k: sum(a[k] for a in attacks.values()) for k in ("outside_ball", "outside_box", "nan")}
    errors = {name: a["error"] for name, a in attacks.items() if a["error"]}
    adversarial = sum(a["attacked"] for a in attacks.values())
    excess = max(a["max_distance"] - a["epsilon"] for a in attacks.values() if a["attacked"])
    results.append(sanity_result(
        "valid-examples", "per example", "FAIL" if any(bad.values()) or errors else "PASS",
        {**bad, "errors": errors, "examples": adversarial, "attacks": attacks},
        f"{adversarial} adversarial examples of {len(attacks)} attacks: {bad['outside_ball']} outside their eps "
        f"ball (largest {'L-inf' if settings.norm == 'linf' else 'L2'} distance minus eps: {excess:+.1e}"
        f"{'/255' * (settings.norm == 'linf')}), {bad['outside_box']} outside [0, 1], "
        f"{bad['nan']} NaN; {len(errors)} attacks raised" + (f" ({next(iter(errors.values()))})" if errors else ""),
        "adversarial examples outside the eps ball or [0, 1], NaN, or an attack that crashed: the attack or "
        "the model is broken and every number from it is invalid; fix the projection/clamping or the NaN first"))
    table = {name: records[name]["robust"] for name in ("pgd20", "cw20", "eot-pgd") if name in records}
    accuracy = {name: flags.float().mean().item() for name, flags in table.items()}  # what evaluate.py reports
    lowest = min(table, key=accuracy.get)
    worst = white_box_worst_case(records, clean, settings) & records["square"]["robust"]
    gap, se = paired_gap(table[lowest], worst)
    eot = f", EOT-PGD-20 ({settings.eot_draws} draws) {pct(accuracy['eot-pgd'])}" if "eot-pgd" in table else ""
    results.append(sanity_result(
        "worst-case-reported", "per example", gap_status(gap, se, "worst-case-reported"),
        {"pgd20": accuracy["pgd20"], "cw20": accuracy["cw20"], "eot_pgd": accuracy.get("eot-pgd"),
         "worst_case": worst.float().mean().item(), "gap": gap, "se": se},
        f"table: PGD-20 {pct(accuracy['pgd20'])}, CW-20 {pct(accuracy['cw20'])}{eot}; worst case per example over "
        f"{sum(r['epsilon'] == settings.epsilon for r in records.values())} attacks "
        f"{pct(worst.float().mean().item())} ({100 * gap:.1f} ± {100 * se:.1f} points below {lowest})",
        "different attacks fool different examples, and the table's lowest number is well above the worst case "
        "per example: report the worst case over attacks per example (as AutoAttack does), or AutoAttack itself"))
    return results


def run_sanity_checks(model, x, y, settings=SanitySettings()):
    """The checklist on `model` (any nn.Module taking [0, 1] images, put in eval mode here) and the test images
    x (float in [0, 1], on the CPU) with labels y: one result dict per check (sanity_result)."""
    model.eval()
    results = [check_eval_mode(model, x, settings), check_deterministic(model, x, settings)]
    randomised = results[-1]["status"] != "PASS"
    logits = predict(model, x, settings.batch_size, settings.device)
    clean = logits.argmax(1) == y
    results += [check_logits(logits), check_gradients(model, x, y, settings)]
    results += check_probe(gradient_probe(model, x, y, settings))
    records = sanity_attacks(model, x, y, clean, settings, randomised=randomised)
    results += check_sweep(records, clean, settings)
    results += check_strength(records, clean, settings)
    results += [check_loss(records, clean), check_black_box(records, clean, settings)]
    results += check_per_example(records, clean, settings)
    return results


# === evaluate.py --sanity: checkpoints, JSON, figure


def print_sanity(results, role):
    """One line per check: status, name, the numbers, and for a WARN or FAIL what it means."""
    for r in results:
        advice = "" if r["status"] == "PASS" else f"  -> {r['meaning']}"
        print(f"  {role:10s} {r['status']:4s}  {r['name']:20s} {r['detail']}{advice}", flush=True)
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "WARN", "FAIL")}
    print(f"  {role:10s} sanity: {counts['PASS']} PASS, {counts['WARN']} WARN, {counts['FAIL']} FAIL", flush=True)
    return counts


def plot_sanity(results, path, title):
    """Accuracy against epsilon (the sweep, +-1 standard error) and against attack effort (gradient steps per
    example: FGSM, PGD-20, then each long restart; CW-20 and the worst case with Square beside), saved
    atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = {r["name"]: r["numbers"] for r in results}
    sweep, strength = numbers["eps-monotone"], numbers["more-steps-restarts"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    acc = np.array(sweep["accuracy"])
    left.errorbar(sweep["epsilons"], 100 * acc, yerr=100 * np.sqrt(acc * (1 - acc) / sweep["n"]), marker="o",
                  capsize=3)
    left.set_xscale("symlog", linthresh=min([e for e in sweep["epsilons"] if e > 0] or [1]))  # linear to the first
    left.set(xlabel=f"{'L-inf epsilon (1/255)' if sweep['norm'] == 'linf' else 'L2 epsilon'}", ylabel="accuracy (%)",
             ylim=(-2, 102), title="accuracy against epsilon (PGD-20, CE)")
    left.set_xticks(sweep["epsilons"], [f"{e:g}" for e in sweep["epsilons"]])
    steps = [20 + strength["long_steps"] * (r + 1) for r in range(len(strength["restarts"]))]
    right.plot([1, 20, *steps], [100 * numbers["fgsm-vs-pgd"]["fgsm"], 100 * strength["pgd20"],
                                 *[100 * a for a in strength["restarts"]]], marker="o", label="FGSM, PGD-20, "
               f"then PGD-{strength['long_steps']} restarts (CE)")
    right.plot([20], [100 * numbers["margin-vs-ce"]["cw"]], marker="s", linestyle="", label="CW-20 (margin)")
    if numbers["worst-case-reported"]["eot_pgd"] is not None:  # a randomised model
        right.plot([20], [100 * numbers["worst-case-reported"]["eot_pgd"]], marker="^", linestyle="",
                   label="EOT-PGD-20")
    right.axhline(100 * numbers["worst-case-reported"]["worst_case"], color="gray", linestyle="--",
                  label="worst case per example, Square included")
    right.axhline(100 * acc[0], color="black", linewidth=0.8, label="clean")
    right.set(xscale="log", xlabel="gradient steps per example", ylabel="accuracy (%)", ylim=(-2, 100 * acc[0] + 5),
              title="accuracy against attack effort")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)



def check_checkpoint(model, x, y, settings, role, png, title, earlier=None):
    """evaluate.py --sanity on one checkpoint (x uint8, y on the CPU): the checks (an earlier entry's for the same
    weights and images), printed, drawn to png; returns the entry's fields."""
    if earlier is not None:
        found = {"checks": earlier["checks"], "seconds": 0.0, "pgd20_seconds": earlier["pgd20_seconds"],
                 "same_weights_as": earlier["checkpoint"]}
    else:
        start = time.time()
        checks = run_sanity_checks(model, utils.to_float(x), y, settings)
        pgd20 = next(c for c in checks if c["name"] == "valid-examples")["numbers"]["attacks"]["pgd20"]["seconds"]
        found = {"checks": checks, "seconds": time.time() - start, "pgd20_seconds": pgd20}
    found["counts"] = print_sanity(found["checks"], role)
    found["cost_vs_pgd20"] = found["seconds"] / max(found["pgd20_seconds"], 1e-9) if found["seconds"] else None
    plot_sanity(found["checks"], png, title)
    took = (f"{found['seconds']:.0f} s, {found['cost_vs_pgd20']:.1f}x its PGD-20 pass" if found["seconds"]
            else f"same weights as {found['same_weights_as']}")
    print(f"  {role:10s} wrote {png} ({took})")
    return {**found, "png": str(png)}
