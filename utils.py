"""What every script shares: flag types, seeding and devices, the data, the CNN models, checkpoints and run
folders, the metrics log, and how a run stops. The algorithms (attacks, losses, interpolation) live in the
scripts. Every image here lives in [0, 1]: each model normalises its input itself, so attacks never see
normalised pixels.
"""

import argparse
import csv
import functools
import hashlib
import inspect
import io
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# === Bad input and flags


class UserError(Exception):
    """Bad input: the scripts print it as one line ("<script>: error: ...") and exit with status 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a refused flag reported in one line (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "resume", None):  # which flags were typed: resume_args refuses those the run disagrees with
            unset = object()  # parsed again with every flag unset: what is set now was typed (abbreviated, or =value)
            again, _ = super().parse_known_args(args, argparse.Namespace(**{a.dest: unset for a in self._actions}))
            parsed.typed = {dest for dest, value in vars(again).items() if value is not unset}
            parsed.refused = self.refused
        return parsed

    def refused(self, saved):
        """What this parser refuses among a run's saved flags `saved` (missing, refused, "2" for an int), or None."""
        for action in (a for a in self._actions if a.default is not argparse.SUPPRESS):
            value = saved.get(action.dest)
            flag = next((o for o in action.option_strings if o.startswith("--")), action.dest)
            try:
                for item in [] if value is None else value if action.nargs in ("*", "+") else [value]:
                    parsed = item if action.type in (None, str) else action.type(
                        ",".join(map(str, item)) if isinstance(item, list) else str(item))  # as typed, again
                    assert parsed == item and (action.nargs != 0 or isinstance(item, bool)) and item in (
                        action.choices or [item]), ""
                assert action.dest in saved, "written by another version?"
            except (ValueError, TypeError, AssertionError, argparse.ArgumentTypeError) as err:
                return f"{flag} {value!r}, which {self.prog} refuses" + (f" ({err})" if str(err) else "")
        return None


def number(kind, low=-math.inf, high=math.inf, open_bounds=False):
    """argparse `type=`: a finite `kind` in [low, high], or in (low, high) with open_bounds."""

    def parse(text):
        value = kind(text)  # a ValueError becomes argparse's "invalid float value: ..."
        if not (math.isfinite(value) and (low < value < high if open_bounds else low <= value <= high)):
            low_, high_ = (f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high))
            interval = f"({low_}, {high_})" if open_bounds else f"[{low_}, {high_}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


positive_int, non_negative_int, non_negative = number(int, 0, open_bounds=True), number(int, 0), number(float, 0)
unit_interval = number(float, 0, 1)  # alpha, beta, momentum: weights of a convex combination
seed_number = number(int, 0, 2**32 - 1)  # every seed numpy accepts
pixel_units = number(float, 0, 255)  # epsilon and step sizes: L-inf's in 1/255 units, L2's in [0, 1] units
NORM_UNITS = {"linf": 255, "l2": 1}  # --norm -> what --epsilon and --step-size are divided by for [0, 1] units
EPSILONS = {"linf": 8.0, "l2": 0.5}  # --norm -> the default --epsilon: the paper's 8/255, RobustBench's L2 0.5


def attack_units(parser, args, l2_step=None):
    """--epsilon, --step-size by --norm where not given (L2 step: l2_step or eps/4); 0 refused, other units warned."""
    linf = args.norm == "linf"
    args.epsilon = EPSILONS[args.norm] if args.epsilon is None else args.epsilon
    args.step_size = (2.0 if linf else l2_step or args.epsilon / 4) if args.step_size is None else args.step_size
    if args.step_size == 0:
        parser.error("argument --step-size: 0 never moves the attack, whose accuracy would be the clean one")
    for flag, value in (("--epsilon", args.epsilon), ("--step-size", args.step_size)):
        if (0 < value < 1) if linf else value > 3:  # 0.031 (L-inf) or 8 (L2) for 8/255
            print(f"{parser.prog}: warning: {flag} {value:g} is " + (
                f"{value:g}/255 (L-inf's units): for {value:g} write {flag} {255 * value:.3g}" if linf else
                f"{value:g} in [0, 1] units (L2's): for {value:g}/255 write {flag} {value / 255:.3g}"), file=sys.stderr)


def radii(args):
    """(epsilon, step size) of the flags in [0, 1] units, the attacks' own."""
    return args.epsilon / NORM_UNITS[args.norm], args.step_size / NORM_UNITS[args.norm]


def threat_model(norm, epsilon):
    """How every printed line names a threat model, epsilon as the flags give it: "L-inf eps 8/255", "L2 eps 0.5"."""
    return f"L-inf eps {epsilon:g}/255" if norm == "linf" else f"L2 eps {epsilon:g}"


def threat_of(row):
    """A result row's threat model as tables name it ("L-inf eps 8/255", "L2 eps 0.5"), None for clean accuracy."""
    norm = row.get("norm") or "linf"  # rows older than --norm: L-inf
    epsilon = row.get("epsilon_255") if norm == "linf" else row.get("epsilon")
    if row["attack"] == "clean":
        return None
    return threat_model(norm, EPSILONS[norm] if epsilon is None else epsilon)  # no eps: the norm's default


