"""`python -m hvd_ba bench ...`: the benches' command line. Every bench prints a ratio against a
baseline measured in the same run (README, "Performance")."""
from __future__ import annotations

import argparse

from hvd_ba.bench.corpus import DEFAULT_CORPUS
from hvd_ba.bench.gpu import RESNET50_ASSUMED_GPU_SAMPLES_PER_S
from hvd_ba.bench.scaling import DEFAULT_BANDWIDTHS_GBIT, DEFAULT_LATENCY_US
from hvd_ba.cluster import usable_cores
from hvd_ba.flags import byte_size
from hvd_ba.config import ARCHS
from hvd_ba.flags import (m_values, non_negative_float, non_negative_int, overlap, places, positive_float, positive_int,
                          positive_numbers, scaling_backends)


def run_bench(args) -> int:
    if args.what == "loader":
        from hvd_ba.bench.loader import run_loader_bench

        return run_loader_bench(args)
    if args.what == "startup":
        from hvd_ba.bench.startup import run_startup_bench

        return run_startup_bench(args)
    if args.what == "pack":
        from hvd_ba.bench.pack import run_pack_bench

        return run_pack_bench(args)
    if args.what == "gpu":
        from hvd_ba.bench.gpu import run_gpu_bench

        return run_gpu_bench(args)
    from hvd_ba.bench import scaling

    return {"breakdown": scaling.run_breakdown, "scaling": scaling.run_scaling}[args.what](args)


def parser_bench() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvd_ba bench", description="Benchmarks that print a ratio against a baseline measured in the same run.")
    sub = p.add_subparsers(dest="what", required=True)
    loader = sub.add_parser("loader", help="BA loader against the naive torchvision way")
    loader.add_argument("--copies", type=m_values, default="1,4,8", help="comma-separated M values (default: 1,4,8)")
    loader.add_argument("--images", type=positive_int, default=480, help="unique images per measurement (default: 480)")
    loader.add_argument("--workers", type=non_negative_int, default=usable_cores(),
                        help="loader processes, one per core (default: this process's cores, its CPU mask)")
    loader.add_argument("--size", type=positive_int, default=224, help="crop side, px (default: 224)")
    loader.add_argument("--batch", type=positive_int, default=64, help="samples per batch, both pipelines (default: 64)")
    loader.add_argument("--corpus", default=DEFAULT_CORPUS, help=f"photo corpus folder, made if absent (default: {DEFAULT_CORPUS})")
    loader.add_argument("--shards", action="store_true",
                        help="also read the corpus packed into tar shards (python -m hvd_ba pack; packed once beside "
                             "the corpus) and print the ratio of shards to folder")
    loader.add_argument("--rounds", type=positive_int, default=3,
                        help="with --shards: folder and shards read alternately this many times, best of each "
                             "(default: 3)")
    pk = sub.add_parser("pack", help="pack's throughput against a plain sequential copy of the same bytes")
    pk.add_argument("--images", type=positive_int, default=2000, help="photos packed (default: 2000, about 120 MB)")
    pk.add_argument("--shard-size", type=byte_size, default=16 << 20, help="shard size (default: 16M)")
    pk.add_argument("--rounds", type=positive_int, default=3, help="rounds of each, alternating (default: 3)")
    pk.add_argument("--dest", default="~/.cache/hvd_ba", help="where both write (a scratch folder is made and removed "
                                                                "there; default: ~/.cache/hvd_ba)")
    pk.add_argument("--corpus", default=DEFAULT_CORPUS, help=f"photo corpus folder, made if short (default: {DEFAULT_CORPUS})")
    from hvd_ba.bench.startup import add_parser as startup_parser

    startup_parser(sub)
    add_parsers(sub)
    return p


