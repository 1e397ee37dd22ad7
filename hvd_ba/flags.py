"""The command-line flags' own checks (argparse types): a bad value stops the command before any
work with argparse's usage line and one line naming the flag and the value."""
from __future__ import annotations

import argparse
import math


def _number(text: str, kind, lowest, strict: bool, what: str):
    try:
        value = kind(text)
        bad = not math.isfinite(value) or value < lowest or (strict and value == lowest)
    except (ValueError, OverflowError):  # OverflowError: an integer too large for a float
        bad = True
    if bad:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}{'...' if len(text) > 40 else ''} is not {what}") from None
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 0, True, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, False, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, 0.0, True, "a positive number")


def non_negative_float(text: str) -> float:
    return _number(text, float, 0.0, False, "a number >= 0")


def m_values(text: str) -> str:
    """M values, comma-separated positive integers ("1,4,8"); kept as the text the benches split."""
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give M as positive integers, comma-separated (e.g. 1,4,8)")
    return text


def positive_numbers(text: str) -> str:
    """Comma-separated positive numbers ("10,100,400"); kept as the text the bench splits."""
    try:
        ok = all(0 < float(p) < math.inf for p in text.split(","))
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers, comma-separated (e.g. 10,100,400)")
    return text


def places(text: str) -> str:
    """--where: loader, device or both, comma-separated."""
    if not text or not set(text.split(",")) <= {"loader", "device"}:
        raise argparse.ArgumentTypeError(f"{text!r}: give loader, device or loader,device")
    return text


def int_in(lowest: int, highest: int):
    """An integer in [lowest, highest]."""
    def check(text: str) -> int:
        value = _number(text, int, lowest, False, f"an integer from {lowest} to {highest}")
        if value > highest:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer from {lowest} to {highest}")
        return value
    return check


SCALING_BACKENDS = ("gloo", "mpi", "torch")  # bench scaling: Horovod's two controllers, torch.distributed


def scaling_backends(text: str) -> str:
    """bench scaling --backends: some of gloo, mpi, torch, comma-separated."""
    unknown = [b for b in text.split(",") if b not in SCALING_BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: {', '.join(unknown) or 'an empty name'} unknown (choose from "
                                         f"{', '.join(SCALING_BACKENDS)})")
    return text


def overlap(text: str) -> str:
    """bench scaling --overlap: none, measured, or a fraction in [0, 1]."""
    if text in ("none", "measured"):
        return text
    try:
        ok = 0.0 <= float(text) <= 1.0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r}: give none, measured or a fraction in [0, 1]")
    return text


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """'1G', '256M', '4096' -> bytes (powers of 1024), for --shard-size."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and t[-1:] else ""
    try:
        value = float(t[:-1] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a size (e.g. 1G, 256M, 1048576)") from None
    if not 1 <= value * SIZE_UNITS[unit] < 1 << 50:
        raise argparse.ArgumentTypeError(f"'{text[:40]}': a shard size between 1 byte and 1 PiB")
    return int(value * SIZE_UNITS[unit])