def first_line(err):
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


# === Seeding, devices and torchrun


def seed_everything(*seeds):
    """Seed python, numpy and torch from one seed, or several (seed, epoch, rank: each epoch seeded afresh)."""
    seed = seeds[0] if len(seeds) == 1 else int(np.random.SeedSequence(seeds).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name=None):
    """--device, or cuda when there is one, else cpu; one UserError for a device this machine lacks."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":  # counted without touching a GPU: every torchrun process would open cuda:0
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= n:
            raise UserError(f"--device {name}, but this machine has {n} usable CUDA device(s); use --device cpu")
    elif device.type != "cpu":
        try:
            assert device.type != "meta", "it holds no data"
            torch.empty(1, device=device)
        except Exception as err:
            raise UserError(f"--device {name} cannot be used here: {first_line(err)}") from None
    return device


def setup_distributed(device_name=None):
    """(rank, world size, device): in torchrun's process group (NCCL, one GPU each; gloo on CPUs), else (0, 1)."""
    device, world_size = pick_device(device_name), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def cleanup_distributed():
    """Leave the process group; on the way out of a failed run without the barrier (the others may be gone)."""
    if distributed():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def distributed():
    """Whether this process is one of torchrun's, in a process group."""
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if distributed() else 0


def all_reduce_sum_(tensor):
    """Sum `tensor` over the ranks in place (nothing to do in a plain run)."""
    if distributed():
        dist.all_reduce(tensor)
    return tensor


def data_parallel(model):
    """`model` in DistributedDataParallel without a buffer broadcast at every forward pass (average_buffers_ after
    each epoch instead). Newer torch calls the flag forward_sync_buffers and deprecates broadcast_buffers."""
    ddp = nn.parallel.DistributedDataParallel
    newer = "forward_sync_buffers" in inspect.signature(ddp).parameters
    return ddp(model, **{"forward_sync_buffers" if newer else "broadcast_buffers": False})


@torch.no_grad()
def average_buffers_(model):
    """Average the floating-point buffers (BatchNorm statistics) over the ranks: every rank holds the same weights."""
    if distributed():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer.div_(dist.get_world_size()))


