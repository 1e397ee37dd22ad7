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
epochs, wall time and bytes read; launch/sweep_table.py). `--report FILE` writes the BA report
(launch/sweep_report.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hvd_ba.cluster import split_outside_brackets
from hvd_ba.config import ConfigError, load_config
from hvd_ba.fsio import atomic_json
from hvd_ba.launch.sweep_report import write_report
from hvd_ba.launch.sweep_table import complete_curves, plot_curves, summarize, write_tables
from hvd_ba.launchers import horovodrun_command, srun_command
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


def choose_launcher(asked: str) -> str:
    """--launcher: auto is srun inside a Slurm allocation, else horovodrun."""
    if asked != "auto":
        return asked
    return "srun" if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_NTASKS") else "horovodrun"


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
    grid, seeds = parse_grid(args.grid), parse_seeds(args.seeds)
    cells = make_cells(grid, seeds, args.also)
    base = [s for s in args.set if not s.startswith("run.out_dir=")]
    check_cells(args.config, base, cells)
    refuse_stale_cells(args, base, out, cells)
    launcher = choose_launcher(args.launcher)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out '{out}': a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    record = grid_record(args, grid, seeds, args.also)
    say_grid_changes(out, cells, record)
    atomic_json(out / "sweep.json", record, indent=1)
    todo = [c for c in cells if not is_complete(out / "cells" / c.name)]
    print(f"sweep: {len(cells)} cells ({len(cells) - len(todo)} complete already), {launcher} -np {args.np}, "
          f"config {args.config}; folder {out}", flush=True)
    failed = run_cells(args, base, out, cells, launcher)
    rows = write_table(out, cells)
    if args.report:
        write_report(Path(args.report), out, rows, record)
        print(f"sweep: wrote {args.report}", flush=True)
    if failed:
        print(f"sweep: {len(failed)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def parse_seeds(text) -> list[int]:
    try:
        return [int(s) for s in str(text).split(",")]
    except ValueError:
        raise SweepError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None


def refuse_stale_cells(args, base: list[str], out: Path, cells: list[Cell]) -> None:
    """Complete cells that ran with other settings than asked now would mix into the table: refused."""
    stale = [c.name for c in cells if is_complete(out / "cells" / c.name)
             and cell_settings(out / "cells" / c.name) not in (None, cell_record(args, base, c))]
    if stale:
        raise SweepError(f"{len(stale)} complete cells in {out} ran with other --config/--set/--np than asked now "
                         f"(first: {stale[0]}); their results would be mixed with new ones: use another --out, or "
                         "remove those cell folders to rerun them")


def say_grid_changes(out: Path, cells: list[Cell], record: dict) -> None:
    """A line when the sweep asked before in this folder (OUT/sweep.json) was another."""
    previous_file = out / "sweep.json"
    if not previous_file.exists():
        return
    try:
        previous = json.loads(previous_file.read_text())
        prev_cells = make_cells([(k, v) for k, v in previous["grid"]], previous["seeds"], previous.get("also", []))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, SweepError):  # torn, foreign, another version
        print(f"sweep: {previous_file} does not read as a sweep's record (damaged or of another version); it is "
              "rewritten for the cells asked now", flush=True)
        return
    changes = grid_changes(cells, prev_cells)
    if changes or previous.get("set") != record["set"] or previous.get("config") != record["config"]:
        print(f"sweep: {out} held another grid: {changes or 'the same cells, other --config/--set'}; "
              "running the cells asked now", flush=True)


def run_cells(args, base: list[str], out: Path, cells: list[Cell], launcher: str) -> list[str]:
    """Each cell not complete yet, one after the other, with a line each (its top-1, or FAILED,
    and the time left); returns the names of the cells that failed."""
    durations, failed = [], []
    weights = {c: cell_weight(args.config, base, c) for c in cells}  # for the time left
    for i, cell in enumerate(cells, 1):
        folder = out / "cells" / cell.name
        if is_complete(folder):
            continue
        code, seconds = run_cell(args, base, cell, folder, launcher)
        durations.append((seconds, weights[cell]))
        left = sum(weights[c] for c in cells[i:] if not is_complete(out / "cells" / c.name))
        eta = time_left(durations, left)
        if code != 0 or not is_complete(folder):
            failed.append(cell.name)
            print(f"cell {i}/{len(cells)} {cell.name}: FAILED ({'exit ' if isinstance(code, int) else ''}{code}) "
                  f"after {seconds:.0f} s; log: {folder / 'sweep.log'}; {eta}", flush=True)
            continue
        result = json.loads((folder / "result.json").read_text())
        print(f"cell {i}/{len(cells)} {cell.name}: top-1 {result['val_top1']:.1f}% in {seconds:.0f} s; {eta}",
              flush=True)
    return failed


def run_cell(args, base: list[str], cell: Cell, folder: Path, launcher: str) -> tuple[int | str, float]:
    """One cell's run (run.resume=auto: from its checkpoint when it has one), its output appended to
    folder/sweep.log; (its exit status, or what ended it, and the seconds it took)."""
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
    return code, time.time() - t0


def time_left(durations: list[tuple[float, float]], left: float) -> str:
    """The time the cells of weight `left` will take at the seconds per weight of those run (seconds, weight)."""
    per_weight = sum(d for d, _ in durations) / sum(w for _, w in durations)
    return f"about {format_seconds(left * per_weight)} left" if left else "the last one"


def write_table(out: Path, cells: list[Cell]) -> list[dict]:
    """OUT/table.csv, OUT/table.md and OUT/top1-*.png from the complete cells; returns the rows."""
    curves = complete_curves(out, cells)
    rows = summarize(cells, curves)
    write_tables(out, rows)
    plot_curves(out, cells, curves)
    print(f"sweep: wrote {out / 'table.csv'}, {out / 'table.md'} and {out}/top1-*.png", flush=True)
    return rows


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
