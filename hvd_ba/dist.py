"""The one module that knows how the ranks talk; the rest of hvd_ba calls these functions.

Two backends (run.backend): `horovod` (the default: Horovod over Gloo or MPI, its
DistributedOptimizer) and `torch` (torch.distributed: Gloo on CPUs, NCCL on GPUs, the model in
DistributedDataParallel), for sites where Horovod does not build: Horovod 0.28.1 (June 2023) is
its last release and builds against today's torch only patched (cluster/setup.sh). Only this
module imports either; nothing outside it asks which one runs.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import warnings

import torch
import torch.distributed as td
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from hvd_ba.cluster import Launch, launch_info, rendezvous
from hvd_ba.config import BACKENDS

_hvd = None  # horovod.torch, once initialised
_torch_world: Launch | None = None  # this rank under torch.distributed (None: not initialised)
_cpu_group = None  # torch backend on GPUs: a Gloo group for the collectives of CPU tensors and objects


class BackendError(RuntimeError):
    """The backend cannot start here (not installed, or started by the other backend's launcher);
    the message is one line that names it."""


def launcher_problem(backend: str, launch: Launch) -> str | None:
    """A backend started by a launcher that only the other one can join."""
    if backend == "torch" and launch.launcher == "horovodrun":
        return ("run.backend=torch, but horovodrun started this rank: horovodrun starts Horovod ranks; launch "
                "torch ranks with torchrun, srun or mpirun, or set run.backend=horovod")
    if backend == "horovod" and launch.launcher == "torchrun":
        return ("run.backend=horovod, but torchrun started this rank: Horovod ranks cannot join torchrun's "
                "rendezvous; set run.backend=torch, or launch with horovodrun, srun or mpirun")
    return None


def launched_backend(launch: Launch, env=None) -> str | None:
    """The backend a command without a training config (analyze, doctor, bench breakdown) joins
    under a launcher: HVD_BA_BACKEND when set (slurm/job.sh sets it from BACKEND), torch under
    torchrun, Horovod under horovodrun or an MPI launcher; None alone (and under a bare srun)."""
    env = os.environ if env is None else env
    if launch.launcher == "alone":
        return None
    if env.get("HVD_BA_BACKEND") in BACKENDS:
        return env["HVD_BA_BACKEND"]
    if launch.launcher == "torchrun":
        return "torch"
    return "horovod" if launch.launcher == "horovodrun" or launch.mpi else None


def init(stall_timeout: float | None = None, backend: str = "horovod", longest_wait: float = 0.0) -> None:
    """Start the backend; every rank calls it once, before any collective. `longest_wait`: the
    longest wait the ranks' watchdogs allow (run.checkpoint_timeout), which the backends'
    own shutdowns must not cut short."""
    if backend not in BACKENDS:
        raise BackendError(f"run.backend {backend!r}: must be one of {', '.join(BACKENDS)}")
    launch = launch_info()  # read before MPI starts: it may add variables of its own
    problem = launcher_problem(backend, launch)
    if problem:
        raise BackendError(problem)
    if backend == "torch":
        _init_torch(launch, stall_timeout, longest_wait)
    else:
        _init_horovod(launch, stall_timeout, longest_wait)


def _init_horovod(launch: Launch, stall_timeout: float | None, longest_wait: float = 0.0) -> None:
    """stall_timeout: Horovod's stall check warns (naming the ranks that did not submit a
    tensor) after min(60 s, stall_timeout), and shuts the job down after
    process_group_timeout(stall_timeout, longest_wait) (1 h at least), unless
    HOROVOD_STALL_CHECK_TIME_SECONDS / HOROVOD_STALL_SHUTDOWN_TIME_SECONDS are set already. The shutdown is the backstop of start-up (rank 0 listing a large folder
    while the others wait is legitimately long); during training the ranks' own watchdogs
    (hvd_ba/train/stop.py) end a stall first and name its cause."""
    global _hvd
    if stall_timeout is not None:
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, int(min(60.0, stall_timeout)))))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
                              str(int(process_group_timeout(stall_timeout, longest_wait))))
    try:
        import horovod.torch as hvd
    except ImportError as err:
        raise BackendError(f"run.backend=horovod needs Horovod, which does not import here ({err}); install it "
                           "with cluster/setup.sh, or train with run.backend=torch (torchrun, srun or mpirun)") from None

    hvd.init()
    _hvd = hvd
    problem = local_rank_problem(launch, hvd.rank(), hvd.local_rank())
    if problem:
        raise RuntimeError(problem)


def process_group_timeout(stall_timeout: float | None, longest_wait: float = 0.0) -> float:
    """Seconds a collective may wait (a torch.distributed one; Horovod's stall shutdown): the
    backstop of a long start-up, and longer than any wait the ranks' watchdogs allow (4 x
    stall_timeout, 1.5 x the checkpoint write's), so that they end a training stall first."""
    return max(3600.0, 4 * (stall_timeout or 0.0), 1.5 * longest_wait)


def _init_torch(launch: Launch, stall_timeout: float | None, longest_wait: float = 0.0) -> None:
    """torch.distributed from the launcher's variables: torchrun's, srun's or Open MPI's (rank,
    world, local rank), the master address and port from cluster.rendezvous. One rank alone
    starts no process group (no collective then runs, as without Horovod)."""
    global _torch_world, _cpu_group
    if launch.world <= 1:
        return
    address, port = rendezvous(launch)
    cuda = torch.cuda.is_available()
    if cuda:
        # NCCL: a failed or hung collective raises instead of hanging the rank (pytorch's
        # async error handling; its default since 2.2, set here for older ones and for clarity)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        # NCCL binds a communicator to the current device: the rank's own GPU before the first
        # collective (train/devices.py picks the same one, and checks it, right after)
        torch.cuda.set_device((launch.local_rank or 0) % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=process_group_timeout(stall_timeout, longest_wait))
    td.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{address}:{port}", rank=launch.rank,
                          world_size=launch.world, timeout=timeout)
    _torch_world = launch
    if cuda:
        _cpu_group = td.new_group(backend="gloo", timeout=timeout)


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
    if _torch_world is not None:
        return _torch_world.rank
    return _hvd.rank() if _hvd else 0


