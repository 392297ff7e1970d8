"""Sparsification: top-k, random-k and magnitude pruning.

Sent entries keep their float32 values; the cost is the cheaper of sending every entry (32 bits) and
sending each non-zero entry with a fixed-width index into its tensor (32 + ceil(log2 n) bits).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pydantic import Field, model_validator

from ._common import update_bits
from .params import Int, Number, Params, PerTensor, Scope, ServerValues
from .registry import Obfuscation, Received, Result, Tensors, register


def keep_count(keep: float, n: int) -> int:
    """Entries kept of ``n`` for a keep fraction: ceil(keep * n) (as ROG's Topk), at least 1, at most n."""
    return min(n, max(1, math.ceil(round(keep * n, 9))))


def _total(update: Tensors) -> int:
    return sum(int(v.numel()) for v in update.values())


# ---------------------------------------------------------------------------------------------- top-k
class TopkParams(Params):
    keep: Number | None = Field(0.1, gt=0, le=1)
    k: Int | None = Field(None, ge=1)
    sparsity: Number | None = Field(None, ge=0, lt=1)  # ROG's: 1 - keep
    scope: Scope = "tensor"

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, data: Any) -> Any:
        given = [k for k in ("keep", "k", "sparsity") if isinstance(data, dict) and data.get(k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of keep, k or sparsity, not {' and '.join(given)}")
        return data

    def values(self) -> dict[str, Any]:
        if self.k is not None:
            return {"keep": None, "k": self.k, "scope": self.scope}
        if self.sparsity is not None:
            return {"keep": round(1.0 - self.sparsity, 12), "k": None, "scope": self.scope}
        return {"keep": 0.1 if self.keep is None else self.keep, "k": None, "scope": self.scope}


class TopkServer(ServerValues):
    scope: Scope = "tensor"  # the unsent entries are bounded per tensor or over the whole update


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
    "topk", _topk, TopkParams, family="sparsify", keeps_zeros=True, bounds_unsent=True, server=TopkServer,
    aliases=("top_k",), keys={"ratio": "keep", "fraction": "keep"},
    doc="keep exactly the ceil(keep * n) largest-magnitude entries per tensor (scope=tensor) or over the "
        "whole update (scope=global), or k entries; zero the rest. `sparsity` (ROG) = 1 - keep. "
        "Default keep 0.1"))


# ------------------------------------------------------------------------------------------- random-k
class RandkParams(Params):
    keep: Number = Field(0.1, gt=0, le=1)


class RandkServer(ServerValues):
    rescale: PerTensor  # n / k per tensor, undone by the server


def _rescale(keep: float, update: Tensors) -> dict[str, float]:
    """n / k of each tensor: the factor random-k multiplies the entries it keeps by."""
    return {n: int(v.numel()) / keep_count(keep, int(v.numel())) for n, v in update.items()}


def _randk_server(p: dict[str, Any], received: Received) -> dict[str, Any]:
    return {"rescale": _rescale(p["keep"], received.update)}


def _randk(update: Tensors, p: dict[str, Any], generator: torch.Generator, context) -> Result:
    out, rescale, kept = {}, _rescale(p["keep"], update), 0
    for n, v in update.items():
        numel = int(v.numel())
        k = keep_count(p["keep"], numel)
        idx = torch.randperm(numel, generator=generator)[:k]
        mask = torch.zeros(numel, dtype=v.dtype)
        mask[idx] = rescale[n]
        out[n] = v.detach() * mask.view(v.shape).to(v.device)
        kept += k
    return Result(out, update_bits(out), {"kept_fraction": kept / max(1, _total(update)), "rescale": rescale})


register(Obfuscation(
    "randk", _randk, RandkParams, family="sparsify", keeps_zeros=True, stochastic=True, server=RandkServer,
    derive=_randk_server, aliases=("rand_k", "random_k"),
    doc="keep ceil(keep * n) entries per tensor chosen uniformly at random (without replacement) and "
        "multiply them by n / k, so the result is an unbiased estimate of the update"))


# -------------------------------------------------------------------------------------------- pruning
class PruneParams(Params):
    p: Number = Field(90.0, ge=0, le=100)


class PruneServer(ServerValues):
    threshold: PerTensor | None = None  # |g| below it was not sent; else the smallest sent |g| bounds it


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
    "prune", _prune, PruneParams, family="sparsify", keeps_zeros=True, bounds_unsent=True, server=PruneServer,
    aliases=("pruning", "magnitude_pruning", "gradient_pruning"), keys={"percentile": "p"},
    doc="magnitude pruning (DLG, GradAttack): per tensor, zero the entries whose |g| is below the p-th "
        "percentile of |g| (numpy's linear interpolation); p in [0, 100], default 90"))
