"""Slurm facts for the launchers: host lists, tasks per node, and which rank this process is.

`python -m hvd_ba hosts` turns a job's SLURM_JOB_NODELIST / SLURM_TASKS_PER_NODE into the
`-H host:slots,...` list of horovodrun (or an Open MPI hostfile). The expansion follows
`scontrol show hostnames`: comma-separated items, each with any number of bracket groups of
numbers and ranges (`node[01-04,07]`, `rack[1-2]-gpu[1-2]`, first group outermost), zero
padding kept from the range's first number. Plain Python rather than a `scontrol` call: it must
run where the launcher runs, which can be a node without Slurm's commands, and it is tested
against many forms.
"""
from __future__ import annotations

import itertools
import os
import re


class HostListError(ValueError):
    """A host list or tasks-per-node string that does not parse; the message names it."""


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets; reject unbalanced or nested brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostListError(f"host list {text!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostListError(f"host list {text!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise HostListError(f"host list {text!r}: '[' is never closed")
    items.append(text[start:])
    return items


def _expand_group(body: str, whole: str) -> list[str]:
    """'01-04,07' -> ['01', '02', '03', '04', '07']."""
    values = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise HostListError(f"host list {whole!r}: {part!r} in [{body}] is not a number or a range lo-hi")
        lo_text, hi_text = m.group(1), m.group(2)
        if hi_text is None:
            values.append(lo_text)
            continue
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise HostListError(f"host list {whole!r}: range {part!r} runs backwards")
        width = len(lo_text)
        values += [str(n).zfill(width) for n in range(lo, hi + 1)]
    return values


def expand_hostlist(text: str) -> list[str]:
    """Every host of a Slurm host list, in Slurm's order (duplicates kept, as Slurm does)."""
    text = (text or "").strip()
    if not text:
        raise HostListError("host list is empty (is SLURM_JOB_NODELIST set? run inside a Slurm job)")
    hosts = []
    for item in _split_top(text):
        if not item:
            raise HostListError(f"host list {text!r}: empty host name (two commas, or a trailing comma)")
        pieces = re.split(r"(\[[^\]]*\])", item)
        choices = []
        for piece in pieces:
            if piece.startswith("["):
                if piece == "[]":
                    raise HostListError(f"host list {text!r}: empty brackets in {item!r}")
                choices.append(_expand_group(piece[1:-1], text))
            elif piece:
                if not re.fullmatch(r"[A-Za-z0-9._-]+", piece):
                    raise HostListError(f"host list {text!r}: {piece!r} in {item!r} is not a host name")
                choices.append([piece])
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE (or SLURM_JOB_CPUS_PER_NODE) form '2(x3),1' -> [2, 2, 2, 1]."""
    text = (text or "").strip()
    if not text:
        raise HostListError("tasks per node is empty (is SLURM_TASKS_PER_NODE set? run inside a Slurm job)")
    counts = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise HostListError(f"tasks per node {text!r}: {part!r} is not N or N(xK)")
        n, repeat = int(m.group(1)), int(m.group(2) or 1)
        if n < 1 or repeat < 1:
            raise HostListError(f"tasks per node {text!r}: {part!r} gives no tasks")
        counts += [n] * repeat
    return counts


def slots(nodelist: str, tasks_per_node: str) -> list[tuple[str, int]]:
    """[(host, tasks)] of a job; the two strings must describe the same number of nodes."""
    hosts, counts = expand_hostlist(nodelist), expand_tasks_per_node(tasks_per_node)
    if len(counts) == 1 and len(hosts) > 1:
        counts *= len(hosts)  # '4' alone: every node
    if len(hosts) != len(counts):
        raise HostListError(f"host list {nodelist!r} has {len(hosts)} hosts but tasks per node "
                            f"{tasks_per_node!r} gives {len(counts)} counts")
    return list(zip(hosts, counts))


def check_tasks(host_slots: list[tuple[str, int]], np: int) -> None:
    total = sum(n for _, n in host_slots)
    if np < 1:
        raise HostListError(f"-np {np}: need at least one task")
    if np > total:
        listing = ",".join(f"{h}:{n}" for h, n in host_slots)
        raise HostListError(f"{np} tasks requested but the hosts have only {total} slots ({listing}); "
                            "ask Slurm for more tasks (--ntasks / --ntasks-per-node) or lower -np")


def horovod_hosts(host_slots: list[tuple[str, int]]) -> str:
    """horovodrun's -H value."""
    return ",".join(f"{h}:{n}" for h, n in host_slots)


def mpi_hostfile(host_slots: list[tuple[str, int]]) -> str:
    """An Open MPI hostfile."""
    return "".join(f"{h} slots={n}\n" for h, n in host_slots)


def launch_rank() -> tuple[int, int]:
    """(rank, world) of this process as its launcher set them, without initialising Horovod:
    horovodrun (HOROVOD_RANK), Open MPI's mpirun (OMPI_COMM_WORLD_RANK), PMIx (PMIX_RANK with
    the size from mpi4py), srun (SLURM_PROCID / SLURM_NTASKS); (0, 1) when started alone."""
    env = os.environ
    for rank_key, size_key in (("HOROVOD_RANK", "HOROVOD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                               ("PMI_RANK", "PMI_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in env and size_key in env:
            return int(env[rank_key]), int(env[size_key])
    return 0, 1
