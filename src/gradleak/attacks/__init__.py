"""Attacks: an Observation in, a Reconstruction out. This package never sees ground-truth images.

Every attack is the same optimisation loop (:mod:`.engine`) assembled from parts (label inference,
initialisation, decoder, objective, regularisers, optimiser and schedule, post-processing) named in its
settings. Each attack is a module with a docstring; its hyper-parameters come only from a YAML preset in
``gradleak/configs/attacks`` (which may inherit another; ``default.yaml`` is the root) and can be
overridden per run. :data:`TYPES` says what each setting may hold; a run's settings are checked against
the model :func:`settings_model` builds from the preset.

    dlg                  DLG (Zhu et al. 2019): L2, L-BFGS, soft labels optimised jointly
    idlg                 DLG with iDLG / count-based labels (Zhao et al. 2020)
    inverting_gradients  Inverting Gradients (Geiping et al. 2020), alias ig
    rog                  ROG (Yue et al. 2023): low-resolution latent, bicubic decoder, post-processing hook
    auto                 the strongest pipeline the model allows: linear-layer disaggregation + feature
                         inversion + refinement where a layer leaks the batch, else optimisation (:mod:`.auto`)
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from ..errors import UserError
from ..observation import Observation
from ..validation import load_yaml, parse_value, unknown_name, validate
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
        raise unknown_name("attack", name, names(), ALIASES)
    return name


def _from_text(value: Any) -> Any:
    """A number given as text (``"1e-3"``) read as YAML 1.2 reads it."""
    return parse_value(value) if isinstance(value, str) else value


_Count = Annotated[int, Field(ge=1), BeforeValidator(_from_text)]
_Positive = Annotated[float, Field(gt=0), BeforeValidator(_from_text)]
_Weight = Annotated[float, Field(ge=0), BeforeValidator(_from_text)]
_Optimisation = Literal[tuple(n for n in (*_ATTACKS, *ALIASES) if n != "auto")]

#: The type (and range) of every setting a preset may hold; the values live only in the presets.
TYPES: dict[str, Any] = {
    "iterations": _Count | None,
    "time_budget": _Positive | None,
    "restarts": _Count,
    **{key: Literal[allowed] for key, allowed in engine.CHOICES.items()},
    "scale_factor": _Count,
    "lr": _Positive,
    "tv_weight": _Weight,
    "lbfgs_history": _Count,
    "attacker_knows_obfuscation": bool,
    "unroll_local_steps": bool,
    "bn_prior_weight": _Weight,
    # obfuscation-aware objectives (:mod:`.aware`)
    "sign_temperature": _Positive,
    "qsgd_floor": Annotated[float, Field(gt=0, lt=1), BeforeValidator(_from_text)],
    "cell_center_weight": _Weight,
    "lowrank_denoise": bool,
    "sparse_bound_weight": _Weight,
    # auto (:mod:`.auto`)
    "invert_iterations": _Count,
    "invert_tv": _Weight,
    "invert_starts": _Count,
    "leak_share": Annotated[float, Field(gt=0, le=1), BeforeValidator(_from_text)],
    "fallback_single": _Optimisation,
    "fallback_batch": _Optimisation,
    "split_clients": bool,
    "client_steps": Literal["records", "mean"],
}


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    @model_validator(mode="after")
    def _some_budget(self) -> "_Settings":
        if getattr(self, "iterations", 1) is None and getattr(self, "time_budget", None) is None:
            raise ValueError("give iterations, a time budget, or both")
        return self


def _read_preset(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name in seen:
        raise UserError(f"attack preset inheritance loops through '{name}'")
    path = resources.files("gradleak") / "configs" / "attacks" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no attack preset '{name}'")
    data = load_yaml(path.read_text()) or {}
    parent = data.pop("inherit", None)
    base = _read_preset(parent, seen + (name,)) if parent else {}
    return {**base, **data}


@functools.lru_cache(maxsize=None)
def settings_model(name: str) -> type[BaseModel]:
    """The pydantic model of attack ``name``'s settings: the keys of its preset chain, typed by
    :data:`TYPES`, with the preset's values as defaults."""
    values = _read_preset(canonical(name))
    untyped = sorted(set(values) - set(TYPES))
    if untyped:
        raise TypeError(f"attack preset '{name}' has settings of no known type: {', '.join(untyped)}")
    return create_model(f"{canonical(name)}_settings", __base__=_Settings,
                        **{k: (TYPES[k], v) for k, v in values.items()})


def preset(name: str) -> dict[str, Any]:
    """The resolved settings of attack ``name``: its preset chain (``default.yaml`` at the root)."""
    return resolve_settings(name)


def resolve_settings(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset plus ``overrides``, checked: an unknown key names the nearest valid one; a value of the
    wrong type or out of range names the setting and the value (one-line :class:`UserError`)."""
    name = canonical(name)
    checked = validate(settings_model(name), dict(overrides or {}),
                       unknown=f"attack '{name}' has no setting '{{where}}'",
                       invalid=f"attack '{name}': {{where}} {{problem}}")
    return checked.model_dump()


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
            own = settings_model(n).model_fields
            return resolve_settings(n, {k: v for k, v in user.items() if k in own and k not in auto.OWN})

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


__all__ = ["Reconstruction", "PostProcess", "names", "canonical", "preset", "resolve_settings", "settings_model",
           "TYPES", "run_attack",
           "apply_postprocessing", "ALIASES"]
