"""Experiment configs: YAML files checked against a schema of defaults.

An unknown key is an error that names the key and the nearest valid one; a value of the wrong type is
an error that names the key and the expected type. Sections marked :data:`OPEN` are passed to the
part of gradleak that owns them (the data loader, the attack's preset), which checks them itself.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError


class _Open(dict):
    """Marks a section whose keys are checked by its owner, not by this schema."""


OPEN = _Open

SCHEMA: dict[str, Any] = {
    "name": "experiment",
    "seed": 0,  # seeds the batch choice, the obfuscation noise and the attack's initialisation
    "output_dir": "experiments",
    "data": OPEN({"source": "phantoms", "size": 64}),
    "capture": {
        "arch": "lenet5",
        "num_classes": 2,
        "model_seed": 0,
        "options": None,  # arch-specific model options (e.g. {width: 8} for convnet)
        "model_state": None,  # a model.pt (e.g. from `gradleak utility`): attack a trained model
        "batch_size": 4,
        "indices": None,  # explicit data set indices; otherwise batch_size images drawn with `seed`
        "labels_known": False,
        "mean": [0.5],
        "std": [0.5],
        "protocol": {"algorithm": "fedsgd", "local_steps": 1, "local_lr": 0.0, "local_batch_size": None,
                     "sends_buffers": False, "per_example_clip": None, "num_clients_averaged": 1},
        # applied in order by each client: dicts {name: qsgd, levels: 16} (ROG's {compress: qsgd,
        # quant_level: 16} too) or strings "qsgd:levels=16"; see docs/obfuscations.md
        "obfuscation": [],
    },
    "attack": {
        "name": "auto",
        "device": "cpu",
        "prior": None,  # a prior file ('gradleak prior train'): post-process, report with and without it
        "settings": OPEN({}),  # overrides of the attack preset (iterations, restarts, time_budget, ...)
    },
}


def _type_name(v: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


def _check_type(value: Any, default: Any, where: str, source: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(f"{source}: '{where}' must be {_type_name(default)}, got {value!r}")
    return value


def merge(user: Any, schema: dict[str, Any], source: str = "config", prefix: str = "") -> dict[str, Any]:
    """``schema``'s defaults overlaid with ``user``'s values, checking names and types."""
    if user is None:
        user = {}
    if not isinstance(user, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    out: dict[str, Any] = {}
    for key, value in user.items():
        if key not in schema:
            near = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise UserError(f"{source}: unknown key '{prefix}{key}'{hint}")
    for key, default in schema.items():
        where = f"{prefix}{key}"
        if isinstance(default, _Open):
            value = user.get(key)
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{source}: '{where}' must be a mapping")
            out[key] = {**copy.deepcopy(dict(default)), **(value or {})}
        elif isinstance(default, dict):
            out[key] = merge(user.get(key), default, source, where + ".")
        else:
            out[key] = _check_type(copy.deepcopy(user.get(key, default)), default, where, source)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (one-line errors for a missing file or bad YAML)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{at}") from None
    if not isinstance(user, dict):
        raise UserError(f"{path}: the top level must be a mapping")
    return user


def merge_with_overrides(user: dict[str, Any], schema: dict[str, Any], source: str = "config",
                         overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`merge`, then set each ``{"dotted.key": value}`` override and check the result again."""
    cfg = merge(user, schema, source)
    for dotted, value in (overrides or {}).items():
        node = cfg
        parts = dotted.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise UserError(f"{source}: cannot set '{dotted}': '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return merge(cfg, schema, source)


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, merge with defaults and check an experiment YAML file."""
    return from_dict(read_yaml(path), source=str(path), overrides=overrides)


def from_dict(user: dict[str, Any], source: str = "config", overrides: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    cfg = merge_with_overrides(user, SCHEMA, source, overrides)
    if cfg["capture"]["batch_size"] < 1:
        raise UserError(f"{source}: 'capture.batch_size' must be >= 1")
    if not isinstance(cfg["capture"]["obfuscation"], list):
        raise UserError(f"{source}: 'capture.obfuscation' must be a list")
    if cfg["capture"]["protocol"]["num_clients_averaged"] < 1:
        raise UserError(f"{source}: 'capture.protocol.num_clients_averaged' must be >= 1")
    from .. import obfuscation
    try:
        obfuscation.resolve_all(cfg["capture"]["obfuscation"])
    except UserError as e:
        raise UserError(f"{source}: capture.obfuscation: {e}") from None
    return cfg


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
