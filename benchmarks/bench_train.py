"""Training throughput of train_piat.py's PGD-10 PIAT+NMSE step against the same step as users write it, on the
same model, batch and machine (BENCHMARKS.md): "ours" is train_piat.py's own step (uint8 images augmented on the
device, an input-only attack, bf16 where train_piat.py would take it, channels_last, --compile); "efficient-peer" is
TRADES's idiom (a DataLoader over PIL images, fp32, BatchNorm in eval mode while attacking, an input-only attack
through torch.autograd.grad); "conventional" the same with an attack through loss.backward() (computing weight
gradients it throws away). Each runs in its own child process, for its own peak memory (CUDA: max_memory_allocated;
CPU: peak RSS); then the table, the ratios of ours to each, and evaluate.py's PGD-20 time per image.

    python benchmarks/bench_train.py --arch resnet18          # CUDA if there is one (about 4 minutes on a CPU)
    python benchmarks/bench_train.py --arch small-cnn --no-amp --no-channels-last   # fp32, NCHW
    python benchmarks/bench_train.py --arch small-cnn --norm both --steps 8          # ours under L2 against L-inf

--norm l2 measures ours and evaluate.py's PGD-20 under L2 (eps 0.5; training step 15/255, evaluation eps/4; the peers
stay L-inf, as their code is); --norm both times ours under L-inf and under L2 in one process, step by step in turn.
"""

import argparse
import copy
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train_piat.py, evaluate.py and utils.py live one folder up

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

import evaluate  # noqa: E402
import train_piat  # noqa: E402
import utils  # noqa: E402
from utils import non_negative_int, positive_int  # noqa: E402

