"""Client-side obfuscations of an update: each a pure function of (update, parameters, generator, context).

An obfuscation is registered with :func:`register` and applied by name through :func:`apply`, the one
entry point (victim capture, ``gradleak obfuscate`` and the utility simulation all go through it). A list
of specs is applied in order (composition). For each step :func:`apply` returns the record that goes
into the Observation's ``obfuscation`` list: ``{"name": canonical name, **resolved parameters,
**derived values}`` — everything a server that knows the obfuscation would use (the noise std actually
used as ``sigma``, the clip norm, quantizer scales, the keep fraction, ...), as plain JSON-able values —
and the update's communication cost in bits.

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

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import UserError
from ._common import FLOAT_BITS

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Context:
    """What an obfuscation may need to know about the round it runs in (all optional).

    ``num_images``: images in the client's batch (B); with ``per_example_clip`` (the protocol clipped
    each image's gradient to that L2 norm, DP-SGD style) the L2 sensitivity of a FedSGD update to one
    image is ``per_example_clip / num_images``. ``algorithm``: ``fedsgd`` or ``fedavg``.
    ``sample_rate`` and ``rounds``: the DP schedule (probability that this client's update is used in a
    round, and the number of rounds) for the ``gaussian`` obfuscation's accounting, unless its spec
    gives them.
    """

    num_images: int | None = None
    per_example_clip: float | None = None
    algorithm: str | None = None
    sample_rate: float | None = None
    rounds: int | None = None

    @classmethod
    def from_protocol(cls, header: dict[str, Any], **kw) -> "Context":
        """The context of one client of an Observation's ``protocol`` header."""
        k = int(header.get("num_clients_averaged") or 1)
        n = header.get("images_per_client") or (int(header["num_images"]) // k if header.get("num_images") else None)
        pec = header.get("per_example_clip")
        return cls(num_images=int(n) if n is not None else None,
                   per_example_clip=float(pec) if pec is not None else None,
                   algorithm=header.get("algorithm"), **kw)


@dataclass
class Result:
    update: Tensors
    bits: int | None  # communication cost of the update after this obfuscation; None: unchanged
    record: dict[str, Any]  # appended to the Observation's ``obfuscation`` list


@dataclass
class Obfuscation:
    """A registered obfuscation.

    ``fn(update, params, generator, context) -> Result``. ``defaults`` lists every parameter it takes;
    ``aliases`` maps other parameter names onto them; ``validate(params)`` checks the merged parameters and may return a normalised copy.
    """

    name: str
    fn: Callable[..., Result]
    defaults: dict[str, Any] = field(default_factory=dict)
    validate: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
    doc: str = ""
    aliases: dict[str, str] = field(default_factory=dict)


_REGISTRY: dict[str, Obfuscation] = {}

#: Other names accepted for the canonical ones.
NAME_ALIASES: dict[str, str] = {
    "identity": "none", "clip_gaussian": "gaussian", "gaussian_noise": "gaussian", "dp": "gaussian",
    "dp_gaussian": "gaussian", "clip_laplace": "laplace", "laplacian": "laplace",
    "signsgd": "sign", "sign_sgd": "sign", "top_k": "topk", "rand_k": "randk", "random_k": "randk",
    "pruning": "prune", "magnitude_pruning": "prune", "gradient_pruning": "prune",
    "quantize": "uniform", "uniform_quantization": "uniform", "half": "fp16", "float16": "fp16",
    "bfloat16": "bf16", "nvflare": "relative_gaussian", "gaussian_privacy": "relative_gaussian",
    "snr": "snr_gaussian",
}


def register(ob: Obfuscation) -> Obfuscation:
    _REGISTRY[ob.name] = ob
    return ob


def names() -> list[str]:
    return sorted(_REGISTRY)


def spec_of_record(record: dict[str, Any]) -> dict[str, Any]:
    """The spec that reproduces an observation's obfuscation record (its ``spec`` entry: the spec as the
    client was given it, without what the obfuscation measured while running, e.g. the k it kept)."""
    if not isinstance(record.get("spec"), dict):
        raise UserError(f"obfuscation record '{record.get('name')}' does not name its spec (an observation "
                        f"written before records carried one): capture it again")
    return dict(record["spec"])


def dense_bits(update: Tensors) -> int:
    return FLOAT_BITS * sum(int(v.numel()) for v in update.values())


def canonical(name: str) -> str:
    """The canonical name of ``name`` (an alias or a registered name); unknown names are a UserError."""
    key = str(name).strip().lower()
    key = NAME_ALIASES.get(key, key)
    if key not in _REGISTRY:
        near = difflib.get_close_matches(str(name), names() + list(NAME_ALIASES), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(names())})"
        raise UserError(f"unknown obfuscation '{name}'{hint}")
    return key


