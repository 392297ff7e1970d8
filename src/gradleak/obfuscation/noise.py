"""Noise: clipping with Gaussian or Laplace noise (with DP accounting), and relative noise.

Noise is drawn from the generator passed in (float32 standard normals in the update's parameter order),
so the same seed gives the same noisy update. Every record carries ``sigma``, the standard deviation of
the noise actually added to each entry (a dict per tensor when it differs by tensor).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pydantic import Field, model_validator

from ..errors import UserError
from ._common import update_bits
from .accounting import ACCOUNTANTS, epsilon_spent, noise_multiplier_for
from .params import Flag, Int, Number, Params, PerTensor, Scope, ServerValues, choice
from .registry import Context, Obfuscation, Received, Result, Tensors, Underivable, register

Accountant = choice(*ACCOUNTANTS)


class NoiseServer(ServerValues):
    """What a knowing server reads from a noise record: the std of the noise in the update."""

    sigma: PerTensor
    sigma_of_mean: PerTensor | None = None  # several clients averaged: the std of the noise of the mean


def _needs(key: str, what: str):
    """A check that ``key`` is given (its default is None), as a model validator."""
    def need(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get(key) is None:
            raise ValueError(f"needs {key}=... ({what})")
        return data
    return model_validator(mode="before")(classmethod(need))


def _norm(v: torch.Tensor) -> float:
    return float(v.detach().to(torch.float64).norm()) if v.numel() else 0.0


def clip_update(update: Tensors, clip: float, per_layer: bool = False
                ) -> tuple[Tensors, float | dict[str, float], dict[str, float]]:
    """Scale the update so its L2 norm is at most ``clip``: ``u * min(1, clip / ||u||)``.

    ``per_layer``: each of the L tensors is clipped on its own to ``clip / sqrt(L)`` (Opacus's per-layer
    clipping with equal thresholds, McMahan et al. 2018), so the whole update's norm is again at most
    ``clip``. Returns (clipped update, norm before clipping — one float or a dict per tensor, the clip
    threshold of each tensor).
    """
    names = list(update)
    if per_layer:
        c = clip / math.sqrt(max(1, len(names)))
        norms = {n: _norm(update[n]) for n in names}
        out = {n: update[n].detach() * (min(1.0, c / norms[n]) if norms[n] > 0 else 1.0) for n in names}
        return out, norms, {n: c for n in names}
    total = math.sqrt(sum(_norm(v) ** 2 for v in update.values()))
    factor = min(1.0, clip / total) if total > 0 else 1.0
    return {n: update[n].detach() * factor for n in names}, total, {n: clip for n in names}


def _add_gaussian(update: Tensors, std: float | dict[str, float], generator: torch.Generator) -> Tensors:
    out = {}
    for n, v in update.items():
        s = std[n] if isinstance(std, dict) else std
        z = torch.randn(v.shape, generator=generator, dtype=torch.float32)
        out[n] = (v.detach() + (s * z).to(device=v.device, dtype=v.dtype)) if s > 0 else v.detach()
    return out


# ------------------------------------------------------------------------------------------- gaussian
class GaussianParams(Params):
    clip: Number | None = Field(None, gt=0)
    noise_multiplier: Number | None = Field(None, ge=0)
    sigma: Number | None = Field(None, ge=0)
    per_layer: Flag = False
    target_epsilon: Number | None = Field(None, gt=0)
    delta: Number = Field(1e-5, gt=0, lt=1)
    sample_rate: Number | None = Field(None, gt=0, le=1)
    rounds: Int | None = Field(None, ge=1)
    accountant: Accountant = "rdp"

    @model_validator(mode="before")
    @classmethod
    def _one_mode(cls, data: Any) -> Any:
        modes = [k for k in ("noise_multiplier", "sigma", "target_epsilon") if isinstance(data, dict)
                 and data.get(k) is not None]
        if len(modes) != 1:
            raise ValueError("give exactly one of noise_multiplier, sigma or target_epsilon"
                             + (f" (got {' and '.join(modes)})" if modes else ""))
        return data

    @model_validator(mode="after")
    def _per_layer_clip(self) -> "GaussianParams":
        if self.per_layer and self.clip is None:
            raise ValueError("per_layer=true needs a clip norm (clip=...)")
        return self


def _sensitivity(p: dict[str, Any], context: Context) -> tuple[float | None, str | None]:
    """The L2 sensitivity the noise multiplier multiplies, and its DP unit (client or example)."""
    if p["clip"] is not None:
        return p["clip"], "client"
    if context.per_example_clip is None:
        return None, None
    if context.algorithm == "fedavg":
        raise UserError("obfuscation 'gaussian': after per-example clipping under fedavg the weight delta's "
                        "sensitivity is not per_example_clip / B; give an update clip norm (clip=...)")
    if not context.num_images:
        raise ValueError("per-example clipping in the context needs num_images")
    return context.per_example_clip / context.num_images, "example"


def _noise_std(p: dict[str, Any], sensitivity: float | None, q: float, rounds: int
               ) -> tuple[float | None, float]:
    """(noise multiplier, noise std) of the spec for a sensitivity and a DP schedule."""
    if p["sigma"] is None and sensitivity is None:
        what = "target_epsilon" if p["target_epsilon"] is not None else "noise_multiplier"
        raise UserError(f"obfuscation 'gaussian': {what} needs a clip norm (clip=...) or per-example clipping "
                        "in the protocol; or give the noise std directly (sigma=...)")
    if p["target_epsilon"] is not None:
        z = noise_multiplier_for(p["target_epsilon"], p["delta"], q, rounds, p["accountant"])
    elif p["noise_multiplier"] is not None:
        z = p["noise_multiplier"]
    else:
        z = p["sigma"] / sensitivity if sensitivity else None
    return z, (z * sensitivity if (z is not None and sensitivity is not None) else p["sigma"])


def _schedule(p: dict[str, Any], context: Context) -> tuple[float, int]:
    """(sample rate, rounds): from the spec, else the context, else one release."""
    q = p["sample_rate"] if p["sample_rate"] is not None else (context.sample_rate or 1.0)
    return q, (p["rounds"] if p["rounds"] is not None else (context.rounds or 1))


def _gaussian_server(p: dict[str, Any], received: Received) -> dict[str, Any]:
    """The noise std from the spec: sigma, or the noise multiplier (given or derived from the DP budget)
    times the clip norm or the protocol's per-example clip / B."""
    try:
        sensitivity, _ = _sensitivity(p, received.context)
        return {"sigma": _noise_std(p, sensitivity, *_schedule(p, received.context))[1]}
    except UserError as e:
        raise Underivable(str(e)) from None


