"""`python -m hvd_ba plot RUN_DIR [RUN_DIR ...]`: PNG plots of runs and of their analyses.

Per run directory, into RUN_DIR/plots/ (or --out):
  training.png       loss per step, train/val top-1 per epoch, LR per step
  lambda.png         lambda_max during training (lambda.jsonl, --track-lambda-every) per batch
                     kind, against 2/lr
  lambda-max-*.png   an `analyze lambda-max` result: per-batch top eigenvalues of each kind, 2/lr
  grad-variance-*.png  an `analyze grad-variance` result: variance ratio against M, BA and plain,
                     with the 1/M of independent samples
With --compare, one lambda.png overlays several runs (e.g. BA, small batch, large batch).
With --theory DIR, stability.png: the least-squares stability boundary of Theorem A against B.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hvd_ba.train.records import read_jsonl  # noqa: E402

def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _kind_color(name: str, index: int) -> str:
    """The three kinds in their standard order: plain B blue, BA red, plain M*B green."""
    return ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")[index % 5]


def plot_training(run: Path, out: Path) -> Path | None:
    steps = read_jsonl(run / "steps.jsonl", needs=("step", "loss", "lr"))
    epochs = read_jsonl(run / "metrics.jsonl", needs=("epoch", "train_top1"))
    if not steps and not epochs:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if steps:
        axes[0].plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8)
    axes[0].set(xlabel="step", ylabel="training loss (rank 0)", title="loss")
    if epochs:
        e = [m["epoch"] for m in epochs]
        axes[1].plot(e, [m["train_top1"] for m in epochs], "o-", label="train (augmented)")
        val = [(m["epoch"], m["val_top1"]) for m in epochs if m.get("val_top1") is not None]
        if val:
            axes[1].plot(*zip(*val), "s-", label="validation")
        axes[1].legend()
    axes[1].set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    if steps:
        axes[2].plot([s["step"] for s in steps], [s["lr"] for s in steps])
    axes[2].set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.suptitle(str(run))
    return _save(fig, out / "training.png")


def plot_lambda_tracks(runs: list[Path], out: Path) -> Path | None:
    """One run: lambda_max against step for each batch kind, 2/lr dashed. Several runs (--compare):
    each run's own training batch kind against epochs (runs of different batch sizes take different
    steps per epoch), each with its 2/lr."""
    tracks = [(run, read_jsonl(run / "lambda.jsonl", needs=("step", "kinds", "two_over_lr"))) for run in runs]
    tracks = [(run, records) for run, records in tracks if records]
    if not tracks:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    if len(tracks) == 1:
        run, records = tracks[0]
        steps = [x["step"] for x in records]
        for i, name in enumerate(records[0]["kinds"]):
            ax.plot(steps, [x["kinds"][name]["lambda_max"] for x in records], "-", marker="o", ms=3,
                    color=_kind_color(name, i), label=name)
        ax.plot(steps, [x["two_over_lr"] for x in records], "--", color="k", lw=1, label="2/lr")
        ax.set_xlabel("step")
    else:
        for r, (run, records) in enumerate(tracks):
            own = _own_kind(records[0])
            color = f"C{r}"
            epochs = [x.get("epochs_done", x["epoch"]) for x in records]
            ax.plot(epochs, [x["kinds"][own]["lambda_max"] for x in records], "-", marker="o", ms=3, color=color,
                    label=f"{run.name}: {own}")
            ax.plot(epochs, [x["two_over_lr"] for x in records], "--", color=color, lw=1, label=f"{run.name}: 2/lr")
        ax.set_xlabel("epoch")
    ax.set(ylabel="lambda_max of batch-averaged Hessian", yscale="log",
           title="lambda_max during training (Theorem A: stable while below 2/lr)")
    ax.legend(fontsize=8)
    return _save(fig, out / "lambda.png")


def _own_kind(record: dict) -> str:
    """The kind of a lambda.jsonl record that is the run's own training batch (B unique x M)."""
    unique, copies = record.get("unique"), record.get("copies")
    for name, kind in record["kinds"].items():
        if kind["unique"] == unique and kind["copies"] == copies:
            return name
    return next(name for name, kind in record["kinds"].items() if kind["copies"] > 1)  # older records: BA