VARIANTS = ("ours", "efficient-peer", "conventional")  # the training steps compared
EPSILON, STEP_SIZE, LAM = 8 / 255, 2 / 255, 4.0  # train_piat.py's defaults for --loss nmse (the peers' attack)
THREATS = {"linf": (8 / 255, 2 / 255), "l2": (0.5, 15 / 255)}  # --norm: train_piat.py's default eps and step


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=str, default="resnet18", choices=utils.ARCHS, help="network")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N", help="batch (CUDA 128, CPU 64)")
    p.add_argument("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--warmup", type=non_negative_int, default=None, metavar="N", help="untimed steps (CUDA 10, CPU 1)")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N", help="timed steps (CUDA 30, CPU 3)")
    p.add_argument("--pgd-steps", type=non_negative_int, default=10, metavar="N", help="steps of the training attack")
    p.add_argument("--norm", type=str, default="linf", choices=("linf", "l2", "both"),
                   help="threat model of ours and of evaluate.py's PGD-20 (both: ours under each, in turn)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast in ours (default: as train_piat.py decides: CUDA, or measured)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last in ours (default: on)")
    p.add_argument("--compile", action="store_true", help="model.compile() in ours")
    p.add_argument("--workers", type=non_negative_int, default=2, metavar="N", help="DataLoader workers of the peers")
    p.add_argument("--eval-images", type=positive_int, default=None, metavar="N",
                   help="images for evaluate.py's PGD-20 (CUDA 256, CPU 64)")
    p.add_argument("--peak-tflops", type=utils.number(float, 0, open_bounds=True), default=989.0, metavar="T",
                   help="dense bf16 peak in TFLOP/s (H100/H200 SXM: 989)")
    p.add_argument("--out", type=str, default=None, metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--variant", type=str, default=None, choices=VARIANTS + ("eval-pgd20",),
                   help="measure only this one, print its JSON")
    args = p.parse_args(argv)
    if args.variant and args.norm == "both":
        p.error("--variant measures one norm: give --norm linf or --norm l2")
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    for name, on_cuda, on_cpu in (("batch_size", 128, 64), ("warmup", 10, 1), ("steps", 30, 3),
                                  ("eval_images", 256, 64)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    return args


def bench_data(train_size, test_size):
    """utils.synthetic_images as an ImageData of train_size training and test_size test images."""
    return utils.ImageData(*utils.synthetic_images(train_size=train_size, test_size=test_size), num_classes=10)


# === The training steps: step(i) runs batch i; each variant also returns its settings


def ours(args, device, model, data):
    """train_piat.py's batch step for --loss nmse (train()'s loop body), through its own functions."""
    model = model.to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    precision = utils.settle_amp(args, device, model, (args.batch_size, 3, 32, 32), args.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=3.5e-3)
    if args.compile:
        model.compile()
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    schedule = argparse.Namespace(seed=0, batch_size=args.batch_size, augment=True, epochs=1)
    batches = (batch for epoch in itertools.count() for batch in
               utils.epoch_batches(x_train, y_train, schedule, epoch, data.flip, channels_last=args.channels_last))
    totals = torch.zeros(4, device=device)  # loss sum, clean correct, robust correct, images: as train() keeps

    def step(i):
        _, _, x, y = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            model.eval()
            x_adv = train_piat.pgd_attack(model, x, y, *THREATS[args.norm], args.pgd_steps, norm=args.norm)
            model.train()
            logits_adv, logits_clean = model(x_adv).float(), model(x).float()
            loss = F.cross_entropy(logits_adv, y) + LAM * train_piat.nmse_loss(logits_adv, logits_clean, y)
        utils.check_finite(0, i, training_loss=loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals.add_(torch.stack([loss.detach() * len(y), (logits_clean.argmax(1) == y).sum(),
                                 (logits_adv.argmax(1) == y).sum(), torch.tensor(len(y), device=device)]).float())

    return step, {"amp": args.amp, "precision": precision, "compile": args.compile, "channels_last": args.channels_last,
                  "norm": args.norm}


class PILImages(torch.utils.data.Dataset):
    """The usual torchvision pipeline: uint8 HWC arrays -> PIL -> RandomCrop + Flip -> ToTensor."""

    def __init__(self, x_uint8, y):
        self.images, self.labels = x_uint8.permute(0, 2, 3, 1).numpy(), y.tolist()
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor()])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def efficient_attack(model, x, y, steps):
    """TRADES's PGD: torch.autograd.grad with respect to the input only, so no weight gradients."""
    x_adv = (x + torch.empty_like(x).uniform_(-EPSILON, EPSILON)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), [x_adv])
        x_adv = torch.min(torch.max(x_adv.detach() + STEP_SIZE * grad.sign(), x - EPSILON), x + EPSILON).clamp(0, 1)
    return x_adv


def conventional_attack(model, x, y, steps):
    """The naive PGD: loss.backward() at every step, which also computes weight gradients it throws away."""
    delta = torch.empty_like(x).uniform_(-EPSILON, EPSILON)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        F.cross_entropy(model(x + delta), y).backward()
        delta.data = (x + (delta + STEP_SIZE * delta.grad.sign()).clamp(-EPSILON, EPSILON)).clamp(0, 1) - x
        delta.grad.zero_()
    return x + delta.detach()


