"""The one module that imports Horovod; the rest of hvd_ba calls these functions.

Keeping every collective here leaves room for a second backend (torch.distributed) later, since
Horovod 0.28.1 (June 2023) is its last release and builds against today's torch only patched
(README, "Two commands on a fresh machine": cluster/setup.sh).
"""
from __future__ import annotations

import os

import torch

from hvd_ba.cluster import Launch, launch_info

_hvd = None


def init(stall_timeout: float | None = None) -> None:
    """Start Horovod. stall_timeout: Horovod's stall check warns (naming the ranks that did not
    submit a tensor) after min(60 s, stall_timeout), and shuts the job down after
    max(3600 s, 4 x stall_timeout), unless HOROVOD_STALL_CHECK_TIME_SECONDS /
    HOROVOD_STALL_SHUTDOWN_TIME_SECONDS are set already. The shutdown is the backstop of start-up
    (rank 0 listing a large folder while the others wait is legitimately long); during training
    the ranks' own watchdogs (hvd_ba/train/stop.py) end a stall first and name its cause."""
    global _hvd
    launch = launch_info()  # read before MPI starts: it may add variables of its own
    if stall_timeout is not None:
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, int(min(60.0, stall_timeout)))))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(max(3600.0, 4 * stall_timeout))))
    import horovod.torch as hvd

    hvd.init()
    _hvd = hvd
    problem = local_rank_problem(launch, hvd.rank(), hvd.local_rank())
    if problem:
        raise RuntimeError(problem)


LOCAL_RANK_VARIABLE = {"srun": "SLURM_LOCALID", "mpirun": "OMPI_COMM_WORLD_LOCAL_RANK", "mpi": "MPI_LOCALRANKID",
                       "horovodrun": "HOROVOD_LOCAL_RANK"}


def local_rank_problem(launch: Launch, rank: int, local_rank: int) -> str | None:
    """hvd.local_rank() can be wrong with mixed MPI installs (horovod #515, #3949): it is checked
    against the local rank of the launcher that started this process (not against SLURM_LOCALID
    alone: the ranks that mpirun forks inherit its daemon's srun task variables)."""
    if launch.local_rank is None or launch.launcher == "alone" or launch.local_rank == local_rank:
        return None
    return (f"rank {rank}: Horovod local rank {local_rank} != {LOCAL_RANK_VARIABLE[launch.launcher]} "
            f"{launch.local_rank} of {launch.launcher}, the launcher that started it; Horovod and "
            f"{launch.launcher} disagree (mixed MPI installs?)")


def rank() -> int:
    return _hvd.rank() if _hvd else 0


def size() -> int:
    return _hvd.size() if _hvd else 1


def local_rank() -> int:
    return _hvd.local_rank() if _hvd else 0


def local_size() -> int:
    return _hvd.local_size() if _hvd else 1


def is_primary() -> bool:
    return rank() == 0


# Collective names: a recurring collective keeps one name (calls are synchronous and in the same
# order on every rank); a name per step would fill Horovod's response cache and renegotiate.


def allreduce_sum(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if _hvd is None:
        return tensor
    return _hvd.allreduce(tensor, name=name, op=_hvd.Sum)


def allreduce_mean(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if _hvd is None:
        return tensor
    return _hvd.allreduce(tensor, name=name, op=_hvd.Average)


def barrier(name: str) -> None:
    """Wait for every rank (an allreduce of one number: it works over Gloo and MPI alike)."""
    if _hvd is not None:
        _hvd.allreduce(torch.zeros(1), name=f"barrier.{name}", op=_hvd.Sum)


def broadcast_object(obj, name: str):
    """Rank 0's `obj` on every rank."""
    if _hvd is None:
        return obj
    return _hvd.broadcast_object(obj, root_rank=0, name=name)


def allgather_object(obj, name: str) -> list:
    if _hvd is None:
        return [obj]
    return _hvd.allgather_object(obj, name=name)


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: bool) -> None:
    """Make every rank start from rank 0's model (and, with `optimizer_state`, optimizer) state.

    Optimizer state first: broadcast_optimizer_state makes ranks with empty state take a step
    with zero gradients, which with weight decay would move their weights (horovod #2805);
    broadcasting the parameters afterwards overwrites any such drift. A fresh run passes
    optimizer_state=False: there is no state to share, and that zero-gradient step would leave
    weight decay in every momentum buffer. All ranks must pass the same flag.
    """
    if _hvd is None:
        return
    if optimizer_state:
        _hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    _hvd.broadcast_parameters(model.state_dict(), root_rank=0)


def distributed_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, fp16_allreduce: bool = False,
                          adasum: bool = False, backward_passes_per_step: int = 1,
                          gradient_predivide_factor: float = 1.0) -> torch.optim.Optimizer:
    """Wrap an optimizer so that step() averages gradients across ranks with allreduce.

    fp16_allreduce: compress gradients to fp16 on the wire; adasum: Adasum reduction instead of
    averaging; backward_passes_per_step: local backward passes accumulated before each allreduce;
    gradient_predivide_factor: split the averaging into a division before and after the sum.
    """
    if _hvd is None:
        return optimizer
    return _hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(),
        compression=_hvd.Compression.fp16 if fp16_allreduce else _hvd.Compression.none,
        op=_hvd.Adasum if adasum else _hvd.Average,
        backward_passes_per_step=backward_passes_per_step,
        gradient_predivide_factor=gradient_predivide_factor,
    )


def optimizer_step(optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """optimizer.step(), with the Horovod + AMP order when a GradScaler is used: finish the
    allreduce, unscale, then step without a second synchronisation (horovod #1089, #3160)."""
    if scaler is None:
        optimizer.step()
        return
    if _hvd is not None:
        optimizer.synchronize()
        scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
    else:
        scaler.step(optimizer)
    scaler.update()


def grouped_allreduce_average(tensors: list[torch.Tensor], name: str, fp16: bool = False) -> list[torch.Tensor]:
    """The mean over ranks of each tensor, in one grouped (fused) allreduce, as DistributedOptimizer
    sends gradients; fp16: compressed to fp16 on the wire."""
    if _hvd is None:
        return tensors
    compression = _hvd.Compression.fp16 if fp16 else _hvd.Compression.none
    return _hvd.grouped_allreduce(tensors, op=_hvd.Average, name=name, compression=compression)


def nccl_built() -> bool:
    """Whether Horovod's GPU operations use NCCL (False also without Horovod initialised)."""
    return bool(_hvd is not None and _hvd.nccl_built())


def controller() -> str:
    """How the ranks talk: gloo or mpi (local: a single process without Horovod)."""
    if _hvd is None:
        return "local"
    return "gloo" if _hvd.gloo_enabled() else "mpi"


def shutdown() -> None:
    if _hvd is not None:
        _hvd.shutdown()
