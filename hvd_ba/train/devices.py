"""Which device a rank trains on, and the checks that stop GPU work a rank cannot do well.

Pure functions of what the launcher and the driver say (tested on the CPU), and `select_device`,
which applies them: training, `bench breakdown` and the analyses all choose the same way.
"""
from __future__ import annotations

import os
import socket

import torch

from hvd_ba import dist
from hvd_ba.train.run_dir import RunRefused


class DeviceError(RunRefused):
    """A GPU setting that would make a run fail or crawl; the message says what to change."""


def gpu_index(local_rank: int, device_count: int, visible: str | None) -> int:
    """The CUDA device index of a rank: its local rank among the visible GPUs, or 0 when the
    launcher gives each task its own GPU (CUDA_VISIBLE_DEVICES of one entry, as Slurm's
    --gpus-per-task or --gpu-bind=single:1 do)."""
    if device_count < 1:
        raise DeviceError("no CUDA device visible")
    entries = [e for e in (visible or "").split(",") if e.strip()] if visible is not None else None
    if entries is not None and len(entries) == 1:
        return 0
    if device_count == 1:
        return 0
    if local_rank >= device_count:
        raise DeviceError(f"local rank {local_rank} but only {device_count} GPUs visible "
                          f"(CUDA_VISIBLE_DEVICES={visible!r}): start at most {device_count} ranks per node")
    return local_rank


def shared_gpus(assignments: list[tuple[str, str]]) -> str | None:
    """One line naming the ranks that share a GPU, from each rank's (host, GPU UUID); None when
    every rank has its own."""
    seen: dict[tuple[str, str], list[int]] = {}
    for rank, key in enumerate(assignments):
        seen.setdefault(tuple(key), []).append(rank)
    shared = [(key, ranks) for key, ranks in seen.items() if len(ranks) > 1]
    if not shared:
        return None
    (host, uuid), ranks = shared[0]
    return (f"ranks {', '.join(map(str, ranks))} on host {host} all use GPU {uuid}: give each rank its own GPU "
            "(one task per GPU: srun --gpus-per-task=1, or as many ranks per node as GPUs) — ranks sharing a "
            "GPU run at a fraction of its speed and may run out of its memory")


def nccl_problem(uses_cuda: bool, nccl_built: bool) -> str | None:
    if uses_cuda and not nccl_built:
        return ("this Horovod was built without NCCL: its allreduce of CUDA tensors copies them to the host every "
                "step; rebuild it on a GPU node (or with HVD_BA_GPU=1): bash cluster/setup.sh")
    return None


def select_device() -> torch.device:
    """The rank's CUDA GPU (gpu_index), or the CPU when there is none. Collective (either
    backend): the ranks' (host, GPU) pairs are gathered, and a rank sharing its GPU with another,
    or a GPU run on a Horovod without NCCL, stops every rank at start with one line."""
    host, device, mine = socket.gethostname(), torch.device("cpu"), None
    if torch.cuda.is_available():
        try:
            index = gpu_index(dist.local_rank(), torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            torch.cuda.set_device(index)
            device = torch.device("cuda", index)
            mine = str(getattr(torch.cuda.get_device_properties(index), "uuid", index))
        except (DeviceError, RuntimeError) as err:
            mine = DeviceError(f"rank {dist.rank()} on host {host}: {err}")
    # Every rank takes part in this one gather, whatever it found, so that a problem on some
    # ranks stops all of them with the same line (rank 0 prints it) instead of a hang.
    every = dist.allgather_object((host, str(mine) if isinstance(mine, Exception) else mine, device.type), name="gpus")
    problems = [text for _, text, kind in every if kind == "cpu" and text]
    kinds = {kind for _, _, kind in every}
    if not problems and kinds == {"cuda", "cpu"}:
        problems.append("some ranks see a GPU and others do not: " + ", ".join(
            f"rank {r} on {h}: {k}" for r, (h, _, k) in enumerate(every)))
    if not problems and device.type == "cuda":
        problems = [p for p in (shared_gpus([(h, u) for h, u, _ in every]),
                                nccl_problem(dist.size() > 1, dist.nccl_built())) if p]
    if problems:
        raise DeviceError("; ".join(problems))
    return device
