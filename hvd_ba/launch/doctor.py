"""`python -m hvd_ba doctor`: what this node has for a run, in one screen.

Each check reports its own failure and never raises: a broken environment (Horovod that does not
import, no MPI, a CPU-only torch on a GPU node) is described, not crashed on. Under a launcher
every rank checks and rank 0 prints one table. The exit status is 1 when a problem would make a
run fail or crawl (a FAIL line), 0 otherwise (WARN lines are advice).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

from hvd_ba.cluster import compact, cores_per_task, cpu_mask, loader_split, rank_cores, usable_cores
from hvd_ba.config import derive
from hvd_ba.fsio import free_bytes

OK, WARN, FAIL = "ok", "WARN", "FAIL"


def _check(name, fn) -> tuple[str, str, str]:
    try:
        level, text = fn()
    except Exception as err:  # a check that breaks reports itself
        level, text = FAIL, f"the check itself failed: {type(err).__name__}: {err}"
    return name, level, text


def check_python():
    return OK, f"{sys.version.split()[0]} at {sys.executable}"


def check_torch():
    import torch

    cuda = torch.version.cuda
    text = f"torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU-only build'})"
    if torch.cuda.is_available():
        names = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                 for i in range(torch.cuda.device_count())]
        return OK, f"{text}; GPUs: {', '.join(names)}"
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return OK, f"{text}; GPUs hidden on purpose (CUDA_VISIBLE_DEVICES is empty)"
    listed = ""
    if cuda and shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        listed = r.stdout if r.returncode == 0 else ""
    if "GPU" in listed:
        return FAIL, f"{text}, but CUDA is not available although nvidia-smi lists GPUs: check the driver"
    return OK, f"{text}; no GPU visible"


def check_horovod(cfg=None):
    try:
        from hvd_ba import dist

        built = dist.horovod_build()
    except Exception as err:
        if cfg is not None and cfg.run.backend == "torch":
            return OK, f"does not import ({type(err).__name__}); not needed: run.backend=torch"
        return FAIL, (f"horovod does not import ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                      "run bash cluster/setup.sh, or train with run.backend=torch")
    controllers = ", ".join(c for c in ("gloo", "mpi") if built[c])
    parts = [f"horovod {built['version']}", "frameworks: PyTorch", f"controllers: {controllers or 'none'}",
             f"NCCL: {'yes' if built['nccl'] else 'no'}"]
    import torch

    if torch.cuda.is_available() and not built["nccl"]:
        return FAIL, "; ".join(parts) + ": GPU tensors would be copied to the host every step; rebuild on this node " \
                                        "(bash cluster/setup.sh) or with HVD_BA_GPU=1"
    if not (built["gloo"] or built["mpi"]):
        return FAIL, "; ".join(parts) + ": no controller built"
    return OK, "; ".join(parts)


def check_pillow():
    import PIL
    from PIL import features

    simd = ".post" in PIL.__version__
    turbo = features.check_feature("libjpeg_turbo")
    text = f"{'pillow-simd' if simd else 'pillow'} {PIL.__version__}, libjpeg-turbo: {'yes' if turbo else 'no'}"
    if not features.check("jpg"):
        return FAIL, text + ": no JPEG support"
    if not simd:
        return WARN, text + ": plain pillow decodes and resizes slower; bash cluster/setup.sh installs pillow-simd"
    return OK, text


def check_mpi():
    path = shutil.which("mpirun")
    if path is None:
        return WARN, "no mpirun on PATH (needed for LAUNCHER=mpirun and Horovod's MPI controller; load the MPI module)"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    return OK, f"{(out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else path}"


def check_slurm():
    keys = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK", "SLURM_LOCALID",
            "SLURM_STEP_ID", "CUDA_VISIBLE_DEVICES")
    found = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    return OK, ", ".join(found) if found else "not inside a Slurm job"


def check_cores():
    mask = cpu_mask()
    n, total = len(mask), os.cpu_count() or 1  # total: the node's cores, not this process's mask
    per_task = cores_per_task()
    text = f"{n} of the node's {total} cores (CPU mask {compact(mask)})"
    if per_task and n < per_task:
        return WARN, (text + f": Slurm allocated {per_task} per task (SLURM_CPUS_PER_TASK); since Slurm 22.05 srun "
                      "needs --cpus-per-task or SRUN_CPUS_PER_TASK to give them")
    return OK, text


def budget(cfg, local_ranks: int) -> tuple[int, int, int]:
    """(cores, threads, loader workers) of this rank, derived as training derives them."""
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    n = rank_cores(cpu_mask(), local_ranks, cores_per_task())
    return (n, *loader_split(n, cfg.run.threads, cfg.data.workers, gpu))


def check_budget(cfg, local_ranks: int):
    """Threads and loader workers a config would use against this rank's cores."""
    n, threads, workers = budget(cfg, local_ranks)
    text = f"run.threads {threads} + data.workers {workers} on {n} cores"
    if threads + workers > usable_cores():
        return WARN, text + ": more busy processes than cores, they will contend; lower data.workers or run.threads"
    return OK, text


