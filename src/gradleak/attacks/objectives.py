"""Gradient-matching objectives: how far a simulated update is from the observed one.

Each takes two ``{name: tensor}`` dicts in the same order and optional per-layer weights and returns a
scalar tensor, differentiable in the simulated update.
"""

from __future__ import annotations

from typing import Callable

import torch

Tensors = dict[str, torch.Tensor]


def cosine(sim: Tensors, target: Tensors, weights: dict[str, float] | None = None) -> torch.Tensor:
    """1 - cosine similarity of the two updates flattened over all layers (Geiping et al. 2020)."""
    dot = 0.0
    ns = 0.0
    nt = 0.0
    for k, t in target.items():
        w = 1.0 if weights is None else weights.get(k, 1.0)
        s = sim[k]
        dot = dot + w * (s * t).sum()
        ns = ns + w * s.pow(2).sum()
        nt = nt + w * t.pow(2).sum()
    return 1 - dot / (ns.sqrt() * torch.as_tensor(nt).sqrt()).clamp_min(1e-12)


def l2(sim: Tensors, target: Tensors, weights: dict[str, float] | None = None) -> torch.Tensor:
    """Squared Euclidean distance summed over layers (Zhu et al. 2019)."""
    total = 0.0
    for k, t in target.items():
        w = 1.0 if weights is None else weights.get(k, 1.0)
        total = total + w * (sim[k] - t).pow(2).sum()
    return total


OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {"cosine": cosine, "l2": l2}
