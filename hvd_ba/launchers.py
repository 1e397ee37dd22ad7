"""The command lines that start a run's ranks from a Python command: horovodrun on this machine
(demo, sweep, bench scaling, the tests), srun inside a Slurm allocation (sweep) and torchrun
(bench scaling's torch.distributed runs). Each starts `python -m hvd_ba <command> <args>` once
per rank with this interpreter. slurm/job.sh builds the batch jobs' own (launch_command).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from hvd_ba.config import ConfigError


def horovodrun_path() -> str:
    """The horovodrun of this interpreter's environment (venv/conda bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "horovodrun"
    if beside.is_file():
        return str(beside)
    found = shutil.which("horovodrun")
    if found is None:
        raise ConfigError("horovodrun not found: run `bash cluster/setup.sh` first")
    return found


def hvd_ba_command(rank_args: list[str], command: tuple[str, ...] = ("train",)) -> list[str]:
    """What each rank runs: this interpreter's `python -m hvd_ba <command> <rank_args>`."""
    return [sys.executable, "-m", "hvd_ba", *command, *rank_args]


def horovodrun_command(np: int, controller: str, rank_args: list[str], command: tuple[str, ...] = ("train",)
                       ) -> list[str]:
    """`horovodrun -np N` on this machine over Gloo (controller "gloo") or MPI ("mpi": Open MPI
    told to oversubscribe, not to bind, and as root that root may run it)."""
    cmd = [horovodrun_path(), "-np", str(np), "-H", f"localhost:{np}"]
    if controller == "gloo":
        cmd.append("--gloo")
    else:
        mpi_args = "--oversubscribe --bind-to none --map-by slot"
        if os.geteuid() == 0:
            mpi_args += " --allow-run-as-root"
        cmd += ["--mpi", f"--mpi-args={mpi_args}"]
    return cmd + hvd_ba_command(rank_args, command)


def srun_command(np: int, rank_args: list[str], command: tuple[str, ...] = ("train",)) -> list[str]:
    """`srun --ntasks=N` inside an allocation, as slurm/job.sh starts Horovod's ranks: PMIx, each
    task with the allocation's cores per task."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    return ["srun", f"--ntasks={np}", "--mpi=pmix", "--kill-on-bad-exit=1",
            *([f"--cpus-per-task={cpus}"] if cpus else []), *hvd_ba_command(rank_args, command)]


def torchrun_command(np: int, rank_args: list[str], command: tuple[str, ...] = ("train",)) -> list[str]:
    """torchrun (`python -m torch.distributed.run`) with N ranks on this machine; they meet on a
    free local port (--standalone)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={np}", "-m", "hvd_ba",
            *command, *rank_args]
