"""Shared pieces of the obfuscation suite: the communication-cost model."""

from __future__ import annotations

import math

import torch

FLOAT_BITS = 32


# ---------------------------------------------------------------------------------------------- bits
def index_bits(n: int) -> int:
    """Bits of a fixed-width index into ``n`` entries: ceil(log2 n) (0 for a single entry)."""
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def update_bits(update: dict[str, torch.Tensor]) -> int:
    """Cost of a float32 update sent dense, or as (index, value) pairs where that is cheaper, per tensor."""
    return sum(sparse_or_dense_bits(v, FLOAT_BITS) for v in update.values())


def sparse_or_dense_bits(t: torch.Tensor, value_bits: int, overhead: int = 0) -> int:
    """Cost of one tensor whose non-zero entries take ``value_bits`` each: the cheaper of the dense code
    (every entry) and the sparse code (each non-zero entry with a fixed-width index), plus ``overhead``
    (e.g. a 32-bit scale)."""
    n = int(t.numel())
    nnz = int(torch.count_nonzero(t))
    return int(overhead) + min(n * value_bits, nnz * (value_bits + index_bits(n)))


def elias_omega_lengths(n: torch.Tensor) -> torch.Tensor:
    """Lengths in bits of the Elias omega ("recursive") codes of the positive integers ``n``.

    omega(1) = "0"; for N > 1 the code is the binary form of N preceded by the code of
    (bit length of N) - 1, recursively, ending in "0": length = 1 + sum of the bit lengths of
    N, bl(N) - 1, ... down to 1 (exclusive). Only the first link depends on N beyond its bit length,
    so the rest comes from a 64-entry table.
    """
    x = n.to(torch.float64)
    if bool((x < 1).any()):
        raise ValueError("Elias omega codes positive integers only")
    _, bl = torch.frexp(x)  # x = m * 2**bl with m in [0.5, 1): bl is the bit length of x
    bl = bl.to(torch.int64)
    lengths = 1 + torch.where(bl > 1, bl + _REST[(bl - 1).clamp(0, 63)], torch.zeros_like(bl))
    return lengths


def _rest_table() -> torch.Tensor:
    # _REST[m] = len(omega(m)) - 1 for m >= 1 (the chain of binary blocks starting at m); _REST[0] unused
    return torch.tensor([0] + [len(elias_omega(m)) - 1 for m in range(1, 64)], dtype=torch.int64)


def elias_omega(n: int) -> str:
    """The Elias omega code of ``n`` >= 1 as a bit string (reference implementation for tests and docs)."""
    if n < 1:
        raise ValueError("Elias omega codes positive integers only")
    code = "0"
    while n > 1:
        b = bin(n)[2:]
        code = b + code
        n = len(b) - 1
    return code


_REST = _rest_table()
