"""Shared plumbing for the training and evaluation scripts: data, models, seeding, logging and
checkpoint I/O. The algorithms themselves (attacks, losses, interpolation) live in the scripts.

Everything here works on images in [0, 1]; each model normalises its input itself, so attacks and
AutoAttack never see normalised pixels.
"""

import argparse
import contextlib
import csv
import functools
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """Bad input from the user: the scripts print it as one line and exit non-zero."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump) with exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _finite(kind, text):
    """kind(text), refusing nan and inf: a flag holds a number it can mean."""
    value = kind(text)  # a ValueError becomes argparse's "invalid float value: ..."
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def finite(kind):
    """argparse `type=` for a number of either sign that must be finite (not nan, not inf)."""

    def parse(text):
        return _finite(kind, text)

    parse.__name__ = kind.__name__  # argparse names the type in "invalid float value"
    return parse


def non_negative(kind, at_most=None):
    """argparse `type=` that rejects nan, inf, negative numbers and, when given, numbers above `at_most`."""

    def parse(text):
        value = _finite(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be <= {at_most}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def positive(kind):
    """argparse `type=` that rejects nan, inf, zero and negative numbers."""

    def parse(text):
        value = _finite(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def between(kind, low, high):
    """argparse `type=` for a finite number in [low, high]."""

    def parse(text):
        value = _finite(kind, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low}, {high}], got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


# α, β, decays, momentum: weights of a convex combination
unit_interval = between(float, 0, 1)
# every seed numpy accepts
seed_number = between(int, 0, 2**32 - 1)
# ε and step sizes, in 1/255 units: 255 is the whole pixel range
pixel_units = non_negative(float, at_most=255)


def add_run_arguments(parser, exp_name):
    """The "run" flags of every training script: what the run is called, its seed, device and folder."""
    g = parser.add_argument_group("run")
    g.add_argument("--exp-name", type=str, default=exp_name,
                   help="name used in the run folder (default: the script's name)")
    g.add_argument("--seed", type=seed_number, default=0, help="seed of every random number generator (default 0)")
    g.add_argument("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--out-dir", type=str, default=None,
                   help="run folder (default: runs/<dataset>__<exp-name>__<seed>__<unix time>)")
    g.add_argument("--resume", type=str, default=None, metavar="RUN_DIR",
                   help="continue the interrupted run in RUN_DIR from its final.pt, with the flags it was started with")
    g.add_argument("--track", action="store_true",
                   help="also log metrics.csv's scalars to Weights & Biases (TensorBoard event files are always "
                        "written into RUN_DIR/tensorboard); WANDB_MODE=offline keeps the W&B run in RUN_DIR/wandb")
    g.add_argument("--wandb-project", type=str, default="piat", help="W&B project of --track (default: piat)")
    g.add_argument("--wandb-entity", type=str, default=None, help="W&B team or user of --track (default: yours)")


def add_data_arguments(parser):
    """The "data" flags of every training script."""
    pos_int, nonneg_int = positive(int), non_negative(int)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="cifar10", choices=DATASETS,
                   help="cifar10/cifar100/svhn are downloaded into --data-dir; imagefolder reads --data-dir/train and "
                        "--data-dir/test; synthetic is a small learnable set made in memory")
    g.add_argument("--data-dir", type=str, default=None,
                   help="where data sets are stored or downloaded (default: ./data, or the resumed run's)")
    g.add_argument("--image-size", type=pos_int, default=None, help="resize image-folder images to this size")
    g.add_argument("--train-size", type=pos_int, default=None, help="train on a fixed subset of N images")
    g.add_argument("--val-size", type=nonneg_int, default=0,
                   help="hold out N training images and select best.pt on the evaluated model's PGD-20 accuracy on "
                        "them instead of the test set's")
    g.add_argument("--eval-size", type=pos_int, default=1000,
                   help="evaluate after every epoch on a fixed subset of N test images (default 1000)")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="turn off random crop (4-pixel padding) and horizontal flip (never used for SVHN)")


# ----------------------------------------------------------------------------------------------
# Seeding and devices
# ----------------------------------------------------------------------------------------------


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name=None):
    """torch.device(--device), or cuda when there is one, else cpu; one UserError for a device this machine lacks."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":  # checked without touching the GPU: every torchrun process would open one on cuda:0
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise UserError(f"--device {name}, but this machine has {count} usable CUDA device(s); use --device cpu "
                            f"or another device")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--device {name} cannot be used here: {reason[:200]}") from None
        if device.type == "meta":
            raise UserError("--device meta holds no data: use cpu or a GPU")
    return device


def setup_distributed(device_name=None):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL with one GPU per
    process, gloo on CPUs. Returns (rank, world_size, device); (0, 1, device) for a plain run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def cleanup_distributed():
    """Leave the process group. On the way out of a failed or interrupted run (called from a `finally`), the
    barrier is skipped: the other ranks may be gone already, and waiting for them could hang for ever."""
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is not None:
            return
        dist.barrier()  # let every rank finish its collectives before the group goes away
        dist.destroy_process_group()


def all_reduce_sum_(tensor):
    """Sum `tensor` over all ranks in place (nothing to do in a plain run)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def average_buffers_(model):
    """Average floating-point buffers (BatchNorm statistics) over all ranks, so that every rank holds
    the same weights; parameters are already identical under DDP."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(dist.get_world_size())


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] under torchrun; [obj] in a plain run."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def state_fingerprint(model):
    """SHA-256 of every tensor of the state_dict: equal fingerprints mean bit-identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rng_state():
    """This process's random-number generators, for exact resumption. numpy's key is kept as a list
    of ints so that checkpoints load with torch.load(weights_only=True)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, key.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states():
    """Every rank's rng_state() (a list of one in a plain run): a checkpoint keeps them all."""
    return gather_objects(rng_state())


def restore_rng_states(states, rank):
    """Undo all_rng_states() on this rank (a run resumed on fewer processes takes rank 0's)."""
    set_rng_state(states[rank] if rank < len(states) else states[0])


