"""Sparsification: top-k, random-k and magnitude pruning.

Sent entries keep their float32 values; the cost is the cheaper of sending every entry (32 bits) and
sending each non-zero entry with a fixed-width index into its tensor (32 + ceil(log2 n) bits).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from . import Obfuscation, Result, Tensors, register
from ._common import as_choice, as_float, as_int, update_bits


def keep_count(keep: float, n: int) -> int:
    """Entries kept of ``n`` for a keep fraction: ceil(keep * n) (as ROG's Topk), at least 1, at most n."""
    return min(n, max(1, math.ceil(round(keep * n, 9))))


def _total(update: Tensors) -> int:
    return sum(int(v.numel()) for v in update.values())


# ---------------------------------------------------------------------------------------------- top-k
def _validate_topk(p: dict[str, Any]) -> dict[str, Any]:
    given = [k for k in ("keep", "k", "sparsity") if p.get(k) is not None]
    if len(given) > 1:
        raise UserError(f"obfuscation 'topk': give one of keep, k or sparsity, not {' and '.join(given)}")
    scope = as_choice("topk", p, "scope", ("tensor", "global"))
    if "k" in given:
        return {"keep": None, "k": as_int("topk", p, "k", lo=1), "scope": scope}
    if "sparsity" in given:
        s = as_float("topk", p, "sparsity", lo=0.0, hi=1.0, hi_open=True)
        return {"keep": round(1.0 - s, 12), "k": None, "scope": scope}
    keep = as_float("topk", {"keep": 0.1 if p.get("keep") is None else p["keep"]}, "keep",
                    lo=0.0, hi=1.0, lo_open=True)
    return {"keep": keep, "k": None, "scope": scope}


def _topk_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
    if k > 0:
        mask[torch.topk(a.reshape(-1), k, sorted=False).indices] = True
    return mask.view(a.shape)


def _topk(update: Tensors, p: dict[str, Any], generator: torch.Generator, context) -> Result:
    out: Tensors = {}
    if p["scope"] == "tensor":
        ks = {n: (min(p["k"], int(v.numel())) if p["k"] is not None else keep_count(p["keep"], int(v.numel())))
              for n, v in update.items()}
        for n, v in update.items():
            out[n] = torch.where(_topk_mask(v.detach().abs(), ks[n]), v.detach(), torch.zeros_like(v))
        kept, k_record = sum(ks.values()), ks
    else:
        total = _total(update)
        k = min(p["k"], total) if p["k"] is not None else keep_count(p["keep"], total)
        flat = torch.cat([v.detach().abs().reshape(-1).to("cpu", torch.float64) for v in update.values()])
        mask = _topk_mask(flat, k)
        start = 0
        for n, v in update.items():
            m = mask[start:start + v.numel()].view(v.shape).to(v.device)
            out[n] = torch.where(m, v.detach(), torch.zeros_like(v))
            start += v.numel()
        kept, k_record = k, k
    fraction = kept / max(1, _total(update))
    record = {"k": k_record, "kept_fraction": fraction}
    if p["k"] is not None:
        record["keep"] = fraction
    return Result(out, update_bits(out), record)


register(Obfuscation(
    "topk", _topk, defaults={"keep": None, "k": None, "sparsity": None, "scope": "tensor"},
    validate=_validate_topk, aliases={"ratio": "keep", "fraction": "keep"},
    doc="keep exactly the ceil(keep * n) largest-magnitude entries per tensor (scope=tensor) or over the "
        "whole update (scope=global), or k entries; zero the rest. `sparsity` (ROG) = 1 - keep. "
        "Default keep 0.1"))


# ------------------------------------------------------------------------------------------- random-k
def _validate_randk(p: dict[str, Any]) -> dict[str, Any]:
    return {"keep": as_float("randk", p, "keep", lo=0.0, hi=1.0, lo_open=True)}


def _randk(update: Tensors, p: dict[str, Any], generator: torch.Generator, context) -> Result:
    out, rescale, kept = {}, {}, 0
    for n, v in update.items():
        numel = int(v.numel())
        k = keep_count(p["keep"], numel)
        idx = torch.randperm(numel, generator=generator)[:k]
        mask = torch.zeros(numel, dtype=v.dtype)
        mask[idx] = numel / k
        out[n] = v.detach() * mask.view(v.shape).to(v.device)
        rescale[n], kept = numel / k, kept + k
    return Result(out, update_bits(out), {"kept_fraction": kept / max(1, _total(update)), "rescale": rescale})


register(Obfuscation(
    "randk", _randk, defaults={"keep": 0.1}, validate=_validate_randk,
    doc="keep ceil(keep * n) entries per tensor chosen uniformly at random (without replacement) and "
        "multiply them by n / k, so the result is an unbiased estimate of the update"))


# -------------------------------------------------------------------------------------------- pruning
def _validate_prune(p: dict[str, Any]) -> dict[str, Any]:
    return {"p": as_float("prune", p, "p", lo=0.0, hi=100.0)}


def _prune(update: Tensors, p: dict[str, Any], generator: torch.Generator, context) -> Result:
    out, thresholds, kept = {}, {}, 0
    for n, v in update.items():
        a = v.detach().to("cpu", torch.float64).abs()
        t = float(np.percentile(a.numpy().reshape(-1), p["p"])) if a.numel() else 0.0
        keep = (a >= t).to(v.device)
        out[n] = torch.where(keep, v.detach(), torch.zeros_like(v))
        thresholds[n], kept = t, kept + int(keep.sum())
    fraction = kept / max(1, _total(update))
    return Result(out, update_bits(out), {"keep": fraction, "kept_fraction": fraction, "threshold": thresholds})


register(Obfuscation(
    "prune", _prune, defaults={"p": 90.0}, validate=_validate_prune,
    aliases={"percentile": "p"},
    doc="magnitude pruning (DLG, GradAttack): per tensor, zero the entries whose |g| is below the p-th "
        "percentile of |g| (numpy's linear interpolation); p in [0, 100], default 90"))
