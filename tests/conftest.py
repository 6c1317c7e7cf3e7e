import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")
# One intra-op thread, for this process and the scripts it starts: the tests' models are tiny, and
# an oversubscribed OpenMP pool (torchrun's second process, a busy 2-core CI machine) made epochs
# 30x slower. Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tiny settings shared by the end-to-end runs: real code paths, seconds per run on 2 CPU cores.
TINY = ["--dataset", "synthetic", "--arch", "small-cnn", "--train-size", "96", "--eval-size", "32",
        "--batch-size", "32", "--pgd-steps", "2", "--eval-pgd-steps", "3", "--device", "cpu"]


def pytest_configure(config):
    config.addinivalue_line("markers", "notebook: executes paper.ipynb end to end (the slowest test)")


@pytest.fixture(scope="session", autouse=True)
def amp_cache(tmp_path_factory):
    """--amp's measured default is remembered in $XDG_CACHE_HOME/piat: the tests' (and the scripts they start) in a
    folder of their own, never the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def stub_bf16_probe(monkeypatch, tmp_path, speedup):
    """A CPU with bf16 kernels on which bf16 measures `speedup` x fp32 (steadily), with an empty cache of
    measurements: returns the list of the inputs the probe timed."""
    import torch

    import utils

    probed = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(utils, "bf16_speedup", lambda model, x: probed.append(x) or (speedup, True))
    return probed


@pytest.fixture(scope="session")
def root():
    return ROOT


def run_script(script, *args, cwd=None, env=None, timeout=600):
    """Run a project script as a user would (no shell), returning the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result, prog=None):
    """The single stderr line of a script that refused its input (non-zero exit, nothing else printed)."""
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    if prog:
        assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def kill_after_first_checkpoint(script, args, run_dir, timeout=300):
    """Start a training script as a user would, SIGKILL it as soon as its first final.pt exists (in
    the middle of a later epoch), and return the number of epochs that checkpoint holds."""
    import signal
    import subprocess
    import time

    import utils

    proc = subprocess.Popen([sys.executable, str(script), *map(str, args), "--out-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (run_dir / "final.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return utils.load_checkpoint(run_dir / "final.pt")["epoch"]


def adversarially_trained_small_cnn(epsilon, step_size, norm="linf"):
    """A small-cnn (width 8) trained for 3 epochs by PGD-AT (PGD-2 in the `norm` ball; epsilon and step size in
    [0, 1] units) on 2,000 synthetic images, seed 0, in eval mode without parameter gradients: an honest model
    for the attack and sanity tests (about 20 s)."""
    import torch
    import torch.nn.functional as F

    import evaluate as ev
    import utils

    utils.seed_everything(0)
    data = utils.load_dataset("synthetic", None)
    x_train, y_train = data.x_train[:2000], data.y_train[:2000]
    model = utils.build_model("small-cnn", 10, data.mean, data.std, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    epochs, batch = 3, 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=epochs * -(-len(x_train) // batch))
    for _ in range(epochs):
        order = torch.randperm(len(x_train))
        for i in range(0, len(x_train), batch):
            idx = order[i : i + batch]
            x, y = utils.to_float(utils.augment(x_train[idx])), y_train[idx]
            model.eval()
            x_adv = ev.pgd_attack(model, x, y, epsilon, step_size, 2, norm=norm)
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().requires_grad_(False), data