# ----------------------------------------------------------------------------------------------
# Data: every data set becomes four tensors (uint8 images NCHW, int64 labels) held in memory
# ----------------------------------------------------------------------------------------------

DATASETS = ("cifar10", "cifar100", "svhn", "imagefolder", "synthetic")

# Per-channel statistics of the training sets; image folders and the synthetic set are measured.
CHANNEL_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

DOWNLOAD_HINTS = {
    "cifar10": "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html",
    "cifar100": "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html",
    "svhn": "train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/",
}


class ImageData:
    """A data set as tensors: `x_*` uint8 (N, C, H, W), `y_*` int64 (N,)."""

    def __init__(self, x_train, y_train, x_test, y_test, num_classes, mean, std, flip):
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = x_test, y_test
        self.num_classes = num_classes
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.flip = flip  # horizontal flips are a valid augmentation (not for digits)

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])


def channel_stats(x_uint8):
    x = x_uint8.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def make_synthetic(num_classes=10, train_size=4000, test_size=1000, image_size=32, seed=0):
    """A small learnable image set made in memory, for tests and smoke runs. Each class is a smooth
    random colour pattern (contrast +-0.18); each image is its class pattern at a random shift, plus
    a smooth random distractor pattern (+-0.2) and pixel noise (sd 0.1) around grey. Like real
    images it is easy to learn and easy to attack: a clean-trained small-cnn reaches ~90% clean but
    ~10% PGD-20 accuracy (8/255), while three epochs of PGD-AT reach ~40% robust accuracy. The
    same `seed` always gives the same images, whatever the run's own seed."""
    x_train, y_train, x_test, y_test = (t.clone() for t in synthetic_images(num_classes, train_size, test_size,
                                                                            image_size, seed))
    mean, std = channel_stats(x_train)
    return ImageData(x_train, y_train, x_test, y_test, num_classes, mean, std, flip=True)


@functools.lru_cache(maxsize=2)  # made once per process: the notebook's quick mode and the tests ask dozens of times
def synthetic_images(num_classes, train_size, test_size, image_size, seed):
    """make_synthetic's uint8 images and labels: (x_train, y_train, x_test, y_test); callers get clones."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=gen) * 2 - 1
    templates = F.interpolate(coarse, size=image_size + 8, mode="bicubic", align_corners=False)

    def smooth_noise(n, size):
        return F.interpolate(torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1, size=size, mode="bicubic",
                             align_corners=False)

    def sample(n):
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        shift = torch.randint(0, 9, (n, 2), generator=gen)
        rows = (shift[:, 0, None] + torch.arange(image_size))[:, None, :, None]
        cols = (shift[:, 1, None] + torch.arange(image_size))[:, None, None, :]
        pattern = templates[y[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        x = 0.5 + 0.18 * pattern + 0.2 * smooth_noise(n, image_size)
        x = x + 0.1 * torch.randn(n, 3, image_size, image_size, generator=gen)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return (*sample(train_size), *sample(test_size))


def _torchvision_split(name, root, train):
    from torchvision import datasets

    if name == "svhn":
        split = "train" if train else "test"
        try:
            ds = datasets.SVHN(root, split=split, download=False)
        except RuntimeError:
            ds = datasets.SVHN(root, split=split, download=True)
        return torch.from_numpy(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError:  # not there yet: fetch it
        ds = cls(root, train=train, download=True)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return x, torch.as_tensor(ds.targets, dtype=torch.int64)


def load_torchvision(name, root):
    try:
        x_train, y_train = _torchvision_split(name, root, train=True)
        x_test, y_test = _torchvision_split(name, root, train=False)
    except Exception as err:  # offline, a proxy, a truncated archive: all end the same way for the user
        raise UserError(
            f"{name} is not in {root} and could not be downloaded ({type(err).__name__}: {err}). "
            f"Put {DOWNLOAD_HINTS[name]} into {root}, or use --dataset imagefolder with a local copy"
        ) from None
    num_classes = {"cifar10": 10, "cifar100": 100, "svhn": 10}[name]
    mean, std = CHANNEL_STATS[name]
    return ImageData(x_train, y_train, x_test, y_test, num_classes, mean, std, flip=name != "svhn")


def _scan_image_folder(folder):
    """torchvision's ImageFolder index of `folder` (class folders and their image files), or one UserError."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(folder)
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(f"cannot read image folder {folder}: {err}") from None


def _read_images(dataset, folder, image_size):
    """(uint8 images NCHW, int64 labels) of a scanned ImageFolder; a file that is no readable image gets one
    UserError naming it."""
    from PIL import Image

    images = []
    for path, _ in dataset.samples:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if image_size:
                    img = img.resize((image_size, image_size), Image.BILINEAR)
                images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        except Exception as err:  # not an image, truncated, unreadable, too large: all about this one file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{path} is not a readable image ({type(err).__name__}: {reason[:200]}); "
                            "fix or remove it") from None
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise UserError(f"images in {folder} have different sizes {sorted(shapes)[:3]}...; pass --image-size")
    labels = torch.as_tensor([label for _, label in dataset.samples], dtype=torch.int64)
    return torch.stack(images), labels


def load_image_folder(root, image_size=None):
    """torchvision's ImageFolder layout: root/train/<class>/*.png and root/test/<class>/*.png, the same classes
    in both (checked before any image is read)."""
    root = Path(root)
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise UserError(f"--dataset imagefolder needs {root}/train/<class>/ and {root}/test/<class>/ "
                        f"folders; {', '.join(str(root / m) for m in missing)} not found")
    train, test = _scan_image_folder(root / "train"), _scan_image_folder(root / "test")
    if train.classes != test.classes:
        only = [(c, "test", "train") for c in test.classes if c not in train.classes]
        only += [(c, "train", "test") for c in train.classes if c not in test.classes]
        raise UserError("; ".join(f"class folder {c!r} is in {root / here} but not in {root / there}"
                                  for c, here, there in only[:3]) + ("; ..." if len(only) > 3 else ""))
    x_train, y_train = _read_images(train, root / "train", image_size)
    x_test, y_test = _read_images(test, root / "test", image_size)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(f"the images in {root}/train are {tuple(x_train.shape[1:])} but those in {root}/test are "
                        f"{tuple(x_test.shape[1:])}; pass --image-size")
    mean, std = channel_stats(x_train)
    return ImageData(x_train, y_train, x_test, y_test, len(train.classes), mean, std, flip=True)


