"""Attacks: an Observation in, a Reconstruction out. This package never sees ground-truth images.

Every attack is the same optimisation loop (:mod:`.engine`) assembled from parts (label inference,
initialisation, decoder, objective, regularisers, optimiser and schedule, post-processing) named in its
settings. Each attack is a module with ``DEFAULTS`` and a docstring; its hyper-parameters come from a
YAML preset in ``gradleak/configs/attacks`` (which may inherit another) and can be overridden per run.

    dlg                  DLG (Zhu et al. 2019): L2, L-BFGS, soft labels optimised jointly
    idlg                 DLG with iDLG / count-based labels (Zhao et al. 2020)
    inverting_gradients  Inverting Gradients (Geiping et al. 2020), alias ig
    rog                  ROG (Yue et al. 2023): low-resolution latent, bicubic decoder, post-processing hook
    auto                 the strongest pipeline the model allows: linear-layer disaggregation + feature
                         inversion + refinement where a layer leaks the batch, else optimisation (:mod:`.auto`)
"""

from __future__ import annotations

import difflib
from importlib import resources
from typing import Any, Callable

import torch
import yaml

from ..errors import UserError
from ..observation import Observation
from . import auto, dlg, engine, inverting, rog
from .base import Reconstruction

_ATTACKS = {"auto": auto, "inverting_gradients": inverting, "dlg": dlg, "idlg": dlg, "rog": rog}
ALIASES = {"ig": "inverting_gradients"}

#: A post-processing step: (images B x C x H x W in [0, 1], labels) -> images of the same shape.
PostProcess = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    for key, allowed in engine.CHOICES.items():
        if key in settings and settings[key] not in allowed:
            raise UserError(f"attack '{canonical(name)}': {key} must be one of {', '.join(allowed)}, "
                            f"got {settings[key]!r}")
    if int(settings.get("scale_factor", 1)) < 1:
        raise UserError(f"scale_factor must be >= 1, got {settings['scale_factor']}")
    for key in ("tv_weight", "bn_prior_weight"):
        if float(settings.get(key, 0.0)) < 0:
            raise UserError(f"{key} must be >= 0, got {settings[key]}")
    if "leak_share" in settings and not 0 < float(settings["leak_share"]) <= 1:
        raise UserError(f"leak_share must be in (0, 1], got {settings['leak_share']}")
    if "invert_iterations" in settings and int(settings["invert_iterations"]) < 1:
        raise UserError(f"invert_iterations must be >= 1, got {settings['invert_iterations']}")
    for key in ("fallback_single", "fallback_batch"):
        if key in settings and canonical(str(settings[key])) == "auto":
            raise UserError(f"{key} must name an optimisation attack, not auto")
    if not float(settings.get("lr", 1.0)) > 0:
        raise UserError(f"lr must be > 0, got {settings['lr']}")
    return settings


def run_attack(name: str, obs: Observation, overrides: dict[str, Any] | None = None, *, seed: int = 0,
               device: str = "cpu", progress: bool = True, postprocess: PostProcess | None = None
               ) -> Reconstruction:
    """Run attack ``name`` on ``obs``. The same seed gives the same reconstruction on CPU.

    ``postprocess`` (e.g. ROG's learned network) maps the images in [0, 1] and labels to improved
    images; the result is then ``rec.images`` and the attack's own output is kept in
    ``rec.extras["without_postprocessing"]``.
    """
    name = canonical(name)
    settings = resolve_settings(name, overrides)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but this torch build has no CUDA device")
    generator = torch.Generator().manual_seed(int(seed))
    if name == "auto":
        user = dict(overrides or {})

        def fallback_settings(n: str) -> dict[str, Any]:
            """The fallback's preset with the user's overrides that apply to it (its own iteration count
            unless the user gave one)."""
            return resolve_settings(n, {k: v for k, v in user.items() if k in preset(n) and k not in auto.OWN})

        rec = auto.run(obs, settings, device=device, generator=generator, progress=progress,
                       fallback_settings=fallback_settings)
    else:
        rec = engine.run(obs, settings, attack=name, device=device, generator=generator, progress=progress)
    rec.settings = {**rec.settings, "seed": int(seed), "device": device}
    if postprocess is not None:
        apply_postprocessing(rec, postprocess)
    return rec


def apply_postprocessing(rec: Reconstruction, postprocess: PostProcess) -> Reconstruction:
    """Replace ``rec.images`` by ``postprocess(rec.images, rec.labels)``, keeping the original in
    ``rec.extras["without_postprocessing"]``."""
    raw = rec.images
    with torch.no_grad():
        out = postprocess(raw.clone(), rec.labels.clone())
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(raw.shape):
        raise ValueError(f"post-processing must return images of shape {tuple(raw.shape)}, got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    rec.images = out.detach().float().cpu().clamp(0, 1)
    rec.extras["without_postprocessing"] = raw
    rec.threat_model["postprocessing"] = getattr(postprocess, "name", getattr(postprocess, "__name__",
                                                                              type(postprocess).__name__))
    return rec


__all__ = ["Reconstruction", "PostProcess", "names", "canonical", "preset", "resolve_settings", "run_attack",
           "apply_postprocessing", "ALIASES"]
