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

from ..errors import UserError
from . import Context, Obfuscation, Result, Tensors, register
from ._common import as_bool, as_choice, as_float, as_int, update_bits
from .accounting import ACCOUNTANTS, epsilon_spent, noise_multiplier_for


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
def _validate_gaussian(p: dict[str, Any]) -> dict[str, Any]:
    modes = [k for k in ("noise_multiplier", "sigma", "target_epsilon") if p.get(k) is not None]
    if len(modes) != 1:
        raise UserError("obfuscation 'gaussian': give exactly one of noise_multiplier, sigma or target_epsilon"
                        + (f" (got {' and '.join(modes)})" if modes else ""))
    q = {
        "clip": as_float("gaussian", p, "clip", lo=0.0, lo_open=True, optional=True),
        "noise_multiplier": as_float("gaussian", p, "noise_multiplier", lo=0.0, optional=True),
        "sigma": as_float("gaussian", p, "sigma", lo=0.0, optional=True),
        "per_layer": as_bool("gaussian", p, "per_layer"),
        "target_epsilon": as_float("gaussian", p, "target_epsilon", lo=0.0, lo_open=True, optional=True),
        "delta": as_float("gaussian", p, "delta", lo=0.0, hi=1.0, lo_open=True, hi_open=True),
        "sample_rate": as_float("gaussian", p, "sample_rate", lo=0.0, hi=1.0, lo_open=True, optional=True),
        "rounds": as_int("gaussian", p, "rounds", lo=1, optional=True),
        "accountant": as_choice("gaussian", p, "accountant", ACCOUNTANTS),
    }
    if q["per_layer"] and q["clip"] is None:
        raise UserError("obfuscation 'gaussian': per_layer=true needs a clip norm (clip=...)")
    return q


def _gaussian(update: Tensors, p: dict[str, Any], generator: torch.Generator, context: Context) -> Result:
    out = {n: v.detach() for n, v in update.items()}
    record: dict[str, Any] = {}
    if p["clip"] is not None:
        out, before, per_tensor = clip_update(out, p["clip"], p["per_layer"])
        sensitivity, unit = p["clip"], "client"
        record["norm_before_clip"] = before
        if p["per_layer"]:
            record["clip_per_tensor"] = per_tensor
    elif context.per_example_clip is not None:
        if context.algorithm == "fedavg":
            raise UserError("obfuscation 'gaussian': after per-example clipping under fedavg the weight delta's "
                            "sensitivity is not per_example_clip / B; give an update clip norm (clip=...)")
        if not context.num_images:
            raise ValueError("per-example clipping in the context needs num_images")
        sensitivity, unit = context.per_example_clip / context.num_images, "example"
    else:
        sensitivity, unit = None, None
    q = p["sample_rate"] if p["sample_rate"] is not None else (context.sample_rate or 1.0)
    rounds = p["rounds"] if p["rounds"] is not None else (context.rounds or 1)
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
    std = z * sensitivity if (z is not None and sensitivity is not None) else p["sigma"]
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
    "gaussian", _gaussian,
    defaults={"clip": None, "noise_multiplier": None, "sigma": None, "per_layer": False, "target_epsilon": None,
              "delta": 1e-5, "sample_rate": None, "rounds": None, "accountant": "rdp"},
    validate=_validate_gaussian,
    aliases={"z": "noise_multiplier", "max_grad_norm": "clip", "clip_norm": "clip", "epsilon": "target_epsilon",
             "std": "sigma", "target_delta": "delta", "steps": "rounds"},
    doc="clip the update to L2 norm `clip` (whole update, or per_layer) and add N(0, sigma^2) to every entry "
        "with sigma = noise_multiplier * sensitivity (sensitivity = clip, or per_example_clip / B after the "
        "protocol's per-example clipping); or sigma given directly; or the noise multiplier derived from "
        "target_epsilon/delta for sample_rate and rounds with Opacus's accountant (rdp or prv). Records "
        "the epsilon spent."))


