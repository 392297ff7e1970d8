"""Gradient-matching objectives: how far a simulated update is from the observed one.

A *matching* is built once per attack from the observed update (the target) and then called on each
simulated update (``{name: tensor}``, possibly batched under ``vmap``), returning a scalar. Building it
once lets it precompute what depends on the target only (flattened tensors, norms, masks), so the
per-iteration cost is one fused dot product per layer rather than several element-wise passes over the
large layers.

:func:`cosine` and :func:`l2` are the plain forms (Geiping et al. 2020; Zhu et al. 2019). The
obfuscation-aware matchings (masked, sign agreement, quantization likelihood, noise-weighted) live in
:mod:`gradleak.attacks.aware`; :func:`for_observation` picks one from an Observation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Tensors = dict[str, torch.Tensor]


def _flat(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1)


@dataclass
class Matching:
    """A bound objective: ``fn(simulated update) -> scalar``; ``name`` says which (for the threat model)."""

    name: str
    fn: Callable[[Tensors], torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self, update: Tensors) -> torch.Tensor:
        return self.fn(update)


def _weights(target: Tensors, weights: dict[str, float] | None) -> dict[str, float]:
    return {k: float(1.0 if weights is None else weights.get(k, 1.0)) for k in target}


def _selection(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of a sparse mask (cheaper to gather than to multiply), or None to use a dense mask."""
    if mask is None:
        return None
    m = _flat(mask).bool()
    if float(m.float().mean()) < 0.25:
        return torch.nonzero(m).reshape(-1)
    return None


def cosine_matching(target: Tensors, weights: dict[str, float] | None = None,
                    masks: Tensors | None = None, name: str = "cosine") -> Matching:
    """``1 - cos(simulated, target)`` over all layers flattened, with optional per-layer weights and a
    mask of the coordinates to compare (the others are ignored on both sides)."""
    w = _weights(target, weights)
    parts = []
    nt = 0.0
    for k, t in target.items():
        if w[k] == 0:
            continue
        mask = None if masks is None else masks.get(k)
        idx = _selection(mask)
        if idx is not None:
            tk = _flat(t)[idx].contiguous()
            parts.append((k, w[k], tk, idx, None))
        else:
            dense = None if mask is None else _flat(mask).to(t.dtype)
            tk = _flat(t) if dense is None else _flat(t) * dense
            parts.append((k, w[k], tk.contiguous(), None, dense))
        nt += w[k] * float(torch.dot(tk.double(), tk.double()))
    tnorm = nt ** 0.5

    def fn(update: Tensors) -> torch.Tensor:
        dot = 0.0
        ns = 0.0
        for k, wk, tk, idx, dense in parts:
            s = _flat(update[k])
            if idx is not None:
                s = s[idx]
            elif dense is not None:
                s = s * dense
            dot = dot + wk * torch.dot(s, tk)
            ns = ns + wk * torch.dot(s, s)
        return 1 - dot / (ns.sqrt() * tnorm).clamp_min(1e-20)

    return Matching(name, fn, {"weights": None if weights is None else dict(w)})


def l2_matching(target: Tensors, weights: dict[str, float] | None = None, masks: Tensors | None = None,
                name: str = "l2") -> Matching:
    """Squared Euclidean distance summed over layers (Zhu et al. 2019), optionally weighted/masked."""
    w = _weights(target, weights)
    parts = []
    for k, t in target.items():
        if w[k] == 0:
            continue
        mask = None if masks is None else masks.get(k)
        idx = _selection(mask)
        if idx is not None:
            parts.append((k, w[k], _flat(t)[idx].contiguous(), idx, None))
        else:
            dense = None if mask is None else _flat(mask).to(t.dtype)
            parts.append((k, w[k], _flat(t).contiguous(), None, dense))

    def fn(update: Tensors) -> torch.Tensor:
        total = 0.0
        for k, wk, tk, idx, dense in parts:
            s = _flat(update[k])
            if idx is not None:
                d = s[idx] - tk
            elif dense is not None:
                d = (s - tk) * dense
            else:
                d = s - tk
            total = total + wk * torch.dot(d, d)
        return total

    return Matching(name, fn, {"weights": None if weights is None else dict(w)})


PLAIN: dict[str, Callable[..., Matching]] = {"cosine": cosine_matching, "l2": l2_matching}


def plain(kind: str, target: Tensors, weights: dict[str, float] | None = None,
          masks: Tensors | None = None) -> Matching:
    if kind not in PLAIN:
        raise ValueError(f"unknown objective {kind!r} (known: {', '.join(PLAIN)})")
    return PLAIN[kind](target, weights=weights, masks=masks)


# Functional forms (unbound), kept for direct use in scripts and tests.
def cosine(sim: Tensors, target: Tensors, weights: dict[str, float] | None = None) -> torch.Tensor:
    """1 - cosine similarity of the two updates flattened over all layers (Geiping et al. 2020)."""
    return cosine_matching(target, weights)(sim)


def l2(sim: Tensors, target: Tensors, weights: dict[str, float] | None = None) -> torch.Tensor:
    """Squared Euclidean distance summed over layers (Zhu et al. 2019)."""
    return l2_matching(target, weights)(sim)
