"""Sweep specs: loading and checking the YAML that names a ``base`` experiment config and a ``grid``.

A grid entry is a dotted key of the experiment config with a list of values, a scalar, or
``{range: ...}``, ``{linspace: ...}``, ``{logspace: ...}``, ``{values: [...]}``. Checking names the key and
file of every mistake (:class:`gradleak.errors.UserError`); expansion to cells is :mod:`.grid`.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .. import obfuscation
from ..errors import UserError
from . import config as config_mod
from .config import OPEN, SCHEMA
from .outputs import _jsonable

SWEEP_FORMAT = "gradleak-sweep/1"

SWEEP_SCHEMA: dict[str, Any] = {
    "name": "sweep",
    "base": OPEN({}),  # an experiment config (the schema of `gradleak run`)
    "grid": OPEN({}),  # dotted key of the experiment config -> list of values, or {range|linspace|values: ...}
    "reid": {
        "enabled": True,
        "distances": ["mse", "ssim", "embedding"],
        "embedding": "auto",  # auto | autoencoder | none | classifier:PATH/model.pt
        "gallery_size": 512,  # images of the attacked data set searched (the attacked images always among them)
        "seed": 0,  # gallery subset and autoencoder training
        "autoencoder_steps": 200,
    },
    "utility": {
        "enabled": False,
        # a `gradleak utility` config; each cell's capture.obfuscation is applied to it, and the cell's
        # architecture and protocol unless the config names its own (the report prints any difference)
        "config": OPEN({}),
        "seeds": 3,  # runs per utility config (seed and model seed + 0, 1, ...): mean and 95 % interval
    },
    "keep_observations": False,  # observation.pt can be large (the model's weights twice); off by default
    "gpus_per_cell": 1.0,  # GPUs a Ray task asks for when the cell's attack.device is cuda
}


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep spec not found: {path}")
    return spec_from_dict(config_mod.read_yaml(path), source=str(path), overrides=overrides)


def spec_from_dict(user: Any, source: str = "sweep", overrides: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    if not isinstance(user, dict):
        raise UserError(f"{source}: a sweep spec must be a mapping with 'base' and 'grid'")
    user = copy.deepcopy(user)
    fmt = user.pop("format", SWEEP_FORMAT)
    if fmt != SWEEP_FORMAT:
        raise UserError(f"{source}: format '{fmt}' is not a sweep spec this gradleak reads ({SWEEP_FORMAT})")
    for dotted, value in (overrides or {}).items():
        node = user
        parts = dotted.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    spec = config_mod.merge(user, SWEEP_SCHEMA, source)
    base = copy.deepcopy(spec["base"])
    base.pop("output_dir", None)
    spec["base"] = config_mod.merge(base, SCHEMA, source, "base.")
    spec["base"].pop("output_dir", None)
    for key, values in spec["grid"].items():
        _check_grid_key(str(key), source)
        spec["grid"][key] = _values(str(key), values, source)
    r = spec["reid"]
    for d in r["distances"]:
        if d not in ("mse", "ssim", "embedding"):
            near = difflib.get_close_matches(str(d), ["mse", "ssim", "embedding"], n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else " (use mse, ssim, embedding)"
            raise UserError(f"{source}: unknown re-identification distance '{d}'{hint}")
    emb = str(r["embedding"])
    if emb not in ("auto", "autoencoder", "none") and not emb.startswith("classifier:"):
        raise UserError(f"{source}: 'reid.embedding' must be auto, autoencoder, none or classifier:PATH, got '{emb}'")
    if r["gallery_size"] < 1:
        raise UserError(f"{source}: 'reid.gallery_size' must be >= 1")
    if spec["utility"]["seeds"] < 1:
        raise UserError(f"{source}: 'utility.seeds' must be >= 1")
    if not spec["gpus_per_cell"] >= 0:
        raise UserError(f"{source}: 'gpus_per_cell' must be >= 0")
    return spec


def _check_grid_key(key: str, source: str) -> None:
    node: Any = SCHEMA
    walked = []
    for part in key.split("."):
        if isinstance(node, OPEN):
            return  # inside a section its owner checks (data options, attack settings)
        if not isinstance(node, dict) or part not in node:
            options = list(node) if isinstance(node, dict) else []
            prefix = ".".join(walked)
            near = difflib.get_close_matches(part, options, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{near[0]}'?)" if near else ""
            raise UserError(f"{source}: unknown grid key '{key}'{hint}")
        walked.append(part)
        node = node[part]


def _values(key: str, v: Any, source: str) -> list[Any]:
    """A grid entry as a list of values: a list, a scalar, or {range: [a, b(, step)]},
    {linspace: [a, b, n]}, {logspace: [a, b, n]} (powers of 10), {values: [...]}."""
    if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("range", "linspace", "logspace", "values"):
        kind, args = next(iter(v.items()))
        if kind == "values":
            out = list(args) if isinstance(args, list) else [args]
        else:
            if not isinstance(args, list) or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                     for a in args):
                raise UserError(f"{source}: grid '{key}': {kind} takes a list of numbers, got {args!r}")
            _check_count(key, kind, args, source)
            if kind == "range":
                if all(isinstance(a, int) for a in args):
                    out = list(range(*args))
                else:
                    start, stop, step = ([0.0, *args, 1.0] if len(args) == 1 else [*args, 1.0])[:3]
                    out = [float(x) for x in np.arange(start, stop, step)]
            else:
                if len(args) != 3 or int(args[2]) != args[2] or args[2] < 1:
                    raise UserError(f"{source}: grid '{key}': {kind} takes [start, stop, count], got {args!r}")
                xs = np.linspace(args[0], args[1], int(args[2]))
                out = [float(x) for x in (10.0 ** xs if kind == "logspace" else xs)]
    elif isinstance(v, list):
        out = list(v)
    else:
        out = [v]
    if not out:
        raise UserError(f"{source}: grid '{key}' has no values")
    if key == "capture.obfuscation":
        out = [normalize_obfuscation(x, f"{source}: grid '{key}'") for x in out]
    keys = [json.dumps(_jsonable(x), sort_keys=True) for x in out]
    dup = next((x for x in keys if keys.count(x) > 1), None)
    if dup is not None:
        raise UserError(f"{source}: grid '{key}' lists the value {dup} twice")
    return out


#: The most values one grid entry may expand to (a sweep of more cells is a mistake, not a plan).
MAX_VALUES = 100_000


def _check_count(key: str, kind: str, args: list[Any], source: str) -> None:
    """Refuse a range/linspace/logspace of more than :data:`MAX_VALUES` values, counted without building it."""
    if kind == "range":
        if len(args) not in (1, 2, 3):
            raise UserError(f"{source}: grid '{key}': range takes [stop], [start, stop] or "
                            f"[start, stop, step], got {args!r}")
        start, stop, step = ([0, *args, 1] if len(args) == 1 else [*args, 1])[:3]
        if step == 0:
            raise UserError(f"{source}: grid '{key}': range step must not be 0")
        span = (stop - start) / step
        n = math.ceil(span) if math.isfinite(span) else math.inf
    else:
        n = args[2] if len(args) == 3 else 0
    if not n <= MAX_VALUES:
        raise UserError(f"{source}: grid '{key}': {kind} {args!r} would give {n:.4g} values; "
                        f"a grid entry may hold at most {MAX_VALUES}")


def normalize_obfuscation(value: Any, where: str = "obfuscation") -> list[dict[str, Any]]:
    """A grid value of ``capture.obfuscation`` as a list of specs: ``none`` / ``[]`` -> ``[]``; a text
    ``NAME:key=value,...`` or a mapping -> one spec; a list of those -> composed in order."""
    if value is None or value == "none" or value == []:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for it in items:
        if isinstance(it, str):
            if it == "none":
                continue
            try:
                out.append(obfuscation.parse_spec(it))
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        elif isinstance(it, dict):
            if "name" not in it and "compress" not in it:  # ROG's form names it under 'compress'
                raise UserError(f"{where}: obfuscation {it!r} has no 'name'")
            out.append(dict(it))
        else:
            raise UserError(f"{where}: an obfuscation is a name like 'qsgd:levels=16' or a mapping, got {it!r}")
    return out


__all__ = ["SWEEP_FORMAT", "SWEEP_SCHEMA", "load_spec", "spec_from_dict", "normalize_obfuscation"]
