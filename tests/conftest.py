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


@pytest.fixture(scope="session")
def root():
    return ROOT


def run_script(script, *args, cwd=None, env=None, timeout=600):
    """Run a project script as a user would (no shell), returning the CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, TQDM_DISABLE="1", **(env or {}))
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
