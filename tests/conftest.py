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
    "slurm": ("the local Slurm (cluster/local_slurm.sh): root, runs alone", 900),
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


# What a `unit` test must not start: the interpreter (the CLI, a rank), a launcher, a shell.
# Libraries' own helpers (ctypes' ldconfig look-up) stay allowed.
LAUNCHES = {"python", "python3", "horovodrun", "torchrun", "mpirun", "mpiexec", "srun", "sbatch", "bash", "sh"}


@pytest.fixture(autouse=True)
def unit_tests_start_no_process(request, monkeypatch):
    """A `unit` test that starts a process (the CLI, a launcher, a shell) fails naming it: it
    belongs to the integration tier."""
    if request.node.get_closest_marker("unit") is None:
        return
    import os
    import subprocess
    import sys

    init = subprocess.Popen.__init__

    def refuse(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        program = os.path.basename(str(argv[0]).split()[0]) if argv else ""
        if program in LAUNCHES or str(argv[0]) == sys.executable:
            raise AssertionError(f"a unit test started a process ({argv!r}): mark it integration")
        init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A small synthetic ImageNet-layout set: 4 classes, 48 train + 12 val JPEGs each."""
    from hvd_ba.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("data") / "small"
    make_dataset(root, num_classes=4, train_per_class=48, val_per_class=12, seed=1)
    return root
