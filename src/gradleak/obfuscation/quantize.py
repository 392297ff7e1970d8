"""Quantization: QSGD, uniform rounding, fp16/bf16 casts, signSGD.

Every function works per tensor of the update (per parameter), as the cited implementations do.
Arithmetic is done in float64 on the CPU (random draws come from the CPU generator passed in) and the
result is cast back to the update's dtype and device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pydantic import Field, model_validator

from ._common import FLOAT_BITS, elias_omega_lengths, sparse_or_dense_bits
from .params import Flag, Int, Params, PerTensor, ServerValues, choice
from .registry import Obfuscation, Received, Result, Tensors, Underivable, register

FP16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------- QSGD
def qsgd_tensor(v: torch.Tensor, levels: int, norm: str, bucket_size: int | None,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QSGD-quantize one tensor. Returns (dequantized tensor, integer levels per bucket (nb x d),
    scale per bucket (nb)).

    With s = ``levels`` - 1 intervals, each bucket x (``bucket_size`` consecutive entries of the
    flattened tensor, or the whole tensor) with scale ||x|| (max-norm or L2) becomes
    ``Q(x_i) = ||x|| * sign(x_i) * l_i / s`` where l_i = floor(s |x_i| / ||x||) + 1 with probability
    s |x_i| / ||x|| - floor(s |x_i| / ||x||), else the floor (Alistarh et al. 2017, eq. for Q_s): an
    unbiased estimate of x on the grid {0, ±1/s, ..., ±1} * ||x||.
    """
    s = levels - 1
    flat = v.detach().reshape(-1).to("cpu", torch.float64)
    n = flat.numel()
    d = int(bucket_size) if bucket_size else max(n, 1)
    nb = max(1, -(-n // d))
    x = torch.cat([flat, flat.new_zeros(nb * d - n)]).view(nb, d)
    a = x.abs()
    scale = a.amax(dim=1) if norm == "max" else x.norm(dim=1)
    positive = scale > 0
    safe = torch.where(positive, scale, torch.ones_like(scale))
    level_f = (a / safe[:, None] * s).clamp(0, s)
    low = level_f.floor()
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    level = low + (u < (level_f - low)).to(torch.float64)
    level = torch.where(positive[:, None], level, torch.zeros_like(level))
    out = torch.sign(x) * level * (scale / s)[:, None]
    out = out.reshape(-1)[:n].reshape(v.shape).to(device=v.device, dtype=v.dtype)
    level = level.to(torch.int64)
    if nb * d > n:  # padding never carries a level
        level.view(-1)[n:] = 0
    return out, level, scale


def qsgd_code_bits(level: torch.Tensor) -> int:
    """Length of the QSGD paper's Elias code of quantized buckets (``level``: nb x d non-negative ints).

    This is the encoding ``Code`` of Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient
    Quantization and Encoding", NeurIPS 2017, Section 3.2 (Efficient Coding of Quantized Gradients),
    applied to the quantized vector actually produced: per bucket, 32 bits for the float scale ||x||;
    then for each non-zero coordinate, in order, the Elias recursive (omega) code of its distance from
    the previous non-zero coordinate (of its 1-based position for the first), one sign bit, and the
    Elias omega code of its level l_i in {1, ..., s}. Zero coordinates cost nothing. (The paper's
    Theorem 3.2 bounds the expectation of this length; we report the realised length, which is exact
    for the update sent.)
    """
    nb = level.shape[0]
    bits = FLOAT_BITS * nb
    nz = torch.nonzero(level, as_tuple=False)
    if nz.numel() == 0:
        return int(bits)
    bucket, pos = nz[:, 0], nz[:, 1] + 1
    first = torch.ones_like(bucket, dtype=torch.bool)
    first[1:] = bucket[1:] != bucket[:-1]
    gap = pos.clone()
    gap[1:] = torch.where(first[1:], pos[1:], pos[1:] - pos[:-1])
    vals = level[bucket, nz[:, 1]]
    bits += int(elias_omega_lengths(gap).sum()) + int(nz.shape[0]) + int(elias_omega_lengths(vals).sum())
    return int(bits)


Norm = choice("max", "l2")


class QsgdParams(Params):
    levels: Int = Field(16, ge=2)
    norm: Norm = "max"
    bucket_size: Int | None = Field(None, ge=1)


class QsgdServer(ServerValues):
    s: Int = Field(ge=1)  # intervals: levels - 1
    norm: Norm = "max"
    bucket_size: Int | None = Field(None, ge=1)
    scale: PerTensor | None = None  # each tensor's norm (unbucketed); else read off the update


def _qsgd_server(p: dict[str, Any], received: Received) -> dict[str, Any]:
    return {"s": p["levels"] - 1, "norm": p["norm"], "bucket_size": p["bucket_size"]}


def _qsgd(update: Tensors, p: dict[str, Any], generator: torch.Generator, context) -> Result:
    out, bits, scales = {}, 0, {}
    for name, v in update.items():
        q, level, scale = qsgd_tensor(v, p["levels"], p["norm"], p["bucket_size"], generator)
        out[name] = q
        bits += qsgd_code_bits(level)
        if p["bucket_size"] is None:
            scales[name] = float(scale[0])
    record: dict[str, Any] = {"s": p["levels"] - 1}
    if p["bucket_size"] is None:
        record["scale"] = scales
    return Result(out, bits, record)


register(Obfuscation(
    "qsgd", _qsgd, QsgdParams, family="quantize", stochastic=True, keeps_zeros=True,
    server=QsgdServer, derive=_qsgd_server,
    keys={"quant_level": "levels", "quantization_level": "levels", "bucket": "bucket_size"},
    doc="QSGD stochastic quantization (Alistarh et al. 2017): `levels` magnitude levels including 0 "
        "(s = levels - 1 intervals, ROG's quant_level), scale = max-norm (ROG) or l2 (paper), per tensor "
        "or per bucket of `bucket_size`; unbiased. Bits: the paper's Elias code of the result."))


# ------------------------------------------------------------------------------------------- uniform
class UniformParams(Params):
    bits: Int | None = Field(8, ge=2, le=32)
    levels: Int | None = Field(None, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("bits") is not None and data.get("levels") is not None:
            raise ValueError("give bits or levels, not both")
        return data

    def values(self) -> dict[str, Any]:
        if self.levels is not None:
            return {"bits": math.ceil(math.log2(2 * self.levels - 1)), "levels": self.levels}
        bits = 8 if self.bits is None else self.bits
        return {"bits": bits, "levels": 2 ** (bits - 1)}


class UniformServer(ServerValues):
    scale: PerTensor  # each tensor's step


def _uniform_server(p: dict[str, Any], received: Received) -> dict[str, Any]:
    """The step of each tensor, read off the update: its largest entry rounds to (levels - 1) steps."""
    if not received.exact:
        raise Underivable(f"its steps would be read off the update, {received.inexact}")
    return {"scale": {n: float(v.detach().double().abs().max()) / (p["levels"] - 1) if v.numel() else 0.0
                      for n, v in received.update.items()}}


def uniform_tensor(v: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Round one tensor to the grid step * {-(L-1), ..., L-1} with step = max|v| / (L-1), L = ``levels``
    (L = 2^(bits-1) for a ``bits``-bit signed code). Returns (dequantized, integer codes, step)."""
    x = v.detach().to("cpu", torch.float64)
    m = float(x.abs().max()) if x.numel() else 0.0
    if m == 0:
        return torch.zeros_like(v), torch.zeros_like(x, dtype=torch.int64), 0.0
    step = m / (levels - 1)
    q = torch.round(x / step).clamp(-(levels - 1), levels - 1)
    return (q * step).to(device=v.device, dtype=v.dtype), q.to(torch.int64), step


def _uniform(update: Tensors, p: dict[str, Any], generator: torch.Generator, context) -> Result:
    out, bits, steps = {}, 0, {}
    for name, v in update.items():
        out[name], q, steps[name] = uniform_tensor(v, p["levels"])
        bits += sparse_or_dense_bits(q, p["bits"], overhead=FLOAT_BITS)
    return Result(out, bits, {"scale": steps})


register(Obfuscation(
    "uniform", _uniform, UniformParams, family="quantize", keeps_zeros=True, server=UniformServer,
    derive=_uniform_server, aliases=("quantize", "uniform_quantization"), keys={"quant_level": "levels"},
    doc="deterministic symmetric rounding per tensor to `bits` bits (default 8): step = max|g| / "
        "(2^(bits-1) - 1), or `levels` magnitude levels including 0 (ROG's uniform quant_level); "
        "the record's `scale` is each tensor's step"))


# ---------------------------------------------------------------------------------------- fp16/bf16
def _cast(dtype: torch.dtype):
    def fn(update: Tensors, p: dict[str, Any], generator: torch.Generator, context) -> Result:
        out, bits = {}, 0
        for name, v in update.items():
            x = v.detach()
            if dtype == torch.float16:
                x = x.clamp(-FP16_MAX, FP16_MAX)  # saturate instead of overflowing to inf
            out[name] = x.to(dtype).to(v.dtype)
            bits += sparse_or_dense_bits(out[name], 16)
        return Result(out, bits, {})
    return fn


register(Obfuscation("fp16", _cast(torch.float16), family="cast", keeps_zeros=True, aliases=("half", "float16"),
                     doc="cast to IEEE half precision (round to nearest even, saturating at ±65504) and back"))
register(Obfuscation("bf16", _cast(torch.bfloat16), family="cast", keeps_zeros=True, aliases=("bfloat16",),
                     doc="cast to bfloat16 (round to nearest even) and back"))


# ---------------------------------------------------------------------------------------------- sign
class SignParams(Params):
    scaled: Flag = False


def _sign(update: Tensors, p: dict[str, Any], generator: torch.Generator, context) -> Result:
    out, bits, scales = {}, 0, {}
    for name, v in update.items():
        x = v.detach()
        s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
        if p["scaled"]:
            scales[name] = float(x.abs().double().mean()) if x.numel() else 0.0
            s = s * scales[name]
        out[name] = s
        bits += int(x.numel()) + (FLOAT_BITS if p["scaled"] else 0)
    return Result(out, bits, {"scale": scales} if p["scaled"] else {})


register(Obfuscation(
    "sign", _sign, SignParams, family="sign", scale_recoverable=False, aliases=("signsgd", "sign_sgd"),
    doc="signSGD (Bernstein et al. 2018): +1 for g >= 0, -1 otherwise (1 bit per entry, as ROG's "
        "SignSGDCompressor); scaled=true multiplies each tensor by its mean |g|"))

