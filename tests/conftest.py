import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The suite means the CPU (its references, tolerances and timings are CPU ones): every process it
# starts, and this one, sees no GPU, so that it passes on a GPU machine too. Tests that need the
# GPU are marked `gpu` and give their subprocesses GPU_ENV (the machine's own setting).
GPU_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")
GPU_ENV = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | (
    {"CUDA_VISIBLE_DEVICES": GPU_VISIBLE} if GPU_VISIBLE is not None else {})
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU; skipped where none is")


def has_gpu() -> bool:
    import shutil

    if shutil.which("nvidia-smi") is None:
        return False
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, env=GPU_ENV)
    return r.returncode == 0 and "GPU" in r.stdout


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A small synthetic ImageNet-layout set: 4 classes, 48 train + 12 val JPEGs each."""
    from hvd_ba.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("data") / "small"
    make_dataset(root, num_classes=4, train_per_class=48, val_per_class=12, seed=1)
    return root


def run_cli(*args, timeout=120, env_extra=None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "hvd_ba", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", ROOT), env=env, **kwargs)