def _gaussian(update: Tensors, p: dict[str, Any], generator: torch.Generator, context: Context) -> Result:
    out = {n: v.detach() for n, v in update.items()}
    record: dict[str, Any] = {}
    if p["clip"] is not None:
        out, before, per_tensor = clip_update(out, p["clip"], p["per_layer"])
        record["norm_before_clip"] = before
        if p["per_layer"]:
            record["clip_per_tensor"] = per_tensor
    sensitivity, unit = _sensitivity(p, context)
    q, rounds = _schedule(p, context)
    z, std = _noise_std(p, sensitivity, q, rounds)
    out = _add_gaussian(out, std, generator)
    epsilon = None
    if z is not None and z > 0:
        try:
            epsilon = epsilon_spent(z, q, rounds, p["delta"], p["accountant"])
        except UserError:
            if p["target_epsilon"] is not None:
                raise
    record.update({
        "noise_multiplier": z,
        "sigma": {n: std for n in out} if p["per_layer"] else std,
        "sensitivity": sensitivity,
        "dp_unit": unit,
        "sample_rate": q,
        "rounds": rounds,
        "epsilon": epsilon,
    })
    return Result(out, update_bits(out), record)


register(Obfuscation(
    "gaussian", _gaussian, GaussianParams, family="noise", stochastic=True, server=NoiseServer,
    derive=_gaussian_server, scale_recoverable=lambda p: p.get("clip") is None,
    aliases=("clip_gaussian", "gaussian_noise", "dp", "dp_gaussian"),
    keys={"z": "noise_multiplier", "max_grad_norm": "clip", "clip_norm": "clip", "epsilon": "target_epsilon",
             "std": "sigma", "target_delta": "delta", "steps": "rounds"},
    doc="clip the update to L2 norm `clip` (whole update, or per_layer) and add N(0, sigma^2) to every entry "
        "with sigma = noise_multiplier * sensitivity (sensitivity = clip, or per_example_clip / B after the "
        "protocol's per-example clipping); or sigma given directly; or the noise multiplier derived from "
        "target_epsilon/delta for sample_rate and rounds with Opacus's accountant (rdp or prv). Records "
        "the epsilon spent."))


# -------------------------------------------------------------------------------------------- laplace
class LaplaceParams(Params):
    clip: Number | None = Field(None, gt=0)
    scale: Number | None = Field(None, ge=0)

    check_scale = _needs("scale", "the Laplace scale b; the noise std is b * sqrt(2)")


def _laplace_std(b: float) -> float:
    return b * math.sqrt(2)


def _laplace(update: Tensors, p: dict[str, Any], generator: torch.Generator, context: Context) -> Result:
    out = {n: v.detach() for n, v in update.items()}
    record: dict[str, Any] = {}
    if p["clip"] is not None:
        out, before, _ = clip_update(out, p["clip"])
        record["norm_before_clip"] = before
    b = p["scale"]
    noisy = {}
    for n, v in out.items():
        # Laplace(0, b) = b * (E1 - E2) with E = -log(1 - U), U uniform in [0, 1)
        e1 = -torch.log1p(-torch.rand(v.shape, generator=generator, dtype=torch.float64))
        e2 = -torch.log1p(-torch.rand(v.shape, generator=generator, dtype=torch.float64))
        noisy[n] = v + (b * (e1 - e2)).to(device=v.device, dtype=v.dtype) if b > 0 else v
    record["sigma"] = _laplace_std(b)
    return Result(noisy, update_bits(noisy), record)