def state_fingerprint(model):
    """SHA-256 of every tensor of the state_dict: equal fingerprints mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(**models):
    """At the end of a torchrun run every rank must hold bit-identical weights; rank 0 says that they do."""
    if distributed():
        prints = [None] * dist.get_world_size()
        dist.all_gather_object(prints, tuple(state_fingerprint(m) for m in models.values()))
        if len(set(prints)) > 1:
            raise RuntimeError(f"the {len(prints)} ranks ended with different {', '.join(models)}: {prints}")
        if rank() == 0:
            print(f"{', '.join(models)}: identical on all {len(prints)} ranks (sha256 {prints[0][0][:16]})")


# === --amp's default: bf16 on CUDA; on a CPU, bf16 only where the run's own model measures clearly faster

BF16_MARGIN, PROBE_IMAGES = 1.2, 8  # bf16 only when clearly faster (runs vary by ~10 %); the probe's batch slice


def settle_amp(args, device, model, batch_shape, channels_last=True):
    """Resolve --amp (None: not given; docs/training.md) and return the precision and why, for the first line."""
    if args.amp is not None:
        why = "as the run started" if getattr(args, "resume", None) else "--amp" if args.amp else "--no-amp"
    elif device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        shape = (min(PROBE_IMAGES, batch_shape[0]), *batch_shape[1:])
        answer = [remembered_speedup(args.arch, model, shape, channels_last) if rank() == 0 else None]
        if distributed():
            dist.broadcast_object_list(answer)
        (speedup, remembered), args.amp = answer[0], answer[0][0] >= BF16_MARGIN
        why = (f"measured {speedup:.2f}x fp32" if args.amp else f"bf16 measured {speedup:.2f}x") + \
            f" on this CPU{remembered}"
    else:
        args.amp = device.type == "cuda"
        why = {"cuda": "CUDA", "cpu": "no bf16 kernels on this CPU"}.get(device.type, f"not measured on {device}")
    return f"{'bf16 autocast' if args.amp else 'fp32'} ({why})"


def remembered_speedup(arch, model, shape, channels_last):
    """(bf16_speedup, how it is kept) from $XDG_CACHE_HOME/piat/amp.json, else measured (kept unless noisy)."""
    key = (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}: "
           f"{arch} ({sum(p.numel() for p in model.parameters())} weights) on {'x'.join(map(str, shape))}"
           f"{' channels_last' * channels_last}")
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "piat" / "amp.json"
    try:
        known = dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # none yet, or unreadable: measured (and written) afresh
        known = {}
    if key in known:
        return float(known[key]), f", remembered in {path}"
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    speedup, steady = bf16_speedup(model, x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    try:  # a noisy measurement (a busy CPU) or an unwritable cache: the next run measures again
        if steady:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_json({**known, key: round(speedup, 2)}, path)
    except OSError:
        pass
    return round(speedup, 2), "" if steady else ", but noisily: measured again next run"


def bf16_speedup(model, x):
    """(fp32 time / bf16 time, steady) of the attack's pass on x in eval mode: fastest of 2-5 alternating passes
    after an untimed one, steady when the second fastest is within 15 %. The model and random stream are kept."""
    was_training, times, start = model.training, {False: [], True: []}, time.perf_counter()
    model.eval()
    while len(times[True]) < 3 or len(times[True]) < 6 and time.perf_counter() - start < 1:
        for bf16, seen in times.items():
            tic, inputs = time.perf_counter(), x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                torch.autograd.grad(model(inputs).float().sum(), inputs)
            seen.append(time.perf_counter() - tic)
    model.train(was_training)
    fp32, bf16 = sorted(times[False][1:]), sorted(times[True][1:])
    return fp32[0] / bf16[0], fp32[1] < 1.15 * fp32[0] and bf16[1] < 1.15 * bf16[0]


def cpu_name():
    """The CPU's model name and bf16 units: a VM's generic 'Intel(R) Xeon(R) Processor' hides which CPU it is."""
    name = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text() if os.path.isfile(
        "/proc/cpuinfo") else "", re.M)
    units = [unit for unit, has in (("AVX512_BF16", torch.cpu._is_avx512_bf16_supported()),
                                    ("AMX", torch.cpu._is_amx_tile_supported())) if has]
    return f"{name[1] if name else platform.processor() or platform.machine()} ({', '.join(units) or 'no bf16 units'})"


# === Data: every data set becomes four tensors held in memory (uint8 images NCHW, int64 labels)

DATASETS = ("cifar10", "cifar100", "svhn", "imagefolder", "synthetic")
CHANNEL_STATS = {  # of the training sets; image folders and the synthetic set are measured
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))}
DOWNLOAD_HINTS = {"cifar10": "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html",
                  "cifar100": "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html",
                  "svhn": "train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/"}


class ImageData:
    """uint8 (N, C, H, W) images, int64 labels; `flip`: flips keep the label; `stats`: (mean, std), else measured."""

    def __init__(self, x_train, y_train, x_test, y_test, num_classes, flip=True, stats=None):
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.num_classes, self.flip, self.image_shape = num_classes, flip, tuple(x_train.shape[1:])
        if stats is None:
            x = to_float(x_train)
            stats = (x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist())
        self.mean, self.std = (tuple(float(v) for v in s) for s in stats)


@functools.lru_cache(maxsize=1)  # made once per process: the notebook's quick mode and the tests ask often
def synthetic_images(num_classes=10, train_size=4000, test_size=1000, image_size=32, seed=0):
    """(x_train, y_train, x_test, y_test): per class a smooth colour pattern (+-0.18) at a random shift, a smooth
    distractor (+-0.2) and noise (sd 0.1) around grey (docs/method.md); the same `seed`, the same images."""
    gen = torch.Generator().manual_seed(seed)

    def smooth(n, size):
        return F.interpolate(torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1, size=size, mode="bicubic",
                             align_corners=False)

    templates = smooth(num_classes, image_size + 8)

    def sample(n):
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        shift = torch.randint(0, 9, (n, 2), generator=gen)
        rows = (shift[:, 0, None] + torch.arange(image_size))[:, None, :, None]
        cols = (shift[:, 1, None] + torch.arange(image_size))[:, None, None, :]
        x = 0.5 + 0.18 * templates[y[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        x = x + 0.2 * smooth(n, image_size) + 0.1 * torch.randn(n, 3, image_size, image_size, generator=gen)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return (*sample(train_size), *sample(test_size))


def load_torchvision(name, root):
    from torchvision import datasets

    existed, splits = Path(root).exists(), []
    try:
        for train in (True, False):
            kind = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "svhn": datasets.SVHN}[name]
            kwargs = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
            try:
                ds = kind(root, download=False, **kwargs)
            except RuntimeError:  # not there yet: fetch it
                ds = kind(root, download=True, **kwargs)
            x = torch.from_numpy(ds.data) if name == "svhn" else torch.from_numpy(ds.data).permute(0, 3, 1, 2)
            splits += [x.contiguous(), torch.as_tensor(ds.labels if name == "svhn" else ds.targets)]
    except Exception as err:  # offline, a proxy, a truncated archive: all end the same way for the user
        if not existed and not any(p.is_file() for p in Path(root).rglob("*")):
            shutil.rmtree(root, ignore_errors=True)  # the failed download's empty folders
        raise UserError(f"{name} is not in {root} and could not be downloaded ({type(err).__name__}: {err}). Put "
                        f"{DOWNLOAD_HINTS[name]} into {root}, or use --dataset imagefolder with a local copy") from None
    return ImageData(*splits, 100 if name == "cifar100" else 10, flip=name != "svhn", stats=CHANNEL_STATS[name])


def load_image_folder(root, image_size=None):
    """torchvision's ImageFolder layout, root/train/<class>/* and root/test/<class>/*, the same classes in both."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root, splits = Path(root), {}
    for split in ("train", "test"):
        try:
            index = ImageFolder(root / split)
        except (OSError, RuntimeError) as err:  # missing, not a folder, no class folders, no images
            raise UserError(f"--dataset imagefolder needs {root}/train/<class>/ and {root}/test/<class>/ with images: "
                            f"{first_line(err)}") from None
        images = []
        for path, _ in index.samples:
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB").resize((image_size,) * 2, Image.BILINEAR) if image_size else img.convert(
                        "RGB")
                    images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
            except Exception as err:  # not an image, truncated, unreadable: all about this one file
                raise UserError(f"{path} is not a readable image ({type(err).__name__}: {first_line(err)[:200]}); "
                                "fix or remove it") from None
        if len({im.shape for im in images}) > 1:
            raise UserError(f"the images in {root / split} have different sizes; pass --image-size")
        splits[split] = (torch.stack(images), torch.as_tensor(index.targets), index.classes)
    (x_train, y_train, classes), (x_test, y_test, test_classes) = splits["train"], splits["test"]
    for c in sorted(set(classes) ^ set(test_classes))[:1]:
        here, there = ("test", "train") if c in test_classes else ("train", "test")
        raise UserError(f"class folder {c!r} is in {root / here} but not in {root / there}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(f"the images in {root}/train are {tuple(x_train.shape[1:])} but those in {root}/test "
                        f"{tuple(x_test.shape[1:])}; pass --image-size")
    return ImageData(x_train, y_train, x_test, y_test, len(classes))


