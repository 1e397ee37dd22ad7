"""`bench loader` runs end to end on real photos and prints its ratios (no speed threshold here:
targets are judged from the benchmark's own output, not in unit tests)."""
import re

from conftest import run_cli


def test_bench_loader_prints_stage_costs_and_ratios(tmp_path):
    r = run_cli("bench", "loader", "--copies", "1,2", "--images", "18", "--size", "64", "--workers", "1", "--batch", "4",
                "--corpus", str(tmp_path / "photos"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    files = list((tmp_path / "photos" / "train").rglob("*.JPEG"))
    assert len(files) == 18 and len({f.parent.name for f in files}) == 9  # 9 real photos, 2 cuts each
    for stage in ("naive decode", "ours decode (once, DCT-scaled)", "ours crop+resize", "naive ToTensor+Normalize"):
        assert re.search(rf"{re.escape(stage)}\s+\d+\.\d\d", out), stage
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"ratios \(hvd_ba / naive\): M=1: (\d+\.\d\d), M=2: (\d+\.\d\d)", last)
    assert m, last
    assert all(float(v) > 0 for v in m.groups())
