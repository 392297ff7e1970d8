"""The command line's argument types and its output checks.

Each type turns one argument's text into its value or raises :class:`argparse.ArgumentTypeError`, which the
parser reports as one line. :func:`_output` checks an output target before any work and remembers what writing
it creates, so that a failed command leaves nothing new.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import absent_parts, check_output
from ..validation import parse_assignment

# What the running command's outputs create (files and folders absent before it started): removed if it fails.
_NEW: list[Path] = []


def _output(path, kind: str = "file", what: str = "--out") -> Path:
    """Check an output target before any work (:func:`gradleak.files.check_output`) and remember what writing
    it creates, so that a failed command leaves nothing new."""
    p = check_output(path, kind, what)
    _NEW.extend(absent_parts(p))
    return p


_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N (or mps)."""
    t = text.strip().lower()
    if not _DEVICE.match(t):
        raise argparse.ArgumentTypeError(f"unknown device '{text}' (expected cpu, cuda or cuda:N)")
    if t == "cpu":
        return t
    import torch

    if t == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError("device 'mps' is not available on this machine (use cpu)")
        return t
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device '{text}': CUDA is not available on this machine (use cpu)")
    index = int(t.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device '{text}': this machine has {torch.cuda.device_count()} CUDA "
                                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return t


def _kv(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value read as YAML 1.2 (``1e-3`` is a number)."""
    try:
        return parse_assignment(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _indices(text: str) -> list[int]:
    """Comma-separated integers (spaces and empty items ignored)."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _number(text: str) -> float:
    """A finite number."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return v


def _positive_float(text: str) -> float:
    v = _number(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'")
    return v


def _non_negative_float(text: str) -> float:
    v = _number(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got '{text}'")
    return v


def _integer(text: str, minimum: int, what: str) -> int:
    """An integer of at least ``minimum``; ``what`` names the expectation in the error."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
    return v


def _non_negative_int(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def _seed(text: str) -> int:
    """A seed: an integer in [0, 2^63)."""
    v = _non_negative_int(text)
    if v >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected a seed below 2^63, got '{text}'")
    return v


def _positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")