def load_dataset(name, data_dir, image_size=None):
    """The data set `name`; one UserError when it cannot be had, or holds fewer than two classes."""
    if name == "synthetic":
        data = ImageData(*(t.clone() for t in synthetic_images()), num_classes=10)
    elif name == "imagefolder":
        data = load_image_folder(data_dir, image_size)
    elif name in DATASETS:
        data = load_torchvision(name, data_dir)
    else:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data.num_classes < 2:
        raise UserError(f"{data_dir} holds one class: every accuracy would be 100 %; a classifier needs at least two")
    return data


def fixed_subset(n_total, n, seed=0):
    """The first n indices of a fixed permutation: the same subset for every run and seed."""
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm if n is None else perm[:n]


def split_data(data, args, device):
    """The fixed subsets every seed shares, uint8 on `device`: "val" (--val-size held out), "train" (--train-size of
    the rest), "test" (--eval-size, default 1000 or all) and "test_indices"."""
    order = fixed_subset(len(data.x_train), None)
    args.eval_size = min(1000, len(data.x_test)) if args.eval_size is None else args.eval_size  # the default
    for flag, wanted, have in (("--val-size", args.val_size, len(order) - 1),
                               ("--train-size", args.train_size, len(order) - args.val_size),
                               ("--eval-size", args.eval_size, len(data.x_test))):
        if wanted is not None and wanted > have:
            raise UserError(f"{flag} {wanted}, but the data set has only {have} images for it; pass at most {have}")
    val, train = order[: args.val_size], order[args.val_size :][: args.train_size]
    if len(torch.unique(data.y_train[train])) < 2:
        raise UserError(f"--train-size {args.train_size}: the training images hold a single class; a classifier needs "
                        "at least two")
    test = fixed_subset(len(data.x_test), args.eval_size)
    return {"train": (data.x_train[train].to(device), data.y_train[train].to(device)),
            "val": (data.x_train[val].to(device), data.y_train[val].to(device)),
            "test": (data.x_test[test].to(device), data.y_test[test].to(device)), "test_indices": test}


def augment(x, pad=4, flip=True):
    """Random crop with zero padding and random horizontal flip of a batch (uint8 or float NCHW) on its device."""
    n, c, h, w = x.shape
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), device=x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    images, channels = torch.arange(n, device=x.device), torch.arange(c, device=x.device)
    out = F.pad(x, (pad, pad, pad, pad))[images[:, None, None, None], channels[None, :, None, None], rows, cols]
    return torch.where((torch.rand(n, device=x.device) < 0.5)[:, None, None, None], out.flip(3), out) if flip else out


def to_float(x_uint8):
    return x_uint8.float().div_(255)


def epoch_batches(x_train, y_train, args, epoch, flip, rank=0, world_size=1, channels_last=True):
    """(step, steps, x in [0, 1], y): a permutation seeded by --seed and the epoch, each rank its share of every
    global batch (torchrun: whole batches only), augmented on the device."""
    if world_size > 1 and len(x_train) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) is larger than the {len(x_train)} "
                        "training images")
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
    order = order.to(x_train.device)
    steps = math.ceil(len(x_train) / args.batch_size) if world_size == 1 else len(x_train) // args.batch_size
    for i in progress(range(steps), desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0 or None):
        idx = order[i * args.batch_size : (i + 1) * args.batch_size][rank::world_size]
        x = to_float(augment(x_train[idx], flip=flip) if args.augment else x_train[idx])
        yield i, steps, x.contiguous(memory_format=torch.channels_last) if channels_last else x, y_train[idx]


def progress(iterable, **kwargs):
    """tqdm on stderr (off with TQDM_DISABLE=1): redrawn in a terminal or notebook, in a log a line every 10 s."""
    from tqdm import tqdm

    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() or "ipykernel" in sys.modules else 10)
    kwargs["disable"] = kwargs.get("disable") or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


# === The CNN models, each normalising its input with non-persistent buffers: their state_dicts have exactly
# the layout of the models robustness code publishes (TRADES, MART, AutoAttack's examples)

