"""Training throughput of train_piat.py against two adversarial-training loops as users write them.

All three run one PGD-10 PIAT+NMSE training step per batch on the same model, batch and machine:
- "ours": train_piat.py's own step: images held on the device as uint8 and augmented there,
  the attack taking gradients with respect to the input only, bf16 autocast where it pays
  (--amp: CUDA, and CPUs with AMX; the training scripts' rule),
  channels_last (--no-channels-last measures without), optionally torch.compile;
- "efficient-peer": the efficient public idiom (TRADES's code): a DataLoader with torchvision
  transforms on PIL images, fp32, an attack that takes torch.autograd.grad with respect to the
  input only (no weight gradients), BatchNorm in eval mode while attacking;
- "conventional": the naive loop much public code runs: the same DataLoader, fp32, and an attack
  that calls loss.backward() at every step (so it also computes weight gradients it throws away).
Each variant runs in its own child process, so peak memory is measured per variant (CUDA:
max_memory_allocated; CPU: the child's peak resident set). The parent prints a table and the
ratio of ours against each loop, and times evaluate.py's PGD-20 per image as well.

    python benchmarks/bench_train.py --arch resnet18                # CUDA if there is one, else the CPU
    python benchmarks/bench_train.py --arch small-cnn --no-amp --no-channels-last   # fp32, NCHW

The defaults fit the device: on CUDA batch 128, 10 untimed and 30 timed steps, 256 images for PGD-20;
on a CPU batch 64, 1 untimed and 3 timed steps, 64 images (ResNet-18 takes about 4 minutes there).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train_piat.py, evaluate.py and utils.py live one folder up

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_piat  # noqa: E402
import utils  # noqa: E402

VARIANTS = ("ours", "efficient-peer", "conventional")  # the training steps compared


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=str, default="resnet18", choices=utils.ARCHS, help="network")
    p.add_argument("--batch-size", type=utils.positive(int), default=None,
                   help="training batch size (default: 128 on CUDA, 64 on a CPU)")
    p.add_argument("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--warmup", type=utils.non_negative(int), default=None,
                   help="untimed steps first (compilation, cudnn autotune; default: 10 on CUDA, 1 on a CPU)")
    p.add_argument("--steps", type=utils.positive(int), default=None,
                   help="timed steps (default: 30 on CUDA, 3 on a CPU)")
    p.add_argument("--pgd-steps", type=utils.non_negative(int), default=10, help="steps of the training attack")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast in our step (default: where it pays, as in the training scripts: CUDA, "
                        "and CPUs with AMX); both peer loops run in fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last model and images in our step (default: on, as in the training scripts; "
                        "--no-channels-last measures NCHW); the peer loops keep the default layout")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in our step")
    p.add_argument("--workers", type=utils.non_negative(int), default=2,
                   help="DataLoader workers of the peer loops")
    p.add_argument("--eval-images", type=utils.positive(int), default=None,
                   help="images for timing evaluate.py's PGD-20 (default: 256 on CUDA, 64 on a CPU)")
    p.add_argument("--peak-tflops", type=utils.positive(float), default=989.0,
                   help="the device's dense bf16 peak in TFLOP/s, for the achieved fraction (H100/H200 SXM: 989)")
    p.add_argument("--out", type=str, default=None, help="also write the results as JSON here")
    p.add_argument("--variant", type=str, default=None, choices=VARIANTS + ("eval-pgd20",),
                   help="internal: measure one variant in this process and print its JSON")
    args = p.parse_args(argv)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    for name, on_cuda, on_cpu in (("batch_size", 128, 64), ("warmup", 10, 1), ("steps", 30, 3),
                                  ("eval_images", 256, 64)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    return args


# ----------------------------------------------------------------------------------------------
# The three training steps
# ----------------------------------------------------------------------------------------------


def ours(args, device, model, data):
    """train_piat.py's batch loop body, called through its own functions."""
    train_args = train_piat.parse_args(["--arch", args.arch, "--loss", "nmse", "--pgd-steps", str(args.pgd_steps)])
    utils.resolve_amp(args, device)  # the training scripts' rule
    amp = args.amp
    channels_last = args.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = utils.wrap_network(model, compile=args.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=3.5e-3)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    order = torch.randperm(len(x_train), device=device)

    def step(i):
        idx = order[(i * args.batch_size) % len(x_train):][: args.batch_size]
        x = utils.to_float(utils.augment(x_train[idx], flip=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _, _ = train_piat.training_loss(net, x, y_train[idx], train_args, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, {"amp": amp, "compile": args.compile, "channels_last": channels_last}


class PILImages(torch.utils.data.Dataset):
    """The usual torchvision pipeline: uint8 HWC arrays -> PIL -> RandomCrop + Flip -> ToTensor."""

    def __init__(self, x_uint8, y):
        from torchvision import transforms

        self.images = x_uint8.permute(0, 2, 3, 1).numpy()
        self.labels = y.tolist()
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor()])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def pil_batches(args, device, data):
    """next_batch() of the peer loops: (x, y) on the device from a shuffling DataLoader over PIL images,
    started again when it runs out."""
    loader = torch.utils.data.DataLoader(PILImages(data.x_train, data.y_train), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers, drop_last=True,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    batches = iter(())

    def next_batch():
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return next_batch


def peer_nmse_step(model, optimizer, x, x_adv, y):
    """The peer loops' training step, the same PIAT+NMSE step as ours: NMSE (lam 4) on x' and x, in train mode."""
    model.train()
    logits_clean, logits_adv = model(x), model(x_adv)
    loss = F.cross_entropy(logits_adv, y) + 4.0 * train_piat.nmse_loss(logits_adv, logits_clean, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def efficient_peer(args, device, model, data):
    """The efficient peer loop (TRADES's idiom): DataLoader, fp32, BatchNorm in eval mode while attacking, and
    an attack through torch.autograd.grad with respect to the input only, so no weight gradients."""
    next_batch = pil_batches(args, device, data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=3.5e-3)
    eps, alpha = 8 / 255, 2 / 255

    def step(i):
        x, y = next_batch()
        model.eval()
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(args.pgd_steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
        peer_nmse_step(model, optimizer, x, x_adv, y)

    return step, {"amp": False, "compile": False, "channels_last": False, "workers": args.workers}


def conventional(args, device, model, data):
    """A conventional PGD-AT + NMSE loop (DataLoader, fp32, attack through loss.backward())."""
    next_batch = pil_batches(args, device, data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=3.5e-3)
    eps, alpha = 8 / 255, 2 / 255

    def step(i):
        x, y = next_batch()
        model.eval()
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        for _ in range(args.pgd_steps):
            loss = F.cross_entropy(model(x + delta), y)
            loss.backward()
            delta.data = ((x + (delta + alpha * delta.grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x)
            delta.grad.zero_()
        peer_nmse_step(model, optimizer, x, x + delta.detach(), y)

    return step, {"amp": False, "compile": False, "channels_last": False, "workers": args.workers}


def eval_pgd20(args, device, model, data):
    """evaluate.py's PGD-20 (fp32, eval mode), per image."""
    import evaluate

    model.eval()
    x, y = utils.to_float(data.x_test[: args.eval_images]).to(device), data.y_test[: args.eval_images].to(device)

    def step(i):
        evaluate.pgd_attack(model, x, y, 8 / 255, 2 / 255, 20)

    return step, {"images": len(x)}


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(model, device):
    """FLOPs of one forward pass of one 32x32 image (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.rand(1, 3, 32, 32, device=device))
    return counter.get_total_flops()


def measure(args):
    device = utils.pick_device(args.device)
    utils.seed_everything(0)
    n_images = max(args.batch_size * 4, args.eval_images)
    data = utils.make_synthetic(train_size=n_images, test_size=args.eval_images)
    model = utils.build_model(args.arch, data.num_classes, data.mean, data.std).to(device)
    flops = forward_flops(model, device)
    build = {"ours": ours, "efficient-peer": efficient_peer, "conventional": conventional,
             "eval-pgd20": eval_pgd20}[args.variant]
    step, settings = build(args, device, model, data)
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    synchronize(device)
    seconds = time.perf_counter() - start
    images = args.steps * (args.eval_images if args.variant == "eval-pgd20" else args.batch_size)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": args.variant, "device": str(device), "device_name": device_name(device), "arch": args.arch,
            "batch_size": args.batch_size, "steps": args.steps, "seconds": seconds,
            "images_per_second": images / seconds,
            "ms_per_image": 1000 * seconds / images, "peak_memory_mib": peak / 2**20,
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            "forward_gflops_per_image": flops / 1e9, **settings}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    isa = "AMX" if torch.cpu._is_amx_tile_supported() else (
        "AVX512_BF16, no AMX" if torch.cpu._is_avx512_bf16_supported() else "no bf16 instructions")
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {isa}, torch {torch.__version__})"


def run_child(args, argv, variant):
    result = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench_train.py: the {variant} measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)))
        return None
    results = {v: run_child(args, argv, v) for v in (*VARIANTS, "eval-pgd20")}
    ours_r, eval_r = results["ours"], results["eval-pgd20"]
    ratio = {peer: ours_r["images_per_second"] / results[peer]["images_per_second"] for peer in VARIANTS[1:]}
    # PGD-k AT: k attack steps of forward + input-gradient backward (~2 forward-equivalents each) and
    # a training step of forward + full backward (~3) on x', plus the same again on x for NMSE
    equivalents = 2 * args.pgd_steps + 3 + 3
    tflops = ours_r["images_per_second"] * equivalents * ours_r["forward_gflops_per_image"] / 1e3
    summary = {"ratio_vs_efficient_peer": ratio["efficient-peer"], "ratio_vs_conventional": ratio["conventional"],
               "forward_equivalents_per_image": equivalents, "achieved_tflops": tflops,
               "fraction_of_peak": tflops / args.peak_tflops if ours_r["device"].startswith("cuda") else None}
    print(f"{args.arch}, batch {args.batch_size}, PGD-{args.pgd_steps} PIAT+NMSE step, {ours_r['device_name']}")
    print(f"{'variant':<16}{'images/s':>10}{'ms/image':>10}{'peak MiB':>10}  settings")
    for r in (results[v] for v in VARIANTS):
        flags = ", ".join(f"{k}={r[k]}" for k in ("amp", "compile", "channels_last", "workers") if k in r)
        print(f"{r['variant']:<16}{r['images_per_second']:>10.1f}{r['ms_per_image']:>10.2f}"
              f"{r['peak_memory_mib']:>10.0f}  {flags}")
    print(f"ratio ours / efficient peer: {ratio['efficient-peer']:.2f}x")
    print(f"ratio ours / conventional: {ratio['conventional']:.2f}x")
    print(f"evaluate.py PGD-20 (fp32): {eval_r['ms_per_image']:.2f} ms per image "
          f"({eval_r['images_per_second']:.1f} images/s)")
    peak = summary["fraction_of_peak"]
    print(f"model forward: {ours_r['forward_gflops_per_image']:.3f} GFLOP per image; "
          f"ours achieves {tflops:.2f} TFLOP/s counting {equivalents} forward-equivalents per image"
          + (f" = {100 * peak:.1f}% of {args.peak_tflops:.0f} TFLOP/s" if peak else ""))
    if args.out:
        utils.save_json({**results, "summary": summary, "command": " ".join([Path(__file__).name, *argv])}, args.out)
    return {**results, "summary": summary}


if __name__ == "__main__":
    try:
        main()
    except utils.UserError as err:
        sys.exit(f"bench_train.py: error: {err}")
