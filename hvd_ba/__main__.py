"""`python -m hvd_ba <command>` (or `hvd-ba <command>`): dispatch only; each command's parser
is built in its own function and its work is imported lazily, so `--help` is instant."""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys

from hvd_ba.config import ConfigError
from hvd_ba.flags import int_in, m_values, non_negative_float, non_negative_int, positive_float, positive_int

DEFAULT_DEMO_DATA = "data/demo"


def _config_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--config", default=default_preset,
                   help=f"preset name shipped in hvd_ba/configs or a YAML path (default: {default_preset})")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="dotted overrides, e.g. --set data.copies=8 optim.epochs=30; --set may be repeated, and of one "
                        "key given twice the later value wins")


def parser_train() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba train",
        description="One rank of a BA training run; start it once per rank with horovodrun, srun or mpirun "
                    "(run.backend=horovod) or torchrun, srun or mpirun (run.backend=torch), e.g. "
                    "horovodrun -np 2 -H localhost:2 --gloo python -m hvd_ba train --config demo --set data.path=DIR")
    _config_args(p, "resnet50")
    p.add_argument("--track-lambda-every", type=positive_int, default=None, metavar="N",
                   help="record lambda_max of plain/BA/large batches every N steps (run.track_lambda_every)")
    return p


def parser_demo() -> argparse.ArgumentParser:
    from hvd_ba.launch.demo import DEFAULT_DEMO_RUN

    p = argparse.ArgumentParser(
        prog="hvd_ba demo",
        description="Make the embedded demo dataset if absent and train on it with "
                    "`horovodrun -np 2 -H localhost:2 --gloo` (CPU, a few minutes).")
    p.add_argument("--data", default=DEFAULT_DEMO_DATA, help=f"demo dataset folder (default: {DEFAULT_DEMO_DATA})")
    p.add_argument("--out", default=None,
                   help=f"run directory (default: {DEFAULT_DEMO_RUN}, or {DEFAULT_DEMO_RUN}-<n> when that holds a run)")
    p.add_argument("--np", type=positive_int, default=2, help="number of ranks (default: 2)")
    p.add_argument("--controller", choices=("gloo", "mpi"), default="gloo", help="Horovod controller (default: gloo)")
    _config_args(p, "demo")
    return p


def parser_make_data() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvd_ba make-data",
                                description="Write a small ImageNet-layout JPEG dataset: DIR/{train,val}/<class>/*.JPEG.")
    p.add_argument("dir", help="output folder")
    p.add_argument("--classes", type=int_in(1, 10), default=10, help="number of classes, at most 10 (default: 10)")
    p.add_argument("--train-per-class", type=positive_int, default=260, help="training images per class (default: 260)")
    p.add_argument("--val-per-class", type=positive_int, default=50, help="validation images per class (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same bytes (default: 0)")
    p.add_argument("--workers", type=positive_int, default=2, help="processes used to render (default: 2)")
    p.add_argument("--photos", action="store_true",
                   help="instead: a real-photo set, 8 classes of crops of scikit-image's sample photographs "
                        "(--train-per-class, --val-per-class, --seed apply)")
    return p


def parser_bench() -> argparse.ArgumentParser:
    from hvd_ba.bench.cli import parser_bench as build

    return build()


def cmd_bench(args) -> int:
    from hvd_ba.bench.cli import run_bench

    return run_bench(args)


def parser_plan() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvd_ba plan",
                                description="Print the figures a run derives from its config (batches, ghost groups, "
                                            "peak LR, steps per epoch) for a number of ranks, without training.")
    p.add_argument("--ranks", type=positive_int, required=True, help="number of Horovod ranks (GPUs)")
    p.add_argument("--train-images", type=positive_int, default=None,
                   help="training images (default: those of data.path/train when it exists, else 1,281,167 "
                        "as in ImageNet-1k)")
    p.add_argument("--show-config", action="store_true", help="also print the resolved config as YAML")
    _config_args(p, "resnet50")
    return p


