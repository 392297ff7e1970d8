"""Pairing reconstructions with originals when the attacker does not know the batch order."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


def pair_by_mse(originals: torch.Tensor, reconstructions: torch.Tensor) -> list[int]:
    """Hungarian matching minimising total MSE.

    Returns ``perm`` such that ``reconstructions[perm[i]]`` is paired with ``originals[i]``.
    """
    a = originals.detach().double().flatten(1)
    b = reconstructions.detach().double().flatten(1)
    cost = torch.cdist(a, b) ** 2 / a.shape[1]
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = [0] * len(rows)
    for r, c in zip(rows, cols):
        perm[int(r)] = int(c)
    return perm
