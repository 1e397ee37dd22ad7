"""`bench gpu`: training images/s on the device fed by this project's loader (augmentation on the
loader or on the device) against the ceiling of the same step on tensors already on the device,
at several M; and the ResNet-50 rate that the scaling projection uses.
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hvd_ba.bench.corpus import corpus, loader_for
from hvd_ba.bench.loader import samples_per_second
from hvd_ba.cluster import usable_cores
from hvd_ba.config import PAPER_GHOST_SIZE
from hvd_ba.data.model_input import channel_stats, normalize
from hvd_ba.models import build_model

RESNET50_ASSUMED_GPU_SAMPLES_PER_S = 2500.0  # assumed: an A100-class GPU, bf16, channels_last


def preset_ghost_size() -> int | None:
    """The ghost-BN group size of the resnet50 preset (the paper's), for the benches' models; a
    constant, not the preset read: the GPU check runs this without PyYAML."""
    return PAPER_GHOST_SIZE


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_and_step(arch: str, device: torch.device, amp: str, channels_last: bool):
    """The model with the resnet50 preset's ghost BN, and one SGD step on (inputs, labels)."""
    model = build_model(arch, 1000, preset_ghost_size()).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = {"off": None, "bf16": torch.bfloat16}[amp]

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    return model, step


def synthetic_rate(step, samples: int, size: int, device: torch.device, warmup: int, steps: int) -> float:
    """Samples/s of `step` on random channels_last tensors already on the device (no I/O at all)."""
    x = torch.randn(samples, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (samples,), device=device)
    for _ in range(warmup):
        step(x, y)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync(device)
    return samples * steps / (time.perf_counter() - t)


def fed_rate(loader, cfg, step, device: torch.device, channels_last: bool, warmup: int) -> tuple[float, float]:
    """Samples/s of `step` fed by `loader` after `warmup` untimed steps, and the fraction of that
    time spent waiting for the loader."""
    mean, std = channel_stats(cfg.augment, device)
    timed, start, io_wait = 0, None, 0.0
    t_wait = time.perf_counter()
    for i, batch in enumerate(loader):
        if i == warmup:
            sync(device)
            start, io_wait = time.perf_counter(), 0.0
            t_wait = start
        io_wait += time.perf_counter() - t_wait
        step(normalize(batch, device, mean, std, channels_last), batch["labels"].to(device, non_blocking=True))
        timed += batch["labels"].numel() if i >= warmup else 0
        t_wait = time.perf_counter()
    sync(device)
    elapsed = time.perf_counter() - start
    return timed / elapsed, io_wait / elapsed


def run_gpu_bench(args) -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    arch = args.model or ("resnet50" if cuda else "small_resnet")
    size = args.size or (224 if cuda else 64)
    unique = args.unique_batch or (32 if cuda else 8)
    steps, warmup = args.steps or (30 if cuda else 4), args.warmup or (5 if cuda else 2)
    amp = args.amp or ("bf16" if cuda else "off")
    channels_last = True
    copies_list = [int(c) for c in args.copies.split(",")]
    places = args.where.split(",")
    if not cuda:
        print("bench gpu: no CUDA device; the reduced form on the CPU (the same measurements, small sizes)")
        torch.set_num_threads(max(1, usable_cores() - args.workers))
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"bench gpu: {arch} on {name}, {size} px, amp {amp}, channels_last, {unique} unique images x M per step, "
          f"{steps} timed steps after {warmup}, {args.workers} loader processes")
    root = corpus(args.corpus, unique * (warmup + steps))
    model, step = model_and_step(arch, device, amp, channels_last)
    rows = []
    for m in copies_list:
        samples = unique * m
        # (a) the ceiling: the same step on tensors already on the device
        ceiling = synthetic_rate(step, samples, size, device, warmup, steps)
        for where in places:
            # (b) this project's loader feeding the same step
            loader, cfg = loader_for(root, m, unique, size, args.workers, where, warmup + steps)
            fed, wait_fraction = fed_rate(loader, cfg, step, device, channels_last, warmup)
            # the loader alone: samples/s that `workers` processes make, per process
            del loader  # its persistent workers go now, not at exit
            alone = loader_for(root, m, unique, size, args.workers, where, warmup + steps)[0]
            rate, _ = samples_per_second(alone)
            del alone
            gc.collect()
            per_worker = rate / args.workers
            rows.append({"copies": m, "where": where, "samples_per_step": samples, "ceiling_samples_per_s": ceiling,
                         "loader_samples_per_s": fed, "ratio": fed / ceiling, "data_wait_fraction": wait_fraction,
                         "loader_only_samples_per_s_per_process": per_worker,
                         "processes_for_ceiling": ceiling / per_worker})
            print(f"  M={m} {where}: {fed:.1f} samples/s against the ceiling {ceiling:.1f} ({fed / ceiling:.2f}); "
                  f"loader alone {per_worker:.1f} samples/s per process", flush=True)
    print(f"\n{'M':>2} {'augment on':>10} {'samples/step':>12} {'ceiling/s':>10} {'fed/s':>9} {'ratio':>6} "
          f"{'data wait':>9} {'loader/s/proc':>13} {'procs for ceiling':>17}")
    for r in rows:
        print(f"{r['copies']:>2} {r['where']:>10} {r['samples_per_step']:>12} {r['ceiling_samples_per_s']:>10.1f} "
              f"{r['loader_samples_per_s']:>9.1f} {r['ratio']:>6.2f} {100 * r['data_wait_fraction']:>8.0f}% "
              f"{r['loader_only_samples_per_s_per_process']:>13.1f} {r['processes_for_ceiling']:>17.1f}")
    print("ratios (loader-fed / ceiling): " + ", ".join(f"M={r['copies']} {r['where']}: {r['ratio']:.2f}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "arch": arch, "size": size, "amp": amp,
                                               "unique_batch": unique, "workers": args.workers, "rows": rows}, indent=1))
    return 0


def resnet50_gpu_rate(given: float | None, unique: int, steps: int = 20, warmup: int = 5) -> tuple[float, str]:
    """ResNet-50 training samples/s of one GPU: given, else measured here (bf16, channels_last,
    synthetic tensors on the GPU, `unique` per step), else the assumed figure."""
    if given is not None:
        return given, "given"
    if not torch.cuda.is_available():
        return RESNET50_ASSUMED_GPU_SAMPLES_PER_S, "assumed: no CUDA here"
    device = torch.device("cuda")
    _, step = model_and_step("resnet50", device, "bf16", True)
    return synthetic_rate(step, unique, 224, device, warmup, steps), "measured"