# -------------------------------------------------------------------------------------------- laplace
def _validate_laplace(p: dict[str, Any]) -> dict[str, Any]:
    if p.get("scale") is None:
        raise UserError("obfuscation 'laplace' needs scale=... (the Laplace scale b; the noise std is b * sqrt(2))")
    return {"clip": as_float("laplace", p, "clip", lo=0.0, lo_open=True, optional=True),
            "scale": as_float("laplace", p, "scale", lo=0.0)}


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
    record["sigma"] = b * math.sqrt(2)
    return Result(noisy, update_bits(noisy), record)


register(Obfuscation(
    "laplace", _laplace, defaults={"clip": None, "scale": None}, validate=_validate_laplace,
    aliases={"b": "scale", "clip_norm": "clip"},
    doc="clip the update to L2 norm `clip` (optional) and add Laplace(0, scale) noise to every entry "
        "(std = scale * sqrt(2))"))


# --------------------------------------------------------------------------------- relative (NVFlare)
def _validate_relative(p: dict[str, Any]) -> dict[str, Any]:
    return {"sigma0": as_float("relative_gaussian", p, "sigma0", lo=0.0),
            "max_percentile": as_float("relative_gaussian", p, "max_percentile", lo=0.0, hi=100.0)}


def _relative(update: Tensors, p: dict[str, Any], generator: torch.Generator, context: Context) -> Result:
    a = np.concatenate([v.detach().to("cpu", torch.float64).abs().reshape(-1).numpy() for v in update.values()])
    nonzero = a[a > 0]
    ref = float(np.percentile(nonzero, p["max_percentile"])) if nonzero.size else 0.0
    sigma = p["sigma0"] * ref
    out = _add_gaussian(update, sigma, generator) if p["sigma0"] > 0 else {n: v.detach() for n, v in update.items()}
    return Result(out, update_bits(out), {"sigma": sigma, "reference": ref})


register(Obfuscation(
    "relative_gaussian", _relative, defaults={"sigma0": 0.1, "max_percentile": 95.0}, validate=_validate_relative,
    aliases={"sigma_fraction": "sigma0", "percentile": "max_percentile"},
    doc="NVIDIA NVFlare's GaussianPrivacy filter: sigma = sigma0 x the max_percentile-th percentile (95) "
        "of the non-zero |entries| over the whole update; N(0, sigma^2) added to every entry"))


# ------------------------------------------------------------------------------------------- SNR form
def _validate_snr(p: dict[str, Any]) -> dict[str, Any]:
    if p.get("snr_db") is None:
        raise UserError("obfuscation 'snr_gaussian' needs snr_db=... (signal-to-noise ratio in dB)")
    return {"snr_db": as_float("snr_gaussian", p, "snr_db"),
            "scope": as_choice("snr_gaussian", p, "scope", ("tensor", "global"))}


def _snr(update: Tensors, p: dict[str, Any], generator: torch.Generator, context: Context) -> Result:
    ratio = 10.0 ** (-p["snr_db"] / 10.0)
    if p["scope"] == "tensor":
        var = {n: float(v.detach().to(torch.float64).var(unbiased=False)) if v.numel() > 1 else 0.0
               for n, v in update.items()}
        sigma: float | dict[str, float] = {n: math.sqrt(var[n] * ratio) for n in update}
        signal: float | dict[str, float] = var
    else:
        flat = torch.cat([v.detach().to("cpu", torch.float64).reshape(-1) for v in update.values()])
        signal = float(flat.var(unbiased=False)) if flat.numel() > 1 else 0.0
        sigma = math.sqrt(signal * ratio)
    out = _add_gaussian(update, sigma, generator)
    return Result(out, update_bits(out), {"sigma": sigma, "signal_variance": signal})


register(Obfuscation(
    "snr_gaussian", _snr, defaults={"snr_db": None, "scope": "tensor"}, validate=_validate_snr,
    aliases={"snr": "snr_db", "dpsnr": "snr_db"},
    doc="Gaussian noise at a signal-to-noise ratio (ROG's form): sigma^2 = Var(g) * 10^(-snr_db/10), "
        "Var over each tensor's entries (scope=tensor, as ROG treats each gradient tensor) or the whole update"))
