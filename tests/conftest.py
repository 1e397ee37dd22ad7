import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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

