"""Sweep specs: loading and checking the YAML that names a ``base`` experiment config and a ``grid``.

A grid entry is a dotted key of the experiment config with a list of values, a scalar, or
``{range: ...}``, ``{linspace: ...}``, ``{logspace: ...}``, ``{values: [...]}``. Checking names the key and
file of every mistake (:class:`gradleak.errors.UserError`); expansion to cells is :mod:`.grid`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, NonNegativeInt, field_validator

from .. import obfuscation
from ..errors import UserError
from ..validation import read_yaml, set_dotted, unknown_dotted, validate
from .config import PARTIAL, Count, Experiment, Section
from .outputs import _jsonable

SWEEP_FORMAT = "gradleak-sweep/1"

DISTANCES = ("mse", "ssim", "embedding")


class Reid(Section):
    enabled: bool = True
    distances: list[Literal[DISTANCES]] = list(DISTANCES)
    embedding: str = "auto"  # auto | autoencoder | none | classifier:PATH/model.pt
    gallery_size: Count = 512  # images of the attacked data set searched (the attacked ones always among them)
    seed: NonNegativeInt = 0  # gallery subset and autoencoder training
    autoencoder_steps: NonNegativeInt = 200

    @field_validator("embedding")
    @classmethod
    def _embedding(cls, v: str) -> str:
        if v not in ("auto", "autoencoder", "none") and not v.startswith("classifier:"):
            raise ValueError("must be auto, autoencoder, none or classifier:PATH")
        return v


class Utility(Section):
    enabled: bool = False
    # a `gradleak utility` config; each cell's capture.obfuscation is applied to it, and the cell's
    # architecture and protocol unless the config names its own (the report prints any difference)
    config: dict[str, Any] = {}
    seeds: Count = 3  # runs per utility config (seed and model seed + 0, 1, ...): mean and 95 % interval


class SweepSpec(Section):
    """A sweep spec. ``base`` is checked as a config that the grid completes (its checks of several fields
    wait for the cells)."""

    name: str = "sweep"
    base: Experiment = Field(default_factory=Experiment)  # an experiment config (`gradleak run`'s)
    grid: dict[str, Any] = {}  # dotted key of the experiment config -> list of values, or {range|linspace|values: ...}
    reid: Reid = Field(default_factory=Reid)
    utility: Utility = Field(default_factory=Utility)
    keep_observations: bool = False  # observation.pt can be large (the model's weights twice); off by default
    gpus_per_cell: Annotated[float, Field(ge=0)] = 1.0  # GPUs a Ray task asks for when a cell's attack.device is cuda


#: The defaults of a sweep spec.
SWEEP_SCHEMA: dict[str, Any] = SweepSpec().model_dump()


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep spec not found: {path}")
    return spec_from_dict(read_yaml(path), source=str(path), overrides=overrides)


def spec_from_dict(user: Any, source: str = "sweep", overrides: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Check a sweep spec given as a dict, with ``{"dotted.key": value}`` overrides, and expand each grid
    entry to its list of values (one-line :class:`UserError` naming ``source``)."""
    if not isinstance(user, dict):
        raise UserError(f"{source}: a sweep spec must be a mapping with 'base' and 'grid'")
    user = copy.deepcopy(user)
    fmt = user.pop("format", SWEEP_FORMAT)
    if fmt != SWEEP_FORMAT:
        raise UserError(f"{source}: format '{fmt}' is not a sweep spec this gradleak reads ({SWEEP_FORMAT})")
    for dotted, value in (overrides or {}).items():
        set_dotted(user, dotted, copy.deepcopy(value), source)
    if isinstance(user.get("base"), dict):
        user["base"].pop("output_dir", None)
    spec = validate(SweepSpec, user, source, context=PARTIAL).model_dump()
    spec["base"].pop("output_dir", None)
    for key, values in spec["grid"].items():
        hint = unknown_dotted(Experiment, str(key))
        if hint is not None:
            raise UserError(f"{source}: unknown grid key '{key}'{hint}")
        spec["grid"][key] = _values(str(key), values, source)
    return spec


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


__all__ = ["SWEEP_FORMAT", "SWEEP_SCHEMA", "SweepSpec", "load_spec", "spec_from_dict", "normalize_obfuscation"]