def peer(args, device, model, data):
    """The peer loops: a DataLoader over PIL images, fp32, args.variant's attack in eval mode, our PIAT+NMSE step."""
    loader = torch.utils.data.DataLoader(PILImages(data.x_train, data.y_train), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers, drop_last=True,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    batches = (batch for _ in itertools.count() for batch in loader)  # started again when it runs out
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=3.5e-3)
    attack = efficient_attack if args.variant == "efficient-peer" else conventional_attack

    def step(i):
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        model.eval()
        x_adv = attack(model, x, y, args.pgd_steps)
        model.train()
        logits_clean, logits_adv = model(x), model(x_adv)
        loss = F.cross_entropy(logits_adv, y) + LAM * train_piat.nmse_loss(logits_adv, logits_clean, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, {"amp": False, "compile": False, "channels_last": False, "workers": args.workers}


def eval_pgd20(args, device, model, data):
    """evaluate.py's PGD-20 (fp32, eval mode), per image."""
    model.eval()
    x, y = utils.to_float(data.x_test[: args.eval_images]).to(device), data.y_test[: args.eval_images].to(device)
    eps = THREATS[args.norm][0]  # evaluate.py's default step: eps/4 (2/255 under L-inf)
    return lambda i: evaluate.pgd_attack(model, x, y, eps, eps / 4, 20, norm=args.norm), {"images": len(x),
                                                                                           "norm": args.norm}


# === Measuring


def device_name(device):
    """The GPU's name, or the CPU's (with its bf16 units), cores, threads and torch."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{utils.cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}")


def synchronize(device):
    """Wait for the GPU's queued work (a step's time is its own); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_variant(args):
    """Time args.variant's step: --warmup untimed steps, then --steps timed ones; its JSON record."""
    from torch.utils.flop_counter import FlopCounterMode

    device = utils.pick_device(args.device)
    cuda = device.type == "cuda"
    utils.seed_everything(0)
    data = bench_data(4 * args.batch_size, args.eval_images)
    model = utils.build_model(args.arch, data.num_classes, data.mean, data.std).to(device)
    flops = FlopCounterMode(display=False)
    with flops, torch.no_grad():  # one forward pass of one image
        model.eval()(torch.rand(1, 3, 32, 32, device=device))
    build = {"ours": ours, "efficient-peer": peer, "conventional": peer, "eval-pgd20": eval_pgd20}[args.variant]
    step, settings = build(args, device, model, data)
    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    if cuda:
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    images = args.steps * (args.eval_images if args.variant == "eval-pgd20" else args.batch_size)
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "device": str(device), "device_name": device_name(device), "arch": args.arch,
            "batch_size": args.batch_size, "steps": args.steps, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "images_per_second": images / seconds, "ms_per_image": 1000 * seconds / images,
            "peak_memory_mib": peak / 2**20 if cuda else peak / 1024,  # ru_maxrss counts KiB
            "peak_memory_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
            "forward_gflops_per_image": flops.get_total_flops() / 1e9, **settings}


