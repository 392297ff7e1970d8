"""Typed parameters of obfuscations (pydantic models) and the one-line errors they raise.

Each obfuscation declares its parameters as a :class:`Params` model (unknown keys forbidden, each field
constrained) and the values a knowing server reads from its record as a :class:`ServerValues` model.
:func:`check` validates a mapping against either and turns the first problem into one line, e.g.
``obfuscation 'qsgd': levels must be an integer >= 2, got 1``: the wording ("an integer >= 2", "a
number in (0, 1]", "one of max, l2", "true or false") is read off the field's type and constraints.
A check that involves several fields raises ``ValueError`` with its own sentence.

The field types are strict where YAML and JSON are loose: a boolean is not a number, a string is not a
number, a number is finite, and an integer may be written as an integral float (``16.0``).
"""

from __future__ import annotations

import math
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..errors import UserError


def _integer(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or int(v) != v:
        raise ValueError("not an integer")
    return int(v)


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError("not a finite number")
    return float(v)


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("not true or false")
    return v


def _lower(v: Any) -> Any:
    return v.lower() if isinstance(v, str) else v


Int = Annotated[int, BeforeValidator(_integer)]
Number = Annotated[float, BeforeValidator(_number)]
Flag = Annotated[bool, BeforeValidator(_flag)]
#: A non-negative number, or one per tensor of the update (``{parameter name: number}``).
NonNegative = Annotated[float, BeforeValidator(_number), Field(ge=0)]
PerTensor = Union[NonNegative, dict[str, NonNegative]]


def choice(*options: str) -> Any:
    """A string among ``options``, compared without case."""
    return Annotated[Literal[options], BeforeValidator(_lower)]


#: Per tensor (each tensor on its own) or over the whole update.
Scope = choice("tensor", "global")


class Params(BaseModel):
    """The parameters of one obfuscation. :meth:`values` is what its function receives and what its
    record lists (a subclass may resolve one parameter from another there, e.g. ``sparsity`` to ``keep``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def values(self) -> dict[str, Any]:
        return self.model_dump()


class NoParams(Params):
    """An obfuscation without parameters."""


class ServerValues(BaseModel):
    """What a knowing server reads from one record: fields without a default must be in the record or
    derivable from the parameters; other keys of the record are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


# --------------------------------------------------------------------------------------------- wording
def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """The type under ``Annotated`` and ``Optional`` wrappers, with the metadata met on the way."""
    meta: list[Any] = []
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            args = get_args(tp)
            tp, meta = args[0], meta + list(args[1:])
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp, meta
            tp = rest[0]
        else:
            return tp, meta


def _bounds(meta: list[Any]) -> str:
    lo = hi = None
    lo_open = hi_open = False
    for m in meta:
        for c in (m.metadata if hasattr(m, "metadata") and isinstance(m.metadata, list) else [m]):
            if isinstance(c, (at.Ge, at.Gt)):
                lo, lo_open = (c.ge, False) if isinstance(c, at.Ge) else (c.gt, True)
            elif isinstance(c, (at.Le, at.Lt)):
                hi, hi_open = (c.le, False) if isinstance(c, at.Le) else (c.lt, True)
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi:g}"
    return ""


def describe(annotation: Any, metadata: list[Any] | None = None) -> str:
    """What a value of a field must be, in words: ``an integer >= 2``, ``a number in (0, 1]``, ..."""
    tp, meta = _strip(annotation)
    meta = list(metadata or []) + meta
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + _bounds(meta)
    if tp is float:
        return "a number" + _bounds(meta)
    if get_origin(tp) in (Union, types.UnionType):  # a number, or one number per tensor
        number = next((a for a in get_args(tp) if _strip(a)[0] is float), None)
        if number is not None:
            return describe(number) + ", or such a number per tensor"
    return getattr(tp, "__name__", str(tp))


def check(model: type[BaseModel], data: dict[str, Any], where: str) -> BaseModel:
    """``model`` validated from ``data``; the first problem is a one-line :class:`UserError` starting
    with ``where`` (e.g. ``obfuscation 'qsgd'``)."""
    try:
        return model(**data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [p for p in err["loc"] if isinstance(p, str)]
        if not loc or loc[0] not in model.model_fields:  # a check across fields: its own sentence
            cause = (err.get("ctx") or {}).get("error")
            text = str(cause) if cause is not None else err["msg"]
            raise UserError(f"{where}: {text}") from None
        key = loc[0]
        field = model.model_fields[key]
        if err["type"] == "missing":
            raise UserError(f"{where}: {key} is required ({describe(field.annotation, field.metadata)})") from None
        raise UserError(f"{where}: {key} must be {describe(field.annotation, field.metadata)}, "
                        f"got {err['input']!r}") from None


__all__ = ["Params", "NoParams", "ServerValues", "Int", "Number", "Flag", "NonNegative", "PerTensor", "Scope", "choice",
           "describe", "check"]
