"""`bench loader` runs end to end on real photos and prints its ratios (no speed threshold here:
targets are judged from the benchmark's own output, not in unit tests)."""
import json
import re

import pytest

from helpers import run_cli


@pytest.mark.integration
def test_bench_loader_prints_stage_costs_and_ratios(tmp_path):
    r = run_cli("bench", "loader", "--copies", "1,2", "--images", "18", "--size", "64", "--workers", "1", "--batch", "4",
                "--corpus", str(tmp_path / "photos"), "--shards", "--rounds", "2", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    files = list((tmp_path / "photos" / "train").rglob("*.JPEG"))
    assert len(files) == 18 and len({f.parent.name for f in files}) == 9  # 9 real photos, 2 cuts each
    for stage in ("naive decode", "ours decode (once, DCT-scaled)", "ours crop+resize", "naive ToTensor+Normalize"):
        assert re.search(rf"{re.escape(stage)}\s+\d+\.\d\d", out), stage
    naive, shards = out.strip().splitlines()[-2:]
    m = re.fullmatch(r"ratios \(hvd_ba / naive\): M=1: (\d+\.\d\d), M=2: (\d+\.\d\d)", naive)
    assert m, naive
    assert all(float(v) > 0 for v in m.groups())
    m = re.fullmatch(r"ratios \(shards / folder\): M=1: (\d+\.\d\d), M=2: (\d+\.\d\d) \(goal >= 0.95; best of 2 "
                         r"each\)", shards)
    assert m and all(float(v) > 0 for v in m.groups()), shards
    packed = list(tmp_path.glob("photos-packed-*/train-000000.tar"))
    assert len(packed) == 1  # the corpus packed beside it, once


@pytest.mark.integration
def test_bench_pack_and_startup_print_their_ratios_and_figures(tmp_path):
    r = run_cli("bench", "pack", "--images", "18", "--rounds", "2", "--shard-size", "256K", "--corpus",
                str(tmp_path / "photos"), "--dest", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert sum(line.startswith("  round ") for line in lines) == 2, r.stdout
    assert re.fullmatch(r"ratio \(pack / plain copy\): \d+\.\d\d \(goal >= 0.8\)", lines[-1]), lines[-1]
    assert not list(tmp_path.glob("bench-pack-*"))  # its scratch folder removed
    figures = tmp_path / "startup.json"
    r = run_cli("bench", "startup", "--entries", "3000", "--no-runs", "--dir", str(tmp_path / "startup"), "--json",
                str(figures), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(figures.read_text())
    assert [r["entries"] for r in rows.values()] == [2600, 3000, 3000], rows
    assert all(r["worker_pss_mb"] > 10 and r["load_s"] >= 0 for r in rows.values()), rows
    tree = tmp_path / "startup" / "tree-3000"
    assert len(list((tree / "train").iterdir())) == 1000 and len(list((tree / "train").rglob("*.JPEG"))) == 3000
    assert "folder (3000 files) against the demo: RSS" in r.stdout and "(goals: <= 60 MB, <= 5 s)" in r.stdout


@pytest.mark.unit
def test_ring_allreduce_model_and_projection():
    from hvd_ba.bench.scaling import project, ring_allreduce_s

    # 2(W-1) latencies + 2(W-1)/W of the bytes over the link
    assert ring_allreduce_s(1e8, 1, 1e9, 1e-5) == 0.0
    assert abs(ring_allreduce_s(1e8, 4, 1e9, 1e-5) - (6e-5 + 1.5 * 0.1)) < 1e-12
    rows = project(1e8, 1000.0, 32, [8, 64, 1024], [10.0, 100.0], 1e-5)
    cell = {(r["bandwidth_gbit"], r["workers"], r["config"]): r for r in rows}
    for gbit in (10.0, 100.0):
        for w in (8, 64, 1024):
            plain, ba = cell[gbit, w, "plain M=1"], cell[gbit, w, "BA M=4"]
            fp16, passes = cell[gbit, w, "BA M=4 + fp16"], cell[gbit, w, "plain M=1, 4 passes/allreduce"]
            assert abs(ba["compute_s"] - 4 * plain["compute_s"]) < 1e-12  # M times the samples per allreduce
            assert ba["allreduce_s"] == plain["allreduce_s"] and abs(fp16["allreduce_s"] * 2 - ba["allreduce_s"]) < 6e-5 * w
            assert plain["efficiency"] < ba["efficiency"] < fp16["efficiency"] <= 1.0
            assert abs(passes["efficiency"] - ba["efficiency"]) < 1e-12  # same compute per allreduce
        assert cell[gbit, 8, "plain M=1"]["efficiency"] > cell[gbit, 1024, "plain M=1"]["efficiency"]
    # a measured overlap hides part of the allreduce, at most the backward's share of the compute
    hidden = {(r["bandwidth_gbit"], r["workers"], r["config"]): r for r in project(1e8, 1000.0, 32, [8], [10.0], 1e-5,
                                                                                    overlap=0.5)}
    plain, ba = cell[10.0, 8, "plain M=1"], hidden[10.0, 8, "plain M=1"]
    assert ba["exposed_s"] == pytest.approx(plain["allreduce_s"] - 2 / 3 * 0.032)  # capped: 0.5 x 0.14 s > 21 ms
    assert ba["efficiency"] > plain["efficiency"] and plain["exposed_s"] == plain["allreduce_s"]
    few = project(1e6, 1000.0, 32, [8], [100.0], 1e-5, overlap=0.5)[0]  # 1 MB: the half fits in the backward
    assert few["exposed_s"] == pytest.approx(0.5 * few["allreduce_s"])
    # 32 samples at 1000/s = 32 ms of compute; 1e8 bytes at 10 Gbit/s, W = 8: 0.14 s + 0.14 ms
    p = cell[10.0, 8, "plain M=1"]
    assert abs(p["allreduce_s"] - (14e-5 + 1.75 * 1e8 / 1.25e9)) < 1e-9
    assert abs(p["efficiency"] - 0.032 / (0.032 + p["allreduce_s"])) < 1e-12


@pytest.mark.integration
@pytest.mark.timeout(1200)  # the bench's own limit is 900 s
def test_bench_scaling_measures_both_backends_and_projects(tmp_path):
    """Real horovodrun -np 2 over Gloo and MPI and torchrun (torch.distributed over Gloo) at
    M = 1, 2: the breakdowns side by side, the measured overlap, and the projection using it."""
    r = run_cli("bench", "scaling", "--copies-list", "1,2", "--steps", "2", "--warmup", "1", "--unique-batch", "4",
                "--overlap", "measured", "--corpus", str(tmp_path / "photos"), "--out", str(tmp_path / "out"),
                timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    import json

    result = json.loads((tmp_path / "out" / "scaling.json").read_text())
    measured = {(m["backend"], m["copies"]): m for m in result["measured"]}
    assert set(measured) == {(b, m) for b in ("gloo", "mpi", "torch") for m in (1, 2)}
    for backend, controller in (("gloo", "gloo"), ("mpi", "mpi"), ("torch", "gloo")):
        one, two = measured[backend, 1], measured[backend, 2]
        assert one["controller"] == controller and one["world"] == 2
        for m in (one, two):
            o = m["overlap"]
            assert o["local_step_s"] > 0 and o["distributed_step_s"] > 0 and 0 <= o["hidden_fraction"] <= 1
            assert o["exposed_allreduce_s"] == pytest.approx(max(0.0, o["distributed_step_s"] - o["local_step_s"]))
            # the timed training path really averaged: the ranks, apart after the local steps, stayed together
            assert o["parameter_spread_local"] > 1e-4 and o["parameter_spread_distributed"] < 1e-6, o
            assert m["allreduce_s_per_mb"] == pytest.approx(m["seconds_per_step"]["allreduce"]
                                                            / (m["wire_bytes_per_step"] / 1e6))
        assert one["allreduce_fit"] == two["allreduce_fit"]  # one launch per backend measured both M
        assert one["wire_bytes_per_step"] == two["wire_bytes_per_step"] > 1e6  # the model's gradients, fp32
        assert two["bytes_per_sample"] * 2 == one["bytes_per_sample"]  # M copies: half the bytes per sample
        assert two["bytes_per_unique_image"] == one["bytes_per_unique_image"]
        for m in (one, two):
            s = m["seconds_per_step"]
            assert all(v > 0 for v in s.values()) and 0 < m["comm_fraction"] < 1
            assert abs(sum(s.values()) - m["step_s"]) < 1e-9
            fit = m["allreduce_fit"]
            assert fit["bandwidth_bytes_per_s"] > 0 and len(fit["bytes"]) == len(fit["seconds"]) == 6
    import torch

    assert result["gpu_rate_source"] == ("measured" if torch.cuda.is_available() else "assumed: no CUDA here")
    assert result["grad_bytes_resnet50"] == 4 * 25_557_032  # torchvision's ResNet-50 parameters, fp32
    assert len(result["projection"]) == 3 * 8 * 4  # bandwidths x W = 8..1024 x configurations
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 10_000
    assert re.search(r"^\s+gloo\s+2\s+16\s", r.stdout, re.M), r.stdout  # 2 ranks x 4 unique x M=2 samples
    assert re.search(r"^\s+torch/gloo\s+2\s+\d+\.\d", r.stdout, re.M), r.stdout  # the side-by-side table
    assert "scaling efficiency" in r.stdout and "assumed" in r.stdout
    hidden = measured["gloo", 2]["overlap"]["hidden_fraction"]
    assert result["overlap"] == hidden and result["overlap_source"] == "measured: horovod/gloo, M=2"
    assert f"{100 * hidden:.0f}% of the allreduce hidden behind the backward pass (measured" in r.stdout


@pytest.mark.integration
def test_bench_gpu_reduced_form_on_cpu(tmp_path):
    """No CUDA here: the reduced form, the same measurements (ceiling, loader- and device-fed)."""
    out = tmp_path / "gpu.json"
    r = run_cli("bench", "gpu", "--copies", "1,2", "--steps", "2", "--warmup", "1", "--workers", "1",
                "--corpus", str(tmp_path / "photos"), "--json", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    result = json.loads(out.read_text())
    rows = {(row["copies"], row["where"]): row for row in result["rows"]}
    assert set(rows) == {(1, "loader"), (1, "device"), (2, "loader"), (2, "device")}
    for (m, _), row in rows.items():
        assert row["samples_per_step"] == 8 * m
        assert row["ceiling_samples_per_s"] > 0 and row["loader_samples_per_s"] > 0
        assert abs(row["ratio"] - row["loader_samples_per_s"] / row["ceiling_samples_per_s"]) < 1e-9
        assert row["processes_for_ceiling"] > 0
    assert "reduced form" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("ratios (loader-fed / ceiling): M=1 loader: ")
