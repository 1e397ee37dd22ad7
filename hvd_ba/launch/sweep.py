"""`python -m hvd_ba sweep`: a grid of config overrides x seeds, one training run per cell under
`horovodrun -np N` (or srun inside an allocation), resumable, and a table of the cells.

    python -m hvd_ba sweep --config demo --grid data.copies=1,2,4 --grid data.copies_on=rank,ranks \
        --seeds 0,1,2 --set data.path=data/demo optim.epochs=6 --out runs/sweep

Each cell is a run folder (OUT/cells/<name>) trained with run.resume=auto: a complete cell is
not run again, an interrupted one resumes from its checkpoint. The grid asked is kept in
OUT/sweep.json; a sweep resumed with another grid says which cells differ and runs what is
asked. After the cells: OUT/table.csv and OUT/table.md (per grid point, over the seeds: top-1
mean and sample standard deviation at equal steps (the end) and at equal wall time (the
shortest cell's training time, interpolated between evaluations), samples seen, bytes read,
training wall time (the epochs: not start-up), and OUT/top1-*.png (top-1 against
epochs, wall time and bytes read). `--report FILE` writes the BA report (launch/sweep_report.py).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from hvd_ba.cluster import split_outside_brackets
from hvd_ba.config import ConfigError, load_config
from hvd_ba.fsio import atomic_json, atomic_write
from hvd_ba.launchers import horovodrun_command, srun_command
from hvd_ba.train.records import read_jsonl
from hvd_ba.train.run_dir import is_complete


class SweepError(ValueError):
    """A grid, seed list or cell that cannot run; one line naming it, before any run starts."""


@dataclasses.dataclass(frozen=True)
class Cell:
    point: tuple[tuple[str, str], ...]  # the grid values (key, value), without the seed
    seed: int

    @property
    def name(self) -> str:
        short = ",".join(f"{k.split('.')[-1]}={v}" for k, v in self.point)
        return f"{short},seed={self.seed}" if short else f"seed={self.seed}"

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.point] + [f"run.seed={self.seed}"]


def split_values(text: str) -> list[str]:
    """'1,2,[0.25, 1.0]' -> ['1', '2', '[0.25, 1.0]']: commas outside brackets."""
    try:
        values = [value.strip() for value in split_outside_brackets(text)]
    except ValueError as err:
        raise SweepError(f"--grid value list {text!r}: {err}") from None
    if any(v == "" for v in values):
        raise SweepError(f"--grid value list {text!r} has an empty value")
    return values


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        if "=" not in item:
            raise SweepError(f"--grid {item!r}: expected section.key=v1,v2,...")
        key, values = item.split("=", 1)
        if key in (k for k, _ in grid):
            raise SweepError(f"--grid {key}: given twice")
        if key == "run.seed":
            raise SweepError("--grid run.seed: give the seeds with --seeds")
        grid.append((key.strip(), split_values(values)))
    return grid


def make_cells(grid: list[tuple[str, list[str]]], seeds: list[int], also: list[str]) -> list[Cell]:
    """The product of the grid's values, then each --also point (a space-separated set of
    key=value), each with every seed; grid points first, seeds innermost."""
    points = [tuple(zip([k for k, _ in grid], combo)) for combo in itertools.product(*(v for _, v in grid))]
    for text in also:
        point = tuple(tuple(word.split("=", 1)) for word in text.split())
        if not point or any(len(p) != 2 for p in point):
            raise SweepError(f"--also {text!r}: expected 'section.key=value ...'")
        points.append(point)
    seen, cells = set(), []
    for point in points:
        if point in seen:
            continue
        seen.add(point)
        cells += [Cell(point, seed) for seed in seeds]
    return cells


def cell_weight(config: str, base: list[str], cell: Cell) -> float:
    """A cell's expected cost, for the time left: samples per epoch x epochs (M x the files), in
    units of an M = 1 epoch; under copies_on=ranks each copy is also a read and a decode."""
    cfg = load_config(config, [*base, *cell.overrides])
    return cfg.data.copies * cfg.optim.epochs * (1.3 if cfg.data.copies_on == "ranks" else 1.0)


def check_cells(config: str, base: list[str], cells: list[Cell]) -> None:
    """Every cell's config loads (an unknown key, a value of the wrong type or a combination the
    config refuses is one line naming the cell) before any run starts."""
    for cell in cells:
        try:
            load_config(config, [*base, *cell.overrides])
        except ConfigError as err:
            raise SweepError(f"cell {cell.name}: {err}") from None


def sweep_launch(np: int, launcher: str, config: str, sets: list[str]) -> list[str]:
    rank_args = ["--config", config, "--set", *sets]
    return srun_command(np, rank_args) if launcher == "srun" else horovodrun_command(np, "gloo", rank_args)


def grid_record(args, grid, seeds, also) -> dict:
    return {"config": args.config, "set": list(args.set), "grid": [[k, v] for k, v in grid], "seeds": seeds,
            "also": list(also), "np": args.np}


def grid_changes(cells: list[Cell], prev_cells: list[Cell]) -> str | None:
    """What differs from the grid a sweep in this folder asked before (None: nothing)."""
    old, new = {c.name for c in prev_cells}, {c.name for c in cells}
    notes = []
    if sorted(old - new):
        notes.append(f"{len(old - new)} cells of the earlier grid are not asked now (kept, not run): "
                     + ", ".join(sorted(old - new)[:6]) + (" ..." if len(old - new) > 6 else ""))
    if sorted(new - old):
        notes.append(f"{len(new - old)} cells are new: " + ", ".join(sorted(new - old)[:6])
                     + (" ..." if len(new - old) > 6 else ""))
    return "; ".join(notes) or None


def run_sweep(args) -> int:
    out = Path(args.out)
    grid = parse_grid(args.grid)
    try:
        seeds = [int(s) for s in str(args.seeds).split(",")]
    except ValueError:
        raise SweepError(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 0,1,2") from None
    cells = make_cells(grid, seeds, args.also)
    base = [s for s in args.set if not s.startswith("run.out_dir=")]
    check_cells(args.config, base, cells)
    stale = [c.name for c in cells if is_complete(out / "cells" / c.name)
             and cell_settings(out / "cells" / c.name) not in (None, cell_record(args, base, c))]
    if stale:
        raise SweepError(f"{len(stale)} complete cells in {out} ran with other --config/--set/--np than asked now "
                         f"(first: {stale[0]}); their results would be mixed with new ones: use another --out, or "
                         "remove those cell folders to rerun them")
    launcher = args.launcher
    if launcher == "auto":
        launcher = "srun" if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_NTASKS") else "horovodrun"
    out.mkdir(parents=True, exist_ok=True)
    record = grid_record(args, grid, seeds, args.also)
    previous_file = out / "sweep.json"
    if previous_file.exists():
        previous = json.loads(previous_file.read_text())
        prev_cells = make_cells([(k, v) for k, v in previous["grid"]], previous["seeds"], previous.get("also", []))
        changes = grid_changes(cells, prev_cells)
        if changes or previous.get("set") != record["set"] or previous.get("config") != record["config"]:
            print(f"sweep: {out} held another grid: {changes or 'the same cells, other --config/--set'}; "
                  "running the cells asked now", flush=True)
    atomic_json(previous_file, record, indent=1)
    todo = [c for c in cells if not is_complete(out / "cells" / c.name)]
    print(f"sweep: {len(cells)} cells ({len(cells) - len(todo)} complete already), {launcher} -np {args.np}, "
          f"config {args.config}; folder {out}", flush=True)
    durations, failed = [], []
    weights = {c: cell_weight(args.config, base, c) for c in cells}  # for the time left
    for i, cell in enumerate(cells, 1):
        folder = out / "cells" / cell.name
        if is_complete(folder):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        atomic_json(folder / "cell.json", cell_record(args, base, cell), indent=1)
        sets = [*base, *cell.overrides, f"run.out_dir={folder}", "run.resume=auto"]
        t0 = time.time()
        with open(folder / "sweep.log", "a") as log:
            try:
                code = subprocess.run(sweep_launch(args.np, launcher, args.config, sets), stdout=log,
                                      stderr=subprocess.STDOUT, timeout=args.cell_timeout).returncode
            except subprocess.TimeoutExpired:
                code = f"timeout after --cell-timeout {args.cell_timeout:g} s"
        seconds = time.time() - t0
        durations.append((seconds, weights[cell]))
        left = sum(weights[c] for c in cells[i:] if not is_complete(out / "cells" / c.name))
        per_weight = sum(d for d, _ in durations) / sum(w for _, w in durations)
        eta = f"about {format_seconds(left * per_weight)} left" if left else "the last one"
        if code != 0 or not is_complete(folder):
            failed.append(cell.name)
            print(f"cell {i}/{len(cells)} {cell.name}: FAILED ({'exit ' if isinstance(code, int) else ''}{code}) "
                  f"after {seconds:.0f} s; log: {folder / 'sweep.log'}; {eta}", flush=True)
            continue
        result = json.loads((folder / "result.json").read_text())
        print(f"cell {i}/{len(cells)} {cell.name}: top-1 {result['val_top1']:.1f}% in {seconds:.0f} s; {eta}",
              flush=True)
    curves = complete_curves(out, cells)
    rows = summarize(cells, curves)
    write_tables(out, rows)
    plot_curves(out, cells, curves)
    print(f"sweep: wrote {out / 'table.csv'}, {out / 'table.md'} and {out}/top1-*.png", flush=True)
    if args.report:
        from hvd_ba.launch.sweep_report import write_report

        write_report(Path(args.report), out, rows, record)
        print(f"sweep: wrote {args.report}", flush=True)
    if failed:
        print(f"sweep: {len(failed)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cell_record(args, base: list[str], cell: Cell) -> dict:
    """What a cell ran with (OUT/cells/<name>/cell.json): a complete cell counts for a later
    sweep only when it ran with the same."""
    return {"config": args.config, "set": list(base), "overrides": cell.overrides, "np": args.np}


def cell_settings(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "cell.json").read_text())
    except (OSError, ValueError):
        return None


def format_seconds(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ------------------------------------------------------------------------------- the table


def cell_curve(folder: Path) -> list[dict]:
    """Per evaluated epoch: epoch, steps, top-1, cumulative wall time, samples and bytes read."""
    records = read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
    result = json.loads((folder / "result.json").read_text()) if (folder / "result.json").exists() else {}
    per_epoch = result.get("steps", 0) / max(1, result.get("epochs", 1))
    curve, wall, samples, nbytes = [], 0.0, 0, 0
    for r in records:
        wall += r["epoch_time_s"]
        samples += r["samples"]
        nbytes += r["bytes_read"]
        if r.get("val_top1") is not None:
            curve.append({"epoch": r["epoch"], "steps": round(r["epoch"] * per_epoch), "top1": r["val_top1"],
                          "wall_s": wall, "samples": samples, "bytes": nbytes,
                          "samples_per_s": r.get("samples_per_s"), "chance": result.get("chance_top1", 0.0)})
    return curve


def top1_at(curve: list[dict], seconds: float) -> float:
    """Top-1 after `seconds` of training, interpolated linearly between evaluations (from chance
    at 0 s): a run whose evaluations fall on either side of the budget is not judged by the
    earlier one alone."""
    points = [(0.0, curve[0]["chance"])] + [(e["wall_s"], e["top1"]) for e in curve]
    for (t0, y0), (t1, y1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return y0 + (y1 - y0) * (seconds - t0) / (t1 - t0) if t1 > t0 else y1
    return points[-1][1]


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def complete_curves(out: Path, cells: list[Cell]) -> dict:
    """Cell -> its curve (cell_curve), for the complete cells that evaluated at least once; read
    once for the table and the plots."""
    curves = {c: cell_curve(out / "cells" / c.name) for c in cells if is_complete(out / "cells" / c.name)}
    return {c: v for c, v in curves.items() if v}


def summarize(cells: list[Cell], curves: dict) -> list[dict]:
    """One row per grid point over its complete seeds. Equal wall time: top-1 of each cell after
    the shortest complete cell's training time (top1_at: interpolated between evaluations)."""
    if not curves:
        return []
    budget = min(v[-1]["wall_s"] for v in curves.values())
    rows = []
    for point in dict.fromkeys(c.point for c in cells):
        mine = [v for c, v in curves.items() if c.point == point]
        if not mine:
            continue
        final = [v[-1]["top1"] for v in mine]
        timed = [top1_at(v, budget) for v in mine]
        top1, top1_sd = mean_std(final)
        timed_mean, timed_sd = mean_std(timed)
        rows.append({
            **{k: v for k, v in point}, "seeds": len(mine), "epochs": mine[0][-1]["epoch"],
            "steps": mine[0][-1]["steps"], "top1_mean": top1, "top1_std": top1_sd,
            "wall_budget_s": budget, "top1_at_budget_mean": timed_mean, "top1_at_budget_std": timed_sd,
            "samples": mine[0][-1]["samples"], "bytes_read": sum(v[-1]["bytes"] for v in mine) / len(mine),
            "wall_s": sum(v[-1]["wall_s"] for v in mine) / len(mine),
            "samples_per_s": sum(v[-1]["samples"] / v[-1]["wall_s"] for v in mine) / len(mine),
            "curve_top1": [mean_std([v[k]["top1"] for v in mine if k < len(v)])[0] for k in range(len(mine[0]))],
            "curve_steps": [e["steps"] for e in mine[0]],
            "curve_seeds": [[(e["steps"], e["top1"]) for e in v] for v in mine],
        })
    return rows


