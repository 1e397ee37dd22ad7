"""`python -m hvd_ba <command>` (or `hvd-ba <command>`): dispatch only; each command's parser
is built in its own function and its work is imported lazily, so `--help` is instant."""
from __future__ import annotations

import argparse
import sys

from hvd_ba.config import ConfigError

DEFAULT_DEMO_DATA = "data/demo"
DEFAULT_DEMO_RUN = "runs/demo"


def _config_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--config", default=default_preset,
                   help=f"preset name shipped in hvd_ba/configs or a YAML path (default: {default_preset})")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="dotted overrides, e.g. --set data.copies=8 optim.epochs=30")


def parser_train() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba train",
        description="One rank of a BA training run; start it once per rank with horovodrun, srun or mpirun, e.g. "
                    "horovodrun -np 2 -H localhost:2 --gloo python -m hvd_ba train --config demo --set data.path=DIR")
    _config_args(p, "resnet50")
    return p


def parser_demo() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvd_ba demo",
        description="Make the embedded demo dataset if absent and train on it with "
                    "`horovodrun -np 2 -H localhost:2 --gloo` (CPU, a few minutes).")
    p.add_argument("--data", default=DEFAULT_DEMO_DATA, help=f"demo dataset folder (default: {DEFAULT_DEMO_DATA})")
    p.add_argument("--out", default=DEFAULT_DEMO_RUN, help=f"run directory (default: {DEFAULT_DEMO_RUN})")
    p.add_argument("--np", type=int, default=2, help="number of ranks (default: 2)")
    p.add_argument("--controller", choices=("gloo", "mpi"), default="gloo", help="Horovod controller (default: gloo)")
    _config_args(p, "demo")
    return p


def parser_make_data() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvd_ba make-data",
                                description="Write a small ImageNet-layout JPEG dataset: DIR/{train,val}/<class>/*.JPEG.")
    p.add_argument("dir", help="output folder")
    p.add_argument("--classes", type=int, default=10, help="number of classes, at most 10 (default: 10)")
    p.add_argument("--train-per-class", type=int, default=260, help="training images per class (default: 260)")
    p.add_argument("--val-per-class", type=int, default=50, help="validation images per class (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same bytes (default: 0)")
    p.add_argument("--workers", type=int, default=2, help="processes used to render (default: 2)")
    return p


def parser_bench() -> argparse.ArgumentParser:
    from hvd_ba.bench import parser_bench as build

    return build()


def cmd_bench(args) -> int:
    from hvd_ba.bench import run_loader_bench

    return {"loader": run_loader_bench}[args.what](args)


def parser_plan() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvd_ba plan",
                                description="Print the figures a run derives from its config (batches, ghost groups, "
                                            "peak LR, steps per epoch) for a number of ranks, without training.")
    p.add_argument("--ranks", type=int, required=True, help="number of Horovod ranks (GPUs)")
    p.add_argument("--train-images", type=int, default=1_281_167,
                   help="training images (default: 1,281,167, ImageNet-1k)")
    _config_args(p, "resnet50")
    return p


def cmd_plan(args) -> int:
    from hvd_ba.config import load_config
    from hvd_ba.train import derived_figures

    cfg = load_config(args.config, args.set)
    if args.ranks < 1:
        raise ConfigError(f"--ranks must be >= 1, got {args.ranks}")
    steps = (args.train_images // args.ranks) // cfg.data.unique_batch
    print(f"{cfg.model.arch} on {args.ranks} ranks, {args.train_images} training images:")
    for line in derived_figures(cfg, args.ranks, steps):
        print("  " + line)
    return 0


def cmd_train(args) -> int:
    from hvd_ba.config import check_paths, load_config
    from hvd_ba.train import main_rank

    cfg = load_config(args.config, args.set)
    check_paths(cfg)
    return main_rank(cfg)


def cmd_demo(args) -> int:
    from hvd_ba.demo import run_demo

    return run_demo(args)


def cmd_make_data(args) -> int:
    from hvd_ba.data.synthetic import make_dataset

    summary = make_dataset(args.dir, args.classes, args.train_per_class, args.val_per_class, args.seed, args.workers)
    print(f"wrote {summary['files']} JPEG files ({summary['bytes'] / 1e6:.1f} MB) of {summary['classes']} classes to {args.dir}")
    return 0


COMMANDS = {
    "train": (parser_train, cmd_train, "one rank of a training run (under horovodrun/srun/mpirun)"),
    "demo": (parser_demo, cmd_demo, "make demo data and train on it with horovodrun -np 2"),
    "make-data": (parser_make_data, cmd_make_data, "write the synthetic ImageNet-layout JPEG dataset"),
    "plan": (parser_plan, cmd_plan, "print the derived figures of a config on N ranks, without training"),
    "bench": (parser_bench, cmd_bench, "benchmarks against a baseline measured in the same run (bench loader)"),
}


def usage() -> str:
    lines = ["usage: python -m hvd_ba <command> [options]   (python -m hvd_ba <command> --help)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