ARCHS = ("resnet18", "wrn-32-10", "small-cnn")


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (3x3 stem, no max-pool), keys conv1, bn1, layer1..4, linear."""

    def __init__(self, num_classes=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation wide block, named as in the TRADES/MART WideResNet so that their weights load."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(out_planes), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class WideResNet(nn.Module):
    """WRN-32-10 (Madry et al.'s count; TRADES/MART's WideResNet(depth=34)): keys conv1, block1..3.layer.N, bn1, fc."""

    def __init__(self, num_classes=10, blocks_per_stage=5, widen=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize, self.conv1 = Normalize(mean, std), nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        for i in range(3):
            group = nn.Module()  # keys blockI.layer.N, as the reference code's
            group.layer = nn.Sequential(*[WideBlock(w[i] if j == 0 else w[i + 1], w[i + 1], (i > 0) + 1 if j == 0
                                                    else 1) for j in range(blocks_per_stage)])
            setattr(self, f"block{i + 1}", group)
        self.bn1, self.relu, self.fc = nn.BatchNorm2d(w[3]), nn.ReLU(inplace=True), nn.Linear(w[3], num_classes)
        for m in self.modules():  # the reference code's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3.layer(self.block2.layer(self.block1.layer(self.conv1(self.normalize(x)))))
        return self.fc(F.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1).flatten(1))


class SmallCNN(nn.Module):
    """Four conv-BatchNorm layers for CPU runs (docs/real-images.md)."""

    def __init__(self, num_classes=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), width=32):
        super().__init__()
        w, self.normalize, layers = width, Normalize(mean, std), []
        for i, (c_in, c_out) in enumerate(((3, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w))):  # keys features.N.*
            conv_bn = nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))
            layers += [nn.MaxPool2d(2), conv_bn] if i else [conv_bn]
        self.features, self.linear = nn.Sequential(*layers), nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(self.normalize(x)), 1).flatten(1))


class NormalizedNet(nn.Module):
    """A timm network behind the input normalisation: state_dict keys are net.<timm key>."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.normalize, self.net = Normalize(mean, std), net

    def forward(self, x):
        return self.net(self.normalize(x))


def build_model(arch, num_classes, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **model_kwargs):
    """The network `arch` normalising its input itself; a timm name randomly initialised with `model_kwargs`."""
    cnns = {"resnet18": ResNet18, "wrn-32-10": WideResNet, "small-cnn": SmallCNN}
    if arch in cnns:
        return cnns[arch](num_classes, mean=mean, std=std, **model_kwargs)
    try:
        import timm  # only the vision transformers need it
    except ImportError:
        raise UserError(f"{arch!r} needs timm (pip install timm); or choose one of {', '.join(ARCHS)}") from None
    if not timm.is_model(arch):
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)} or a timm model name")
    return NormalizedNet(timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_kwargs), mean, std)


# === Files: atomic writes, checkpoints, run folders


def atomic_write(path, write):
    """write(binary file) beside `path`, then renamed over it: never half a file; an OSError names `path`."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is owner-only; give it the usual permissions
        os.replace(tmp, path)
    except BaseException as err:  # Ctrl-C included: no temporary file is left behind
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        cause = err if isinstance(err, OSError) else err.__cause__ or err.__context__  # torch.save wraps OSErrors
        if isinstance(cause, OSError):
            raise OSError(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from None
        raise


def save_json(obj, path):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def check_output(path, flag, ours):
    """`path`, or one UserError unless it is writable and new or this command's own, unedited: ours(path), or with
    `ours` a writer's name, a text signed(..., ours) wrote."""
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"{path} cannot be written (a folder, or not in a writable folder); choose another {flag}")
    text = "" if callable(ours) or not path.is_file() else path.read_bytes().decode(errors="replace")
    if path.exists() and not (ours(path) if callable(ours) else signed(text[: text.rstrip("\n").rfind("\n") + 1],
                                                                       ours) == text):
        raise UserError(f"{path} holds a file this command did not write (or one edited since); move it away or "
                        f"choose another {flag}")
    return path


def signed(text, by):
    """`text` with a last line (a Markdown comment) that check_output knows as `by`'s, unedited."""
    return text + f"<!-- written by {by}; sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]} -->\n"


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


CHECKPOINT_KEYS = ("model", "arch", "num_classes", "mean", "std", "args", "metrics", "epoch")


def not_a_torch_file(path):
    """Why `path` cannot be a file torch.save wrote (a zip archive, or a legacy pickle), else None."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith((b"PK", b"\x80")):
        return None
    kind = "empty" if not head else "a text file" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else \
        "not a torch file"
    return f"{path} is not a checkpoint at all ({kind}: torch.save writes a zip archive or a pickle)"


def load_checkpoint(path, mmap=False):
    """A checkpoint of this project on the CPU (weights_only, mmap: maps the tensors); one UserError if it is not."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    problem = not_a_torch_file(path)
    if problem:
        raise UserError(problem)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        if "Weights only load failed" in str(err):
            raise UserError(f"{path} pickles Python objects, which this project's checkpoints never do (another "
                            "project's state_dict: evaluate.py --arch)") from None
        raise UserError(f"{path} is not a readable checkpoint (truncated?): {first_line(err)}") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint of this project (no {', '.join(CHECKPOINT_KEYS)}); for a plain "
                        "state_dict use evaluate.py --arch")
    return checkpoint


