"""The table and plots of a sweep's cells (launch/sweep.py runs them; launch/sweep_report.py
writes the BA report from the rows): each complete cell's curve of top-1 against epochs, wall
time and bytes read; per grid point, over its seeds, the mean and sample standard deviation at
equal steps (the end) and at equal wall time (the shortest cell's training time, interpolated
between evaluations). A cell here is a sweep.Cell: its folder OUT/cells/<name>, its grid point
(key, value) pairs.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from hvd_ba.fsio import atomic_write
from hvd_ba.train.records import read_jsonl
from hvd_ba.train.run_dir import is_complete


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


def complete_curves(out: Path, cells: list) -> dict:
    """Cell -> its curve (cell_curve), for the complete cells that evaluated at least once; read
    once for the table and the plots."""
    curves = {c: cell_curve(out / "cells" / c.name) for c in cells if is_complete(out / "cells" / c.name)}
    return {c: v for c, v in curves.items() if v}


def summarize(cells: list, curves: dict) -> list[dict]:
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


def grid_keys(rows: list[dict]) -> list[str]:
    """The keys the grid sets in the rows (data.copies, ...), in order: the table's first columns."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in TABLE_COLUMNS and not k.startswith("curve_")))


def write_tables(out: Path, rows: list[dict]) -> None:
    keys = grid_keys(rows)
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


def plot_curves(out: Path, cells: list, curves_of: dict) -> None:
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
