"""The prepared GPU check (`bash cluster/gpu_check.sh`): every GPU figure the README needs, in
one JSON, in a few minutes on one GPU with only torch and torchvision installed (no Horovod, no
PyYAML, no internet, possibly another torch). On a machine without CUDA it runs a reduced form
(small model and images), which CI runs.

Parts, each timed and recorded even when another fails:
1. bench gpu at M = 1, 4, 8 with loader and device augmentation against the no-I/O ceiling
   (loader workers capped so that /dev/shm holds the batches in flight);
2. training steps of ResNet-50 through the real engine (train_step) in bf16 and in fp16 with a
   GradScaler, channels_last, on one process;
3. device crops against loader crops of the same draws, on the device;
4. a checkpoint written and resumed on the device: the next step's loss is the same (model with
   dropout, so the CUDA RNG state matters).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from hvd_ba.cluster import usable_cores
from hvd_ba.fsio import free_bytes


CHECKS = {  # part -> (what must hold of its figures, the message when it does not)
    "train_steps": (lambda r: all(v["finite"] for v in r.values() if isinstance(v, dict)), "a loss was not finite"),
    "device_crops": (lambda r: r["mean_abs_diff_0_255"] < 3.0, "device crops differ from the loader's"),
    "checkpoint_resume": (lambda r: r["abs_diff"] <= 1e-4, "the resumed step's loss differs"),
}


def _timed(results: dict, name: str, fn, out_path: Path) -> None:
    t = time.perf_counter()
    try:
        results[name] = fn()
        results[name]["ok"] = True
        check = CHECKS.get(name)
        if check and not check[0](results[name]):
            results[name].update(ok=False, error=check[1])
    except Exception as err:
        results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    results[name]["seconds"] = round(time.perf_counter() - t, 2)
    print(f"gpu_check: {name}: {'ok' if results[name]['ok'] else 'FAILED ' + results[name]['error']} "
          f"({results[name]['seconds']} s)", flush=True)
    out_path.write_text(json.dumps(results, indent=1, default=str))  # a timeout keeps what was measured


def make_data(root: Path, images: int) -> Path:
    """JPEGs for the loader parts: the synthetic ImageNet-layout set (PIL and numpy only)."""
    if (root / "train").is_dir():
        return root
    from hvd_ba.data.synthetic import make_dataset

    per_class = max(8, -(-images // 10))
    make_dataset(root, num_classes=10, train_per_class=per_class, val_per_class=2, seed=0, workers=2)
    return root


def shm_capped_workers(wanted: int, batch_bytes: int, prefetch: int = 2) -> int:
    """As many loader workers as /dev/shm holds batches in flight for (half of it), at least 1."""
    try:
        free = free_bytes("/dev/shm")
    except OSError:
        return 1
    return max(1, min(wanted, int(free / 2 // max(1, batch_bytes * prefetch))))


def part_bench(data: Path, reduced: bool, out_dir: Path) -> dict:
    from hvd_ba.bench.gpu import run_gpu_bench

    size, unique = (64, 8) if reduced else (224, 32)
    copies = "1,2" if reduced else "1,4,8"
    workers = shm_capped_workers(max(1, usable_cores() - 2), 8 * unique * size * size * 3)
    path = out_dir / "bench_gpu.json"
    args = SimpleNamespace(corpus=str(data), copies=copies, where="loader,device", workers=workers, model=None,
                           size=size, unique_batch=unique, steps=3 if reduced else 20, warmup=1 if reduced else 5,
                           amp=None, json=str(path))
    run_gpu_bench(args)
    return {"workers": workers, **json.loads(path.read_text())}


def _state(arch: str, device: torch.device, amp: str, channels_last: bool, dropout: float = 0.0, classes: int = 1000):
    from hvd_ba.config import PAPER_GHOST_SIZE, from_dict
    from hvd_ba.train.run import build_state

    ghost = 32 if arch == "small_resnet" else PAPER_GHOST_SIZE
    cfg = from_dict({"model": {"arch": arch, "ghost_size": ghost, "dropout": dropout},
                     "run": {"amp": amp, "channels_last": channels_last},
                     "data": {"unique_batch": 16, "copies": 4}, "optim": {"warmup_from": "zero"}})
    return cfg, build_state(cfg, classes, device, world=1, steps_per_epoch=100)


def _batch(samples: int, size: int, classes: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randint(0, 256, (samples, size, size, 3), dtype=torch.uint8, generator=g),
            "lighting": torch.zeros(samples, 3), "labels": torch.randint(0, classes, (samples,), generator=g)}


def part_train(device: torch.device, reduced: bool) -> dict:
    from hvd_ba.train.engine import train_step

    # reduced: fp16 on a CPU runs at a few percent of fp32's speed (12.5 s for 16 samples of 64 px on one
    # core, 2026-12-03), so 32 samples of 32 px: the same code path in seconds
    arch, size, samples = ("small_resnet", 32, 32) if reduced else ("resnet50", 224, 128)
    out = {}
    for amp in ("bf16", "fp16"):
        cfg, state = _state(arch, device, amp, channels_last=True, classes=10 if reduced else 1000)
        state.model.train()
        batch = _batch(samples, size, 10 if reduced else 1000, 0)
        losses, times = [], []
        for i in range(3 if reduced else 12):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss, _ = train_step(state, batch, 0.01, cfg)
            losses.append(float(loss))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        steady = times[2:] or times
        out[amp] = {"arch": arch, "samples_per_step": samples, "losses": losses, "finite": all(np.isfinite(losses)),
                    "samples_per_s": samples / (sum(steady) / len(steady)),
                    "grad_scale": float(state.scaler.get_scale()) if state.scaler is not None else None,
                    "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    return out


def part_crops(data: Path, device: torch.device) -> dict:
    """The same (seed, epoch, file) draws cropped by the loader (PIL) and on the device (roi_align)."""
    from PIL import Image

    from hvd_ba.data.copies_on_device import canvas_copies, device_crops
    from hvd_ba.data.augment import TrainPreset, image_rng
    from hvd_ba.data.copies import make_copies

    preset = TrainPreset(size=64, scale=(0.25, 1.0))
    diffs = []
    for i, path in enumerate(sorted((data / "train").rglob("*.JPEG"))[:8]):
        loader, _ = make_copies(Image.open(path), preset, 4, image_rng(0, 0, i))
        item = canvas_copies(Image.open(path), preset, 4, image_rng(0, 0, i), 512)
        canvas = torch.from_numpy(np.ascontiguousarray(item["canvas"]))[None].to(device)
        crops = device_crops(canvas, torch.as_tensor(item["boxes"]), torch.zeros(4, dtype=torch.long),
                             torch.as_tensor(item["flips"]), 64)
        ref = torch.from_numpy(np.stack(loader)).permute(0, 3, 1, 2).float().div(255).to(device)
        diffs.append(float((crops - ref).abs().mean() * 255))
    return {"mean_abs_diff_0_255": float(np.mean(diffs)), "max_image_diff_0_255": float(max(diffs)),
            "images": len(diffs)}


def part_resume(device: torch.device, reduced: bool) -> dict:
    """Three steps; a checkpoint after two; a fresh state resumed from it takes the third: the
    same loss (dropout draws from the CUDA RNG, which the checkpoint carries)."""
    from hvd_ba.train.checkpoint import find_checkpoint, save_checkpoint
    from hvd_ba.train.engine import train_step
    from hvd_ba.train.checkpoint import rng_states, set_rng_states

    size, samples = (64, 64) if reduced else (128, 128)
    batches = [_batch(samples, size, 10, s) for s in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg, state = _state("small_resnet", device, "off", channels_last=True, dropout=0.3, classes=10)
        state.model.train()
        for b in batches[:2]:
            train_step(state, b, 0.05, cfg)
        save_checkpoint(tmp, {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                              "step": state.step, "run_id": "gpu-check", "rng": [rng_states()]}, keep=1)
        expected = float(train_step(state, batches[2], 0.05, cfg)[0])
        torch.manual_seed(1234)  # disturb the RNG: the checkpoint must restore it
        if device.type == "cuda":
            torch.cuda.manual_seed(1234)
        cfg, fresh = _state("small_resnet", device, "off", channels_last=True, dropout=0.3, classes=10)
        path, payload = find_checkpoint("auto", tmp)
        fresh.model.load_state_dict(payload["model"])
        fresh.optimizer.load_state_dict(payload["optimizer"])
        set_rng_states(payload["rng"][0])
        fresh.model.train()
        got = float(train_step(fresh, batches[2], 0.05, cfg)[0])
    return {"expected_loss": expected, "resumed_loss": got, "abs_diff": abs(expected - got),
            "cuda_rng_saved": "cuda" in payload["rng"][0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvd_ba.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON of every figure (default: gpu_check.json)")
    p.add_argument("--data", default=None, help="a JPEG folder for the loader parts (default: made in a temp dir)")
    p.add_argument("--reduced", action="store_true", help="the reduced form even where CUDA is available")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    reduced = args.reduced or not cuda
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
        torch.backends.cudnn.benchmark = True
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results = {"torch": torch.__version__, "cuda": torch.version.cuda, "reduced": reduced,
               "device": torch.cuda.get_device_name(0) if cuda else "cpu",
               "cudnn": torch.backends.cudnn.version() if cuda else None}
    print(f"gpu_check: torch {torch.__version__} on {results['device']}{' (reduced form)' if reduced else ''}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else make_data(Path(tmp) / "data", 400 if reduced else 2000)
        _timed(results, "train_steps", lambda: part_train(device, reduced), out_path)
        _timed(results, "device_crops", lambda: part_crops(data, device), out_path)
        _timed(results, "checkpoint_resume", lambda: part_resume(device, reduced), out_path)
        _timed(results, "bench_gpu", lambda: part_bench(data, reduced, out_path.parent), out_path)
    out_path.write_text(json.dumps(results, indent=1, default=str))
    failed = [k for k, v in results.items() if isinstance(v, dict) and not v.get("ok")]
    print(f"gpu_check: {out_path}: " + ("every part ran" if not failed else "FAILED: " + ", ".join(failed)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
