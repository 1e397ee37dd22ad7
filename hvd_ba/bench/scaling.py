"""Benchmarks of multi-rank training: `bench breakdown` (one rank's step split into
data wait, forward/backward, allreduce, optimizer, and how much of the allreduce training hides
behind the backward pass) and `bench scaling` (breakdowns under real `horovodrun -np 2` over Gloo
and MPI and `torchrun --nproc_per_node 2` with torch.distributed over Gloo, at M = 1, 2, 4, side
by side, then a ring-allreduce model of ResNet-50 at W = 8 ... 1024 workers).

Every figure comes with the baseline it is compared to, measured in the same run. In the
breakdown, the allreduce is first timed on its own (one grouped allreduce of all gradients after
the backward pass, as Horovod's tensor fusion sends them): the communication the overlap has to
hide. Then the step is timed as training runs it (DistributedOptimizer's hooks, or DDP's buckets,
allreduce during the backward) against the same step without communication: the difference is
the part of the allreduce left exposed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hvd_ba.bench.corpus import corpus, loader_for
from hvd_ba.bench.gpu import preset_ghost_size, resnet50_gpu_rate, sync
from hvd_ba.config import derive
from hvd_ba.data.model_input import channel_stats, normalize
from hvd_ba.flags import SCALING_BACKENDS
from hvd_ba.launchers import horovodrun_command, torchrun_command
from hvd_ba.models import build_model

DEFAULT_BANDWIDTHS_GBIT = "10,100,400"  # assumed: Ethernet, EDR InfiniBand, NDR InfiniBand
DEFAULT_LATENCY_US = 10.0  # assumed: per ring step (software + network)


# ----------------------------------------------------------------------------- bench breakdown


def run_breakdown(args) -> int:
    """One launch measures every M of --copies in turn (one start-up, one allreduce fit, shared)."""
    from hvd_ba import dist
    from hvd_ba.cluster import launch_info
    from hvd_ba.train.devices import select_device

    torch.set_num_threads(args.threads)
    dist.init(backend=args.backend or dist.launched_backend(launch_info()) or "horovod")
    rank, world = dist.rank(), dist.size()
    device = select_device()  # the training's choice (set_device, one GPU per rank, NCCL checked)
    results, link = [], None
    for copies in copies_values(args.copies):
        loader, cfg = breakdown_loader(args, copies, rank, world)
        model = build_model(args.model, 1000, preset_ghost_size()).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        dist.broadcast_state(model, opt, optimizer_state=False)
        wire_bytes = sum(p.numel() for p in model.parameters() if p.requires_grad) * (2 if args.fp16_allreduce else 4)
        per_step, x, labels = time_phases(args, loader, model, opt, device, *channel_stats(cfg.augment, device))
        overlap = measure_overlap(model, opt, x, labels, args, device, per_step["allreduce"]) if world > 1 else None
        if link is None and world > 1:  # the link does not depend on M: fitted once
            link = allreduce_fit(world, device=device)
        results.append({"world": world, "copies": copies, "unique_batch": args.unique_batch,
                        "samples_per_rank": derive(cfg, world).samples_per_rank, "model": args.model,
                        "size": args.size, "wire_bytes_per_step": wire_bytes, "fp16_allreduce": args.fp16_allreduce,
                        "seconds_per_step": per_step, "step_s": sum(per_step.values()), "allreduce_fit": link,
                        "overlap": overlap, "backend": dist.backend(), "controller": dist.controller()})
        if rank == 0:
            print(json.dumps(results[-1]), flush=True)
    if rank == 0 and args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    dist.shutdown()
    return 0


def copies_values(text: str) -> list[int]:
    """--copies: one M or several, comma-separated ("1,2,4"; checked by the command line)."""
    return [int(c) for c in str(text).split(",")]


def breakdown_loader(args, copies: int, rank: int, world: int):
    """This rank's loader at M = copies over the photo corpus (rank 0 makes the corpus first) and its config."""
    from hvd_ba import dist

    if rank == 0:
        corpus(args.corpus, args.unique_batch * world * (args.warmup + args.steps))
    dist.barrier("corpus")
    root = corpus(args.corpus, 0)
    return loader_for(root, copies, args.unique_batch, args.size, args.workers, "loader",
                      args.warmup + args.steps, rank, world)