register(Obfuscation(
    "laplace", _laplace, LaplaceParams, family="noise", stochastic=True, server=NoiseServer,
    derive=lambda p, received: {"sigma": _laplace_std(p["scale"])},
    scale_recoverable=lambda p: p.get("clip") is None, aliases=("clip_laplace", "laplacian"),
    keys={"b": "scale", "clip_norm": "clip"},
    doc="clip the update to L2 norm `clip` (optional) and add Laplace(0, scale) noise to every entry "
        "(std = scale * sqrt(2))"))


# --------------------------------------------------------------------------------- relative (NVFlare)
class RelativeParams(Params):
    sigma0: Number = Field(0.1, ge=0)
    max_percentile: Number = Field(95.0, ge=0, le=100)


def _relative_server(p: dict[str, Any], received: Received) -> dict[str, Any]:
    raise Underivable("its noise std is sigma0 times a percentile of the update before the noise, which the "
                      "server never receives")


def _relative(update: Tensors, p: dict[str, Any], generator: torch.Generator, context: Context) -> Result:
    a = np.concatenate([v.detach().to("cpu", torch.float64).abs().reshape(-1).numpy() for v in update.values()])
    nonzero = a[a > 0]
    ref = float(np.percentile(nonzero, p["max_percentile"])) if nonzero.size else 0.0
    sigma = p["sigma0"] * ref
    out = _add_gaussian(update, sigma, generator) if p["sigma0"] > 0 else {n: v.detach() for n, v in update.items()}
    return Result(out, update_bits(out), {"sigma": sigma, "reference": ref})


register(Obfuscation(
    "relative_gaussian", _relative, RelativeParams, family="noise", stochastic=True, server=NoiseServer,
    derive=_relative_server, aliases=("nvflare", "gaussian_privacy"),
    keys={"sigma_fraction": "sigma0", "percentile": "max_percentile"},
    doc="NVIDIA NVFlare's GaussianPrivacy filter: sigma = sigma0 x the max_percentile-th percentile (95) "
        "of the non-zero |entries| over the whole update; N(0, sigma^2) added to every entry"))


# ------------------------------------------------------------------------------------------- SNR form
class SnrParams(Params):
    snr_db: Number | None = None
    scope: Scope = "tensor"

    check_snr = _needs("snr_db", "signal-to-noise ratio in dB")


def _snr_server(p: dict[str, Any], received: Received) -> dict[str, Any]:
    """The noise std estimated from the received update: its variance is Var(g) + sigma^2 with
    sigma^2 = Var(g) r, r = 10^(-snr_db/10), so sigma^2 = Var(received) r / (1 + r)."""
    if not received.exact:
        raise Underivable(f"its noise std would be estimated from the update, {received.inexact}")
    r = 10.0 ** (-p["snr_db"] / 10.0)
    if p["scope"] == "tensor":
        return {"sigma": {n: math.sqrt(_variance(v) * r / (1 + r)) for n, v in received.update.items()}}
    flat = torch.cat([v.detach().reshape(-1) for v in received.update.values()])
    return {"sigma": math.sqrt(_variance(flat) * r / (1 + r))}


def _variance(v: torch.Tensor) -> float:
    return float(v.detach().to("cpu", torch.float64).var(unbiased=False)) if v.numel() > 1 else 0.0


def _snr(update: Tensors, p: dict[str, Any], generator: torch.Generator, context: Context) -> Result:
    ratio = 10.0 ** (-p["snr_db"] / 10.0)
    if p["scope"] == "tensor":
        var = {n: _variance(v) for n, v in update.items()}
        sigma: float | dict[str, float] = {n: math.sqrt(var[n] * ratio) for n in update}
        signal: float | dict[str, float] = var
    else:
        signal = _variance(torch.cat([v.detach().to("cpu", torch.float64).reshape(-1) for v in update.values()]))
        sigma = math.sqrt(signal * ratio)
    out = _add_gaussian(update, sigma, generator)
    return Result(out, update_bits(out), {"sigma": sigma, "signal_variance": signal})


register(Obfuscation(
    "snr_gaussian", _snr, SnrParams, family="noise", stochastic=True, server=NoiseServer, derive=_snr_server,
    aliases=("snr",), keys={"snr": "snr_db", "dpsnr": "snr_db"},
    doc="Gaussian noise at a signal-to-noise ratio (ROG's form): sigma^2 = Var(g) * 10^(-snr_db/10), "
        "Var over each tensor's entries (scope=tensor, as ROG treats each gradient tensor) or the whole update"))