def cmd_plan(args) -> int:
    from hvd_ba.config import load_config, steps_per_epoch
    from hvd_ba.train.figures import derived_figures

    cfg = load_config(args.config, args.set)
    if args.ranks < 1:
        raise ConfigError(f"--ranks must be >= 1, got {args.ranks}")
    steps, parts = None, None  # from the data where it is there: static parts of whole packed shards lower it
    if args.train_images is None:
        args.train_images = 1_281_167
        if cfg.data.path and (os.path.isdir(os.path.join(cfg.data.path, "train"))
                              or os.path.isfile(os.path.join(cfg.data.path, "train.json"))):
            from hvd_ba.data.shards import files_per_rank, load_split, static_parts_line

            index = load_split(cfg, "train", write=True)
            args.train_images = len(index)
            per_rank = files_per_rank(index, cfg.data.shard, args.ranks)
            steps = steps_per_epoch(len(index), args.ranks, cfg.data.unique_batch, cfg.run.max_steps_per_epoch,
                                    per_rank)
            parts = static_parts_line(index, cfg.data.shard, args.ranks)
    if steps is None:
        per_rank = args.train_images // args.ranks
        steps = steps_per_epoch(args.train_images, args.ranks, cfg.data.unique_batch, cfg.run.max_steps_per_epoch)
    if steps == 0:  # the run would be refused at its start, after its launch
        raise ConfigError(f"config key 'data.unique_batch': {args.train_images} training images give each of "
                          f"{args.ranks} ranks {per_rank}, fewer than one batch of {cfg.data.unique_batch} (lower "
                          "data.unique_batch, or use fewer ranks)")
    print(f"{cfg.model.arch} on {args.ranks} ranks, {args.train_images} training images:")
    for line in derived_figures(cfg, args.ranks, args.train_images, steps) + ([parts] if parts else []):
        print("  " + line)
    if args.show_config:
        from hvd_ba.config import config_yaml

        print("resolved config:")
        print(config_yaml(cfg).rstrip())
    return 0


def cmd_train(args) -> int:
    # Preemption signals are caught from here on (before torch and Horovod are imported): one
    # during start-up ends the rank with 75, the last checkpoint staying the resume point.
    from hvd_ba.train.stop import (PREEMPTED_EXIT_CODE, Preempted, ignore_stop_signals, install_stop_handlers,
                                   leave_now)

    install_stop_handlers()
    try:
        from hvd_ba.config import check_paths, load_config
        from hvd_ba.theory.tracking import track_lambda
        from hvd_ba.train.run import main_rank

        extra = [f"run.track_lambda_every={args.track_lambda_every}"] if args.track_lambda_every else []
        try:
            cfg = load_config(args.config, [*args.set, *extra])
        except ConfigError:
            # The same settings give every rank the same refusal: rank 0 says it. (Paths, checked
            # next, can differ between nodes: every rank says its own.)
            from hvd_ba.cluster import launch_info

            if launch_info().rank != 0:
                return 2
            raise
        check_paths(cfg)
    except Preempted as err:
        print(f"hvd_ba: stopped ({err}) before the rank started; the last checkpoint stays the resume point",
              file=sys.stderr)
        ignore_stop_signals()
        return PREEMPTED_EXIT_CODE
    code = main_rank(cfg, track_lambda)  # the run gets the lambda tracker from here: train/ needs no theory/
    if code in (0, PREEMPTED_EXIT_CODE):
        # Done (or stopped with its checkpoint: out within horovodrun's grace after Ctrl-C): the exit
        # hooks run, the interpreter's teardown does not. That teardown took seconds, and under
        # torchrun a native library's thread once aborted the finished rank in it (exit -6).
        leave_now(code)
    return code


def cmd_demo(args) -> int:
    from hvd_ba.launch.demo import run_demo

    return run_demo(args)


