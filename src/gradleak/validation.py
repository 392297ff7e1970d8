"""Reading what a user writes: YAML 1.2 scalars, ``key=value`` assignments, dotted overrides, and one-line
messages for the checks of a pydantic model.

Every place that reads a value a user typed (``--set KEY=VALUE``, sweep overrides, ``NAME:k=v``
obfuscation specs, config files) reads it with the YAML 1.2 core schema, not PyYAML's YAML 1.1:

- integers: ``-2``, ``010`` (ten: no implicit octal), ``0o17`` (octal), ``0x10`` (hexadecimal);
- numbers: ``1e-3``, ``1E3``, ``.5``, ``-2.5e+3``, ``.inf``, ``-.inf``, ``.nan``;
- ``true`` / ``false`` (also ``True``, ``TRUE``, ...), and ``null`` / ``~`` / nothing for null;
- everything else is text: ``yes``, ``no``, ``on``, ``off``, ``inf``, ``1_000``, ``2024-01-01``.

Flow collections work as in any YAML (``[1, 2]``, ``{name: qsgd, levels: 16}``), with the same scalars.

:func:`validate` checks data against a pydantic model and turns its first problem into a
:class:`~gradleak.errors.UserError` of one line that names the dotted location of the bad value (and the
file it came from), the expected type or range, the value given, and for an unknown key or a choice
the nearest valid name ("did you mean ...").
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from types import UnionType
from typing import Any, Iterable, Sequence, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .errors import UserError

M = TypeVar("M", bound=BaseModel)

# ---------------------------------------------------------------------------------------- YAML 1.2
_CORE = {  # tag: (pattern, first characters); the YAML 1.2 core schema
    "null": (r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    "bool": (r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    "int": (r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    "float": (r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", list("-+.0123456789")),
}
_TAG = "tag:yaml.org,2002:"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema's implicit types (and ``<<`` merge keys)."""


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] == _TAG + "merge"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _name, (_pattern, _first) in _CORE.items():
    _Loader.add_implicit_resolver(_TAG + _name, re.compile(_pattern), _first)


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = str(loader.construct_scalar(node))
    low = text.lower()
    if low.lstrip("+-") == ".inf":
        return -math.inf if low.startswith("-") else math.inf
    if low == ".nan":
        return math.nan
    return float(text)


_Loader.add_constructor(_TAG + "int", _construct_int)
_Loader.add_constructor(_TAG + "float", _construct_float)


class _Dumper(yaml.SafeDumper):
    """Quotes every string that a YAML 1.1 or a YAML 1.2 reader would take for another type, so a dumped
    file reads back the same under both."""


for _name, (_pattern, _first) in _CORE.items():
    _Dumper.add_implicit_resolver(_TAG + _name, re.compile(_pattern), _first)


def load_yaml(text: str) -> Any:
    """The YAML document ``text`` with YAML 1.2 core-schema scalars (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_Loader)


def dump_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (one-line errors for a missing file, bad YAML or another top level)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        user = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (a YAML config is UTF-8 text)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{at}") from None
    if user is None:
        raise UserError(f"{path}: the file is empty (write the settings to change, or {{}} for all defaults)")
    if not isinstance(user, dict):
        raise UserError(f"{path}: the top level must be a mapping")
    return user


# ----------------------------------------------------------------------------- key=value, dotted keys
def parse_value(text: str) -> Any:
    """A value as typed on a command line: YAML 1.2 (a scalar, or a flow list/mapping); text that is not
    valid YAML stays text, and nothing at all is null."""
    if not text.strip():
        return None
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"a.b=1e-3"`` -> ``("a.b", 0.001)``: the key stripped, the value read by :func:`parse_value`."""
    key, eq, value = str(text).partition("=")
    if not eq or not key.strip():
        raise UserError(f"expected KEY=VALUE, got '{text}'")
    return key.strip(), parse_value(value)


def set_dotted(cfg: dict[str, Any], dotted: str, value: Any, source: str = "config") -> None:
    """Set ``cfg["a"]["b"]["c"] = value`` for ``dotted`` "a.b.c", creating missing (or null) sections."""
    node = cfg
    parts = dotted.split(".")
    if not all(parts):
        raise UserError(f"{source}: cannot set '{dotted}': empty part in the dotted key")
    for i, p in enumerate(parts[:-1]):
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise UserError(f"{source}: cannot set '{dotted}': '{'.'.join(parts[:i + 1])}' is not a section")
        node = node[p]
    node[parts[-1]] = value


def nearest(word: Any, options: Iterable[Any]) -> str | None:
    """The option closest to ``word`` (difflib), or None when none is close."""
    near = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return near[0] if near else None


