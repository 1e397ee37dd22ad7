"""The BA report of a sweep (`python -m hvd_ba sweep ... --report docs/ba-report.md`): the table,
the plots, and the answers the grid holds, each with its seed-to-seed spread:

(a) BA at M > 1 against M = 1 at the same number of steps;
(b) the steps BA needs to reach M = 1's final top-1;
(c) BA (data.copies_on=rank) against RA (ranks) at equal M: top-1, bytes read, samples/s;
(d) BA at M against a plain batch of M x B distinct images (data.copies=1, data.unique_batch=M x B,
    its LR scaled linearly by the config's rule).

A difference is called real only when it is larger than the two points' spreads combined
(sqrt(sd1^2 + sd2^2)); otherwise the report says it lies inside the seed-to-seed spread.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from hvd_ba.config import load_config
from hvd_ba.launch.sweep import TABLE_COLUMNS, markdown_table


def _find(rows, copies, on="rank", unique=None):
    for r in rows:
        if (str(r.get("data.copies", "")) == str(copies) and r.get("data.copies_on", "rank") == on
                and str(r.get("data.unique_batch")) == str(unique)):  # None: the config's own unique batch
            return r
    return None


def compare(a: dict, b: dict) -> str:
    """'a - b = d points (spread s): beyond / inside the seed-to-seed spread'."""
    diff = a["top1_mean"] - b["top1_mean"]
    spread = math.sqrt(a["top1_std"] ** 2 + b["top1_std"] ** 2)
    verdict = "beyond the seed-to-seed spread" if abs(diff) > spread else "inside the seed-to-seed spread"
    return f"{diff:+.1f} points (combined sd {spread:.1f}; {verdict})"


def fmt(r: dict) -> str:
    return f"{r['top1_mean']:.1f} ± {r['top1_std']:.1f} % (n = {r['seeds']})"


def answers(rows: list[dict], unique_batch: int) -> list[str]:
    lines = []
    base = _find(rows, 1)
    ba = sorted((r for r in rows if r.get("data.copies_on", "rank") == "rank" and "data.unique_batch" not in r
                 and str(r.get("data.copies")) != "1"), key=lambda r: int(r["data.copies"]))
    if base and ba:
        lines.append(f"**(a) BA against M = 1 at the same {base['steps']} steps.** M = 1: {fmt(base)}. " + "; ".join(
            f"M = {r['data.copies']}: {fmt(r)}, {compare(r, base)}" for r in ba) + ".")
        parts = []
        target = base["top1_mean"]
        for r in ba:
            reached = [s for s, t in zip(r["curve_steps"], r["curve_top1"]) if t >= target]
            parts.append(f"M = {r['data.copies']}: {reached[0]} steps ({reached[0] / base['steps']:.0%} of M = 1's)"
                         if reached else f"M = {r['data.copies']}: not within its {r['steps']} steps")
        lines.append(f"**(b) Steps to reach M = 1's final top-1 ({target:.1f} %, mean over seeds; evaluated once "
                     f"per epoch, so a step count is an epoch's end).** " + "; ".join(parts) + ".")
    pairs = [(r, _find(rows, r["data.copies"], "ranks")) for r in ba + ([base] if base else [])]
    pairs = [(a, b) for a, b in pairs if b]
    if pairs:
        lines.append("**(c) BA (copies on the rank) against RA (copies on other ranks) at equal M.** " + "; ".join(
            f"M = {a['data.copies']}: BA {fmt(a)}, RA {fmt(b)}, BA - RA {compare(a, b)}; bytes read per run "
            f"{a['bytes_read'] / 1e6:.1f} MB (BA) vs {b['bytes_read'] / 1e6:.1f} MB (RA, x{b['bytes_read'] / a['bytes_read']:.1f}); "
            f"samples/s {a['samples_per_s']:.0f} vs {b['samples_per_s']:.0f}" for a, b in pairs) + ".")
    plain = [(r, _find(rows, 1, "rank", int(r["data.copies"]) * unique_batch)) for r in ba]
    plain = [(a, b) for a, b in plain if b]
    if plain:
        lines.append("**(d) BA against a plain batch of M x B distinct images (linearly scaled LR, the same epochs, "
                     "so 1/M of the steps).** " + "; ".join(
                         f"M = {a['data.copies']}: BA {fmt(a)} in {a['steps']} steps, plain {b['data.unique_batch']} "
                         f"per rank {fmt(b)} in {b['steps']} steps, BA - plain {compare(a, b)}" for a, b in plain) + ".")
    return lines


def write_report(path: Path, out: Path, rows: list[dict], record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = path.parent / "img"
    images.mkdir(exist_ok=True)
    stem = path.stem
    pictures = []
    for axis in ("epoch", "wall", "bytes"):
        source = out / f"top1-{axis}.png"
        if source.exists():
            shutil.copyfile(source, images / f"{stem}-top1-{axis}.png")
            pictures.append(f"![top-1 against {axis}](img/{stem}-top1-{axis}.png)")
    cfg = load_config(record["config"], record["set"])
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in TABLE_COLUMNS and not k.startswith("curve_")))
    grid = " ".join(f"--grid {k}={','.join(v)}" for k, v in record["grid"])
    also = " ".join(f"--also '{a}'" for a in record.get("also", []))
    command = (f"python -m hvd_ba sweep --config {record['config']} {grid} {also} --seeds "
               f"{','.join(map(str, record['seeds']))} --np {record['np']} --set {' '.join(record['set'])} "
               f"--out {out} --report {path}")
    text = [
        "# Does BA pay off? A sweep on this project's own data",
        "",
        f"Made by (on this 2-core machine, `horovodrun -np {record['np']}` over Gloo):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Config `{record['config']}` with the overrides above: model {cfg.model.arch}, {cfg.augment.size} px crops, "
        f"{cfg.data.unique_batch} unique images per rank per step, {cfg.optim.epochs} epochs, base LR "
        f"{cfg.optim.base_lr} scaled by the unique global batch / {cfg.optim.reference_batch}. Every cell ran with "
        f"{len(record['seeds'])} seeds (`run.seed`: weights, data order, augmentation); the figures are mean ± sample "
        "standard deviation over them. \"Equal time\" is the top-1 at the last evaluation each run reached within "
        "the shortest run's training time.",
        "",
        "## Answers",
        "",
        *[f"- {line}" for line in answers(rows, cfg.data.unique_batch)],
        "",
        "## Table",
        "",
        markdown_table(rows, keys),
        "## Plots",
        "",
        *pictures,
        "",
    ]
    path.write_text("\n".join(text))