def cmd_make_data(args) -> int:
    from hvd_ba.data.synthetic import make_dataset, make_photo_dataset

    if args.photos:
        summary = make_photo_dataset(args.dir, args.train_per_class, args.val_per_class, args.seed)
        print(f"wrote {summary['files']} JPEG files ({summary['bytes'] / 1e6:.1f} MB) of {summary['classes']} "
              f"photo classes to {args.dir}")
        return 0
    summary = make_dataset(args.dir, args.classes, args.train_per_class, args.val_per_class, args.seed, args.workers)
    print(f"wrote {summary['files']} JPEG files ({summary['bytes'] / 1e6:.1f} MB) of {summary['classes']} classes to {args.dir}")
    return 0


def parser_hosts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba hosts",
        description="Expand a Slurm job's host list into horovodrun's -H value (host:slots,...) or an Open MPI "
                    "hostfile, e.g. horovodrun -np $SLURM_NTASKS -H $(python -m hvd_ba hosts) ...")
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"),
                   help="Slurm host list, e.g. 'node[01-04,07]' (default: $SLURM_JOB_NODELIST)")
    p.add_argument("--tasks-per-node", default=os.environ.get("SLURM_TASKS_PER_NODE"),
                   help="slots per host, e.g. '4(x2),2' (default: $SLURM_TASKS_PER_NODE)")
    p.add_argument("--np", type=positive_int, default=None, help="check that this many tasks fit in the slots")
    p.add_argument("--format", choices=("horovod", "hostfile", "lines", "rendezvous"), default="horovod",
                   help="horovod: host:n,host:n; hostfile: 'host slots=n' lines; lines: one host per line; "
                        "rendezvous: host:port where torch.distributed ranks meet (the first host, a port from "
                        "the job id; MASTER_ADDR / MASTER_PORT when set)")
    return p


def cmd_hosts(args) -> int:
    from hvd_ba import cluster

    try:
        if args.format == "lines":
            print("\n".join(cluster.expand_hostlist(args.nodelist)))
            return 0
        if args.format == "rendezvous":
            env = {**os.environ, "SLURM_JOB_NODELIST": args.nodelist or ""}
            address, port = cluster.rendezvous(cluster.Launch("srun", 0, 1, 0, 1), env)
            print(f"{address}:{port}")
            return 0
        host_slots = cluster.slots(args.nodelist, args.tasks_per_node)
        if args.np is not None:
            cluster.check_tasks(host_slots, args.np)
    except (cluster.HostListError, cluster.RendezvousError) as err:
        print(f"hvd_ba hosts: error: {err}", file=sys.stderr)
        return 2
    print(cluster.horovod_hosts(host_slots) if args.format == "horovod" else cluster.mpi_hostfile(host_slots), end=
          "\n" if args.format == "horovod" else "")
    return 0


def parser_settings() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba settings",
        description="Split a SETTINGS string (slurm/job.sh) into its key=value overrides, one per NUL-terminated "
                    "word: quotes honoured, nothing globbed, a bracketed value such as 'augment.scale=[0.25, 1.0]' "
                    "kept whole.")
    p.add_argument("text", help="the SETTINGS string")
    return p


def cmd_settings(args) -> int:
    from hvd_ba import cluster

    try:
        words = cluster.settings_words(args.text)
    except ValueError as err:
        print(f"hvd_ba settings: error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(f"{w}\0" for w in words))
    return 0


def parser_stage() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba stage",
        description="Copy each rank's static shard (training and evaluation files) from data.path to node-local "
                    "disk, verified, skipping files already there. Start it like the training (srun/horovodrun/"
                    "mpirun, same tasks), then train with --set data.local_path=DEST.")
    _config_args(p, "resnet50")
    p.add_argument("--dest", default=None, help="node-local folder, e.g. $SLURM_TMPDIR/imagenet "
                                                "(default: config key data.local_path)")
    p.add_argument("--threads", type=positive_int, default=8, help="copy threads per rank (default: 8)")
    p.add_argument("--trust-size", action="store_true",
                   help="trust a file already present when its size is the manifest's (fast; only for a folder nobody "
                        "else can write). Default: trust it only when it hashes as this rank's last stage record says")
    p.add_argument("--remove", action="store_true",
                   help="remove the node-local folder (once per node, at the job's end) instead of staging; refused "
                        "unless it is this user's private folder")
    return p