def check_out_dir(out_dir):
    """One UserError unless --out-dir is a new or empty folder: a folder that holds anything is never written into."""
    run_dir = Path(out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out-dir {run_dir} is a file; choose a new or empty folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        how = f"continue its run with --resume {run_dir}" if (run_dir / "args.json").exists() else "move them away"
        raise UserError(f"--out-dir {run_dir} is not empty; choose a new or empty folder, or {how}")
    return run_dir


def make_run_dir(args, script):
    """--out-dir (default runs/<dataset>__<exp-name>__<seed>__<unix time>) made, with args.json in it."""
    if args.out_dir is None:
        args.out_dir = f"runs/{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = check_out_dir(args.out_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json({**vars(args), "script": script}, run_dir / "args.json")
    except OSError as err:
        raise UserError(f"--out-dir {run_dir} cannot be written: {err.strerror or err}") from None
    return run_dir


RESUME_MAY_CHANGE = {"resume", "device", "data_dir", "track", "wandb_project", "wandb_entity"}


def resume_args(args, script):
    """(the run's own flags, its final.pt or None) to continue --resume RUN, as docs/failures.md says."""
    run_dir = Path(args.resume)
    run_dir = run_dir.parent if run_dir.is_file() else run_dir
    try:
        saved = json.loads((run_dir / "args.json").read_text())
        assert isinstance(saved, dict)
    except (OSError, ValueError, AssertionError):
        raise UserError(f"--resume {args.resume}: no run there (no readable {run_dir / 'args.json'})") from None
    if saved.get("script") != script:
        raise UserError(f"--resume {args.resume}: a run of {saved.get('script') or 'another program'}, not {script}")
    checkpoint = load_checkpoint(run_dir / "final.pt") if (run_dir / "final.pt").exists() else None
    if checkpoint is not None and not isinstance(checkpoint.get("resume"), dict):
        raise UserError(f"{run_dir / 'final.pt'} holds no training state to continue from; start a new run")
    if checkpoint is None and ((run_dir / "best.pt").exists() or (run_dir / "metrics.csv").is_file() and (
            run_dir / "metrics.csv").read_text(errors="replace").count("\n") > 1):  # a row under the header
        raise UserError(f"--resume {args.resume}: final.pt is missing but best.pt or metrics.csv hold saved epochs, "
                        "so it cannot continue exactly; start a new run (this folder is left as it is)")
    own = {"norm": "linf", **(checkpoint["args"] if checkpoint else saved)}  # runs older than --norm were L-inf
    if args.refused(own):  # a hand edit, or an older version: refused before anything is written
        raise UserError(f"--resume {args.resume}: its {'final.pt' if checkpoint else 'args.json'} holds "
                        f"{args.refused(own)}; start a new run")
    if checkpoint is None:
        print(f"{run_dir} saved no epoch yet: starting it over with its own flags", flush=True)
    for key in sorted(getattr(args, "typed", set()) - RESUME_MAY_CHANGE):  # sweep.py repeats the run's own flags
        value = getattr(args, key)
        if key == "out_dir" and Path(value).resolve() == run_dir.resolve() or value == own.get(key, value):
            continue
        name = key.replace("_", "-")
        typed, its = (f"no --{name}" if v is None else f"--{'' if v else 'no-'}{name}" if isinstance(v, bool) else
                      f"--{name} {v}" for v in (value, own.get(key)))
        raise UserError(f"--resume {args.resume} continues the run with its own flags ({its}); drop {typed}, or "
                        "start a new run with it")
    own = {**own, "resume": str(run_dir), "out_dir": str(run_dir), "device": args.device,
           "data_dir": args.data_dir or saved["data_dir"]}
    if args.track:  # tracking can be switched on when continuing a run: it changes no result
        own.update(track=True, wandb_project=args.wandb_project, wandb_entity=args.wandb_entity)
    return argparse.Namespace(**own), checkpoint


def save_epoch(run_dir, checkpoint, training_state, column, log, last):
    """best.pt when the epoch beats every earlier one on `column`, final.pt with `training_state`, then (a logged row
    always has its weights) the metrics.csv row and curves.png (at the end, else at most every 30 s)."""
    metrics = checkpoint["metrics"]
    if metrics[-1][column] > max((m[column] for m in metrics[:-1]), default=-1.0):
        save_checkpoint(checkpoint, run_dir / "best.pt")
    save_checkpoint({**checkpoint, "resume": training_state}, run_dir / "final.pt")
    if log is None:  # a view of the run (train_piat.py's RUN/trained): its checkpoints only
        return
    log.write(metrics[-1])
    if last or time.monotonic() - log.plotted >= 30:  # a plot takes 0.5-2 s, which short epochs would feel
        plot_curves(metrics, run_dir / "curves.png", checkpoint["args"], checkpoint["script"])
        log.plotted = time.monotonic()


# === The metrics log: metrics.csv, TensorBoard and (with --track) Weights & Biases


class MetricsLog:
    """metrics.csv, TensorBoard events and (--track) a W&B run named WANDB_NAME or the folder's (docs/training.md);
    a resumed run writes its restored `rows` again, so all three read back alike."""

    def __init__(self, run_dir, fields, rows, args):
        self.run_dir, self.plotted, self.wandb = Path(run_dir), time.monotonic(), None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # a copied script in a project without tensorboard still runs
            self.tensorboard = None
        else:
            self.tensorboard = SummaryWriter(self.run_dir / "tensorboard", purge_step=1 if rows else None)
        if args.track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs Weights & Biases: pip install wandb") from None
            args.wandb_id = getattr(args, "wandb_id", None) or os.urandom(4).hex()  # kept in the checkpoints' args
            try:
                self.wandb = wandb.init(project=args.wandb_project, entity=args.wandb_entity, dir=str(self.run_dir),
                                        id=args.wandb_id, resume="allow", config=vars(args),
                                        name=os.environ.get("WANDB_NAME", self.run_dir.name))
            except wandb.errors.UsageError as err:
                raise UserError(f"--track: {err} (WANDB_MODE=offline logs without an account)") from None
        self.wandb_logged = len(rows) - 1  # a killed process may have lost the last row in W&B's buffer: log it again
        self.file = io.StringIO()  # the header and restored rows replace metrics.csv whole: it is never cut short
        self.csv = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        self.csv.writeheader()
        for row in rows:
            self.write(row)
        atomic_write(self.run_dir / "metrics.csv", lambda f: f.write(self.file.getvalue().encode()))
        self.file = open(self.run_dir / "metrics.csv", "a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")

    def write(self, row):
        self.csv.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        self.file.flush()
        scalars = {k: v for k, v in row.items() if k != "epoch" and type(v) in (int, float)}
        for tag, value in scalars.items() if self.tensorboard else ():
            self.tensorboard.add_scalar(tag, value, global_step=row["epoch"])
        if self.wandb is not None and row["epoch"] > self.wandb_logged:
            self.wandb.log(scalars, step=row["epoch"])
            self.wandb_logged = row["epoch"]

    def close(self):
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


LOSS_NAMES = {"ce": "PGD-AT", "nmse": "NMSE", "alp": "ALP", "trades": "TRADES", "mart": "MART", "mail": "MAIL",
              "cfa": "CFA", "rat": "RAT"}


def method_name(args, script="train_piat.py"):
    """A run's one name from its flags (dict or Namespace) and script: "PIAT + NMSE", "PGD-AT + EMA", "RDAT + PIAT",
    "vit_base_patch16_224: PIAT + A&P", ..."""
    args, script = args if isinstance(args, dict) else vars(args), Path(script).stem
    if script == "train_rdat":
        return ("RDAT" if args["lam"] > 0 else "Generalist") + (" + PIAT" if args["piat"] else "")
    loss = args.get("loss")
    name = LOSS_NAMES.get(loss, loss or script)
    name = ("PIAT" if loss == "ce" else f"PIAT + {name}") if args.get("piat") else name
    name += " + EMA" if args.get("ema") is not None else " + SWA" if args.get("swa_start") is not None else ""
    if script == "train_vit":  # A&P = ARD + PRM
        ap = " + A&P" if args["ard"] and args["prm"] else " + ARD" if args["ard"] else " + PRM" if args["prm"] else ""
        return f"{args['arch']}: {name}{ap}"
    return name if script == "train_piat" else f"{script}: {name}"


def plot_curves(metrics, path, args, script):
    """curves.png as docs/training.md describes it; returns the Figure."""
    from matplotlib.figure import Figure  # no pyplot: drawing here never changes a notebook's backend

    args = args if isinstance(args, dict) else vars(args)
    logged = {key for key, value in (metrics[0] if metrics else {}).items() if value not in ("", None)}
    logged -= set() if args.get("piat") else {"alpha"}  # 0 throughout a run without PIAT
    average = "EMA" if args.get("ema") is not None else "SWA" if args.get("swa_start") is not None else "FAWA"
    other, ours, theirs = (("raw_test", f", {average} weights", ", trained weights") if "raw_test_pgd20_acc" in logged
                           else ("robust_learner", ", global learner", ", robust learner") if "beta" in logged
                           else ("", "", ""))
    fig = Figure(figsize=(11, 5), layout="constrained")
    fig.suptitle(method_name(args, script), fontsize="x-large")
    ax_acc, ax_loss = fig.subplots(1, 2)
    ax_share = ax_loss.twinx() if {"alpha", "beta"} & logged else None
    legends = {ax_acc: [], ax_loss: []}
    for key, label, style in (
            ("train_clean_acc", "train clean", "C0--"), ("train_robust_acc", "train robust", "C1--"),
            ("test_clean_acc", f"test clean{ours}", "C0-"), ("test_pgd20_acc", f"test PGD-20{ours}", "C1-"),
            (f"{other}_clean_acc", f"test clean{theirs}", "C0:"), (f"{other}_pgd20_acc", f"test PGD-20{theirs}", "C1:"),
            ("test_worst_pgd20_acc", "test PGD-20, worst class", "C3-"), ("val_pgd20_acc", "val PGD-20", "C2-"),
            ("train_loss", "train loss", "k-"), ("alpha", "alpha (PIAT)", "C3:"), ("beta", "beta (RDAT)", "C4:")):
        if key in logged:
            ax = ax_acc if key.endswith("_acc") else ax_loss if key == "train_loss" else ax_share
            legends[ax_acc if ax is ax_acc else ax_loss] += ax.plot(
                [m["epoch"] for m in metrics], [m[key] * (100 if ax is ax_acc else 1) for m in metrics], style,
                marker=".", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)")
    ax_loss.set(xlabel="epoch", ylabel="train loss")
    if ax_share:
        ax_share.set(ylabel=", ".join(k for k in ("alpha", "beta") if k in logged), ylim=(-0.05, 1.05))
    for ax, lines in legends.items():  # below the axes; a lone line is named by its axis label
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs 1, 2, 3, not 1.25
        if len(lines) > 1:
            ax.legend(handles=lines, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncols=2, frameon=False)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return fig


# === How a run stops: divergence, stop signals, one line and an exit status (docs/failures.md)


class Diverged(Exception):
    """A training loss or weights that are not finite, found before anything of the epoch is saved (exit status 3)."""


class Interrupted(KeyboardInterrupt):
    """A stop signal ended the run (exit status 128 + its number, the shell's convention)."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def check_finite(epoch, step, **values):
    """Raise Diverged when a loss (training_loss=loss) is not finite on any rank (one host sync per step)."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    for name, value, bad in zip(values, stacked.tolist(), all_reduce_sum_((~torch.isfinite(stacked)).float()).tolist()):
        if bad:
            shown = value if not math.isfinite(value) else "not finite on another rank"
            raise Diverged(f"the {name.replace('_', ' ')} is {shown} at epoch {epoch + 1}, step {step + 1}; "
                           f"{kept(epoch)}")


def check_finite_weights(epoch, **models):
    """Raise Diverged when a floating-point tensor of a model's state_dict (None models skipped) is nan or inf."""
    for name, model in models.items():
        for key, tensor in (model.state_dict().items() if model is not None else ()):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise Diverged(f"{key} of the {name.replace('_', ' ')} is not finite at the end of epoch {epoch + 1}; "
                               f"{kept(epoch)}")


def kept(epoch):
    saved = f"best.pt and final.pt keep epoch {epoch}" if epoch else "nothing was saved"
    return f"{saved}; start a new run with a lower --lr"


STOP_SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, s))