def load_dataset(name, data_dir, image_size=None):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "synthetic":
        return make_synthetic()
    if name == "imagefolder":
        return load_image_folder(data_dir, image_size)
    return load_torchvision(name, data_dir)


def fixed_subset(n_total, n, seed=0):
    """The first n indices of a fixed permutation: the same subset for every run and seed."""
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm if n is None else perm[:n]


def augment(x, pad=4, flip=True):
    """Random crop with zero padding and random horizontal flip of a batch, on its own device.
    x: uint8 or float (N, C, H, W)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    images = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[images, channels, rows, cols]
    if flip:
        flipped = torch.rand(n, device=x.device) < 0.5
        out = torch.where(flipped[:, None, None, None], out.flip(3), out)
    return out


def progress(iterable, **kwargs):
    """tqdm that stays quiet when stderr is not a terminal (logs, CI), and cleans up after itself."""
    from tqdm import tqdm

    kwargs.setdefault("disable", None)  # None: off when not a terminal
    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def to_float(x_uint8):
    return x_uint8.float().div_(255)


# ----------------------------------------------------------------------------------------------
# Models: each holds its normalisation as non-persistent buffers, so its state_dict has exactly the
# layout of the models most robustness code publishes (TRADES, MART, AutoAttack's examples)
# ----------------------------------------------------------------------------------------------

ARCHS = ("resnet18", "wrn-32-10", "small-cnn")
# The vision transformers of the paper's Table IV (train_vit.py); build_model takes any timm name.
VIT_ARCHS = ("vit_base_patch16_224", "deit_small_patch16_224", "convit_base")


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (3x3 stem, no max-pool) with the key layout conv1, bn1, layer1..4, linear."""

    def __init__(self, num_classes=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes, layers = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class WideBlock(nn.Module):
    """Pre-activation wide block, named as in the TRADES/MART WideResNet so their weights load."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class WideGroup(nn.Module):
    def __init__(self, n_blocks, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(n_blocks)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-32-10 in Madry et al.'s counting (5 blocks per stage, 10x wide): the same network the
    TRADES/MART code calls WideResNet(depth=34), whose formula counts the two shortcut-convs too.
    Key layout conv1, block1..3.layer.N.*, bn1, fc."""

    def __init__(self, num_classes=10, blocks_per_stage=5, widen=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = WideGroup(blocks_per_stage, widths[0], widths[1], 1)
        self.block2 = WideGroup(blocks_per_stage, widths[1], widths[2], 2)
        self.block3 = WideGroup(blocks_per_stage, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # the initialisation of the reference WideResNet code
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        out = F.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1).flatten(1)
        return self.fc(out)


class SmallCNN(nn.Module):
    """A four-conv BatchNorm network for CPU runs: one PGD-10 epoch over 5,000 CIFAR images takes
    about a minute on 2 cores (README), yet it learns CIFAR-10 to a useful robust accuracy."""

    def __init__(self, num_classes=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), width=32):
        super().__init__()
        self.normalize = Normalize(mean, std)

        def conv_bn(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
                                 nn.ReLU(inplace=True))

        w = width
        self.features = nn.Sequential(conv_bn(3, w), nn.MaxPool2d(2), conv_bn(w, 2 * w), nn.MaxPool2d(2),
                                      conv_bn(2 * w, 4 * w), nn.MaxPool2d(2), conv_bn(4 * w, 4 * w))
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        out = self.features(self.normalize(x))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class NormalizedNet(nn.Module):
    """A timm network behind the input normalisation: state_dict keys are net.<timm key>."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x):
        return self.net(self.normalize(x))


def build_model(arch, num_classes, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **model_kwargs):
    """The network `arch` with its input normalisation built in; mean=0, std=1 gives a model that
    takes its input as it comes (for foreign checkpoints). `model_kwargs` are what a checkpoint's
    "model_kwargs" holds (none for the CNNs; for a timm name, e.g. {"img_size": 32, "patch_size": 4},
    passed to timm.create_model, randomly initialised)."""
    cnns = {"resnet18": ResNet18, "wrn-32-10": WideResNet, "small-cnn": SmallCNN}
    if arch in cnns:
        return cnns[arch](num_classes, mean=mean, std=std, **model_kwargs)
    try:
        import timm  # only the vision transformers need it
    except ImportError:
        raise UserError(f"{arch!r} is not one of {', '.join(ARCHS)}, and timm (for {', '.join(VIT_ARCHS)} and other "
                        "timm models) is not installed: pip install timm") from None
    if not timm.is_model(arch):
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)} or a timm model name "
                        f"(e.g. {', '.join(VIT_ARCHS)})")
    return NormalizedNet(timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_kwargs), mean, std)


# ----------------------------------------------------------------------------------------------
# Run folders: args.json, metrics.csv, checkpoints, curves.png
# ----------------------------------------------------------------------------------------------


def atomic_write(path, write):
    """Call write(binary file) on a temporary file in the same folder, then rename it over `path`: a
    crash leaves either the old file or the new one, never half of one. A failure of the file system (a full
    disk, a lost permission) is raised as an OSError naming `path`, even where torch.save wraps it."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; give it the usual permissions
        os.replace(tmp, path)
    except Exception as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = next((e for e in _exception_chain(err) if isinstance(e, OSError)), None)
        if cause is None:
            raise
        raise OSError(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from None
    except BaseException:  # Ctrl-C while writing: no temporary file left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _exception_chain(err):
    """err, the exception it was raised from or while handling, and so on."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def save_json(obj, path):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


CHECKPOINT_KEYS = ("model", "arch", "num_classes", "mean", "std", "args", "metrics", "epoch")


def not_a_torch_file(path):
    """Why `path` cannot be a file torch.save wrote (None when it may be one): torch.save writes a zip
    archive (since torch 1.6) or, in the legacy format, a pickle stream; anything else is not a checkpoint."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return f"{path} is empty: not a checkpoint at all"
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return None
    kind = "a text file" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not a torch file"
    return f"{path} is not a checkpoint at all ({kind}: torch.save writes a zip archive or a pickle)"


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Load a checkpoint written by save_checkpoint; one clear UserError for a missing, truncated
    or foreign file, or one that is no checkpoint at all. mmap=True maps the tensors instead of reading
    them (fast when only the metadata is wanted)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    problem = not_a_torch_file(path)
    if problem:
        raise UserError(problem)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)  # runs no pickled code
    except Exception as err:
        if "Weights only load failed" in str(err):
            raise UserError(f"{path} pickles Python objects, which this project's checkpoints never do: not one of "
                            "ours (for another project's state_dict use evaluate.py --arch)") from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a torch file?): {reason}") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint of this project (expected a dict with keys "
                        f"{', '.join(CHECKPOINT_KEYS)}); for a plain state_dict use evaluate.py --arch")
    return checkpoint