def cmd_stage(args) -> int:
    from hvd_ba.launch.stage import run_stage

    return run_stage(args)


def parser_pack() -> argparse.ArgumentParser:
    from hvd_ba.launch.pack import parser_pack as build

    return build()


def cmd_pack(args) -> int:
    from hvd_ba.launch.pack import run_pack

    return run_pack(args)


def parser_analyze() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba analyze",
        description="Measure the paper's theory on a checkpoint (--run DIR) or a fresh model (--config): "
                    "lambda-max: top eigenvalues of batch-averaged loss Hessians for plain B, BA B x M and plain "
                    "M*B batches against 2/lr; grad-variance: minibatch gradient variance against M. Runs in one "
                    "process or under horovodrun/srun (parts spread over the ranks).")
    p.add_argument("what", choices=("lambda-max", "grad-variance"))
    p.add_argument("--run", default=None, help="run directory: its config.yaml and checkpoint (default: latest)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file inside --run (default: the latest valid)")
    _config_args(p, "demo")
    p.add_argument("--batches", type=positive_int, default=4, help="batches per kind, K (default: 4)")
    p.add_argument("--unique", type=positive_int, default=None,
                   help="unique images per batch, B (default: data.unique_batch x the run's ranks)")
    p.add_argument("--copies", type=positive_int, default=None, help="lambda-max: M of the BA kind (default: data.copies)")
    p.add_argument("--copies-list", type=m_values, default="1,2,4,8", help="grad-variance: the M values (default: 1,2,4,8)")
    p.add_argument("--reference-images", type=non_negative_int, default=0,
                   help="grad-variance: images in the reference gradient; 0: the whole training split, the full "
                        "gradient (default: 0)")
    p.add_argument("--parts", type=positive_int, default=None,
                   help="forward passes (own BN statistics) per batch; a multiple of the ranks (default: ranks)")
    p.add_argument("--method", choices=("lanczos", "power"), default="lanczos",
                   help="top eigenvalue by Lanczos (ARPACK; 10 vectors of memory) or power iteration (default: lanczos)")
    p.add_argument("--tol", type=non_negative_float, default=1e-3, help="eigenvalue: relative tolerance (default: 1e-3)")
    p.add_argument("--max-iter", type=positive_int, default=300,
                   help="eigenvalue: about this many Hessian-vector products at most (default: 300)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (default: this rank's share of its CPU mask)")
    p.add_argument("--out", default=None, help="JSON output (default: RUN/analysis/<what>-step<N>.json)")
    return p


def cmd_analyze(args) -> int:
    from hvd_ba.theory.analyze import run_analysis

    if args.checkpoint and not args.run:  # it would be ignored: the fresh model of --config measured instead
        raise ConfigError(f"analyze --checkpoint '{args.checkpoint}' needs --run, the run folder whose config.yaml "
                          "built it")

    return run_analysis(args)


def parser_plot() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba plot",
        description="PNG plots of run directories: training curves (loss, top-1, LR), lambda_max during training "
                    "(lambda.jsonl), and the results of `analyze` (RUN/analysis/*.json); into RUN/plots/.")
    p.add_argument("runs", nargs="*", help="run directories")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: RUN/plots)")
    p.add_argument("--compare", action="store_true",
                   help="one lambda.png overlaying the lambda tracks of all given runs (into the first's plots/)")
    p.add_argument("--theory", default=None, metavar="DIR",
                   help="also write DIR/stability.png: Theorem A's stability boundary on least squares against B")
    return p


def cmd_plot(args) -> int:
    from hvd_ba.theory.plot import run_plot

    if not args.runs and not args.theory:
        raise ConfigError("plot: give at least one run directory (or --theory DIR)")
    return run_plot(args)


