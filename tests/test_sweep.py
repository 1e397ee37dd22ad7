"""`python -m hvd_ba sweep` on a tiny grid under horovodrun -np 2: cells, resume, table, plots, report."""
import csv
import json
import re

import pytest

from helpers import cli, run_cli


TINY = ["model.ghost_size=8", "data.unique_batch=8", "data.workers=0", "optim.epochs=2", "optim.warmup_epochs=0",
        "run.max_steps_per_epoch=2", "run.checkpoint_every=1", "run.log_every=1"]


@pytest.mark.integration
@pytest.mark.timeout(1500)  # its runs' own limit is 900 s, and it resumes after them
def test_a_tiny_sweep_runs_resumes_and_reports(small_data, tmp_path):
    out, report = tmp_path / "sweep", tmp_path / "docs" / "ba-report.md"
    args = ["sweep", "--grid", "data.copies=1,2", "--grid", "data.copies_on=rank,ranks", "--seeds", "0,1",
            "--set", f"data.path={small_data}", *TINY, "--out", str(out), "--report", str(report)]
    r = run_cli(*args, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    progress = re.findall(r"^cell (\d)/8 (\S+): top-1 [\d.]+% in \d+ s; (about \d+ \w+ left|the last one)$", r.stdout, re.M)
    assert [int(i) for i, _, _ in progress] == list(range(1, 9)), r.stdout
    assert progress[0][1] == "copies=1,copies_on=rank,seed=0" and progress[-1][2] == "the last one"
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["data.copies"], row["data.copies_on"]) for row in rows] == [
        ("1", "rank"), ("1", "ranks"), ("2", "rank"), ("2", "ranks")]
    for row in rows:
        assert row["seeds"] == "2" and row["steps"] == "4" and 0 <= float(row["top1_mean"]) <= 100
    by = {(row["data.copies"], row["data.copies_on"]): row for row in rows}
    assert float(by["2", "ranks"]["bytes_read"]) > 1.9 * float(by["2", "rank"]["bytes_read"])  # RA reads M-fold
    assert int(by["2", "rank"]["samples"]) == 2 * int(by["1", "rank"]["samples"])
    assert "| copies | copies_on | seeds |" in (out / "table.md").read_text()
    for axis in ("epoch", "wall", "bytes"):
        assert (out / f"top1-{axis}.png").stat().st_size > 5000
    text = report.read_text()
    assert "**(a) BA against M = 1 at the same 4 steps.**" in text and "**(c) BA (copies on the rank)" in text
    assert "**(b) Steps to reach M = 1's final top-1" in text and "**(d)**: not in this grid" in text
    assert re.search(r"M = 2: [\d.]+ ± [\d.]+ % \(n = 2\), [+-][\d.]+ points \(combined sd [\d.]+; "
                     r"(beyond|inside) the seed-to-seed spread\)", text), text
    assert "python -m hvd_ba sweep --config demo --grid data.copies=1,2 --grid data.copies_on=rank,ranks" in text, text[:800]
    assert (report.parent / "img" / "ba-report-top1-wall.png").exists()

    # a complete cell is not run again; an interrupted one resumes from its checkpoint: here one
    # that died after step 4, before its checkpoint and its result
    cell = out / "cells" / "copies=2,copies_on=ranks,seed=1"
    (cell / "result.json").unlink()
    (cell / "checkpoints" / "ckpt-000000004.pt").unlink()
    (cell / "checkpoints" / "latest").write_text("ckpt-000000003.pt")
    r = run_cli(*args, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "sweep: 8 cells (7 complete already)" in r.stdout
    assert re.findall(r"^cell (\d)/8 (\S+):", r.stdout, re.M) == [("8", "copies=2,copies_on=ranks,seed=1")]
    log = (cell / "sweep.log").read_text()
    assert re.search(r"resumed from \S+ckpt-000000003.pt", log), log[-2000:]
    assert [s["step"] for s in map(json.loads, (cell / "steps.jsonl").read_text().splitlines())] == [1, 2, 3, 4]

    # the same cells with other settings: refused, not mixed into the table
    r = run_cli(*[a if a != "optim.epochs=2" else "optim.epochs=3" for a in args], timeout=120)
    assert r.returncode == 2 and "8 complete cells" in r.stderr and "ran with other --config/--set/--np" in r.stderr

    # another grid: it says what differs and runs only what is asked
    r = run_cli("sweep", "--grid", "data.copies=2", "--seeds", "1,2", "--set", f"data.path={small_data}", *TINY,
                "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"held another grid: 8 cells of the earlier grid are not asked now .*; 2 cells are new: "
                     r"copies=2,seed=1, copies=2,seed=2", r.stdout), r.stdout
    assert len(re.findall(r"^cell \d/2 ", r.stdout, re.M)) == 2
    assert json.loads((out / "sweep.json").read_text())["seeds"] == [1, 2]


@pytest.mark.unit
def test_a_bad_grid_is_one_line_before_any_run(small_data, tmp_path):
    """In this process: the unit tier's guard fails the test if the sweep starts any process."""
    out = tmp_path / "sweep"
    r = cli("sweep", "--grid", "data.copies=2,x", "--set", f"data.path={small_data}", *TINY, "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip() == (
        "hvd_ba sweep: error: cell copies=x,seed=0: config key 'data.copies': expected an integer, got 'x'")
    r = cli("sweep", "--grid", "data.copis=2", "--set", f"data.path={small_data}", *TINY, "--out", str(out))
    assert r.returncode == 2 and "unknown config key 'data.copis'" in r.stderr
    assert not out.exists()  # nothing ran, nothing was written