TABLE_COLUMNS = ["seeds", "epochs", "steps", "top1_mean", "top1_std", "top1_at_budget_mean", "top1_at_budget_std",
                 "wall_budget_s", "samples", "bytes_read", "wall_s", "samples_per_s"]


def write_tables(out: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in TABLE_COLUMNS and not k.startswith("curve_")))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[*keys, *TABLE_COLUMNS], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "table.csv", text.getvalue())
    atomic_write(out / "table.md", markdown_table(rows, keys))


def markdown_table(rows: list[dict], keys: list[str]) -> str:
    budget = f" ({rows[0]['wall_budget_s']:.0f} s)" if rows else ""
    head = [k.split(".")[-1] for k in keys] + ["seeds", "steps", "top-1 % (end)", f"top-1 % at equal time{budget}",
                                                "samples", "MB read", "train s", "samples/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(k, "–")) for k in keys] + [
            str(r["seeds"]), str(r["steps"]), f"{r['top1_mean']:.1f} ± {r['top1_std']:.1f}",
            f"{r['top1_at_budget_mean']:.1f} ± {r['top1_at_budget_std']:.1f}", str(r["samples"]),
            f"{r['bytes_read'] / 1e6:.1f}", f"{r['wall_s']:.0f}", f"{r['samples_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n–: the config's own value (the grid does not set it for that row).\n"


def plot_curves(out: Path, cells: list[Cell], curves_of: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list(dict.fromkeys(c.point for c in cells))
    for axis, label in (("epoch", "epoch"), ("wall_s", "wall time, s"), ("bytes", "bytes read, MB")):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for point in points:
            curves = [v for c, v in curves_of.items() if c.point == point]
            if not curves:
                continue
            n = min(len(v) for v in curves)
            xs = [sum(v[k][axis] for v in curves) / len(curves) / (1e6 if axis == "bytes" else 1) for k in range(n)]
            ys = [mean_std([v[k]["top1"] for v in curves]) for k in range(n)]
            name = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in point) or "run"
            ax.errorbar(xs, [m for m, _ in ys], yerr=[s for _, s in ys], label=name, marker="o", ms=3, capsize=2)
        ax.set_xlabel(label)
        ax.set_ylabel("val top-1, % (mean ± sd over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"top1-{axis.split('_')[0]}.png", dpi=110)
        plt.close(fig)