def size() -> int:
    if _torch_world is not None:
        return _torch_world.world
    return _hvd.size() if _hvd else 1


def local_rank() -> int:
    if _torch_world is not None:
        return _torch_world.local_rank or 0
    return _hvd.local_rank() if _hvd else 0


def local_size() -> int:
    if _torch_world is not None:
        return _torch_world.local_size or 1
    return _hvd.local_size() if _hvd else 1


def is_primary() -> bool:
    return rank() == 0


def _group(tensor: torch.Tensor | None = None):
    """torch backend: the group for a collective of `tensor` (None: of objects): NCCL's (the
    default) for GPU tensors, the Gloo group for CPU ones."""
    return None if tensor is not None and tensor.is_cuda else _cpu_group


# Collective names: a recurring collective keeps one name (calls are synchronous and in the same
# order on every rank); a name per step would fill Horovod's response cache and renegotiate.


def allreduce_sum(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """The sum over ranks, as a new tensor (`tensor` is left as it was)."""
    if _torch_world is not None:
        total = tensor.clone()
        td.all_reduce(total, op=td.ReduceOp.SUM, group=_group(total))
        return total
    if _hvd is None:
        return tensor
    return _hvd.allreduce(tensor, name=name, op=_hvd.Sum)


def allreduce_mean(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if _torch_world is not None:
        return allreduce_sum(tensor, name) / size()
    if _hvd is None:
        return tensor
    return _hvd.allreduce(tensor, name=name, op=_hvd.Average)


def barrier(name: str) -> None:
    """Wait for every rank (an allreduce of one number: it works over Gloo, MPI and NCCL alike)."""
    if _torch_world is not None:
        allreduce_sum(torch.zeros(1), name)
    elif _hvd is not None:
        _hvd.allreduce(torch.zeros(1), name=f"barrier.{name}", op=_hvd.Sum)


def broadcast_object(obj, name: str):
    """Rank 0's `obj` on every rank."""
    if _torch_world is not None:
        holder = [obj]
        td.broadcast_object_list(holder, src=0, group=_group())
        return holder[0]
    if _hvd is None:
        return obj
    return _hvd.broadcast_object(obj, root_rank=0, name=name)


def allgather_object(obj, name: str) -> list:
    if _torch_world is not None:
        every = [None] * size()
        td.all_gather_object(every, obj, group=_group())
        return every
    if _hvd is None:
        return [obj]
    return _hvd.allgather_object(obj, name=name)


def _broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """torch backend: rank 0's values into `tensors` in place, one broadcast per dtype and device."""
    kinds: dict = {}
    for t in tensors:
        kinds.setdefault((t.dtype, t.device), []).append(t)
    for same in kinds.values():
        flat = _flatten_dense_tensors(same)
        td.broadcast(flat, src=0, group=_group(flat))
        for t, value in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(value)


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: bool) -> None:
    """Make every rank start from rank 0's model (and, with `optimizer_state`, optimizer) state.

    Horovod: optimizer state first: broadcast_optimizer_state makes ranks with empty state take
    a step with zero gradients, which with weight decay would move their weights (horovod
    #2805); broadcasting the parameters afterwards overwrites any such drift. A fresh run passes
    optimizer_state=False: there is no state to share, and that zero-gradient step would leave
    weight decay in every momentum buffer. torch: rank 0's optimizer state_dict as an object,
    loaded as it is (no step). All ranks must pass the same flag.
    """
    if _torch_world is not None:
        if optimizer_state:
            held = optimizer.state_dict() if is_primary() else None
            if held is not None:
                held = {"state": {k: {n: v.cpu() if torch.is_tensor(v) else v for n, v in entry.items()}
                                  for k, entry in held["state"].items()}, "param_groups": held["param_groups"]}
            optimizer.load_state_dict(broadcast_object(held, "optimizer_state"))
        with torch.no_grad():
            _broadcast_tensors(list(model.state_dict().values()))
        return
    if _hvd is None:
        return
    if optimizer_state:
        _hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    _hvd.broadcast_parameters(model.state_dict(), root_rank=0)


def distributed_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, fp16_allreduce: bool = False,
                          adasum: bool = False, backward_passes_per_step: int = 1,
                          gradient_predivide_factor: float = 1.0) -> torch.optim.Optimizer:
    """Horovod: wrap an optimizer so that step() averages gradients across ranks with allreduce
    (the torch backend averages in the model's backward instead: distributed_model).

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


def distributed_model(model: torch.nn.Module, *, fp16_allreduce: bool = False) -> torch.nn.Module:
    """The module that training calls: under the torch backend the model in
    DistributedDataParallel (bucketed allreduce overlapped with the backward pass; buffers not
    broadcast: ghost BN statistics stay rank-local, evaluation averages them), with DDP's fp16
    compression hook for fp16_allreduce; else the model itself (Horovod averages in the optimizer)."""
    if _torch_world is None:
        return model
    device = next(model.parameters()).device
    with warnings.catch_warnings():
        # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, which would still
        # sync the buffers at construction; its warning says to keep broadcast_buffers=False
        # where buffers are rank-local (ghost BN running statistics are) until init_sync_buffers exists
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    if fp16_allreduce:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return ddp


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside what distributed_model (and torch.compile) made: what is saved."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def accumulating(model: torch.nn.Module, last: bool):
    """Context for one of several forward/backward passes of a step (ghost BN's accumulate form):
    under DDP no allreduce but after the `last` (no_sync), so one per step, as Horovod's
    backward_passes_per_step does in the optimizer; else nothing."""
    inner = getattr(model, "_orig_mod", model)
    if last or not isinstance(inner, DistributedDataParallel):
        return contextlib.nullcontext()
    return inner.no_sync()


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
    if _torch_world is not None:
        if not tensors:
            return []
        flat = _flatten_dense_tensors(tensors)
        wire = flat.half() if fp16 else flat.clone()
        td.all_reduce(wire, op=td.ReduceOp.SUM, group=_group(wire))
        mean = wire.to(flat.dtype) / size()
        return list(_unflatten_dense_tensors(mean, tensors))
    if _hvd is None:
        return tensors
    compression = _hvd.Compression.fp16 if fp16 else _hvd.Compression.none
    return _hvd.grouped_allreduce(tensors, op=_hvd.Average, name=name, compression=compression)


def horovod_build() -> dict:
    """What the installed Horovod was built with, without starting it (doctor): its version and
    whether its Gloo and MPI controllers and NCCL are built in. Raises what importing it raises."""
    import horovod
    import horovod.torch as hvd

    return {"version": horovod.__version__, "gloo": bool(hvd.gloo_built()), "mpi": bool(hvd.mpi_built()),
            "nccl": bool(hvd.nccl_built())}


def nccl_built() -> bool:
    """Whether GPU collectives use NCCL (False also without a backend initialised)."""
    if _torch_world is not None:
        return td.get_backend() == "nccl"
    return bool(_hvd is not None and _hvd.nccl_built())


def backend() -> str:
    """Which backend runs: horovod or torch (local: a single process without one)."""
    if _torch_world is not None:
        return "torch"
    return "horovod" if _hvd is not None else "local"


def controller() -> str:
    """How the ranks talk: Horovod's controller (gloo or mpi), or the torch.distributed
    backend (gloo or nccl); local: a single process without a backend."""
    if _torch_world is not None:
        return td.get_backend()
    if _hvd is None:
        return "local"
    return "gloo" if _hvd.gloo_enabled() else "mpi"


def another_rank_left(err: BaseException) -> bool:
    """Whether `err` is the symptom of another rank leaving first (or Horovod's stall shutdown),
    not a cause of its own: Horovod shut down, or a torch.distributed collective whose peer
    closed its connection."""
    text = str(err)
    if type(err).__name__ == "HorovodInternalError":
        return "shut down" in text
    if _torch_world is not None and isinstance(err, RuntimeError):
        return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                       "connection closed", "NCCL communicator was aborted"))
    return False


def shutdown() -> None:
    global _torch_world, _cpu_group
    if _torch_world is not None:
        td.destroy_process_group()
        _torch_world, _cpu_group = None, None
    if _hvd is not None:
        _hvd.shutdown()
