"""The theory tools on real networks: Hessian-vector products and power iteration against an
explicit Hessian, Horovod ranks against one process, and lambda tracking that leaves training
untouched."""
import json
import subprocess

import pytest
import torch
import torch.nn.functional as F

from hvd_ba.theory.hessian import AnalysisMode, BatchKind, batch_hvp, top_eigenvalue
from hvd_ba.launchers import horovodrun_command
from hvd_ba.models import GhostBatchNorm2d
from hvd_ba.train.records import read_jsonl
from helpers import ENV, ROOT, run_cli, side_by_side


def operator(matrix):
    return lambda v: [matrix @ v[0]]


@pytest.mark.unit
@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("eigenvalues", [[5.0, 2.0, -1.0, 0.5], [1.0, -6.0, 0.2, 0.0], [3.0, 3.0 - 1e-2, 1.0, 1.0]])
def test_the_top_algebraic_eigenvalue_is_found(method, eigenvalues):
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    matrix = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    value, products = top_eigenvalue(operator(matrix), [torch.zeros(d, dtype=torch.float64)], tol=1e-10,
                                     max_iter=20_000, method=method)
    assert value == pytest.approx(max(eigenvalues), rel=1e-4, abs=1e-9) and products > 1


@pytest.mark.unit
def test_lanczos_finds_a_small_top_above_a_large_negative_bulk():
    """The case of a network near a flat minimum, where power iteration's stopping rule fails: a
    top of 1e-3 over eigenvalues down to -2 in 400 dimensions."""
    d = 400
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    values = torch.cat([torch.tensor([1e-3]), -2 * torch.rand(d - 1, generator=torch.Generator().manual_seed(3),
                                                                   dtype=torch.float64)])
    matrix = q @ torch.diag(values) @ q.T
    value, products = top_eigenvalue(operator(matrix), [torch.zeros(d, dtype=torch.float64)], tol=1e-6, max_iter=3000)
    assert value == pytest.approx(1e-3, rel=1e-3) and products < 3000