def measure_in_child(argv, variant):
    """One variant's JSON record, measured in a child process of its own (its own peak memory)."""
    child = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"bench_train.py: the {variant} measurement failed:\n{child.stderr[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def compare_norms(args, argv):
    """--norm both: ours under L-inf and under L2 in one process, step by step in turn (L-inf first on even steps, L2
    on odd ones), so that the load of a shared machine falls on both alike; each trains its own copy of the same
    model on the same batches. After --warmup untimed steps of each, --steps timed ones: the ratios L2 / L-inf of
    the median step time, wall clock and this process's CPU time (which other work on the machine disturbs less)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the batches' progress bars would run through the table
    device = utils.pick_device(args.device)
    utils.seed_everything(0)
    data = bench_data(4 * args.batch_size, args.eval_images)
    model = utils.build_model(args.arch, data.num_classes, data.mean, data.std).to(device)
    steps = {norm: ours(argparse.Namespace(**{**vars(args), "norm": norm}), device, copy.deepcopy(model), data)[0]
             for norm in ("linf", "l2")}
    times = {norm: [] for norm in steps}  # (wall, CPU) seconds of each timed step
    for i in range(args.warmup + args.steps):
        for norm in ("linf", "l2") if i % 2 == 0 else ("l2", "linf"):
            synchronize(device)
            tic, cpu_tic = time.perf_counter(), time.process_time()
            steps[norm](i)
            synchronize(device)
            if i >= args.warmup:
                times[norm].append((time.perf_counter() - tic, time.process_time() - cpu_tic))
    median = {norm: [statistics.median(t[k] for t in ts) for k in (0, 1)] for norm, ts in times.items()}
    ratio, cpu_ratio = (median["l2"][k] / median["linf"][k] for k in (0, 1))
    print(f"{args.arch}, batch {args.batch_size}, PGD-{args.pgd_steps} PIAT+NMSE step (ours), L-inf and L2 in turn, "
          f"{args.steps} timed steps each, {device_name(device)}")
    for norm, ts in times.items():
        print(f"{norm:<5} ms/image per step: " + ", ".join(f"{1000 * w / args.batch_size:.1f}" for w, _ in ts)
              + f"; median {1000 * median[norm][0] / args.batch_size:.2f} (CPU {median[norm][1]:.2f} s per step)")
    print(f"ratio L2 / L-inf of the median step time: {ratio:.3f} wall clock, {cpu_ratio:.3f} CPU time")
    results = {"times": times, "l2_over_linf_time": ratio, "l2_over_linf_cpu_time": cpu_ratio,
               "device_name": device_name(device)}
    if args.out:
        utils.save_json({**results, "command": " ".join([Path(__file__).name, *argv])}, args.out)
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure_variant(args)))
        return None
    utils.pick_device(args.device)  # a device this machine lacks: one line here rather than in every child
    if args.norm == "both":
        return compare_norms(args, argv)
    results = {variant: measure_in_child(argv, variant) for variant in (*VARIANTS, "eval-pgd20")}
    ours_r, eval_r = results["ours"], results["eval-pgd20"]
    # PGD-k AT: k attack steps of forward + input-gradient backward (~2 forward-equivalents each) and a training
    # step of forward + full backward (~3) on x', plus the same again on x for NMSE
    equivalents = 2 * args.pgd_steps + 3 + 3
    tflops = ours_r["images_per_second"] * equivalents * ours_r["forward_gflops_per_image"] / 1e3
    ratios = {v: ours_r["images_per_second"] / results[v]["images_per_second"] for v in VARIANTS[1:]}
    peak = tflops / args.peak_tflops if ours_r["device"].startswith("cuda") else None
    summary = {**{f"ratio_vs_{v.replace('-', '_')}": ratio for v, ratio in ratios.items()},
               "forward_equivalents_per_image": equivalents, "achieved_tflops": tflops, "fraction_of_peak": peak}
    print(f"{args.arch}, batch {args.batch_size}, PGD-{args.pgd_steps} PIAT+NMSE step"
          f"{' under L2 (the peers: L-inf)' if args.norm == 'l2' else ''}, {ours_r['device_name']}")
    print(f"our step: {ours_r['precision']}")
    print(f"{'variant':<16}{'images/s':>10}{'ms/image':>10}{'peak MiB':>10}  settings")
    for r in (results[v] for v in VARIANTS):
        flags = ", ".join(f"{k}={r[k]}" for k in ("amp", "compile", "channels_last", "workers") if k in r)
        print(f"{r['variant']:<16}{r['images_per_second']:>10.1f}{r['ms_per_image']:>10.2f}"
              f"{r['peak_memory_mib']:>10.0f}  {flags}")
    for v, ratio in ratios.items():
        print(f"ratio ours / {v.replace('-', ' ')}: {ratio:.2f}x")
    print(f"evaluate.py PGD-20 (fp32): {eval_r['ms_per_image']:.2f} ms per image "
          f"({eval_r['images_per_second']:.1f} images/s)")
    print(f"model forward: {ours_r['forward_gflops_per_image']:.3f} GFLOP per image; "
          f"ours achieves {f'{tflops:.2f} TFLOP/s' if peak else f'{1e3 * tflops:.1f} GFLOP/s'} counting {equivalents} "
          "forward-equivalents per image"
          + (f" = {100 * peak:.1f}% of {args.peak_tflops:.0f} TFLOP/s" if peak else ""))
    if args.out:
        utils.save_json({**results, "summary": summary, "command": " ".join([Path(__file__).name, *argv])}, args.out)
    return {**results, "summary": summary}


if __name__ == "__main__":
    sys.exit(utils.run_main(main, __file__))  # one line and an exit status for bad input