def unknown_name(kind: str, name: Any, known: Sequence[str], aliases: Iterable[str] = ()) -> UserError:
    """The one-line error for a name no registry holds: "unknown KIND 'NAME' (did you mean ...?)", or the
    known names when none is close."""
    near = nearest(name, [*known, *aliases])
    hint = f" (did you mean '{near}'?)" if near else f" (known: {', '.join(known)})"
    return UserError(f"unknown {kind} '{name}'{hint}")


# ------------------------------------------------------------------------------------------ models
def section(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The model of ``model``'s field ``key`` when it is a section (a nested model), else None."""
    field = model.model_fields.get(key) if model is not None else None
    if field is None:
        return None
    ann = field.annotation
    for t in (get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _is_open(model: type[BaseModel], key: str) -> bool:
    """Whether ``model``'s field ``key`` is a mapping its owner checks (keys under it are not the model's).
    A mapping that may be null is set as a whole."""
    ann = model.model_fields[key].annotation
    return ann is dict or get_origin(ann) is dict


def unknown_dotted(model: type[BaseModel], dotted: str) -> str | None:
    """None when the dotted key names a field of ``model`` (or lies under a mapping it leaves open);
    else the hint for the unknown key: " (did you mean 'a.b'?)", or "" when nothing is close."""
    node, walked = model, []
    for i, part in enumerate(parts := dotted.split(".")):
        if part not in node.model_fields:
            near = nearest(part, node.model_fields)
            return f" (did you mean '{'.'.join([*walked, near])}'?)" if near else ""
        walked.append(part)
        sub = section(node, part)
        if sub is None:
            return None if i == len(parts) - 1 or _is_open(node, part) else ""
        node = sub
    return None


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPES = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
          "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
          "bool_type": "true/false", "bool_parsing": "true/false", "string_type": "a string",
          "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
          "model_attributes_type": "a mapping", "dataclass_type": "a mapping"}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _problem(err: dict[str, Any]) -> str:
    """What is wrong with a value, as "must be ..." (without the value)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        choices = re.findall(r"'((?:[^'\\]|\\.)*)'", str(ctx.get("expected", "")))
        return "must be one of " + ", ".join(choices)
    if kind in _BOUNDS:
        key, sign = _BOUNDS[kind]
        bound = ctx.get(key)
        return f"must be {sign} {int(bound) if isinstance(bound, float) and bound.is_integer() else bound}"
    if kind in _TYPES:
        return f"must be {_TYPES[kind]}"
    return err["msg"][0].lower() + err["msg"][1:]


def explain(exc: ValidationError, model: type[BaseModel], *, unknown: str = "unknown key '{where}'",
            invalid: str = "'{where}' {problem}") -> str:
    """One line for the first problem of ``exc`` (an unknown key first: a misspelt name explains the rest).

    ``unknown`` and ``invalid`` are templates with ``{where}`` (the dotted location) and ``{problem}``;
    the value given and a "did you mean" hint are appended.
    """
    errors = exc.errors(include_url=False)
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(err["loc"])
    where = _where(loc)
    if err["type"] == "extra_forbidden":
        parent: type[BaseModel] | None = model
        for part in loc[:-1]:
            parent = section(parent, part) if isinstance(part, str) else None
        near = nearest(loc[-1], parent.model_fields) if parent is not None else None
        prefix = _where(loc[:-1]) + "." if len(loc) > 1 else ""
        return unknown.format(where=where) + (f" (did you mean '{prefix}{near}'?)" if near else "")
    problem = _problem(err)
    if not loc and err["type"] == "value_error":  # a check of the whole model composes its own sentence
        return problem
    text = invalid.format(where=where or "top level", problem=problem)
    if err["type"] != "missing" and not isinstance(err.get("input"), dict):
        text += f", got {_shown(err.get('input'))}"
    if err["type"] == "literal_error" and isinstance(err.get("input"), str):
        near = nearest(err["input"], re.findall(r"'((?:[^'\\]|\\.)*)'", str(err["ctx"]["expected"])))
        text += f" (did you mean '{near}'?)" if near else ""
    return text


def validate(model: type[M], data: Any, source: str | None = None, context: dict[str, Any] | None = None,
             **templates: str) -> M:
    """``model`` checked against ``data``; a :class:`UserError` of one line (prefixed by ``source``, the
    file or the thing checked) on the first problem. ``context`` reaches the model's validators;
    ``templates``: see :func:`explain`."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        line = explain(e, model, **templates)
        raise UserError(f"{source}: {line}" if source else line) from None


__all__ = ["load_yaml", "dump_yaml", "read_yaml", "parse_value", "parse_assignment", "set_dotted", "nearest", "unknown_name",
           "section", "unknown_dotted", "explain", "validate"]