def add_parsers(sub) -> None:
    gpu = sub.add_parser("gpu", help="images/s of training: synthetic tensors on the device (the no-I/O ceiling) "
                                     "against this loader at several M, loader and device augmentation")
    gpu.add_argument("--model", default=None, choices=ARCHS, help="arch (default: resnet50 on CUDA, small_resnet on CPU)")
    gpu.add_argument("--size", type=positive_int, default=None, help="crop side, px (default: 224 on CUDA, 64 on CPU)")
    gpu.add_argument("--unique-batch", type=positive_int, default=None, help="unique images per step (default: 32 on CUDA "
                     "(half the resnet50 preset's 64, so M = 8 fits a GPU), 8 on CPU); samples per step = M x this")
    gpu.add_argument("--copies", type=m_values, default="1,4,8", help="M values (default: 1,4,8)")
    gpu.add_argument("--steps", type=positive_int, default=None, help="timed steps (default: 30 on CUDA, 4 on CPU)")
    gpu.add_argument("--warmup", type=non_negative_int, default=None, help="untimed steps first (default: 5 on CUDA, 2 on CPU)")
    gpu.add_argument("--workers", type=non_negative_int, default=usable_cores(),
                     help="loader processes (default: this process's cores, its CPU mask)")
    gpu.add_argument("--amp", default=None, choices=("off", "bf16"), help="autocast (default: bf16 on CUDA, off on CPU)")
    gpu.add_argument("--where", type=places, default="loader,device", help="augmentation places to measure (default: loader,device)")
    gpu.add_argument("--corpus", default=DEFAULT_CORPUS, help="photo corpus folder, made if short")
    gpu.add_argument("--json", default=None, help="also write the figures here")

    br = sub.add_parser("breakdown", help="one rank's step time split into data / forward+backward / allreduce / "
                                          "optimizer, and the share of the allreduce the training path hides behind "
                                          "the backward pass (run under horovodrun, or torchrun with --backend torch)")
    _breakdown_args(br)
    br.add_argument("--backend", default=None, choices=("horovod", "torch"),
                    help="horovod or torch (torch.distributed, DDP); default: the launcher's (torch under torchrun, "
                         "else horovod; HVD_BA_BACKEND when set)")
    br.add_argument("--json", default=None, help="rank 0 writes the figures here")

    sc = sub.add_parser("scaling", help="breakdowns under horovodrun -np 2 (Gloo, MPI) and torchrun (torch.distributed "
                                        "over Gloo) at M = 1, 2, 4, side by side, and a ring-allreduce projection of "
                                        "ResNet-50 to W = 8 ... 1024")
    _breakdown_args(sc)
    sc.add_argument("--copies-list", type=m_values, default="1,2,4", help="M values (default: 1,2,4)")
    sc.add_argument("--backends", type=scaling_backends, default="gloo,mpi,torch",
                    help="gloo, mpi: Horovod's controllers (horovodrun); torch: torch.distributed over Gloo "
                         "(torchrun, DDP) (default: gloo,mpi,torch)")
    sc.add_argument("--overlap", type=overlap, default="none",
                    help="projection: the fraction of the allreduce hidden behind the backward pass: none (0, "
                         "default), a number 0..1, or measured (this run's, of the first backend at the largest M)")
    sc.add_argument("--np", type=positive_int, default=2, help="ranks of the measured runs (default: 2)")
    sc.add_argument("--bandwidths-gbit", type=positive_numbers, default=DEFAULT_BANDWIDTHS_GBIT,
                    help=f"projection: link bandwidths, Gbit/s (assumed; default: {DEFAULT_BANDWIDTHS_GBIT})")
    sc.add_argument("--latency-us", type=non_negative_float, default=DEFAULT_LATENCY_US,
                    help=f"projection: latency per ring step, us (assumed; default: {DEFAULT_LATENCY_US})")
    sc.add_argument("--gpu-samples-per-s", type=positive_float, default=None,
                    help="projection: ResNet-50 training samples/s of one GPU (default: measured on this machine's "
                         "GPU, bf16, channels_last, 32 per step, when there is one; else an assumed "
                         f"{RESNET50_ASSUMED_GPU_SAMPLES_PER_S:.0f})")
    sc.add_argument("--out", default="runs/bench-scaling", help="folder for scaling.json and scaling.png")


def _breakdown_args(p) -> None:
    p.add_argument("--model", default="small_resnet", choices=ARCHS, help="arch (default: small_resnet)")
    p.add_argument("--size", type=positive_int, default=64, help="crop side, px (default: 64)")
    p.add_argument("--unique-batch", type=positive_int, default=16, help="unique images per rank per step (default: 16)")
    p.add_argument("--copies", type=m_values, default="4", help="M (default: 4); breakdown: several, comma-separated, are measured "
                                                 "in turn in one launch")
    p.add_argument("--steps", type=positive_int, default=8, help="timed steps (default: 8)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--workers", type=non_negative_int, default=1, help="loader processes per rank (default: 1)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per rank (default: 1)")
    p.add_argument("--fp16-allreduce", action="store_true", help="fp16 gradients on the wire (Horovod's compression, "
                                                                  "DDP's fp16 hook)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="photo corpus folder, made if short")