PHASES = ("data", "forward_backward", "rank_skew", "allreduce", "optimizer")


def time_phases(args, loader, model, opt, device, mean, std) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Seconds per step of each phase (PHASES) over the steps after args.warmup, the mean over the
    ranks (a slow rank shows up in the others' allreduce wait); and the last batch (input, labels)."""
    from hvd_ba import dist

    params = [p for p in model.parameters() if p.requires_grad]
    phases = dict.fromkeys(PHASES, 0.0)
    t_wait = time.perf_counter()
    for i, batch in enumerate(loader):
        t0 = time.perf_counter()
        if i == args.warmup:
            phases = dict.fromkeys(phases, 0.0)
        phases["data"] += t0 - t_wait
        x = normalize(batch, device, mean, std)
        opt.zero_grad()
        F.cross_entropy(model(x), batch["labels"].to(device)).backward()
        sync(device)
        t1 = time.perf_counter()
        dist.barrier(f"skew{i}")  # waiting for the slowest rank, kept apart from the transfer itself
        t_skew = time.perf_counter()
        average_gradients(params, args.fp16_allreduce)
        sync(device)
        t2 = time.perf_counter()
        opt.step()
        sync(device)
        t_wait = time.perf_counter()
        phases["forward_backward"] += t1 - t0
        phases["rank_skew"] += t_skew - t1
        phases["allreduce"] += t2 - t_skew
        phases["optimizer"] += t_wait - t2
    per_step = [phases[k] / args.steps for k in phases]
    mean_over_ranks = dist.allreduce_mean(torch.tensor(per_step, dtype=torch.float64), name="phases")
    return dict(zip(phases, mean_over_ranks.tolist())), x, batch["labels"].to(device)


def average_gradients(params: list, fp16: bool) -> None:
    """One grouped allreduce of all gradients after the backward pass, as Horovod's tensor fusion
    sends them: the communication the overlap has to hide."""
    from hvd_ba import dist

    averaged = dist.grouped_allreduce_average([p.grad for p in params], "grads", fp16=fp16)
    for p, g in zip(params, averaged):
        p.grad.copy_(g)


def measure_overlap(model, opt, x, labels, args, device, allreduce_alone_s: float) -> dict:
    """How much of the allreduce the training path hides behind the backward pass, measured:
    the step (forward, backward, optimizer) of the plain model with no communication, against
    the same step as training runs it (Horovod's DistributedOptimizer, whose gradient hooks
    allreduce during the backward; or DDP's bucketed allreduce), on the same batch; a barrier
    before each step keeps the ranks' skew out of both. exposed = distributed - local; hidden =
    the allreduce timed alone - exposed, as a fraction of it (0: none hidden, 1: all)."""
    from hvd_ba import dist

    def timed(step_model, step_opt) -> float:
        """The median step (a difference of two noisy times: the median resists one slow step)."""
        times = []
        for i in range(args.warmup + args.steps):
            dist.barrier("overlap")
            t0 = time.perf_counter()
            step_opt.zero_grad()
            F.cross_entropy(step_model(x), labels).backward()
            step_opt.step()
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    dist.broadcast_state(model, opt, optimizer_state=True)
    local = timed(model, opt)
    drift = parameter_spread(model)  # each rank stepped on its own batch: the ranks now differ
    dist.broadcast_state(model, opt, optimizer_state=True)
    wrapped_opt = dist.distributed_optimizer(opt, model, fp16_allreduce=args.fp16_allreduce)
    wrapped_model = dist.distributed_model(model, fp16_allreduce=args.fp16_allreduce)
    distributed = timed(wrapped_model, wrapped_opt)
    spread = parameter_spread(model)  # averaged gradients: the ranks stayed together
    both = dist.allreduce_mean(torch.tensor([local, distributed], dtype=torch.float64), name="overlap_times")
    local, distributed = both.tolist()
    exposed = max(0.0, distributed - local)
    hidden = min(1.0, max(0.0, (allreduce_alone_s - exposed) / allreduce_alone_s)) if allreduce_alone_s > 0 else 0.0
    return {"local_step_s": local, "distributed_step_s": distributed, "exposed_allreduce_s": exposed,
            "allreduce_alone_s": allreduce_alone_s, "hidden_fraction": hidden,
            "parameter_spread_local": drift, "parameter_spread_distributed": spread}


def parameter_spread(model) -> float:
    """The largest difference of a parameter between ranks (0 when all ranks hold the same)."""
    from hvd_ba import dist

    flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])
    mean = dist.allreduce_mean(flat, name="spread") if dist.size() > 1 else flat
    return float(dist.allreduce_sum(torch.tensor([float((flat - mean).abs().max())]), name="spread_max")[0])


