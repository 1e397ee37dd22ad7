"""The suite's tiers, their time limits, and the fixtures that several modules share. Helpers that
tests call live in helpers.py (imported first: it pins the suite to the CPU)."""
from pathlib import Path

import pytest

import helpers  # noqa: F401  (the CPU pinning happens at its import, before any test module's)

# Each test carries exactly one tier (a module's `pytestmark` where the file is one tier); the limit
# is each test's wall time in seconds (pytest-timeout) unless it asks for its own with
# @pytest.mark.timeout(seconds): a hang fails naming the test instead of eating CI's time.
TIERS = {
    "unit": ("in-process: no launcher, no CLI run (the quick tier, before every commit)", 120),
    "integration": ("launches processes: horovodrun, torchrun, mpirun, CLI runs, setup.sh", 600),
    "crash": ("the crash harness: a kill at every file operation of a run, then its resume", 1200),
    "slurm": ("the local Slurm (cluster/local_slurm.sh): root, runs alone", 1200),
}


def pytest_configure(config):
    for name, (what, _) in TIERS.items():
        config.addinivalue_line("markers", f"{name}: tier: {what}")
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU; skipped where none is")


def pytest_collection_modifyitems(config, items):
    wrong = []
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {tiers or 'no tier'}")
            continue
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIERS[tiers[0]][1]))
    if wrong:
        raise pytest.UsageError("each test needs exactly one tier marker (" + ", ".join(TIERS) + "):\n  "
                                + "\n  ".join(wrong))


# What a `unit` test must not start through subprocess or os.system: the interpreter (the CLI, a
# rank), a launcher, a shell, also behind a wrapper (env, taskset, nice, timeout). Libraries' own
# helpers (ctypes' ldconfig look-up) stay allowed, and so do the DataLoader's worker processes
# (multiprocessing: the loader's machinery, not a launch).
LAUNCHES = {"horovodrun", "torchrun", "mpirun", "mpiexec", "srun", "sbatch", "bash", "sh", "dash", "zsh"}


def launches(command) -> bool:
    """Whether a command line (a list, or a string for a shell) starts the interpreter, a
    launcher or a shell anywhere in it."""
    import os
    import re
    import shlex
    import sys

    if isinstance(command, (str, bytes)):
        text = os.fsdecode(command)
        try:
            words = shlex.split(text)
        except ValueError:
            words = text.split()
    else:
        words = [os.fsdecode(w) if isinstance(w, bytes) else str(w) for w in command]
    python = {os.path.realpath(sys.executable), sys.executable}
    return any(w in python or os.path.realpath(w) in python or os.path.basename(w) in LAUNCHES
               or re.fullmatch(r"python[\d.]*", os.path.basename(w)) for w in words)


@pytest.fixture(autouse=True)
def unit_tests_start_no_process(request, monkeypatch):
    """A `unit` test that starts the interpreter, a launcher or a shell (subprocess, os.system,
    os.popen) fails naming the command: it belongs to the integration tier."""
    if request.node.get_closest_marker("unit") is None:
        return
    import os
    import subprocess

    init = subprocess.Popen.__init__

    def refuse(command):
        raise AssertionError(f"a unit test started a process ({command!r}): mark it integration")

    def guarded_popen(self, args, *rest, **kwargs):
        if launches(args) or (kwargs.get("shell") and isinstance(args, (str, bytes)))\
                or (kwargs.get("executable") is not None and launches([kwargs["executable"]])):
            refuse(args)
        init(self, args, *rest, **kwargs)

    def guarded_system(command):
        refuse(command)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_popen)
    monkeypatch.setattr(os, "system", guarded_system)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A small synthetic ImageNet-layout set: 4 classes, 48 train + 12 val JPEGs each."""
    from hvd_ba.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("data") / "small"
    make_dataset(root, num_classes=4, train_per_class=48, val_per_class=12, seed=1)
    return root


# One completed run of helpers.ONE_EPOCH (6 steps, checkpoints at steps 2, 4 and 6, the newest 2
# kept), built once for the tests that only start from a finished run (refused resumes, a fresh
# start over it, start-up signals, a corrupted checkpoint). A test reads it, or copies it
# (shutil.copytree into its tmp_path) before it launches into it or changes it.
@pytest.fixture(scope="session")
def two_rank_run(small_data, tmp_path_factory) -> Path:
    """A completed 2-rank Horovod (Gloo, horovodrun) run of ONE_EPOCH."""
    from helpers import ONE_EPOCH, launch

    out = tmp_path_factory.mktemp("two_rank_run") / "run"
    r = launch("gloo", small_data, out, settings=ONE_EPOCH)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def one_rank_run(small_data, tmp_path_factory) -> Path:
    """A completed run of ONE_EPOCH by one rank started without a launcher (helpers.train_alone)."""
    from helpers import ONE_EPOCH, train_alone

    out = tmp_path_factory.mktemp("one_rank_run") / "run"
    r = train_alone(small_data, out, ONE_EPOCH)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out
