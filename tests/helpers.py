"""What the test modules share, in one place (no test module imports another): the repository and
the ranks' environment, the settings of the short runs, launching ranks (horovodrun, torchrun, one
rank alone, the CLI), finding and killing their processes, and comparing a run with a reference
under named tolerances."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

# The suite means the CPU (its references, tolerances and timings are CPU ones): every process it
# starts, and this one, sees no GPU, so that it passes on a GPU machine too. Tests that need the
# GPU are marked `gpu` and give their subprocesses GPU_ENV (the machine's own setting). conftest.py
# imports this module first, so this holds before any test module is imported.
GPU_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")
GPU_ENV = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | (
    {"CUDA_VISIBLE_DEVICES": GPU_VISIBLE} if GPU_VISIBLE is not None else {})
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Every process the suite starts runs this checkout, with a Horovod stall shutdown well inside the
# tests' own time limits.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "120"}

# ------------------------------------------------------------------------------ tolerances
# A resumed run against the uninterrupted run of the same backend: the same operations in the same
# order, so the same numbers up to the float32 rounding of the per-epoch sums.
SAME_RUN = 1e-6
# Horovod against torch.distributed (DDP), and either against the one process that averages the
# ranks' losses itself: the gradients are summed in another order (one allreduce per tensor or per
# bucket, the ghost groups in one backward or two); 3 steps of SGD with momentum grow that float32
# rounding to a few 1e-6.
OTHER_SUMMATION = 1e-5
# The per-epoch metrics (mean loss, top-1) of two runs, summed in float32 over 12 steps.
EPOCH_METRICS = 1e-5

# ------------------------------------------------------------------------------ settings
# 192 training images (the small_data fixture), 2 ranks x 8 unique images: 12 steps per epoch.
TRAIN_SETTINGS = [
    "data.copies=2", "data.unique_batch=8", "data.workers=1", "model.ghost_size=16",
    "optim.epochs=10", "optim.warmup_epochs=0", "optim.base_lr=0.32", "optim.milestones=[]",
    "run.log_every=4", "run.record_reads=true",
    # near-fixed crops: the loss must fall within a few dozen steps on 192 images
    "augment.scale=[0.9, 1.0]", "augment.hflip=0.0",
]
# The resume scenarios: 2 epochs of 6 steps, a checkpoint every 2 steps, the newest 2 kept.
RUN = ["data.workers=1", "data.copies=2", "data.unique_batch=8", "model.ghost_size=16", "optim.epochs=2",
       "optim.warmup_epochs=0.5", "optim.base_lr=0.8", "optim.milestones=[1.5]", "run.max_steps_per_epoch=6",
       "run.log_every=1", "run.checkpoint_every=2", "run.keep_checkpoints=2"]
ONE_EPOCH = [*RUN, "optim.epochs=1"]
# A rank frozen after step 3 is met by its peers in a step's allreduce, not in a checkpoint's or
# an epoch end's collective (with checkpoints every 2 steps a frozen rank may have finished step
# 4's allreduce, and the watchdog then names the checkpoint of step 4).
NO_COLLECTIVE_BUT_STEPS = ["run.checkpoint_every=null", "run.max_steps_per_epoch=12"]
# The proof that 2 ranks equal 1. Peak LR 0.05 (0.8 x 16 / 256): at 0.1 the third step of this data
# order is ill-conditioned (the loss jumps from 1.30 to 2.11) and amplifies the fp32 rounding
# difference of summing the ghost groups' gradients in one backward or two (1e-6 after 2 steps) to 7e-4.
PROOF = ["data.workers=0", "data.copies=4", "data.unique_batch=8", "model.ghost_size=16", "optim.epochs=1",
         "optim.warmup_epochs=0.5", "optim.base_lr=0.8", "optim.momentum=0.9", "optim.nesterov=true",
         "run.record_reads=false", "augment.scale=[0.25, 1.0]", "augment.hflip=0.5"]
TORCH = ["run.backend=torch"]
BACKENDS = ["horovod", "torch"]


def has_gpu() -> bool:
    import shutil

    if shutil.which("nvidia-smi") is None:
        return False
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, env=GPU_ENV)
    return r.returncode == 0 and "GPU" in r.stdout


def read_jsonl(path) -> list[dict]:
    from hvd_ba.train.records import read_jsonl as read

    return read(path)


# ------------------------------------------------------------------------------ launching
def run_cli(*args, timeout=120, env_extra=None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m hvd_ba ARGS` in a fresh process of this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "hvd_ba", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kwargs.pop("cwd", ROOT), env=env, **kwargs)


def cli(*args) -> subprocess.CompletedProcess:
    """`python -m hvd_ba ARGS` in this process (hvd_ba.__main__.main), for commands whose process
    boundary is not what a test tests (help, the config's refusals, plan): its exit status and
    what it printed, as run_cli gives them."""
    import contextlib
    import io

    from hvd_ba.__main__ import main

    import faulthandler

    if not faulthandler.is_enabled():  # main() would enable it on the StringIO below, which has no fd
        faulthandler.enable()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:  # argparse: --help (0) and usage errors (2)
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return subprocess.CompletedProcess(["hvd_ba", *map(str, args)], code or 0, out.getvalue(), err.getvalue())


def train_command(controller: str, data, out, extra=(), preset="demo", settings=None) -> list[str]:
    """`horovodrun -np 2 ... python -m hvd_ba train`, built as the demo builds it."""
    from hvd_ba.launchers import horovodrun_command

    settings = TRAIN_SETTINGS if settings is None else settings
    return horovodrun_command(2, controller, ["--config", preset, "--set", f"data.path={data}",
                                              f"run.out_dir={out}", *settings, *extra])


def torch_command(data, out, settings, ranks=2) -> list[str]:
    """`torchrun --standalone --nproc_per_node 2 -m hvd_ba train ...` (torchrun of this Python)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
            "hvd_ba", "train", "--config", "demo", "--set", f"data.path={data}", f"run.out_dir={out}", *TORCH,
            *settings]