def allreduce_fit(world: int, repeats: int = 5, device: torch.device | None = None) -> dict:
    """Time allreduces of 16 KB ... 16 MB on the training device (GPU tensors go through NCCL)
    and fit t = a + b * bytes (least squares on the medians): latency a and, by the ring model's
    2(W-1)/W factor, the link bandwidth."""
    from hvd_ba import dist

    device = device or torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sizes, times = [], []
    for exp in range(14, 25, 2):
        nbytes = 2 ** exp
        tensor = torch.zeros(nbytes // 4, device=device)
        dist.allreduce_mean(tensor, name=f"warm{exp}")
        runs = []
        for r in range(repeats):
            sync()
            t = time.perf_counter()
            dist.allreduce_mean(tensor, name=f"fit{exp}.{r}")
            sync()
            runs.append(time.perf_counter() - t)
        sizes.append(nbytes)
        times.append(sorted(runs)[repeats // 2])
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(times) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, times)) / sum((x - mx) ** 2 for x in sizes)
    intercept = my - slope * mx
    factor = 2 * (world - 1) / world
    return {"bytes": sizes, "seconds": times, "latency_s": max(intercept, 0.0),
            "bandwidth_bytes_per_s": factor / slope if slope > 0 else float("inf")}


# ------------------------------------------------------------------------------ bench scaling


def ring_allreduce_s(nbytes: float, workers: int, bandwidth_bytes_per_s: float, latency_s: float) -> float:
    """Ring allreduce: 2(W-1) steps, each a latency, carrying 2(W-1)/W of the bytes over each link."""
    if workers == 1:
        return 0.0
    return 2 * (workers - 1) * latency_s + 2 * (workers - 1) / workers * nbytes / bandwidth_bytes_per_s


BACKWARD_SHARE = 2 / 3  # of a step's compute: the backward pass, behind which an allreduce can hide


def project(grad_bytes: float, samples_per_s: float, unique: int, workers: list[int], bandwidths_gbit: list[float],
            latency_s: float, overlap: float = 0.0) -> list[dict]:
    """Step time and scaling efficiency of data-parallel training, per configuration.

    compute = samples per allreduce / samples_per_s; `overlap` (0..1) is the fraction of the
    allreduce hidden behind the backward pass (0: none, a lower bound on efficiency; `bench
    scaling --overlap measured` takes the fraction measured here), at most the backward's
    BACKWARD_SHARE of the compute: exposed = allreduce - min(overlap x allreduce, backward).
    Efficiency = compute / (compute + exposed): the throughput of W workers over W times one.
    """
    configs = [("plain M=1", 1, 1, 1.0), ("BA M=4", 4, 1, 1.0), ("BA M=4 + fp16", 4, 1, 0.5),
               ("plain M=1, 4 passes/allreduce", 1, 4, 1.0)]
    rows = []
    for gbit in bandwidths_gbit:
        bw = gbit * 1e9 / 8
        for w in workers:
            for name, copies, passes, wire in configs:
                compute = unique * copies * passes / samples_per_s
                comm = ring_allreduce_s(grad_bytes * wire, w, bw, latency_s)
                exposed = comm - min(overlap * comm, BACKWARD_SHARE * compute / passes)
                rows.append({"bandwidth_gbit": gbit, "workers": w, "config": name, "compute_s": compute,
                             "allreduce_s": comm, "exposed_s": exposed, "efficiency": compute / (compute + exposed),
                             "unique_images_per_s": w * unique * passes / (compute + exposed)})
    return rows


def resnet50_gradient_bytes() -> int:
    import torchvision

    return 4 * sum(p.numel() for p in torchvision.models.resnet50().parameters())


def run_scaling(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    copies_list = copies_values(args.copies_list)
    backends = args.backends.split(",")  # checked by the command line (hvd_ba.flags.scaling_backends)
    overlap_option = overlap_setting(args.overlap)
    corpus(args.corpus, args.unique_batch * args.np * (args.warmup + args.steps))
    print(f"bench scaling: {args.np} ranks per backend ({', '.join(BACKEND_LABELS[b] for b in backends)}), {args.model} "
          f"at {args.size} px, {args.unique_batch} unique images per rank per step, M = {copies_list}, {args.steps} "
          "timed steps", flush=True)
    measured = [r for backend in backends for r in measure_breakdown(args, backend, copies_list)]
    print_breakdowns(args, measured, copies_list)
    print_side_by_side(measured)
    overlap, overlap_source = overlap_option, "assumed" if overlap_option else "none assumed"
    if overlap_option is None:
        first = max((r for r in measured if r["backend"] == backends[0]), key=lambda r: r["copies"])
        overlap = first["overlap"]["hidden_fraction"]
        overlap_source = f"measured: {BACKEND_LABELS[backends[0]]}, M={first['copies']}"
    fits = [r["allreduce_fit"] for r in measured if r.get("allreduce_fit")]
    # measured compute per sample of this run's model (the largest M: the steadiest figure)
    big = max((r for r in measured), key=lambda r: r["samples_per_rank"])
    measured_rate = big["samples_per_rank"] / big["seconds_per_step"]["forward_backward"]
    grad_bytes = resnet50_gradient_bytes()
    gpu_rate, gpu_source, proj = print_projection(args, grad_bytes, overlap, overlap_source)
    print(f"\nthis run's {big['model']} on this CPU: {measured_rate:.1f} samples/s per rank forward+backward (measured);"
          f" ResNet-50 on a GPU: {gpu_rate:.0f} ({gpu_source}). Inputs measured here: the breakdowns, the "
          f"allreduce fits, the gradient bytes{', the GPU rate' if gpu_source == 'measured' else ''}. Assumed: "
          f"{'' if gpu_source == 'measured' else 'the GPU rate, '}bandwidths, latency.")
    result = {"measured": measured, "allreduce_fits": fits, "projection": proj, "grad_bytes_resnet50": grad_bytes,
              "gpu_samples_per_s": gpu_rate, "gpu_rate_source": gpu_source, "latency_us": args.latency_us,
              "overlap": overlap, "overlap_source": overlap_source,
              "measured_samples_per_s_per_rank": measured_rate}
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    plot_scaling(proj, out / "scaling.png")
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")
    return 0


BACKEND_LABELS = dict(zip(SCALING_BACKENDS, ("horovod/gloo", "horovod/mpi", "torch/gloo")))


def overlap_setting(text: str) -> float | None:
    """--overlap (checked by the command line, hvd_ba.flags.overlap): none -> 0.0, a number in
    [0, 1], measured -> None (taken from the run)."""
    if text == "measured":
        return None
    return 0.0 if text == "none" else float(text)


def measure_breakdown(args, backend: str, copies_list: list[int]) -> list[dict]:
    """`bench breakdown` at every M of copies_list, in one launch, under a real
    `horovodrun -np N --<gloo|mpi>`, or (torch) `torchrun --nproc_per_node N` with
    torch.distributed; its rank 0's figures, one per M."""
    copies = ",".join(map(str, copies_list))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "breakdown.json"
        rank_args = [*(["--backend", "torch"] if backend == "torch" else []), "--model", args.model, "--size",
                     str(args.size), "--unique-batch", str(args.unique_batch), "--copies", copies, "--steps",
                     str(args.steps), "--warmup", str(args.warmup), "--workers", str(args.workers), "--threads",
                     str(args.threads), "--corpus", args.corpus, "--json", str(target),
                     *(["--fp16-allreduce"] if args.fp16_allreduce else [])]
        command = ("bench", "breakdown")
        cmd = (torchrun_command(args.np, rank_args, command) if backend == "torch"
               else horovodrun_command(args.np, backend, rank_args, command))
        env = dict(os.environ)
        if 0 < torch.cuda.device_count() < args.np:  # ranks may not share a GPU (train/devices.py)
            env["CUDA_VISIBLE_DEVICES"] = ""
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if done.returncode or not target.exists():
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"bench scaling: the {backend} run at M={copies} failed ({done.returncode})")
        results = json.loads(target.read_text())
    for r in results:
        r["backend"] = backend
        s = r["seconds_per_step"]
        print(f"  {BACKEND_LABELS[backend]} M={r['copies']}: step {1000 * r['step_s']:.0f} ms, allreduce "
              f"{1000 * s['allreduce']:.0f} ms, {100 * r['overlap']['hidden_fraction']:.0f}% of it hidden in training",
              flush=True)
    return results


def print_side_by_side(measured: list[dict]) -> None:
    """Each backend at each M: the step, the allreduce alone and per MB, and in training (the
    allreduce overlapped with the backward pass) the step, the exposed part and the hidden share."""
    print("\nside by side (training path: the step as training runs it, gradients averaged by the backend; "
          "local: the same step without communication; exposed = training - local; hidden = 1 - exposed / allreduce):")
    print(f"{'backend':>12} {'M':>2} {'allreduce ms':>12} {'ms/MB':>6} {'local ms':>9} {'training ms':>11} "
          f"{'exposed ms':>10} {'hidden %':>8}")
    for r in measured:
        o, mb = r["overlap"], r["wire_bytes_per_step"] / 1e6
        r["allreduce_s_per_mb"] = r["seconds_per_step"]["allreduce"] / mb
        print(f"{BACKEND_LABELS[r['backend']]:>12} {r['copies']:>2} {1000 * r['seconds_per_step']['allreduce']:>12.1f} "
              f"{1000 * r['allreduce_s_per_mb']:>6.2f} {1000 * o['local_step_s']:>9.1f} "
              f"{1000 * o['distributed_step_s']:>11.1f} {1000 * o['exposed_allreduce_s']:>10.1f} "
              f"{100 * o['hidden_fraction']:>7.0f}%")


def print_breakdowns(args, measured: list[dict], copies_list: list[int]) -> None:
    """The table of the measured steps (and, into each record, its shares and bytes per image and
    per sample), and each backend's allreduce fit."""
    print(f"\nmeasured, per step (mean over {args.np} ranks; skew: the wait at a barrier for the slowest rank; "
          f"allreduce: then the gradients' grouped allreduce on its own; comm %: allreduce / step):")
    print(f"{'backend':>7} {'M':>2} {'samples':>7} {'data ms':>8} {'fwd+bwd ms':>10} {'skew ms':>8} "
          f"{'allreduce ms':>12} {'opt ms':>7} {'step ms':>8} {'comm %':>7} {'MB/step':>8} {'KB/unique img':>13} "
          f"{'KB/sample':>9}")
    for r in measured:
        s, step = r["seconds_per_step"], r["step_s"]
        unique_global, samples_global = r["unique_batch"] * r["world"], r["samples_per_rank"] * r["world"]
        r["comm_fraction"] = s["allreduce"] / step
        r["bytes_per_unique_image"] = r["wire_bytes_per_step"] / unique_global
        r["bytes_per_sample"] = r["wire_bytes_per_step"] / samples_global
        print(f"{r['backend']:>7} {r['copies']:>2} {samples_global:>7} {1000 * s['data']:>8.1f} "
              f"{1000 * s['forward_backward']:>10.1f} {1000 * s['rank_skew']:>8.1f} {1000 * s['allreduce']:>12.1f} "
              f"{1000 * s['optimizer']:>7.1f} "
              f"{1000 * step:>8.1f} {100 * r['comm_fraction']:>6.1f}% {r['wire_bytes_per_step'] / 1e6:>8.2f} "
              f"{r['bytes_per_unique_image'] / 1e3:>13.1f} {r['bytes_per_sample'] / 1e3:>9.1f}")
    base = {(r["backend"]): r for r in measured if r["copies"] == copies_list[0]}
    for r in measured:
        b = base[r["backend"]]
        r["compute_ratio_to_first"] = r["seconds_per_step"]["forward_backward"] / b["seconds_per_step"]["forward_backward"]
    for backend in args.backends.split(","):
        fit = next(r["allreduce_fit"] for r in measured if r["backend"] == backend and r.get("allreduce_fit"))
        print(f"{backend}: allreduce fit on this machine (loopback, {args.np} ranks): latency "
              f"{1e6 * fit['latency_s']:.0f} us, bandwidth {8 * fit['bandwidth_bytes_per_s'] / 1e9:.1f} Gbit/s")


def print_projection(args, grad_bytes: int, overlap: float = 0.0, overlap_source: str = "none assumed"
                     ) -> tuple[float, str, list[dict]]:
    """The ring-allreduce projection of ResNet-50 at W = 8 ... 1024 (printed); returns the GPU
    rate it used, where that rate comes from, and the rows."""
    workers = [2 ** k for k in range(3, 11)]
    bandwidths = [float(b) for b in args.bandwidths_gbit.split(",")]
    unique = 32  # per GPU, as `bench gpu` measures it: half the resnet50 preset's 64 (so M = 8 fits a GPU)
    gpu_rate, gpu_source = resnet50_gpu_rate(args.gpu_samples_per_s, unique)
    proj = project(grad_bytes, gpu_rate, unique, workers, bandwidths, args.latency_us * 1e-6, overlap)
    configs = list(dict.fromkeys(r["config"] for r in proj))
    print(f"\nprojection: ResNet-50 ({grad_bytes / 1e6:.1f} MB of fp32 gradients, measured from torchvision), "
          f"{unique} unique images per GPU per step, {gpu_rate:.0f} samples/s per GPU ({gpu_source}), ring latency {args.latency_us:.0f} us per step (assumed), {100 * overlap:.0f}% of the allreduce hidden behind the backward pass ({overlap_source}; at most the backward's {100 * BACKWARD_SHARE:.0f}% of the compute).")
    print("scaling efficiency = throughput of W GPUs / (W x one GPU), and (in brackets) the time between allreduces:")
    print(f"{'Gbit/s':>6} {'W':>5} " + " ".join(f"{c:>30}" for c in configs))
    for gbit in bandwidths:
        for w in workers:
            cells = [next(r for r in proj if r["bandwidth_gbit"] == gbit and r["workers"] == w and r["config"] == c)
                     for c in configs]
            print(f"{gbit:>6.0f} {w:>5} " + " ".join(
                f"{100 * c['efficiency']:>5.1f}% ({1000 * (c['compute_s'] + c['allreduce_s']):>6.1f} ms)"
                .rjust(30) for c in cells))
    return gpu_rate, gpu_source, proj


def plot_scaling(proj: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    bandwidths = sorted({r["bandwidth_gbit"] for r in proj})
    fig, axes = plt.subplots(1, len(bandwidths), figsize=(4.2 * len(bandwidths), 3.6), sharey=True, squeeze=False)
    for ax, gbit in zip(axes[0], bandwidths):
        for config in dict.fromkeys(r["config"] for r in proj):
            rows = [r for r in proj if r["bandwidth_gbit"] == gbit and r["config"] == config]
            style = "x:" if "passes" in config else "o-"  # it coincides with BA M=4: drawn on top, dotted
            ax.plot([r["workers"] for r in rows], [100 * r["efficiency"] for r in rows], style, label=config, ms=4)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["workers"] for r in proj if r["bandwidth_gbit"] == gbit][::len(set(r["config"] for r in proj))])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(f"{gbit:.0f} Gbit/s")
        ax.set_xlabel("GPUs (W)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("scaling efficiency, %")
    axes[0][0].legend(fontsize=7)
    overlap = max((r["allreduce_s"] - r["exposed_s"]) / r["allreduce_s"] for r in proj if r["allreduce_s"] > 0)
    fig.suptitle(f"ResNet-50, ring allreduce model (up to {100 * overlap:.0f}% of the allreduce hidden)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
