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

import json
import math
import shlex
import shutil
from pathlib import Path

from hvd_ba.config import load_config
from hvd_ba.launch.sweep_table import grid_keys, markdown_table, mean_std


def _val(r: dict, key: str, default):
    return str(r.get(key, default))


def _find(rows, copies, on="rank", unique=None, default_copies=None):
    """The row of (copies, copies_on, unique batch); None for a key the grid does not vary: the
    config's own value. Other grid axes are not matched: a grid with a third axis pairs its
    first row of each kind."""
    for r in rows:
        if (_val(r, "data.copies", default_copies) == str(copies) and r.get("data.copies_on", "rank") == on
                and str(r.get("data.unique_batch")) == str(unique)):
            return r
    return None


def compare(a: dict, b: dict) -> str:
    """'a - b = d points (combined sd s): beyond / inside the seed-to-seed spread'."""
    diff = a["top1_mean"] - b["top1_mean"]
    if min(a["seeds"], b["seeds"]) < 2:
        return f"{diff:+.1f} points (one seed: no spread, no verdict)"
    spread = math.sqrt(a["top1_std"] ** 2 + b["top1_std"] ** 2)
    verdict = "beyond the seed-to-seed spread" if abs(diff) > spread else "inside the seed-to-seed spread"
    return f"{diff:+.1f} points (combined sd {spread:.1f}; {verdict})"


def fmt(r: dict) -> str:
    return f"{r['top1_mean']:.1f} ± {r['top1_std']:.1f} % (n = {r['seeds']})"


def steps_to(r: dict, target: float) -> str:
    """Per seed, the first evaluation at or above `target`; mean ± sd over the seeds that got there."""
    reached = [next((s for s, t in curve if t >= target), None) for curve in r["curve_seeds"]]
    got = [s for s in reached if s is not None]
    if not got:
        return f"not within its {r['steps']} steps in any of {len(reached)} seeds"
    mean, sd = mean_std(got)
    missed = len(reached) - len(got)
    return (f"{mean:.0f} ± {sd:.0f} steps ({mean / r['steps']:.0%} of its {r['steps']}; "
            f"{len(got)} of {len(reached)} seeds reached it{'' if not missed else ', the others not within the run'})")


def answers(rows: list[dict], unique_batch: int, copies: int) -> list[str]:
    lines = []
    base = _find(rows, 1, default_copies=copies)
    ba = sorted((r for r in rows if r.get("data.copies_on", "rank") == "rank" and "data.unique_batch" not in r
                 and _val(r, "data.copies", copies) != "1"), key=lambda r: int(_val(r, "data.copies", copies)))
    m = lambda r: _val(r, "data.copies", copies)  # noqa: E731
    if base and ba:
        lines.append(f"**(a) BA against M = 1 at the same {base['steps']} steps.** M = 1: {fmt(base)}. " + "; ".join(
            f"M = {m(r)}: {fmt(r)}, {compare(r, base)}" for r in ba) + ".")
        target = base["top1_mean"]
        lines.append(f"**(b) Steps to reach M = 1's final top-1 ({target:.1f} %, its mean over seeds; each seed's "
                     "run judged at its evaluations, once per epoch).** "
                     + "; ".join(f"M = {m(r)}: {steps_to(r, target)}" for r in ba) + ".")
    else:
        lines.append("**(a), (b)**: not in this grid (they need data.copies = 1 and some M > 1 with copies on the rank).")
    pairs = [(a, _find(rows, m(a), "ranks", default_copies=copies)) for a in ([base] if base else []) + ba]
    pairs = [(a, b) for a, b in pairs if b]
    if pairs:
        lines.append("**(c) BA (copies on the rank) against RA (copies on other ranks) at equal M.** " + "; ".join(
            f"M = {m(a)}: BA {fmt(a)}, RA {fmt(b)}, BA - RA {compare(a, b)}; bytes read per run "
            f"{a['bytes_read'] / 1e6:.1f} MB (BA) vs {b['bytes_read'] / 1e6:.1f} MB (RA, x{b['bytes_read'] / a['bytes_read']:.1f}); "
            f"samples/s {a['samples_per_s']:.0f} vs {b['samples_per_s']:.0f}" for a, b in pairs) + ".")
    else:
        lines.append("**(c)**: not in this grid (it needs the same M with data.copies_on = rank and ranks).")
    plain = [(a, _find(rows, 1, "rank", int(m(a)) * unique_batch, copies)) for a in ba]
    plain = [(a, b) for a, b in plain if b]
    if plain:
        lines.append("**(d) BA against a plain batch of M x B distinct images (linearly scaled LR, the same epochs, "
                     "so 1/M of the steps).** " + "; ".join(
                         f"M = {m(a)}: BA {fmt(a)} in {a['steps']} steps, plain {b['data.unique_batch']} "
                         f"per rank {fmt(b)} in {b['steps']} steps, BA - plain {compare(a, b)}" for a, b in plain) + ".")
    else:
        lines.append("**(d)**: not in this grid (it needs data.copies = 1 with data.unique_batch = M x B).")
    return lines