class StopSignals:
    """Ctrl-C, SIGTERM and SIGUSR2 as docs/failures.md says: the first lets the epoch be saved, a second stops at
    once. A signal the process was told to ignore stays ignored."""

    def __init__(self, script_file):
        name = os.path.basename(script_file)
        self.typed = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == name else name
        self.signum, self.started, self.resume, self.previous = None, False, "nothing was written", {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS
                             if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def start(self, run_dir, world_size):
        """From now on a stop signal is answered with the command that continues `run_dir`, as the run was started."""
        launcher = f"torchrun --nproc_per_node={world_size}" if world_size > 1 else "python"
        self.started = True
        command = f"{launcher} {self.typed} --resume {shlex.quote(str(run_dir))}"
        self.resume = f"continue from the last saved epoch with: {command}"

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None or not self.started:  # a second signal, or nothing to save yet: stop now
            raise Interrupted(signum, f"interrupted by {name} at once; {self.resume}")
        self.signum = signum
        print(f"\n{name}: stopping once this epoch is saved (again to stop at once)", file=sys.stderr, flush=True)

    def check(self, epoch, epochs, device):
        """After the 0-indexed epoch was saved: end the run when any rank got a stop signal."""
        if all_reduce_sum_(torch.tensor([float(self.signum is not None)], device=device)).item() and epoch + 1 < epochs:
            signum = self.signum or signal.SIGTERM
            raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name} after epoch {epoch + 1}; "
                                      f"{self.resume}")


