"""Attacks: an Observation in, a Reconstruction out. This package never sees ground-truth images.

Each attack is a module with ``DEFAULTS`` and ``run(obs, settings, device=, generator=, progress=)``;
its hyper-parameters come from a YAML preset in ``gradleak/configs/attacks`` (which may inherit another)
and can be overridden per run.
"""

from __future__ import annotations

import difflib
from importlib import resources
from typing import Any

import torch
import yaml

from ..errors import UserError
from ..observation import Observation
from . import inverting
from .base import Reconstruction

_ATTACKS = {"inverting_gradients": inverting}
ALIASES = {"ig": "inverting_gradients"}


def names() -> list[str]:
    return sorted(_ATTACKS)


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in _ATTACKS:
        near = difflib.get_close_matches(name, names() + list(ALIASES), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(names())})"
        raise UserError(f"unknown attack '{name}'{hint}")
    return name


def _read_preset(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name in seen:
        raise UserError(f"attack preset inheritance loops through '{name}'")
    path = resources.files("gradleak") / "configs" / "attacks" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no attack preset '{name}'")
    data = yaml.safe_load(path.read_text()) or {}
    parent = data.pop("inherit", None)
    base = _read_preset(parent, seen + (name,)) if parent else {}
    return {**base, **data}


def preset(name: str) -> dict[str, Any]:
    """The resolved settings of attack ``name``: module defaults, then its preset chain."""
    name = canonical(name)
    return {**_ATTACKS[name].DEFAULTS, **_read_preset(name)}


def resolve_settings(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset plus ``overrides``; an unknown key is a :class:`UserError` naming the nearest valid one."""
    settings = preset(name)
    for k, v in (overrides or {}).items():
        if k not in settings:
            near = difflib.get_close_matches(k, list(settings), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise UserError(f"attack '{canonical(name)}' has no setting '{k}'{hint}")
        settings[k] = v
    if settings.get("iterations") is None and settings.get("time_budget") is None:
        raise UserError("give iterations, a time budget, or both")
    if settings.get("iterations") is not None and int(settings["iterations"]) < 1:
        raise UserError(f"iterations must be >= 1, got {settings['iterations']}")
    if settings.get("time_budget") is not None and not float(settings["time_budget"]) > 0:
        raise UserError(f"time_budget must be > 0 seconds, got {settings['time_budget']}")
    if int(settings.get("restarts", 1)) < 1:
        raise UserError(f"restarts must be >= 1, got {settings['restarts']}")
    return settings


def run_attack(name: str, obs: Observation, overrides: dict[str, Any] | None = None, *, seed: int = 0,
               device: str = "cpu", progress: bool = True) -> Reconstruction:
    """Run attack ``name`` on ``obs``. The same seed gives the same reconstruction on CPU."""
    name = canonical(name)
    settings = resolve_settings(name, overrides)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but this torch build has no CUDA device")
    generator = torch.Generator().manual_seed(int(seed))
    rec = _ATTACKS[name].run(obs, settings, device=device, generator=generator, progress=progress)
    rec.settings = {**rec.settings, "seed": int(seed), "device": device}
    return rec


__all__ = ["Reconstruction", "names", "canonical", "preset", "resolve_settings", "run_attack", "ALIASES"]