def parser_status() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvd_ba status",
                                description="What a run folder holds: its run id, whether it is complete (a result.json "
                                            "that parses and names the run), its newest checkpoint, its lock. Exit "
                                            f"status: {STATUS_COMPLETE} complete, {STATUS_INCOMPLETE} not complete "
                                            f"(run.resume=auto continues it), {STATUS_NO_RUN} no run there (a missing "
                                            "folder, a file, or a folder that holds no run).")
    p.add_argument("run", help="run directory (run.out_dir)")
    p.add_argument("--complete", action="store_true",
                   help="only the exit status: 0 when complete, 1 otherwise (a missing folder or one without a run "
                        "also says so on stderr)")
    return p


STATUS_COMPLETE, STATUS_INCOMPLETE, STATUS_NO_RUN = 0, 1, 3


def no_run_reason(out) -> str | None:
    """Why `out` holds no run (one line), or None when it does: a run folder has config.yaml or
    result.json (what a run writes first and last)."""
    if not out.exists():
        return f"no run at '{out}': no such folder"
    if not out.is_dir():
        return f"no run at '{out}': a file, not a run folder"
    if not (out / "config.yaml").is_file() and not (out / "result.json").is_file():
        return f"no run at '{out}': the folder holds no config.yaml or result.json"
    return None


def cmd_status(args) -> int:
    from pathlib import Path

    from hvd_ba.train.run_dir import LOCK, is_complete, read_lock, read_result, read_run_id

    out = Path(args.run)
    missing = no_run_reason(out)
    if missing:
        print(f"hvd_ba status: {missing}", file=sys.stderr)
        return STATUS_INCOMPLETE if args.complete else STATUS_NO_RUN
    complete = is_complete(out)
    if args.complete:
        return STATUS_COMPLETE if complete else STATUS_INCOMPLETE
    from hvd_ba.train.checkpoint import checkpoint_dir, find_checkpoint
    from hvd_ba.fsio import read_records

    print(f"run folder: {out}")
    print(f"run id: {read_run_id(out) or '-'}")
    result = read_result(out)
    print(f"complete: {'yes, val top-1 %s' % result.get('val_top1') if complete else 'no'}")
    try:
        print(f"epochs recorded: {len(read_records(out / 'metrics.jsonl'))}")
    except OSError as err:  # a folder or an unreadable file in its place: said, the rest still shown
        print(f"epochs recorded: - ({out / 'metrics.jsonl'}: {err.strerror or err})")
    found = find_checkpoint("auto", out) if checkpoint_dir(out).is_dir() else None
    print("resume point: " + (f"{found[0]} (step {found[1]['step']})" if found else "-"))
    holder, age = read_lock(out / LOCK)
    lock = f"held by host {holder.get('host')}, pid {holder.get('pid')}, heartbeat {age:.0f} s ago" if holder else "-"
    print(f"lock: {lock}")
    return STATUS_COMPLETE if complete else STATUS_INCOMPLETE


def parser_doctor() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba doctor",
        description="What this node has for a run, one screen: Python, torch and its CUDA, GPUs, Horovod's build "
                    "(controllers, NCCL), pillow-simd and libjpeg-turbo, MPI, Slurm variables, the cores this process "
                    "may use, and with --config the threads, loader workers and /dev/shm a run would use. Under a "
                    "launcher every rank checks and rank 0 prints the table. Exit 1 when a problem would make a run "
                    "fail or crawl.")
    p.add_argument("--config", default=None, help="a preset or YAML path to check the run's budget against")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="SECTION.KEY=VALUE", help="dotted overrides")
    return p


def cmd_doctor(args) -> int:
    from hvd_ba.launch.doctor import run_doctor

    if args.set and not args.config:  # they would be dropped: without --config no run budget is checked
        raise ConfigError("doctor --set: give --config too (the preset or YAML file the overrides apply to)")
    return run_doctor(args)