def backend_command(backend: str, data, out, settings) -> list[str]:
    """Two ranks of `backend`: horovodrun over Gloo, or torchrun."""
    if backend == "torch":
        return torch_command(data, out, settings)
    return train_command("gloo", data, out, settings=settings)


def launch(controller: str, data, out, extra=(), preset="demo", settings=None) -> subprocess.CompletedProcess:
    """A horovodrun job to its end."""
    return subprocess.run(train_command(controller, data, out, extra, preset, settings), capture_output=True,
                          text=True, timeout=400, env=ENV, cwd=ROOT)


def short_run(data, out, *extra):
    """A 2-rank Horovod run of one epoch of 6 steps; its epoch records and both ranks' rank<i>.json."""
    settings = ["optim.epochs=1", "run.max_steps_per_epoch=6", *extra]
    r = launch("gloo", data, out, extra=settings)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return read_jsonl(out / "metrics.jsonl"), [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]


def torchrun(data, out, settings, env=None, timeout=400) -> subprocess.CompletedProcess:
    """A torchrun job to its end."""
    return subprocess.run(torch_command(data, out, settings), capture_output=True, text=True, timeout=timeout,
                          env=env or ENV, cwd=ROOT)


def run_backend(backend: str, data, out, settings, timeout=400) -> subprocess.CompletedProcess:
    """A 2-rank job of `backend` to its end."""
    return subprocess.run(backend_command(backend, data, out, settings), capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def start(backend: str, data, out, settings) -> subprocess.Popen:
    """A 2-rank job of `backend` in the background, stdout and stderr merged."""
    return subprocess.Popen(backend_command(backend, data, out, settings), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)


def train_alone(data, out, settings, extra=(), timeout=180, env_extra=None) -> subprocess.CompletedProcess:
    """One rank started without a launcher (a world of 1)."""
    return run_cli("train", "--config", "demo", "--set", f"data.path={data}", f"run.out_dir={out}", *settings, *extra,
                   timeout=timeout, env_extra=env_extra)


def wait_for_step(out, step, proc, timeout=240) -> int:
    """Wait until the run in `out` has recorded `step` (run.log_every=1); the launcher must live."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = read_jsonl(out / "steps.jsonl") if (out / "steps.jsonl").exists() else []
        if steps and steps[-1]["step"] >= step:
            return steps[-1]["step"]
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def side_by_side(*calls):
    """Run the zero-argument callables two at a time (this machine's 2 cores) and return their
    results in order. For independent runs whose outcome does not depend on the load (their
    thread counts are fixed by their settings or their CPU mask, not by the time they take): most
    of a short run is start-up and shut-down latency, which two runs overlap."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=2)
    try:
        return list(pool.map(lambda call: call(), calls))
    finally:  # a failure or the test's time limit does not wait for the other call (it cleans up itself)
        pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------ processes
def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it, and wait until all are gone (a killed
    rank not yet reaped still holds its run folder's lock for the next start)."""
    parent = psutil.Process(proc.pid)
    tree = parent.children(recursive=True) + [parent]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


@contextlib.contextmanager
def killed_on_failure(proc: subprocess.Popen):
    """The block's launcher tree is killed when the block fails (a launcher already gone was
    reaped: nothing of it to kill)."""
    try:
        yield proc
    except BaseException:
        if proc.poll() is None:
            kill_tree(proc)
        raise


def signalled(proc: subprocess.Popen, send, timeout: float) -> tuple[str, float]:
    """send() (a signal to one of the job's processes), then the launcher's output to its end and
    the seconds from the signal to that end."""
    t0 = time.time()
    send()
    output, _ = proc.communicate(timeout=timeout)
    return output, time.time() - t0


def rank_process(proc: subprocess.Popen, rank: int, backend: str = "horovod") -> psutil.Process:
    """The training process of `rank` (not one of its loader workers) under this launcher:
    HOROVOD_RANK in its environment under horovodrun, RANK under torchrun."""
    variable = "RANK" if backend == "torch" else "HOROVOD_RANK"
    deadline = time.time() + 60
    while time.time() < deadline:
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                line = p.cmdline()
                if backend == "torch":  # torchrun starts `python -u -m hvd_ba ...`
                    found = "torch.distributed.run" not in line and "hvd_ba" in line[1:4]
                else:  # a loader worker is a fork of its rank: same command line as its parent
                    found = line[1:3] == ["-m", "hvd_ba"] and p.parent().cmdline() != line
                if found and p.environ().get(variable) == str(rank):
                    return p
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise TimeoutError(f"rank {rank} not found")


def loader_workers(rank: psutil.Process) -> list[psutil.Process]:
    """A rank's loader workers: the children of its fork server (data.worker_start auto), or
    forks of the rank itself (same command line)."""
    workers = []
    for child in rank.children():
        line = child.cmdline()
        if "multiprocessing.forkserver" in " ".join(line):
            workers += child.children()
        elif line == rank.cmdline():
            workers.append(child)
    return workers


def gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def no_process_left(out) -> bool:
    """No process whose command line names the run folder `out` is left."""
    return not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]


# ------------------------------------------------------------------------------ comparing runs
def snapshot(folder) -> dict:
    """Every file under `folder` and its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_steps(out):
    """step -> (sorted global files, lr), from reads.jsonl and steps.jsonl (run.log_every=1)."""
    files = {r["step"]: sorted(i for part in r["files"] for i in part) for r in read_jsonl(out / "reads.jsonl")}
    lrs = {s["step"]: s["lr"] for s in read_jsonl(out / "steps.jsonl")}
    return files, lrs


def assert_same_models(got, reference, atol: float) -> None:
    """model.pt of two runs: the same tensors, floating ones within `atol`, the others equal."""
    import torch

    mine, theirs = (torch.load(Path(d) / "model.pt", weights_only=True) for d in (got, reference))
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        if value.is_floating_point():
            assert torch.allclose(mine[name], value, atol=atol, rtol=0), \
                (name, float((mine[name] - value).abs().max()))
        else:
            assert torch.equal(mine[name], value), name


def assert_same_run(got, reference, steps: int, atol: float = SAME_RUN) -> None:
    """The run in `got` recorded steps 1..`steps` with the losses (within `atol`) and LRs of the
    run in `reference`, and ended with its model.pt (within `atol`)."""
    mine, theirs = read_jsonl(Path(got) / "steps.jsonl"), read_jsonl(Path(reference) / "steps.jsonl")
    assert [s["step"] for s in mine] == [s["step"] for s in theirs] == list(range(1, steps + 1))  # no gap, no twice
    for a, b in zip(mine, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=atol), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12), (a, b)
    assert_same_models(got, reference, atol)


def assert_same_epochs(got, reference) -> None:
    """Each epoch's record covers the whole epoch in both runs: the same counts, the same means."""
    for a, b in zip(read_jsonl(Path(reference) / "metrics.jsonl"), read_jsonl(Path(got) / "metrics.jsonl"),
                    strict=True):
        for key in ("epoch", "unique_images", "samples", "files_read", "bytes_read", "files_read_per_rank"):
            assert a[key] == b[key], key
        for key in ("train_loss", "train_top1", "val_top1"):
            assert a[key] == pytest.approx(b[key], abs=EPOCH_METRICS), key


# ------------------------------------------------------------------------------ the proof
def fresh_state(cfg, num_classes, steps_per_epoch, world):
    """The state every rank starts from (no backend is initialised here: no collective runs)."""
    import torch

    from hvd_ba.train.run import build_state

    return build_state(cfg, num_classes, torch.device("cpu"), world, steps_per_epoch)


def reference_parameters(data: str, settings: list[str], out: str) -> None:
    """One process that averages the two ranks' losses itself (ghost BN per rank and per group),
    with the ranks' intra-op thread count (cores / local ranks); saves its parameters to `out`.
    Run in a fresh process: a process whose thread pool once ran with another count sums the
    convolutions' gradients in another order, and the rounding difference grows over the steps."""
    import torch
    import torch.nn.functional as F

    from hvd_ba.cluster import usable_cores
    from hvd_ba.config import load_config
    from hvd_ba.data.manifest import load_index
    from hvd_ba.data.pipeline import make_train_loader
    from hvd_ba.train.engine import lr_at, normalize

    torch.set_num_threads(max(1, usable_cores() // 2))
    cfg = load_config("demo", [f"data.path={data}", "data.manifest_dir=null", *settings])
    index = load_index(data, "train", None)
    loaders = [make_train_loader(index, cfg, rank, 2) for rank in (0, 1)]
    state = fresh_state(cfg, 4, len(loaders[0]), world=2)
    model, opt = state.model, state.optimizer
    model.train()
    steps = 0
    for step, batches in enumerate(zip(*loaders)):
        lr = lr_at(step, state, cfg.optim)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        for batch in batches:  # each rank's batch on its own: ghost BN per rank, per group of 16
            loss = F.cross_entropy(model(normalize(batch, state)), batch["labels"])
            (loss / 2).backward()  # the backend averages the two ranks' gradients
        opt.step()
        steps += 1
    torch.save({"steps": steps, "params": {n: p.detach() for n, p in model.named_parameters()}}, out)


def run_reference(data, settings: list[str], ref_file) -> dict:
    """reference_parameters in a fresh process (see there); its saved steps and parameters."""
    import torch

    code = f"import helpers; helpers.reference_parameters({str(data)!r}, {settings!r}, {str(ref_file)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(ref_file, weights_only=True)


def assert_evaluation_equals_one_process(small_data, out) -> None:
    """The last evaluation of the 2-rank run in `out` equals one process evaluating its model.pt."""
    import torch

    from hvd_ba.config import load_config
    from hvd_ba.data.manifest import load_index
    from hvd_ba.data.pipeline import make_eval_loader
    from hvd_ba.train.engine import evaluate

    record = read_jsonl(out / "metrics.jsonl")[-1]
    cfg = load_config("demo", [f"data.path={small_data}", "data.manifest_dir=null", *PROOF])
    state = fresh_state(cfg, 4, 1, 1)
    state.model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    single = evaluate(state, make_eval_loader(load_index(small_data, "val", None), cfg, 0, 1))
    assert single["val_images"] == record["val_images"] == 48
    assert single["val_correct"] == record["val_correct"]
    assert single["val_top5"] == record["val_top5"]
    assert single["val_loss"] == pytest.approx(record["val_loss"], rel=1e-5)
    assert json.loads((out / "result.json").read_text())["val_top1"] == record["val_top1"]