def check_shm(cfg, local_ranks: int):
    """/dev/shm against the batches the loader workers keep in flight (uint8 copies)."""
    if not os.path.isdir("/dev/shm"):
        return WARN, "no /dev/shm: loader workers cannot share batches"
    free = free_bytes("/dev/shm")
    d, a = cfg.data, cfg.augment
    batch = derive(cfg, 1).samples_per_rank * a.size * a.size * 3
    in_flight = batch * max(1, budget(cfg, local_ranks)[2]) * d.prefetch
    text = f"/dev/shm {free / 2**30:.1f} GiB free; batches in flight {in_flight / 2**20:.0f} MiB per rank"
    if in_flight > free:
        return FAIL, text + ": loader workers will die with a bus error; lower data.workers or data.prefetch"
    if in_flight > free / 2:
        return WARN, text + ": over half of it (several ranks per node share it)"
    return OK, text


def node_report(cfg, local_ranks: int) -> list[tuple[str, str, str]]:
    checks = [("python", check_python), ("torch", check_torch), ("horovod", lambda: check_horovod(cfg)),
              ("pillow", check_pillow), ("mpi", check_mpi), ("slurm", check_slurm), ("cores", check_cores)]
    if cfg is not None:
        checks += [("threads", lambda: check_budget(cfg, local_ranks)), ("shm", lambda: check_shm(cfg, local_ranks))]
    return [_check(name, fn) for name, fn in checks]


def run_doctor(args) -> int:
    from hvd_ba.cluster import bind_rank, launch_rank
    from hvd_ba.config import load_config

    cfg = None
    if args.config:
        cfg = load_config(args.config, args.set)
    rank, world = launch_rank()
    if cfg is not None:
        bind_rank(cfg.run.bind)  # as a training rank would, before any thread starts
    gathered = None
    if world > 1:  # under a launcher: every rank checks, rank 0 prints them all
        try:
            from hvd_ba import dist

            from hvd_ba.cluster import launch_info

            dist.init(backend=dist.launched_backend(launch_info()) or "horovod")
            report = node_report(cfg, dist.local_size())
            gathered = dist.allgather_object((socket.gethostname(), dist.rank(), report), name="doctor")
            rank = dist.rank()
        except Exception as err:
            print(f"hvd_ba doctor: rank {rank}: the ranks could not gather ({type(err).__name__}: {err}); "
                  "this rank's own report follows", file=sys.stderr)
    if gathered is None:
        gathered = [(socket.gethostname(), rank, node_report(cfg, 1))]
    worst = FAIL if any(level == FAIL for _, _, r in gathered for _, level, _ in r) else OK
    if rank == 0 or len(gathered) == 1:
        for host, r, report in gathered:
            print(f"== rank {r} on {host}")
            for name, level, text in report:
                print(f"  {level:4} {name:8} {text}")
        problems = sum(level == FAIL for _, _, r in gathered for _, level, _ in r)
        print(f"doctor: {problems} problem(s) that would make a run fail or crawl" if problems
              else "doctor: nothing that would stop a run")
    return 1 if worst == FAIL else 0