def resume_run(args, script):
    """(the run's own flags, its final.pt) to continue `args.resume` from. The flags the interrupted run
    was started with win, except where to run (--device), where to write (the run folder itself) and,
    when given, where the data lives (--data-dir). A final.pt of another script, one holding no
    training state, a run that diverged or one another process is training get one clear UserError."""
    checkpoint = load_checkpoint(Path(args.resume) / "final.pt")
    written_by = checkpoint.get("script", "another script")
    if written_by != script:
        raise UserError(f"{args.resume}/final.pt was written by {written_by}, not {script}; resume it with that script")
    if "resume" not in checkpoint:
        raise UserError(f"{args.resume}/final.pt holds no training state to resume from")
    status = read_status(args.resume) or {}
    if status.get("status") == "diverged":
        raise UserError(f"{args.resume} diverged at epoch {status.get('epoch')}, step {status.get('step')} "
                        "(status.json): resumed with its own flags it would diverge again; start a new run with a "
                        f"lower --lr or --no-amp (or delete {args.resume}/status.json to resume anyway)")
    _refuse_if_in_use(args.resume, status)
    _refuse_unless_writable(args.resume)
    saved = dict(checkpoint["args"])
    saved.update(resume=args.resume, device=args.device, out_dir=args.resume,
                 data_dir=args.data_dir or saved["data_dir"])
    if args.track:  # tracking can be switched on when continuing a run; it changes no result
        saved.update(track=True, wandb_project=args.wandb_project, wandb_entity=args.wandb_entity)
    RUN.epochs_saved = checkpoint["epoch"]
    return argparse.Namespace(**saved), checkpoint


def make_run_dir(args):
    """A new run folder (args.out_dir, or runs/<dataset>__<exp-name>__<seed>__<unix time>). Refused with one
    UserError, before anything is written, when it already holds a run (a final.pt; or the args.json of a run of
    another script or seed that saved no epoch yet), another process is training in it, or it cannot be written.
    The args.json of the same script and seed (a run stopped before its first epoch ended) is started over."""
    if args.out_dir is None:
        args.out_dir = f"runs/{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out-dir {run_dir} is a file, not a folder")
    status = read_status(run_dir) or {}
    other = status.get("script") if status.get("script") not in (None, RUN.script) else None
    if (run_dir / "final.pt").exists():
        how = f"python {other} --resume {run_dir}" if other else f"--resume {run_dir}"
        raise UserError(f"{run_dir} already holds a run{f' of {other}' if other else ''}; continue it with {how} "
                        "or choose another --out-dir")
    _refuse_if_in_use(run_dir, status)
    if (run_dir / "args.json").exists():
        _refuse_another_start(run_dir, args, other)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the run folder {run_dir}: {err.strerror or err}") from None
    _refuse_unless_writable(run_dir)
    return run_dir


