"""Client-side obfuscations of an update: each a pure function of (update, parameters, generator).

An obfuscation is registered with :func:`register` and applied by name through :func:`apply`, which also
returns the record that goes into the Observation's ``obfuscation`` list (the name, the resolved
parameters, and anything derived such as the noise multiplier) and the update's cost in bits.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import UserError

Tensors = dict[str, torch.Tensor]

#: Bits per entry of an unobfuscated float32 update.
FLOAT_BITS = 32


@dataclass
class Result:
    update: Tensors
    bits: int  # communication cost of the update after this obfuscation
    record: dict[str, Any]  # appended to the Observation's ``obfuscation`` list


@dataclass
class Obfuscation:
    name: str
    fn: Callable[[Tensors, dict[str, Any], torch.Generator], Result]
    defaults: dict[str, Any] = field(default_factory=dict)
    validate: Callable[[dict[str, Any]], None] | None = None
    doc: str = ""


_REGISTRY: dict[str, Obfuscation] = {}


def register(ob: Obfuscation) -> Obfuscation:
    _REGISTRY[ob.name] = ob
    return ob


def names() -> list[str]:
    return sorted(_REGISTRY)


def dense_bits(update: Tensors) -> int:
    return FLOAT_BITS * sum(int(v.numel()) for v in update.values())


def resolve(spec: dict[str, Any]) -> tuple[Obfuscation, dict[str, Any]]:
    """Look up ``spec['name']`` and return it with its parameters merged over the defaults and checked."""
    if "name" not in spec:
        raise UserError(f"obfuscation {spec!r} has no 'name'")
    name = str(spec["name"])
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(names())})"
        raise UserError(f"unknown obfuscation '{name}'{hint}")
    ob = _REGISTRY[name]
    params = {k: v for k, v in spec.items() if k != "name"}
    unknown = [k for k in params if k not in ob.defaults]
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(ob.defaults), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"obfuscation '{name}' has no parameter '{unknown[0]}'{hint}")
    merged = {**ob.defaults, **params}
    if ob.validate:
        ob.validate(merged)
    return ob, merged


def apply(specs: list[dict[str, Any]], update: Tensors, generator: torch.Generator | None = None
          ) -> tuple[Tensors, list[dict[str, Any]], int]:
    """Apply ``specs`` in order. Returns (obfuscated update, records, bits of the final update)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    records: list[dict[str, Any]] = []
    bits = dense_bits(update)
    for spec in specs:
        ob, params = resolve(spec)
        res = ob.fn(update, params, generator)
        update, bits = res.update, res.bits
        records.append(res.record)
    return update, records, bits


def _identity(update: Tensors, params: dict[str, Any], generator: torch.Generator) -> Result:
    return Result(dict(update), dense_bits(update), {"name": "none"})


register(Obfuscation("none", _identity, doc="no obfuscation"))

__all__ = ["Obfuscation", "Result", "register", "resolve", "apply", "names", "dense_bits"]