class FixedBatches:
    """Stands in for analyze.Batches: the same tensors for every part."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def part(self, kind, k, part, parts):
        per = len(self.x) // parts
        return self.x[part * per:(part + 1) * per], self.y[part * per:(part + 1) * per]


@pytest.mark.unit
def test_hessian_vector_products_and_lambda_match_the_explicit_hessian():
    """A small conv net with ghost BN in training mode (float64): HVPs equal central differences
    of the gradient, and the top eigenvalue from power iteration equals that of the explicit
    Hessian, BN's dependence on the weights included; BN running statistics are left as they
    were. (torch.func.jacrev(jacrev) gives a non-symmetric, wrong Hessian through batch_norm in
    torch 2.14, so the explicit one is torch.autograd.functional.hessian.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), GhostBatchNorm2d(4, ghost_size=4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    before = {n: b.clone() for n, b in model.named_buffers()}

    def loss_of(flat):
        chunks = flat.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        params |= {n: b.clone() for n, b in before.items()}  # BN updates its own copies
        losses = [F.cross_entropy(torch.func.functional_call(model, params, (x[p * 4:(p + 1) * 4],)),
                                  y[p * 4:(p + 1) * 4]) for p in range(2)]
        return sum(losses) / 2

    def gradient(flat):
        flat = flat.detach().requires_grad_()
        return torch.autograd.grad(loss_of(flat), flat)[0]

    with AnalysisMode(model):
        hvp, loss = batch_hvp(model, FixedBatches(x, y), BatchKind("t", 8, 1), 0, parts=2, label_smoothing=0.0)
        v = [torch.randn(s, dtype=torch.float64) for s in shapes]
        v_flat = torch.cat([t.reshape(-1) for t in v])
        hv = torch.cat([t.reshape(-1) for t in hvp(v)])
        eps = 1e-5
        central = (gradient(flat0 + eps * v_flat) - gradient(flat0 - eps * v_flat)) / (2 * eps)
        assert torch.allclose(hv, central, rtol=1e-5, atol=1e-7)
        explicit = torch.autograd.functional.hessian(loss_of, flat0)
        assert torch.allclose(explicit, explicit.T, atol=1e-12)
        lanczos, _ = top_eigenvalue(hvp, list(model.parameters()), tol=1e-9, max_iter=5000)
        power, _ = top_eigenvalue(hvp, list(model.parameters()), tol=1e-9, max_iter=5000, method="power")
    assert loss == pytest.approx(float(loss_of(flat0)), rel=1e-9)
    top = float(torch.linalg.eigvalsh(explicit)[-1])
    assert lanczos == pytest.approx(top, rel=1e-6) and power == pytest.approx(top, rel=1e-4)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


@pytest.mark.integration
def test_two_ranks_give_the_answers_of_one_process(small_data, tmp_path):
    # A fixed number of power iterations (tol 0), so both compute the same sequence of vectors.
    common = ["--config", "demo", "--batches", "2", "--unique", "8", "--parts", "2", "--method", "power", "--tol", "0",
              "--max-iter", "12",
              "--threads", "1",  # float32 reductions depend on the thread count; this batch is sensitive
              "--set", f"data.path={small_data}", "model.ghost_size=16", "model.zero_init_residual=false",
              "data.manifest_dir=null", "augment.size=32"]
    cmd = horovodrun_command(2, "gloo", [*common, "--out", str(tmp_path / "two.json")])
    cmd[cmd.index("train")] = "analyze"
    cmd.insert(cmd.index("analyze") + 1, "lambda-max")
    one, two = side_by_side(  # independent, each with its thread count fixed
        lambda: run_cli("analyze", "lambda-max", *common, "--out", str(tmp_path / "one.json"), timeout=600),
        lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert b["ranks"] == 2 and a["ranks"] == 1
    assert list(a["kinds"]) == ["plain B=8", "BA B=8 x M=4", "plain B=32"]
    for name in a["kinds"]:
        assert a["kinds"][name]["losses"] == pytest.approx(b["kinds"][name]["losses"], rel=1e-6)
        assert a["kinds"][name]["per_batch"] == pytest.approx(b["kinds"][name]["per_batch"], rel=1e-6)
        assert a["kinds"][name]["lambda_max"] > 0


# no loader process and one torch thread: the two runs side by side fill the 2 cores, not oversubscribe them
RUN = ["data.workers=0", "run.threads=1", "data.copies=2", "data.unique_batch=8", "model.ghost_size=16",
       "optim.epochs=1", "optim.warmup_epochs=0", "run.max_steps_per_epoch=6", "run.log_every=1",
       "data.manifest_dir=null"]


@pytest.mark.integration
def test_lambda_tracking_records_and_leaves_training_untouched(small_data, tmp_path):
    runs = {"plain": tmp_path / "plain", "tracked": tmp_path / "tracked"}

    def train(name, *extra):
        return run_cli("train", "--config", "demo", *extra, "--set", f"data.path={small_data}",
                       f"run.out_dir={runs[name]}", *RUN, timeout=600)

    # independent runs with the same thread count (from the same CPU mask), side by side
    for r in side_by_side(lambda: train("plain"), lambda: train("tracked", "--track-lambda-every", "3")):
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    losses = {n: [s["loss"] for s in read_jsonl(out / "steps.jsonl")] for n, out in runs.items()}
    assert losses["plain"] == losses["tracked"] and len(losses["plain"]) == 6
    records = read_jsonl(runs["tracked"] / "lambda.jsonl")
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert list(r["kinds"]) == ["plain B=8", "BA B=8 x M=2", "plain B=16"]
        assert all(k["lambda_max"] > 0 for k in r["kinds"].values())
        assert r["two_over_lr"] == pytest.approx(2 / r["lr"])
    assert not (runs["plain"] / "lambda.jsonl").exists()

    # the analysis commands on the run's checkpoint
    r = run_cli("analyze", "lambda-max", "--run", str(runs["tracked"]), "--batches", "1", "--tol", "1e-2",
                timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads((runs["tracked"] / "analysis" / "lambda-max-step6.json").read_text())
    assert result["step"] == 6 and result["source"].endswith("ckpt-000000006.pt")
    assert "2/lr" in r.stdout and "BA B=8 x M=2" in r.stdout
    r = run_cli("analyze", "grad-variance", "--run", str(runs["tracked"]), "--batches", "2", "--copies-list", "1,2",
                "--reference-images", "64", timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads((runs["tracked"] / "analysis" / "grad-variance-step6.json").read_text())["rows"]
    assert [(row["kind"], row["copies"]) for row in rows] == [("BA", 1), ("BA", 2), ("plain", 1), ("plain", 2)]
    assert all(row["variance"] > 0 for row in rows) and rows[0]["ratio_to_m1"] == 1.0

    # and the plots of it all
    r = run_cli("plot", str(runs["tracked"]), "--theory", str(tmp_path / "theory"))
    assert r.returncode == 0, r.stderr
    plots = runs["tracked"] / "plots"
    for name in ("training.png", "lambda.png", "lambda-max-step6.png", "grad-variance-step6.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert (tmp_path / "theory" / "stability.png").stat().st_size > 10_000
    r = run_cli("plot", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.unit
def test_reference_gradient_is_the_full_split_or_a_disjoint_sample():
    from hvd_ba.theory.analyze import reference_batches
    from hvd_ba.config import ConfigError

    assert reference_batches(2600, 32, 16, 8, 0) == (True, 0, 81)  # every full batch of the split
    assert reference_batches(2600, 32, 16, 8, 5000) == (True, 0, 81)
    full, first, count = reference_batches(10_000, 32, 4, 8, 1024)
    assert not full and first * 32 >= 4 * 32 * 8 and count == 32  # starts after the 1024 measured positions
    with pytest.raises(ConfigError, match="disjoint reference"):
        reference_batches(1500, 32, 4, 8, 1024)
