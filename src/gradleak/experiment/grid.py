"""The cells of a sweep: its grid expanded (Cartesian product, in the order the keys are written) to full
experiment configs, each with a stable id, and the checks that fail a sweep before any cell runs."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from .. import obfuscation
from ..errors import UserError
from ..validation import set_dotted
from . import config as config_mod
from .outputs import _jsonable

#: The most cells one sweep may hold (counted before the grid is expanded).
MAX_CELLS = 100_000


@dataclass
class Cell:
    id: str
    index: int
    params: dict[str, Any]  # the grid values of this cell, by dotted key
    config: dict[str, Any]  # the full experiment config

    @property
    def device(self) -> str:
        return str(self.config["attack"]["device"])


def digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha1(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()[:n]


def count_cells(spec: dict[str, Any]) -> int:
    """The number of cells of ``spec``'s grid, without expanding it."""
    return math.prod(len(values) for values in spec["grid"].values())


def expand(spec: dict[str, Any], source: str = "sweep") -> list[Cell]:
    """The cells of ``spec``'s grid (Cartesian product in the order the keys are written)."""
    import itertools

    n = count_cells(spec)
    if n > MAX_CELLS:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in spec["grid"].items())
        raise UserError(f"{source}: the grid holds {n:,} cells ({sizes}); a sweep may hold at most {MAX_CELLS:,}")
    grid = spec["grid"]
    keys = list(grid)
    cells = []
    for index, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        cfg = copy.deepcopy(spec["base"])
        params = dict(zip(keys, combo))
        for k, v in params.items():
            set_dotted(cfg, k, copy.deepcopy(v), source)
        cfg["name"] = spec["name"]
        cfg = config_mod.from_dict(cfg, source=f"{source} (cell {index})")
        cfg.pop("output_dir", None)
        cells.append(Cell(id=f"{index:04d}-{digest(cfg, 8)}", index=index, params=params, config=cfg))
    return cells


def check_cells(cells: list[Cell]) -> None:
    """Fail early, before any work, on names a cell would only trip over later."""
    from ..attacks import canonical, resolve_settings

    seen: set[str] = set()
    for c in cells:
        att = c.config["attack"]
        key = json.dumps([att["name"], att["settings"]], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            try:
                resolve_settings(canonical(att["name"]), att["settings"])
            except UserError as e:
                raise UserError(f"cell {c.index} ({params_text(c.params)}): {e}") from None
        for spec in c.config["capture"]["obfuscation"]:
            try:
                obfuscation.resolve(spec)
            except UserError as e:
                raise UserError(f"cell {c.index} ({params_text(c.params)}): {e}") from None


def check_data(cells: list[Cell]) -> None:
    """Fail before any work when a cell's data set cannot be opened (a path that does not exist, an
    option its source does not take)."""
    from ..data import load_dataset

    seen: set[str] = set()
    for c in cells:
        key = json.dumps(_jsonable(c.config["data"]), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            load_dataset(c.config["data"])
        except UserError as e:
            raise UserError(f"cell {c.index} ({params_text(c.params)}): data: {e}") from None


def params_text(params: dict[str, Any]) -> str:
    """A cell's grid values as one line, ``key=value, ...`` (``base`` for a grid without keys)."""
    return ", ".join(f"{k}={json.dumps(_jsonable(v))}" for k, v in params.items()) or "base"


__all__ = ["MAX_CELLS", "Cell", "digest", "count_cells", "expand", "check_cells", "check_data", "params_text"]