def write_report(path: Path, out: Path, rows: list[dict], record: dict) -> None:
    pictures = copy_plots(out, path)
    cfg = load_config(record["config"], record["set"])
    text = [
        *introduction(record, cfg, sweep_command(record, out, path), cells_wall_seconds(out)),
        "## Answers",
        "",
        *[f"- {line}" for line in answers(rows, cfg.data.unique_batch, cfg.data.copies)],
        "",
        *keep_in_mind(record["np"]),
        "## Table",
        "",
        markdown_table(rows, grid_keys(rows)),
        "## Plots",
        "",
        *pictures,
        "",
    ]
    path.write_text("\n".join(text))


def copy_plots(out: Path, path: Path) -> list[str]:
    """The sweep's top1-*.png beside the report (img/<report>-top1-*.png); their Markdown lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = path.parent / "img"
    images.mkdir(exist_ok=True)
    pictures = []
    for axis in ("epoch", "wall", "bytes"):
        source = out / f"top1-{axis}.png"
        if source.exists():
            shutil.copyfile(source, images / f"{path.stem}-top1-{axis}.png")
            pictures.append(f"![top-1 against {axis}](img/{path.stem}-top1-{axis}.png)")
    return pictures


def cells_wall_seconds(out: Path) -> float:
    """The cells' wall times (result.json) summed."""
    run_seconds = 0.0
    for folder in (out / "cells").iterdir() if (out / "cells").exists() else []:
        try:
            run_seconds += json.loads((folder / "result.json").read_text()).get("wall_time_s", 0.0)
        except (OSError, ValueError):
            pass
    return run_seconds


def sweep_command(record: dict, out: Path, path: Path) -> str:
    """The command line that makes this report again (the grid of OUT/sweep.json)."""
    q = shlex.quote
    grid = " ".join(f"--grid {q(k + '=' + ','.join(v))}" for k, v in record["grid"])
    also = " ".join(f"--also {q(a)}" for a in record.get("also", []))
    return (f"python -m hvd_ba sweep --config {q(record['config'])} {grid} {also} --seeds "
            f"{','.join(map(str, record['seeds']))} --np {record['np']} --set {' '.join(map(q, record['set']))} "
            f"--out {q(str(out))} --report {q(str(path))}")


def introduction(record: dict, cfg, command: str, run_seconds: float) -> list[str]:
    return [
        "# Does BA pay off? A sweep on this project's own data",
        "",
        f"Made by (`{record['np']}` ranks per run; the machine and wall times are those of the run that wrote this):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Config `{record['config']}` with the overrides above: model {cfg.model.arch}, {cfg.augment.size} px crops, "
        f"{cfg.data.unique_batch} unique images per rank per step, {cfg.optim.epochs} epochs, base LR "
        f"{cfg.optim.base_lr} scaled by the unique global batch / {cfg.optim.reference_batch}. Every cell ran with "
        f"{len(record['seeds'])} seeds (`run.seed`: weights, data order, augmentation); the figures are mean ± sample "
        "standard deviation over them. \"Equal time\" is each run's top-1 after the shortest run's training time "
        "(interpolated between its evaluations). A difference is called beyond the seed-to-seed spread when it is "
        "larger than the two points' standard deviations combined (sqrt(sd1^2 + sd2^2)): with 3 seeds per point a "
        "rough screen (about p < 0.2 for a normal spread), not a significance test. The runs took "
        f"{run_seconds / 60:.0f} min in all (the sum of their wall times, start-up of the launcher aside).",
        "",
    ]


def keep_in_mind(np: int) -> list[str]:
    return [
        "## What to keep in mind",
        "",
        f"- With {np} ranks, repeated augmentation (RA) puts an image's copies on different ranks only up "
        f"to M = {np}; beyond, each rank holds M / {np} copies of each of its images.",
        "- An RA rank decodes its image at the JPEG scale that all M crops allow (so that its copy is BA's, bit for "
        "bit); an RA pipeline of its own would decode at its one crop's scale: RA's samples/s here is a lower "
        "bound, its reads (bytes) are exact.",
        "- Wall times are this machine's: its cores run the ranks, the loaders and the allreduce together.",
        "",
    ]