def _refuse_another_start(run_dir, args, other_script):
    """One UserError when run_dir/args.json is that of a run of another script (as its status.json says), or of
    another seed."""
    try:
        saved = json.loads((run_dir / "args.json").read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or other_script:
        raise UserError(f"{run_dir} holds the args.json of a run of {other_script or 'another program'} that saved "
                        f"no epoch yet; choose another --out-dir, or delete {run_dir} to start over there")
    if saved.get("seed") != args.seed:
        raise UserError(f"{run_dir} holds the args.json of a run with --seed {saved.get('seed')} that saved no "
                        f"epoch yet, not --seed {args.seed}; choose another --out-dir, or delete {run_dir} to start "
                        "over there")


def _refuse_unless_writable(run_dir):
    """One UserError unless a file can be created in run_dir (permissions, a read-only file system, a quota)."""
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise UserError(f"cannot write the run folder {run_dir}: {err.strerror or err}") from None


def _refuse_if_in_use(run_dir, status):
    """One UserError when status.json says a live process on this machine is training the run in run_dir."""
    pid = status.get("pid")
    if status.get("status") != "running" or status.get("host") != socket.gethostname() or not isinstance(pid, int):
        return
    if pid == os.getpid():
        return
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return  # killed (SIGKILL, a power cut): its status.json still says "running"
    except PermissionError:
        pass  # it exists, under another user
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if str(status.get("script")) not in command:
            return  # the number belongs to another program now
    except OSError:
        pass
    raise UserError(f"{run_dir} is being trained by process {pid} of {status.get('script')} on this machine "
                    "(status.json); wait for it, stop it, or choose another --out-dir")


def open_run_dir(args, resumed, is_main):
    """The run folder: the resumed run's own, or (rank 0) a new one with args.json; None on other ranks.
    Rank 0 then says "running" in its status.json."""
    if resumed:
        run_dir = Path(args.resume)
    elif not is_main:
        return None
    else:
        RUN.epochs_saved = 0
        run_dir = make_run_dir(args)
        save_json(vars(args), run_dir / "args.json")
    if is_main:
        RUN.dir, RUN.args, RUN.curves_drawn = run_dir, args, time.monotonic()
        write_status(run_dir, "running")
    return run_dir


def read_status(run_dir):
    """RUN_DIR/status.json as a dict (see write_status), or None when there is none or it is unreadable."""
    try:
        status = json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def write_status(run_dir, status, **fields):
    """RUN_DIR/status.json, written atomically: why the run stopped, for evaluate.py and sweep launchers.
    status: "running" (or killed without a word: see pid and host), "finished", "diverged", "interrupted" or
    "failed"; epochs_saved: the epochs final.pt holds (what --resume continues after); epoch, step: where it
    stopped, counted from 1 (null when not inside an epoch); message: the line the script printed;
    exit_code: the script's exit status (README, "When something goes wrong"; null while running)."""
    record = {"status": status, "script": RUN.script, "epochs_saved": RUN.epochs_saved,
              "epochs": getattr(RUN.args, "epochs", None), "epoch": None, "step": None, "message": None,
              "exit_code": None, "pid": os.getpid(), "host": socket.gethostname(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    record.update(fields)
    save_json(record, Path(run_dir) / "status.json")


def load_resumed_state(model, state, args, what=None):
    """model.load_state_dict(state) for --resume, or one UserError naming what does not fit."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        part = f": the {what}" if what else ""
        reason = str(err).splitlines()[0]
        raise UserError(f"{args.resume}/final.pt{part} does not fit a {args.arch}: {reason}") from None


def selection_metric(args):
    """The metrics.csv column best.pt is chosen on: held-out images when --val-size, else the test subset."""
    return "val_pgd20_acc" if args.val_size else "test_pgd20_acc"


def is_best(metrics, column):
    """Whether the last row beats every earlier one on `column` (ties keep the earlier checkpoint)."""
    return metrics[-1][column] > max((m[column] for m in metrics[:-1]), default=-1.0)


CURVES_EVERY_S = 30  # curves.png is drawn after the last epoch (or the one a stop signal ends), else at most this often


def write_epoch(run_dir, checkpoint, resume_state, metrics, column, log, title):
    """End of an epoch on rank 0: best.pt (when the epoch is the best so far) and final.pt with the training
    state `resume_state`, each written atomically; then the metrics.csv row, status.json and curves.png (after
    the last epoch, before it at most every CURVES_EVERY_S seconds: drawing takes 0.5-2 s, which short epochs
    would feel).
    Checkpoints first, so a crash never leaves a logged row without its weights; weights that are not finite
    are never written (Diverged); a stop signal that arrives meanwhile waits until all of them are written."""
    problem = first_non_finite(checkpoint["model"])
    if problem:
        raise Diverged(f"{problem[0]} of the saved model", problem[1], len(metrics))
    with stop_signals_deferred():
        if is_best(metrics, column):
            save_checkpoint(checkpoint, run_dir / "best.pt")
        save_checkpoint({**checkpoint, "resume": resume_state}, run_dir / "final.pt")
        RUN.epochs_saved = checkpoint["epoch"]
        log.write(metrics[-1])
        write_status(run_dir, "running")
        last = checkpoint["epoch"] == getattr(RUN.args, "epochs", None) or RUN.pending is not None  # or stopping
        if last or time.monotonic() - RUN.curves_drawn >= CURVES_EVERY_S:
            plot_curves(metrics, run_dir / "curves.png", title=title)
            RUN.curves_drawn = time.monotonic()


def report_done(metrics, column, run_dir):
    best = max(metrics, key=lambda m: m[column])
    line = (f"done: best {column} {best[column]:.4f} at epoch {best['epoch']}, final {metrics[-1][column]:.4f}; "
            f"outputs in {run_dir}")
    print(line)
    write_status(run_dir, "finished", epochs_saved=len(metrics), epoch=len(metrics), message=line, exit_code=0)


# ----------------------------------------------------------------------------------------------
# When a run stops early: divergence, stop signals, status.json and the scripts' exit codes (the README's
# "When something goes wrong"). A script's train() calls check_finite every step and check_finite_weights
# before saving an epoch; its main() runs train() inside run_guard; its __main__ is run_main.
# ----------------------------------------------------------------------------------------------

EXIT_BAD_INPUT, EXIT_BAD_FLAG, EXIT_DIVERGED, EXIT_MACHINE = 1, 2, 3, 4
# Ctrl-C; what Slurm sends before preemption (SIGTERM) and, on some clusters, before a requeue (SIGUSR2). Each
# ends a run with exit code 128 + its number (130, 143, 140), the shell's convention.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))


class Diverged(RuntimeError):
    """A training loss or weights that are not finite. `epoch` and `step` count from 1 (step None: at the
    end of the epoch). Raised before anything of the epoch is written, so best.pt and final.pt keep the last
    finite weights."""

    def __init__(self, what, value, epoch, step=None):
        where = f"epoch {epoch}, step {step}" if step else f"the end of epoch {epoch}"
        super().__init__(f"{what} is {value} at {where}")
        self.what, self.value, self.epoch, self.step = what, value, epoch, step


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised in the main thread as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _RunRecord:
    """What this process knows of the run it writes (rank 0), for status.json and the line a run that stops
    early prints: the script and how it was launched (run_guard), the folder and flags (open_run_dir), the
    epochs final.pt holds (resume_run, write_epoch), and a stop signal held back (stop_signals_deferred)."""

    def __init__(self):
        self.script = self.command = self.dir = self.args = self.pending = None
        self.epochs_saved = self.deferring = 0
        self.curves_drawn = -math.inf  # time.monotonic() of the last curves.png


RUN = _RunRecord()


def check_finite(epoch, step, **losses):
    """Raise Diverged when a training loss (each given by name: training_loss=loss) is nan or inf. Call it
    once per step, after the loss and before backward(), with the loop's 0-indexed epoch and step. Reading
    the verdict is one host synchronisation per step, which the loops otherwise avoid: negligible next to a
    PGD-10 step (eleven forward and backward passes). Under torchrun the verdict is summed over the ranks,
    so every rank stops at the same step instead of waiting for the others in the next all-reduce."""
    values = torch.stack([loss.detach().float().reshape(()) for loss in losses.values()])
    bad = all_reduce_sum_((~torch.isfinite(values)).float())
    if not bad.any():
        return
    for name, value, anywhere in zip(losses, values.tolist(), bad.tolist()):
        if anywhere:
            shown = value if not math.isfinite(value) else "not finite on another rank"
            raise Diverged(f"the {name.replace('_', ' ')}", shown, epoch + 1, step + 1)


def check_finite_weights(epoch, **models):
    """Raise Diverged when a floating-point weight or buffer of a model (each given by name: model=model) is
    nan or inf after the 0-indexed `epoch` (None models are skipped). Call it on every rank, before anything of
    the epoch is saved."""
    for name, model in models.items():
        problem = first_non_finite(model.state_dict()) if model is not None else None
        if problem:
            raise Diverged(f"{problem[0]} of the {name.replace('_', ' ')}", problem[1], epoch + 1)


def first_non_finite(state):
    """(name, value) of the first floating-point tensor of a state_dict holding nan or inf, else None; one host
    synchronisation when all are finite."""
    floats = [(name, t) for name, t in state.items() if torch.is_tensor(t) and t.is_floating_point()]
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats])
    if finite.all():
        return None
    name, tensor = floats[int((~finite).nonzero()[0, 0])]
    return name, tensor[~torch.isfinite(tensor)].flatten()[0].item()


def _on_stop_signal(signum, frame):
    if RUN.deferring:
        RUN.pending = signum  # raised when the deferred block ends
        return
    raise Interrupted(signum)


def install_stop_handlers():
    """Make every STOP_SIGNALS raise Interrupted (only the main thread can handle signals); returns the handlers
    it replaced. A signal the process was told to ignore (a shell's `cmd &` ignores SIGINT) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _on_stop_signal) for signum in STOP_SIGNALS
            if signal.getsignal(signum) is not signal.SIG_IGN}


@contextlib.contextmanager
def stop_signals_deferred():
    """A stop signal that arrives inside the block is raised when the block ends: files written together agree."""
    RUN.deferring += 1
    try:
        yield
    finally:
        RUN.deferring -= 1
    if RUN.pending is not None and not RUN.deferring:
        signum, RUN.pending = RUN.pending, None
        raise Interrupted(signum)


@contextlib.contextmanager
def run_guard(script_file):
    """Around a training script's train(): stop signals raise Interrupted, and a run that stops early (it
    diverged, was interrupted or failed) says why in its status.json before the exception goes on to run_main,
    which prints the same line. Without a run folder yet (bad input found while setting up), nothing is written."""
    RUN.script = os.path.basename(script_file)
    RUN.command = _launch_command(script_file)
    previous = install_stop_handlers()
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:
        RUN.deferring += 1  # a second Ctrl-C must not cut status.json short
        err.stop = describe_stop(err)
        if RUN.dir is not None:
            interrupted = isinstance(err, KeyboardInterrupt)
            epoch = getattr(err, "epoch", None) or (RUN.epochs_saved + 1 if interrupted else None)
            with contextlib.suppress(Exception):  # a full disk must not hide why the run stopped
                write_status(RUN.dir, err.stop.status, epoch=epoch, step=getattr(err, "step", None),
                             message=err.stop.line, exit_code=err.stop.exit_code)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        RUN.__init__()


def _launch_command(script_file):
    """How to start this script again: as it was typed (python train_piat.py, torchrun ... train_piat.py)."""
    name = os.path.basename(script_file)
    typed = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == name else name
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return f"torchrun --nproc_per_node={processes} {typed}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
        else f"python {typed}"


class Stop(NamedTuple):
    """How a script ends when `main()` raised: status.json's status, the exit code, the line after
    "<script>: ", and whether that line says it all (False: a bug, whose traceback is kept)."""

    status: str
    exit_code: int
    line: str
    expected: bool


def describe_stop(err):
    """The Stop for an exception that ended main()."""
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    if isinstance(err, UserError):
        return Stop("failed", EXIT_BAD_INPUT, f"error: {err}", True)
    if isinstance(err, Diverged):
        return Stop("diverged", EXIT_DIVERGED, _diverged_line(err), True)
    if isinstance(err, KeyboardInterrupt):
        signum = getattr(err, "signum", signal.SIGINT)
        return Stop("interrupted", 128 + signum, _interrupted_line(signal.Signals(signum).name), True)
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return Stop("failed", EXIT_MACHINE, f"error: out of memory ({first}); try a smaller --batch-size or "
                                            "--eval-batch-size", True)
    if isinstance(err, OSError):
        return Stop("failed", EXIT_MACHINE, f"error: {first}", True)
    return Stop("failed", 1, f"{type(err).__name__}: {first}", False)


def _diverged_line(err):
    kept = (f"best.pt and final.pt keep the last finite weights (final.pt: epoch {RUN.epochs_saved})"
            if RUN.epochs_saved else "nothing was saved: no epoch ended with finite weights")
    lr = getattr(RUN.args, "lr", None)
    hint = "try a lower --lr" + (f" than {lr:g}" if isinstance(lr, (int, float)) else "")
    if getattr(RUN.args, "amp", True):
        hint += " or --no-amp"
    return f"diverged: {err}; {kept}; {hint}"


def _interrupted_line(name):
    if RUN.script is None:
        return f"interrupted by {name}"
    if RUN.dir is None:
        return f"interrupted by {name} before training started; nothing was written"
    saved, epochs = RUN.epochs_saved, getattr(RUN.args, "epochs", None)
    if saved == 0:
        return (f"interrupted by {name} in epoch 1, before any epoch was saved; run the same command again to start "
                f"over ({RUN.dir} holds only its flags)")
    if epochs is not None and saved >= epochs:
        return f"interrupted by {name} after its last epoch; {RUN.dir} is complete"
    held = f"epoch {saved}" if saved == 1 else f"epochs 1-{saved}"
    return (f"interrupted by {name} in epoch {saved + 1}; {RUN.dir}/final.pt holds {held}; continue exactly from "
            f"there with: {RUN.command} --resume {shlex.quote(str(RUN.dir))}")


def run_main(main, script_file):
    """What a script's `if __name__ == "__main__":` runs: main() with stop signals handled, then, for every way it
    can end early, one line on stderr ("<script>: ...") and the exit code of the README's "When something goes
    wrong" (returned for sys.exit); a bug keeps its traceback. Under torchrun, only rank 0 reports a divergence
    or an interrupt (every rank stops at the same point)."""
    install_stop_handlers()
    try:
        main()
    except (Exception, KeyboardInterrupt) as err:
        RUN.deferring += 1  # a second Ctrl-C must not turn the one line into a traceback
        stop = getattr(err, "stop", None) or describe_stop(err)
        if not stop.expected:
            raise
        if os.environ.get("RANK", "0") == "0" or not isinstance(err, (Diverged, KeyboardInterrupt)):
            print(f"{os.path.basename(script_file)}: {stop.line}", file=sys.stderr, flush=True)
        return stop.exit_code
    return 0


# ----------------------------------------------------------------------------------------------
# The training loop's plumbing, shared by the three training scripts: data split, batches, the
# network's roles (plain, compiled, DDP-wrapped), and the checks of a multi-process run
# ----------------------------------------------------------------------------------------------


def bf16_pays(device):
    """--amp's default: whether bf16 autocast makes training faster on `device`. CUDA: yes. A CPU: only with
    AMX, whose tile units multiply bf16 matrices many times faster than AVX-512 does fp32. AVX512_BF16 alone
    is not enough: on a 2-core Xeon VM that has it, bf16 made our PGD-10 step slower (0.75-0.9x fp32 for
    ResNet-18 and small-cnn, torch 2.14 and 2.15; BENCHMARKS.md), and ARM's BF16 is unmeasured, so both
    default to fp32 (--amp forces bf16). bf16 kernels on a CPU come from oneDNN."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return platform.machine().lower() in ("x86_64", "amd64") and torch.cpu._is_amx_tile_supported()


def resolve_amp(args, device):
    """--amp's default, settled once per run (and then stored in args.json and the checkpoints): bf16
    autocast where it pays (bf16_pays), fp32 elsewhere. --amp and --no-amp force it; a resumed run keeps
    its own."""
    if args.amp is None:
        args.amp = bf16_pays(device)


def precision(amp, device):
    """How the training step computes, for the line a run starts with: bf16 autocast or fp32, and why."""
    where = "CUDA" if device.type == "cuda" else f"this {device.type.upper()}"
    if amp == bf16_pays(device):
        return (f"bf16 autocast (the default on {where})" if amp else
                f"fp32 (the default on {where}: bf16 pays only on CUDA and CPUs with AMX; --amp forces it)")
    return "bf16 autocast (--amp)" if amp else "fp32 (--no-amp)"


def check_processes(args, world_size, device):
    """One UserError for settings this process layout cannot run, before any work."""
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must divide among {world_size} processes")
    if getattr(args, "sync_bn", False) and device.type != "cuda":
        raise UserError("--sync-bn needs one CUDA device per process")


def split_data(data, args, device):
    """Fixed subsets (the same for every seed): validation images held out of training, training
    subset, and the evaluation subset of the test set. Moved to `device` once, as uint8."""
    order = fixed_subset(len(data.x_train), None)
    if args.val_size >= len(order):
        raise UserError(f"--val-size {args.val_size} leaves no training images (the set has {len(order)})")
    val_idx, train_idx = order[: args.val_size], order[args.val_size :]
    if args.train_size is not None:
        train_idx = train_idx[: args.train_size]
    test_idx = fixed_subset(len(data.x_test), args.eval_size)
    return {"train": (data.x_train[train_idx].to(device), data.y_train[train_idx].to(device)),
            "val": (data.x_train[val_idx].to(device), data.y_train[val_idx].to(device)),
            "test": (data.x_test[test_idx].to(device), data.y_test[test_idx].to(device))}


def prepare_module(model, args, device, world_size, channels_last=True):
    """The model on `device`: channels_last for CNNs (faster convolutions on CUDA, and on a CPU too:
    BENCHMARKS.md), SyncBatchNorm with --sync-bn under torchrun."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if getattr(args, "sync_bn", False) and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class Network(NamedTuple):
    """One network in its three roles. `model` holds the weights: saved, interpolated, averaged.
    `for_attack` is what the attacks and the evaluation call: the model, compiled with --compile.
    `for_step` is what the training step's forward passes call: wrapped in DistributedDataParallel
    under torchrun, so that DDP's gradient hooks see only them (compiled too with --compile)."""

    model: nn.Module
    for_attack: nn.Module
    for_step: nn.Module


def wrap_network(model, compile=False, world_size=1):
    """The Network of `model` (see Network)."""
    for_attack = for_step = torch.compile(model) if compile else model
    if world_size > 1:
        for_step = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        for_step = torch.compile(for_step) if compile else for_step
    return Network(model, for_attack, for_step)


def steps_per_epoch(n_train, batch_size, world_size=1):
    """Batches per epoch; under torchrun every rank takes the same number of equal steps, so the last
    partial batch is dropped."""
    if world_size > 1 and n_train < batch_size:
        raise UserError(f"--batch-size {batch_size} (the global batch) is larger than the {n_train} training images: "
                        f"under torchrun every step takes a whole batch")
    return math.ceil(n_train / batch_size) if world_size == 1 else n_train // batch_size


def epoch_batches(x_train, y_train, args, epoch, flip, rank=0, world_size=1, channels_last=True):
    """The (step, x, y) of one epoch, x float in [0, 1]. One permutation per epoch, seeded from --seed and
    the epoch, so it is the same on every rank and after --resume without saving any state; each rank
    takes its share of every global batch; augmented on the device. A progress bar on rank 0."""
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
    order = order.to(x_train.device)
    n_steps = steps_per_epoch(len(x_train), args.batch_size, world_size)
    for i in progress(range(n_steps), desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0 or None):
        idx = order[i * args.batch_size : (i + 1) * args.batch_size][rank::world_size]
        x = x_train[idx]
        x = to_float(augment(x, flip=flip) if args.augment else x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield i, x, y_train[idx]


def check_ranks_agree(models, names, world_size):
    """At the end of a torchrun run: every rank must hold bit-identical `models` (compared by fingerprint;
    `names` says what each is; None entries are skipped); rank 0 prints the check. A plain run has nothing
    to compare."""
    names = [name for model, name in zip(models, names) if model is not None]
    fingerprints = gather_objects(tuple(state_fingerprint(m) for m in models if m is not None))
    if world_size == 1 or dist.get_rank() != 0:
        return
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"the {world_size} ranks ended with different {', '.join(names)}: {fingerprints}")
    also = f", and the {', '.join(names[1:])} too" if len(names) > 1 else ""
    print(f"{names[0]} identical on all {world_size} ranks (sha256 {fingerprints[0][0][:16]}){also}")


class MetricsLog:
    """metrics.csv, one row per epoch, flushed as it goes, and the same scalars for TensorBoard (and W&B
    with --track: see Tracker). `rows` are rewritten first, so a resumed run's file holds exactly the
    epochs its checkpoint holds. `args` (the run's flags) say whether and where W&B tracks it."""

    def __init__(self, path, fields, rows=(), args=None):
        self.path, self.fields = Path(path), list(fields)
        self.tracker = Tracker(self.path.parent, rows, args)
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.fields, extrasaction="ignore")
        self.writer.writeheader()
        for row in rows:
            self._write_row(row)

    def write(self, row):
        self._write_row(row)
        self.tracker.log(row)

    def _write_row(self, row):
        self.writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        self.file.flush()

    def close(self):
        self.file.close()
        self.tracker.close()


class Tracker:
    """Experiment tracking, the CleanRL convention: every metrics.csv scalar but `epoch` (the step) goes to
    TensorBoard event files in RUN_DIR/tensorboard and, with --track, to a Weights & Biases run (files in
    RUN_DIR/wandb; WANDB_MODE=offline needs no network). A resumed run purges the older events and logs its
    restored rows again, so the event files read back exactly as metrics.csv; it continues the same W&B run
    (its id is kept in RUN_DIR/wandb/resume.json), logging the epochs W&B may not hold (the last one a killed
    process logged, again). Neither touches metrics.csv or the checkpoints."""

    def __init__(self, run_dir, rows=(), args=None):
        self.run_dir, self.tensorboard, self.wandb = Path(run_dir), None, None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("note: tensorboard is not installed (pip install tensorboard): no TensorBoard event files")
        else:
            # purge_step=1: a reader drops every event of an earlier process once it meets this writer's
            self.tensorboard = SummaryWriter(self.run_dir / "tensorboard", purge_step=1 if rows else None)
        if args is not None and getattr(args, "track", False):
            self.wandb, self.wandb_logged = start_wandb(self.run_dir, args)
        for row in rows:
            self.log(row)

    def log(self, row):
        scalars = {k: v for k, v in row.items()
                   if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, global_step=row["epoch"])
            self.tensorboard.flush()
        if self.wandb is not None and row["epoch"] > self.wandb_logged:
            self.wandb.log(scalars, step=row["epoch"])
            self.wandb_logged = row["epoch"]
            # a killed process may take its last row with it, still in W&B's buffer: it is logged again on resume
            self.save_wandb_record(self.wandb_logged - 1)

    def save_wandb_record(self, epochs):
        save_json({"id": self.wandb.id, "epochs": epochs}, self.run_dir / "wandb" / "resume.json")

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.save_wandb_record(self.wandb_logged)


def start_wandb(run_dir, args):
    """(the W&B run of `run_dir`, the last epoch it holds): a new run, or the one an earlier process of
    this run folder logged to. Named WANDB_NAME or the folder's name; grouped by WANDB_RUN_GROUP."""
    try:
        import wandb
    except ImportError:
        raise UserError("--track needs Weights & Biases: pip install wandb") from None
    record = run_dir / "wandb" / "resume.json"
    record.parent.mkdir(exist_ok=True)
    earlier = json.loads(record.read_text()) if record.exists() else {"id": os.urandom(4).hex(), "epochs": 0}
    try:
        run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, dir=str(run_dir), id=earlier["id"],
                         resume="allow", name=os.environ.get("WANDB_NAME", run_dir.name), config=vars(args))
    except wandb.errors.UsageError as err:
        raise UserError(f"--track: {err} (WANDB_MODE=offline logs without an account)") from None
    save_json(earlier, record)  # before the first epoch: a run killed early keeps its W&B id
    return run, earlier["epochs"]


def read_metrics(path):
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def plot_curves(metrics, path, title=""):
    """Clean and PGD-20 accuracy per epoch (left), loss and alpha (right), saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("train_clean_acc", "train clean", "C0--"), ("train_robust_acc", "train robust", "C1--"),
                              ("test_clean_acc", "test clean", "C0-"), ("test_pgd20_acc", "test PGD-20", "C1-"),
                              ("raw_test_pgd20_acc", "test PGD-20, trained weights", "C1:"),
                              ("test_worst_pgd20_acc", "test PGD-20, worst class", "C3-"),
                              ("val_pgd20_acc", "val PGD-20", "C2-")):
        if metrics and key in metrics[0] and metrics[0][key] not in ("", None):
            ax_acc.plot(epochs, [100 * m[key] for m in metrics], style, marker=".", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "k-", marker=".", label="train loss")
    ax_loss.set(xlabel="epoch", ylabel="train loss")
    ax_alpha = ax_loss.twinx()
    ax_alpha.plot(epochs, [m["alpha"] for m in metrics], "C3:", marker=".", label="alpha (PIAT)")
    if metrics and "beta" in metrics[0]:  # train_rdat.py's mixing weight of the robust learner
        ax_alpha.plot(epochs, [m["beta"] for m in metrics], "C4:", marker=".", label="beta (RDAT)")
    ax_alpha.set(ylabel="alpha, beta" if metrics and "beta" in metrics[0] else "alpha", ylim=(-0.05, 1.05))
    ax_loss.legend(loc="upper left")
    ax_alpha.legend(loc="upper right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