def run_main(main, script_file):
    """main(); an early end as one line on stderr and its exit status (docs/failures.md), a bug with its traceback."""
    line = None
    try:
        status = main()  # sweep.py's says whether a run failed
        code = status if isinstance(status, int) else 0
    except UserError as err:
        line, code = f"error: {err}", 1
    except Diverged as err:
        line, code = f"diverged: {err}", 3
    except Interrupted as err:
        line, code = str(err), 128 + err.signum
    except KeyboardInterrupt:
        line, code = "interrupted", 130
    except (MemoryError, torch.cuda.OutOfMemoryError) as err:
        line, code = f"error: out of memory ({first_line(err)}); try a smaller --batch-size or --eval-batch-size", 4
    except OSError as err:
        line, code = f"error: {first_line(err)}", 4
    torchrun_rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if line and (not torchrun_rank or code in (1, 4)):  # the process group is gone by now: rank() says 0 everywhere
        print(f"{os.path.basename(script_file)}: {line}", file=sys.stderr, flush=True)
    if torchrun_rank is not None:
        # a worker that left its gloo process group can abort in the interpreter's shutdown (torch 2.14: 'terminate
        # called without an active exception', SIGABRT, in about 1 of 3 processes on a busy CPU); its work is saved
        # and the group left, so it ends here, before that shutdown
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    return code