def plot_lambda_analysis(result_path: Path, out: Path) -> Path:
    r = json.loads(result_path.read_text())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, kind) in enumerate(r["kinds"].items()):
        ax.scatter([i] * len(kind["per_batch"]), kind["per_batch"], color=_kind_color(name, i), alpha=0.6)
        ax.scatter([i], [kind["lambda_max"]], marker="_", s=600, color=_kind_color(name, i))
    ax.axhline(r["two_over_lr"], color="k", ls="--", label=f"2/lr = {r['two_over_lr']:.3g}")
    ax.set_xticks(range(len(r["kinds"])), list(r["kinds"]), fontsize=9)
    ax.set(ylabel="top eigenvalue of <H>_k (dots: batches; bar: lambda_max)", yscale="log",
           title=f"lambda_max at step {r['step']} ({Path(r['source']).name})")
    ax.legend()
    return _save(fig, out / (result_path.stem + ".png"))


def plot_grad_variance(result_path: Path, out: Path) -> Path:
    r = json.loads(result_path.read_text())
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kind, color, label in (("BA", "tab:red", f"BA: B={r['unique']} x M"), ("plain", "tab:green", f"plain: M*{r['unique']} distinct")):
        rows = [row for row in r["rows"] if row["kind"] == kind]
        ax.plot([row["copies"] for row in rows], [row["ratio_to_m1"] for row in rows], "o-", color=color, label=label)
    plain = [row for row in r["rows"] if row["kind"] == "plain"]
    ms = [row["copies"] for row in plain]
    full = " x (N-MB)/(N-B)" if r.get("reference_is_full") else ""
    ax.plot(ms, [row.get("independent_ratio", 1 / row["copies"]) for row in plain], "k--",
            label=f"1/M{full} (independent samples)")
    ax.set(xscale="log", yscale="log", xlabel="M", ylabel="E||g - g_ref||^2 relative to M = 1",
           title=f"gradient variance against M at step {r['step']}")
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.legend()
    return _save(fig, out / (result_path.stem + ".png"))


def plot_stability(out: Path, dim: int = 5, samples: int = 64, seed: int = 0) -> Path:
    """Theorem A on least squares: against B, 2/lambda_max (sufficient), the exact mean-square
    threshold, and 2/lambda_bar (the full-batch condition, necessary)."""
    from hvd_ba.theory.theorem import batch_hessians, lambda_bar, lambda_max, random_dataset, stability_threshold

    x = random_dataset(samples, dim, seed)
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if samples % b == 0]
    hs = [batch_hessians(x, b) for b in batches]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(batches, [2 / lambda_max(h) for h in hs], "o-", label="2 / lambda_max (Theorem A: sufficient)")
    ax.plot(batches, [stability_threshold(h) for h in hs], "s-", label="exact mean-square threshold")
    ax.plot(batches, [2 / lambda_bar(h) for h in hs], "k--", label="2 / lambda_bar (gradient descent)")
    ax.fill_between(batches, [2 / lambda_max(h) for h in hs], color="tab:blue", alpha=0.1)
    ax.set(xscale="log", xlabel="batch size B", ylabel="learning rate eta",
           title=f"SGD stability, least squares (N={samples}, d={dim})")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    return _save(fig, out / "stability.png")


def _analysis(plot, result: Path, out: Path) -> Path:
    """plot(result, out) for an analysis JSON; a file that is torn or not an analysis of this
    version is one line naming it (ConfigError)."""
    from hvd_ba.config import ConfigError

    try:
        return plot(result, out)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise ConfigError(f"'{result}': not an analysis hvd_ba analyze wrote ({type(err).__name__}: "
                          f"{str(err)[:80]})") from None


def run_plot(args) -> int:
    written = []
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not run.is_dir():
            raise FileNotFoundError(f"run directory '{run}' does not exist")
        out = Path(args.out) if args.out else run / "plots"
        if out.exists() and not out.is_dir():
            raise FileNotFoundError(f"plot output '{out}' is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        written.append(plot_training(run, out))
        if not args.compare:
            written.append(plot_lambda_tracks([run], out))
        for result in sorted((run / "analysis").glob("lambda-max-*.json")):
            written.append(_analysis(plot_lambda_analysis, result, out))
        for result in sorted((run / "analysis").glob("grad-variance-*.json")):
            written.append(_analysis(plot_grad_variance, result, out))
    if args.compare and runs:
        out = Path(args.out) if args.out else runs[0] / "plots"
        written.append(plot_lambda_tracks(runs, out))
    if args.theory:
        written.append(plot_stability(Path(args.theory)))
    written = [w for w in written if w is not None]
    if not written:
        raise FileNotFoundError("nothing to plot: no steps.jsonl, metrics.jsonl, lambda.jsonl or analysis/*.json in "
                                + ", ".join(map(str, runs)))
    for path in written:
        print(f"wrote {path}")
    return 0