def _scalar(text: str) -> Any:
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null", "~", ""):
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def parse_spec(text: str) -> dict[str, Any]:
    """``NAME[:key=value,...]`` -> ``{"name": NAME, key: value, ...}``.

    Values are read as integers, numbers, ``true``/``false``, ``none``, else strings, e.g.
    ``qsgd:levels=16,norm=l2`` or ``gaussian:clip=1,noise_multiplier=0.01``.
    """
    text = str(text).strip()
    name, _, rest = text.partition(":")
    if not name.strip():
        raise UserError(f"obfuscation spec '{text}' has no name (expected NAME:key=value,...)")
    spec: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item:
            raise UserError(f"obfuscation spec '{text}': expected key=value, got '{item}'")
        k, v = item.split("=", 1)
        if not k.strip():
            raise UserError(f"obfuscation spec '{text}': empty key in '{item}'")
        spec[k.strip()] = _scalar(v)
    return spec


def normalize(spec: Any) -> dict[str, Any]:
    """A spec (dict or ``NAME:key=value`` string, canonical or alias names, ROG keys) as
    ``{"name": canonical name, param: value, ...}`` with canonical parameter names (not yet validated)."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if not isinstance(spec, dict):
        raise UserError(f"an obfuscation must be a mapping with a 'name' or a 'NAME:key=value' string, got {spec!r}")
    spec = dict(spec)
    if "compress" in spec:  # ROG's configuration: compress: qsgd | topk | uniform | sign | none
        comp = spec.pop("compress")
        if "name" in spec and canonical(spec["name"]) != canonical(comp):
            raise UserError(f"obfuscation {spec!r}: 'compress: {comp}' contradicts 'name: {spec['name']}'")
        spec["name"] = comp
    if "name" not in spec:
        raise UserError(f"obfuscation {spec!r} has no 'name'")
    name = canonical(spec.pop("name"))
    ob = _REGISTRY[name]
    params: dict[str, Any] = {}
    for k, v in spec.items():
        key = ob.aliases.get(str(k), str(k))
        if key in params:
            raise UserError(f"obfuscation '{name}': parameter '{key}' given twice (as '{k}')")
        params[key] = v
    return {"name": name, **params}


def resolve(spec: Any) -> tuple[Obfuscation, dict[str, Any]]:
    """Look up a spec's obfuscation and return it with its parameters merged over the defaults and checked."""
    spec = normalize(spec)
    ob = _REGISTRY[spec["name"]]
    params = {k: v for k, v in spec.items() if k != "name"}
    unknown = [k for k in params if k not in ob.defaults]
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(ob.defaults) + list(ob.aliases), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else (
            f" (it takes {', '.join(ob.defaults)})" if ob.defaults else " (it takes none)")
        raise UserError(f"obfuscation '{ob.name}' has no parameter '{unknown[0]}'{hint}")
    merged = {**ob.defaults, **params}
    if ob.validate:
        checked = ob.validate(merged)
        if checked is not None:
            merged = checked
    return ob, merged


def resolve_all(specs: Sequence[Any]) -> list[tuple[Obfuscation, dict[str, Any]]]:
    """Resolve every spec of a list (reporting the first bad one) without applying anything."""
    if isinstance(specs, (str, dict)):
        raise UserError("obfuscations must be given as a list of specs")
    return [resolve(s) for s in specs]


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


register(Obfuscation("none", _identity, doc="no obfuscation"))

from . import noise, quantize, sparsify  # noqa: E402  (register the suite)

__all__ = ["Obfuscation", "Result", "Context", "register", "resolve", "apply", "names", "dense_bits",
           "spec_of_record", "canonical", "parse_spec", "normalize", "resolve_all", "merge_client_records", "NAME_ALIASES", "FLOAT_BITS"]