def parser_sweep() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba sweep",
        description="Train one run per cell of a grid of overrides x seeds (horovodrun -np N, or srun inside an "
                    "allocation), resumable, and write a table (CSV, Markdown) and plots of top-1 against epochs, "
                    "wall time and bytes read, e.g. python -m hvd_ba sweep --grid data.copies=1,2,4 "
                    "--grid data.copies_on=rank,ranks --seeds 0,1,2 --set data.path=data/demo")
    p.add_argument("--config", default="demo", help="preset or YAML path (default: demo)")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="an axis of the grid (repeat for more; values split on commas outside brackets)")
    p.add_argument("--also", action="append", default=[], metavar="'SECTION.KEY=V ...'",
                   help="one more point outside the product, e.g. 'data.copies=1 data.unique_batch=32'")
    p.add_argument("--seeds", default="0,1,2", help="run.seed values of every point (default: 0,1,2)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="SECTION.KEY=VALUE", help="overrides of every cell")
    p.add_argument("--np", type=positive_int, default=2, help="ranks per cell (default: 2)")
    p.add_argument("--launcher", choices=("auto", "horovodrun", "srun"), default="auto",
                   help="auto: srun inside a Slurm allocation, else horovodrun (default: auto)")
    p.add_argument("--out", default="runs/sweep", help="sweep folder: cells/, sweep.json, tables, plots")
    p.add_argument("--cell-timeout", type=positive_float, default=3600, help="seconds a cell may run (default: 3600)")
    p.add_argument("--report", default=None, help="also write the BA report (Markdown) here, e.g. docs/ba-report.md")
    return p


def cmd_sweep(args) -> int:
    from hvd_ba.launch.sweep import SweepError, run_sweep

    try:
        return run_sweep(args)
    except SweepError as err:
        print(f"hvd_ba sweep: error: {err}", file=sys.stderr)
        return 2


COMMANDS = {
    "train": (parser_train, cmd_train, "one rank of a training run (under horovodrun, torchrun, srun or mpirun)"),
    "demo": (parser_demo, cmd_demo, "make demo data and train on it with horovodrun -np 2"),
    "make-data": (parser_make_data, cmd_make_data, "write the synthetic ImageNet-layout JPEG dataset"),
    "plan": (parser_plan, cmd_plan, "print the derived figures of a config on N ranks, without training"),
    "hosts": (parser_hosts, cmd_hosts, "expand a Slurm host list into horovodrun's -H or an MPI hostfile"),
    "settings": (parser_settings, cmd_settings, "split a SETTINGS string into --set overrides (slurm/job.sh)"),
    "stage": (parser_stage, cmd_stage, "copy each rank's static shard to node-local disk (once per job)"),
    "pack": (parser_pack, cmd_pack, "pack an ImageNet-layout folder into tar shards with a flat index (or --verify)"),
    "analyze": (parser_analyze, cmd_analyze, "lambda_max of batch Hessians, gradient variance against M"),
    "plot": (parser_plot, cmd_plot, "PNG plots of runs (curves, lambda tracks) and of analyses"),
    "status": (parser_status, cmd_status, "a run folder: run id, complete or not, resume point, lock"),
    "sweep": (parser_sweep, cmd_sweep, "a grid of overrides x seeds, one run each, resumable; table and plots"),
    "doctor": (parser_doctor, cmd_doctor, "what this node has for a run (GPUs, Horovod's build, MPI, cores, shm)"),
    "bench": (parser_bench, cmd_bench, "benchmarks against a baseline measured in the same run (bench loader | gpu | breakdown | scaling)"),
}


def usage() -> str:
    lines = ["usage: python -m hvd_ba <command> [options]   (python -m hvd_ba <command> --help)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not faulthandler.is_enabled():
        # A crash in native code (a segfault in a library, an abort) prints every thread's Python
        # stack to stderr, which the job's attempt log keeps: where it died, not just that it did.
        # Set before MPI starts, it stays: Open MPI then installs no handler of its own (its report,
        # handed the signal on, would show a false fault address).
        faulthandler.enable(all_threads=True)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hvd_ba: unknown command '{name}' (choose from: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    make_parser, run, _ = COMMANDS[name]
    args = make_parser().parse_args(rest)
    try:
        return run(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"hvd_ba {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
