"""The registry of obfuscations: what each one is, takes, and reveals to a server that knows it was applied.

An :class:`Obfuscation` declares

- its pure function ``fn(update, params, generator, context) -> Result``;
- its parameters as a :class:`~.params.Params` model, other names of the obfuscation (``aliases``)
  and of its parameters (``keys``, ROG's configuration keys such as ``quant_level`` among them);
- what it reveals: its ``family`` (one of :data:`FAMILIES`, which decides how an attacker that knows it
  matches an update), whether an entry that was zero stays zero after it (``keeps_zeros``: a mask sent
  earlier stays visible), whether the entries a sparsifier did not send are bounded by the smallest one
  it sent (``bounds_unsent``), whether it draws random numbers (``stochastic``), whether the server can
  still read the update's scale (``scale_recoverable``, a flag or a function of the parameters);
- the values a knowing server reads from its record (``server``, a :class:`~.params.ServerValues`
  model) and how to derive the ones a record leaves out from the parameters and the received update
  (``derive``, which raises :class:`Underivable` where they cannot be).

A spec is a dict (``{"name": "qsgd", "levels": 16}``) or a string ``NAME:key=value,...``
(:func:`parse_spec`); :func:`normalize` maps aliases and ROG keys to canonical names, :func:`resolve`
validates. :func:`server_record` reads a record as a knowing server, whoever wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import UserError
from ..validation import nearest, parse_value, unknown_name
from .params import NoParams, Params, ServerValues, check

Tensors = dict[str, torch.Tensor]

#: How an obfuscation changes the update, as a knowing attacker matches it: ``identity`` (nothing),
#: ``cast`` (below the precision that matters: plain matching), ``quantize`` (values on a grid: a
#: rounding model, stochastic or deterministic), ``sign`` (signs only), ``sparsify`` (some entries
#: sent exactly, the others zero) and ``noise`` (random noise of a known std added).
FAMILIES = ("identity", "cast", "quantize", "sign", "sparsify", "noise")

#: Values a server model must declare for its family's objective: (family, stochastic) -> keys.
FAMILY_KEYS: dict[tuple[str, bool], tuple[str, ...]] = {
    ("quantize", True): ("s",),  # stochastic rounding to s intervals of each bucket's norm
    ("quantize", False): ("scale",),  # deterministic rounding to a grid of step ``scale``
    ("noise", True): ("sigma",),  # the noise std
}


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
    def from_protocol(cls, protocol: Any, **kw) -> "Context":
        """The context of one client of an Observation's protocol (a
        :class:`gradleak.federated.ObservedProtocol`)."""
        pec = protocol.per_example_clip
        return cls(num_images=int(protocol.images_per_client),
                   per_example_clip=float(pec) if pec is not None else None,
                   algorithm=protocol.algorithm, **kw)


@dataclass
class Result:
    update: Tensors
    bits: int | None  # communication cost of the update after this obfuscation; None: unchanged
    record: dict[str, Any]  # appended to the Observation's ``obfuscation`` list


@dataclass(frozen=True)
class Received:
    """What a server has when it reads a record: the update it received (in the records' units), the
    round's context, and whether this step's output is that update (no later step changed it, and it is
    one client's); ``inexact`` says what else it is, for the messages of values that cannot be read off it."""

    update: Tensors
    context: Context
    exact: bool
    inexact: str = "which later steps changed"


class Underivable(Exception):
    """A value a knowing server needs is neither in the record nor derivable; the message says why."""


class NoServerValues(ServerValues):
    """An obfuscation whose record a knowing server does not need to read."""


@dataclass(frozen=True)
class Obfuscation:
    """A registered obfuscation (see the module's docstring for each field)."""

    name: str
    fn: Callable[..., Result]
    params: type[Params] = NoParams
    family: str = "identity"
    doc: str = ""
    aliases: tuple[str, ...] = ()
    keys: Mapping[str, str] = field(default_factory=dict)
    keeps_zeros: bool = False
    bounds_unsent: bool = False
    stochastic: bool = False
    scale_recoverable: bool | Callable[[dict[str, Any]], bool] = True
    server: type[ServerValues] = NoServerValues
    derive: Callable[[dict[str, Any], Received], dict[str, Any]] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """Every parameter it takes, with its default."""
        return {k: f.default for k, f in self.params.model_fields.items()}

    def check(self, params: dict[str, Any]) -> dict[str, Any]:
        """The validated parameters (canonical keys), defaults filled in, as its function receives them."""
        return check(self.params, params, f"obfuscation '{self.name}'").values()

    def recovers_scale(self, params: dict[str, Any]) -> bool:
        """Whether a server can still read the update's scale after this step with these parameters."""
        s = self.scale_recoverable
        return bool(s(params) if callable(s) else s)


_REGISTRY: dict[str, Obfuscation] = {}

#: Other names accepted for the canonical ones (filled from each obfuscation's ``aliases``).
NAME_ALIASES: dict[str, str] = {}


def register(ob: Obfuscation) -> Obfuscation:
    """Add ``ob`` to the registry; its declarations are checked (a mistake here is a bug, not a user error)."""
    if ob.family not in FAMILIES:
        raise ValueError(f"obfuscation '{ob.name}': family must be one of {', '.join(FAMILIES)}, got {ob.family!r}")
    missing = [k for k in FAMILY_KEYS.get((ob.family, ob.stochastic), ()) if k not in ob.server.model_fields]
    if missing:
        raise ValueError(f"obfuscation '{ob.name}' ({ob.family}) must declare {', '.join(missing)} in its server values")
    for other in (ob.name, *ob.aliases):
        owner = NAME_ALIASES.get(other) or (other if other in _REGISTRY else None)
        if owner is not None and owner != ob.name:
            raise ValueError(f"obfuscation name '{other}' is already taken by '{owner}'")
    unknown = [k for k, v in ob.keys.items() if v not in ob.params.model_fields]
    if unknown:
        raise ValueError(f"obfuscation '{ob.name}': key alias '{unknown[0]}' names no parameter")
    _REGISTRY[ob.name] = ob
    NAME_ALIASES.update({a: ob.name for a in ob.aliases})
    return ob


def names() -> list[str]:
    return sorted(_REGISTRY)


def canonical(name: str) -> str:
    """The canonical name of ``name`` (an alias or a registered name); unknown names are a UserError."""
    key = name.strip().lower() if isinstance(name, str) else None  # a name is a string (None is not 'none')
    key = NAME_ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise unknown_name("obfuscation", name, names(), NAME_ALIASES)
    return key


def get(name: str) -> Obfuscation:
    """The obfuscation called ``name`` (or an alias of it); unknown names are a UserError."""
    return _REGISTRY[canonical(name)]


# ----------------------------------------------------------------------------------------------- specs
def parse_spec(text: str) -> dict[str, Any]:
    """``NAME[:key=value,...]`` -> ``{"name": NAME, key: value, ...}``.

    Values are read as YAML 1.2 scalars (integers, numbers such as ``1e-3``, ``true``/``false``, ``null``,
    and ``none`` for an absent value), else strings, e.g.
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
        value = parse_value(v)
        spec[k.strip()] = None if isinstance(value, str) and value.lower() == "none" else value
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
    ob = get(spec.pop("name"))
    params: dict[str, Any] = {}
    for k, v in spec.items():
        key = ob.keys.get(str(k), str(k))
        if key in params:
            raise UserError(f"obfuscation '{ob.name}': parameter '{key}' given twice (as '{k}')")
        params[key] = v
    return {"name": ob.name, **params}


def resolve(spec: Any) -> tuple[Obfuscation, dict[str, Any]]:
    """Look up a spec's obfuscation and return it with its validated parameters (defaults filled in)."""
    spec = normalize(spec)
    ob = _REGISTRY[spec["name"]]
    params = {k: v for k, v in spec.items() if k != "name"}
    unknown = [k for k in params if k not in ob.params.model_fields]
    if unknown:
        near = nearest(unknown[0], list(ob.defaults) + list(ob.keys))
        hint = f" (did you mean '{near}'?)" if near else (
            f" (it takes {', '.join(ob.defaults)})" if ob.defaults else " (it takes none)")
        raise UserError(f"obfuscation '{ob.name}' has no parameter '{unknown[0]}'{hint}")
    return ob, ob.check(params)


def resolve_all(specs: Sequence[Any]) -> list[tuple[Obfuscation, dict[str, Any]]]:
    """Resolve every spec of a list (reporting the first bad one) without applying anything."""
    if isinstance(specs, (str, dict)):
        raise UserError("obfuscations must be given as a list of specs")
    return [resolve(s) for s in specs]


# ------------------------------------------------------------------------------------ the server's view
def _user_params(ob: Obfuscation, record: dict[str, Any]) -> dict[str, Any]:
    """The parameters a record gives: its ``spec`` where it has one (gradleak's records, whose other
    keys mix in what the step measured), else its keys that name a parameter."""
    source = record["spec"] if isinstance(record.get("spec"), dict) else record
    out = {}
    for k, v in source.items():
        key = ob.keys.get(str(k), str(k))
        if key in ob.params.model_fields:
            out[key] = v
    return out


def server_record(record: dict[str, Any], received: Received) -> dict[str, Any]:
    """``record`` as a server that knows the obfuscation reads it: the record with its name canonical and
    the values of the obfuscation's ``server`` model checked, those the record lacks derived from its
    parameters (defaults filled in) and the received update.

    An unknown name is a :class:`UserError`; a value that is neither given nor derivable, or a given
    one that does not check, raises :class:`Underivable` saying why.
    """
    ob = get(record["name"])
    given = dict(record)
    required = [k for k, f in ob.server.model_fields.items() if f.is_required()]
    values = {k: given[k] for k in ob.server.model_fields if given.get(k) is not None}
    if any(k not in values for k in required):
        try:
            params = ob.check(_user_params(ob, record))
        except UserError as e:
            raise Underivable(f"its record's parameters are invalid ({e})") from None
        derived = ob.derive(params, received) if ob.derive is not None else {}
        values = {**params, **derived, **values}
        lacking = [k for k in required if values.get(k) is None]
        if lacking:
            raise Underivable(f"the record lacks {', '.join(lacking)}, which its parameters do not determine")
    try:
        server = check(ob.server, values, "its record").model_dump()
    except UserError as e:
        raise Underivable(str(e)) from None
    for k, v in server.items():
        if isinstance(v, dict) and any(n not in v for n in received.update):
            raise Underivable(f"its record's {k} names no value for tensor "
                              f"'{next(n for n in received.update if n not in v)}'")
    return {**given, **server, "name": ob.name}


__all__ = ["FAMILIES", "Context", "Result", "Received", "Underivable", "Obfuscation", "register", "names",
           "canonical", "get", "parse_spec", "normalize", "resolve", "resolve_all", "server_record",
           "NAME_ALIASES", "Tensors"]
