"""Client-side obfuscations of an update: each a pure function of (update, parameters, generator, context).

This is the small public API over the registry (:mod:`.registry`), where each obfuscation declares its
function, its parameters (a pydantic model, :mod:`.params`), its aliases and ROG's keys, and what it
reveals to a server that knows it was applied. :func:`apply` is the one entry point (victim capture,
``gradleak obfuscate`` and the utility simulation all go through it): a list of specs is applied in
order (composition), and each step returns the record that goes into the Observation's
``obfuscation`` list: ``{"name": canonical name, **resolved parameters, **derived values}`` —
everything a server that knows the obfuscation would use (the noise std actually used as ``sigma``,
the clip norm, quantizer scales, the keep fraction, ...), as plain JSON-able values — and the update's
communication cost in bits. :func:`server_record` reads a record the other way, as a knowing server,
deriving what a record written by another tool leaves out.

The suite (see ``docs/obfuscations.md`` for the exact definitions):

=================== ============================================================================
``none``            identity
``qsgd``            QSGD stochastic quantization (Alistarh et al. 2017), max- or L2-norm, buckets
``uniform``         deterministic symmetric rounding to ``bits`` bits per tensor
``fp16``, ``bf16``  casts to half precision and back
``sign``            signSGD (Bernstein et al. 2018), optionally scaled by the mean |g|
``topk``            keep the largest-magnitude entries (per tensor or over the whole update)
``randk``           keep a random subset, rescaled to stay unbiased
``prune``           zero entries below the p-th percentile of |g| per tensor (DLG / GradAttack)
``gaussian``        clip + Gaussian noise, fixed noise multiplier or derived from a DP budget
``laplace``         clip + Laplace noise of scale b
``relative_gaussian`` NVFlare's GaussianPrivacy: σ = sigma0 × 95th percentile of non-zero |update|
``snr_gaussian``    noise at a signal-to-noise ratio: σ² = Var(g)·10^(−snr_db/10)
=================== ============================================================================

Specs are dicts (``{"name": "qsgd", "levels": 16}``) or strings ``NAME:key=value,...``
(:func:`parse_spec`). Name aliases (``clip_gaussian``, ``signsgd``, ...) and ROG's configuration keys
(``compress: qsgd``, ``quant_level``, ``compress: topk``, ``sparsity``) are accepted and resolved to the
canonical names and parameters above.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import UserError
from ._common import FLOAT_BITS
from .registry import (FAMILIES, NAME_ALIASES, Context, Obfuscation, Received, Result, Tensors, Underivable,
                       canonical, get, names, normalize, parse_spec, register, resolve, resolve_all, server_record)


def spec_of_record(record: dict[str, Any]) -> dict[str, Any]:
    """The spec that reproduces an observation's obfuscation record (its ``spec`` entry: the spec as the
    client was given it, without what the obfuscation measured while running, e.g. the k it kept)."""
    if not isinstance(record.get("spec"), dict):
        raise UserError(f"obfuscation record '{record.get('name')}' does not name its spec (an observation "
                        f"written before records carried one): capture it again")
    return dict(record["spec"])


def dense_bits(update: Tensors) -> int:
    return FLOAT_BITS * sum(int(v.numel()) for v in update.values())


def apply(specs: Sequence[Any], update: Tensors, generator: torch.Generator | None = None,
          context: Context | None = None) -> tuple[Tensors, list[dict[str, Any]], int]:
    """Apply ``specs`` in order. Returns (obfuscated update, records, bits of the final update).

    All specs are resolved (and any bad parameter reported) before the first one runs. Each record
    carries ``update_bits``, the cost of the update after that step (the unobfuscated update costs
    :data:`FLOAT_BITS` per entry; the key is not ``bits``, a parameter of ``uniform``), and ``spec``, the
    spec as given (canonical name), which reproduces the step.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    context = context or Context()
    resolved = resolve_all(specs)
    records: list[dict[str, Any]] = []
    bits = dense_bits(update)
    update = dict(update)
    with torch.no_grad():
        for spec, (ob, params) in zip(specs, resolved):
            res = ob.fn(update, dict(params), generator, context)
            update = res.update
            if res.bits is not None:
                bits = int(res.bits)
            record = {"name": ob.name, **params, **res.record}
            record["name"] = ob.name
            record["update_bits"] = bits
            record["spec"] = {**normalize(spec), "name": ob.name}  # what reproduces this step
            records.append(plain(record))
    return update, records, bits


def plain(x: Any) -> Any:
    """``x`` with tensors and numpy scalars turned into Python numbers/lists (what weights_only loads)."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, torch.Tensor):
        return plain(x.tolist())
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return x.item()
    return x


def merge_client_records(per_client: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per obfuscation step for an update averaged over K clients that each obfuscated their own.

    Values equal for all clients stay as they are. Values that differ go to ``per_client`` (a list of
    K dicts); ``sigma`` then becomes the root-mean-square of the clients' stds (per tensor where it is a
    dict) and ``update_bits`` the rounded mean. With K > 1 every noise record also gets ``sigma_of_mean``: the
    std of the noise in the averaged update the server sees, sqrt(sum_k sigma_k^2) / K.
    """
    if not per_client:
        return []
    k = len(per_client)
    if k == 1:
        return [dict(r) for r in per_client[0]]
    merged: list[dict[str, Any]] = []
    for step in zip(*per_client):
        out: dict[str, Any] = {}
        differing: list[str] = []
        for key in step[0]:
            values = [r.get(key) for r in step]
            if all(v == values[0] for v in values):
                out[key] = values[0]
            else:
                differing.append(key)
        if differing:
            out["per_client"] = [{key: r.get(key) for key in differing} for r in step]
        for key in differing:
            values = [r.get(key) for r in step]
            if key == "sigma":
                out["sigma"] = _rms(values)
            elif key == "update_bits":
                out["update_bits"] = int(round(sum(values) / k))
        if "sigma" in out and out["sigma"] is not None:
            out["sigma_of_mean"] = _scale(out["sigma"], 1 / math.sqrt(k))
        merged.append(out)
    return merged


def _rms(values: list[Any]) -> Any:
    if isinstance(values[0], dict):
        return {n: math.sqrt(sum(float(v[n]) ** 2 for v in values) / len(values)) for n in values[0]}
    return math.sqrt(sum(float(v) ** 2 for v in values) / len(values))


def _scale(value: Any, factor: float) -> Any:
    if isinstance(value, dict):
        return {n: float(v) * factor for n, v in value.items()}
    return float(value) * factor


def _identity(update: Tensors, params: dict[str, Any], generator: torch.Generator, context: Context) -> Result:
    return Result(dict(update), None, {})


register(Obfuscation("none", _identity, family="identity", aliases=("identity",), keeps_zeros=True,
                     doc="no obfuscation"))

from . import noise, quantize, sparsify  # noqa: E402  (register the suite)

__all__ = ["Obfuscation", "Result", "Context", "Received", "Underivable", "FAMILIES", "register", "get", "resolve",
           "apply", "names", "dense_bits", "spec_of_record", "canonical", "parse_spec", "normalize", "resolve_all",
           "server_record", "merge_client_records", "plain", "NAME_ALIASES", "FLOAT_BITS"]
