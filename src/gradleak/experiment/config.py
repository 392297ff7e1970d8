"""Experiment configs: YAML files checked by pydantic models.

:class:`Experiment` is the config of ``gradleak run`` (and of each cell of a sweep). An unknown key is an
error that names the key and the nearest valid one; a value of the wrong type or out of range is an
error that names its dotted location, the file and what was expected (:func:`gradleak.validation.validate`).
Types are exact: ``2`` is not ``true`` and ``"2"`` is not ``2``. A section left empty in the file
(``capture:`` with nothing under it) takes its defaults.

Some parts are checked by the part of gradleak that owns them: ``data`` by the data loader (after the
defaults of :data:`DATA_DEFAULTS` are filled in), ``capture.obfuscation`` by :mod:`gradleak.obfuscation`,
``capture.options`` by the model and ``attack.settings`` by the attack's preset
(:func:`gradleak.attacks.resolve_settings`).

Values typed as ``key=value`` (``--set``, sweep overrides) are read by :func:`parse_assignment` (YAML 1.2
scalars: ``1e-3`` is a number, ``yes`` is text) and set by :func:`set_dotted`; both live in
:mod:`gradleak.validation` so that the layers below the experiment (obfuscation specs) read values the
same way.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeInt,
                      ValidationInfo, field_validator, model_validator)

from ..errors import UserError
from ..federated.protocol import ALGORITHMS
from ..validation import dump_yaml, parse_assignment, read_yaml, set_dotted, validate

#: What ``data`` holds unless the config says otherwise.
DATA_DEFAULTS: dict[str, Any] = {"source": "phantoms", "size": 64}


class Section(BaseModel):
    """A part of a config: unknown keys are errors, types are exact, the defaults are checked too, and a
    section given as null (nothing under its key) is its defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_defaults(cls, data: Any) -> Any:
        return {} if data is None else data


def _with_data_defaults(value: Any) -> Any:
    if value is None:
        return dict(DATA_DEFAULTS)
    return {**DATA_DEFAULTS, **value} if isinstance(value, dict) else value


#: A data spec as a mapping (``source`` and the loader's options) over :data:`DATA_DEFAULTS`.
DataSpec = Annotated[dict[str, Any], BeforeValidator(_with_data_defaults)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
Count = Annotated[int, Field(ge=1)]
Stds = list[Annotated[float, Field(gt=0)]]  # per-channel standard deviations of a model's normalisation


#: Validation context of a config that is a base for others (a sweep's ``base``, completed by each cell
#: of the grid): checks that involve several fields wait for the complete config.
PARTIAL = {"partial": True}


def fedavg_lr(v: float, info: ValidationInfo) -> float:
    """A protocol's ``local_lr`` must be positive under FedAvg (``algorithm`` is checked before it)."""
    if (info.context or {}).get("partial"):
        return v
    if info.data.get("algorithm") == "fedavg" and not v > 0:
        raise ValueError("must be > 0 for fedavg")
    return v


class CaptureProtocol(Section):
    """The federated protocol of the attacked client (:class:`gradleak.federated.protocol.Protocol`)."""

    algorithm: Literal[ALGORITHMS] = "fedsgd"
    local_steps: Count = 1
    local_lr: Annotated[float, Field(ge=0)] = 0.0
    local_batch_size: Count | None = None
    sends_buffers: bool = False
    per_example_clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    num_clients_averaged: Count = 1

    _local_lr = field_validator("local_lr")(fedavg_lr)


class Capture(Section):
    arch: str = "lenet5"
    num_classes: Count = 2
    model_seed: int = 0
    options: dict[str, Any] | None = None  # arch-specific model options (e.g. {width: 8} for convnet)
    model_state: str | None = None  # a model.pt (e.g. from `gradleak utility`): attack a trained model
    batch_size: Count = 4
    indices: list[NonNegativeInt] | None = None  # explicit data set indices; else batch_size drawn with `seed`
    labels_known: bool = False
    mean: list[float] = [0.5]
    std: Stds = [0.5]
    protocol: CaptureProtocol = Field(default_factory=CaptureProtocol)
    # applied in order by each client: dicts {name: qsgd, levels: 16} (ROG's {compress: qsgd,
    # quant_level: 16} too) or strings "qsgd:levels=16"; see docs/obfuscations.md
    obfuscation: list[Any] = []


class Attack(Section):
    name: str = "auto"
    device: Annotated[str, Field(pattern=r"^(cpu|mps|cuda(:\d+)?)$")] = "cpu"  # checked on the machine that runs it
    prior: str | None = None  # a prior file ('gradleak prior train'): post-process, report with and without it
    settings: dict[str, Any] = {}  # overrides of the attack preset (iterations, restarts, time_budget, ...)


class Experiment(Section):
    """The config of one experiment (``gradleak run``)."""

    name: str = "experiment"
    seed: NonNegativeInt = 0  # seeds the batch choice, the obfuscation noise and the attack's initialisation
    output_dir: str = "experiments"
    data: DataSpec = Field(default_factory=dict)
    capture: Capture = Field(default_factory=Capture)
    attack: Attack = Field(default_factory=Attack)


def merge_with_overrides(user: Any, model: type[Section], source: str = "config",
                         overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``user`` with each ``{"dotted.key": value}`` of ``overrides`` set (:func:`set_dotted`), checked by
    ``model``, as a plain dict with every default filled in."""
    cfg = copy.deepcopy(user) if user is not None else {}
    if isinstance(cfg, dict):
        for dotted, value in (overrides or {}).items():
            set_dotted(cfg, dotted, copy.deepcopy(value), source)
    return validate(model, cfg, source).model_dump()


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, merge with defaults and check an experiment YAML file."""
    return from_dict(read_yaml(path), source=str(path), overrides=overrides)


def from_dict(user: dict[str, Any], source: str = "config", overrides: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Check an experiment config given as a dict (one-line :class:`UserError` naming ``source``)."""
    cfg = merge_with_overrides(user, Experiment, source, overrides)
    if cfg["capture"]["model_state"] and not _gives_size(user, overrides):
        cfg["data"]["size"] = _model_size(cfg["capture"]["model_state"], source)
    from .. import obfuscation
    try:
        obfuscation.resolve_all(cfg["capture"]["obfuscation"])
    except UserError as e:
        raise UserError(f"{source}: capture.obfuscation: {e}") from None
    return cfg


def _gives_size(user: Any, overrides: dict[str, Any] | None) -> bool:
    data = user.get("data") if isinstance(user, dict) else None
    return (isinstance(data, dict) and "size" in data) or any(
        k == "data.size" or (k == "data" and isinstance(v, dict) and "size" in v) for k, v in (overrides or {}).items())


def _model_size(path: str, source: str) -> int:
    """The image size a model file was trained at: a config that attacks it reads its data at that size
    unless ``data.size`` says otherwise (as ``gradleak capture --model-state`` does)."""
    from ..models.checkpoint import load_model

    try:
        return int(load_model(path)["model"]["image_size"])
    except UserError as e:
        raise UserError(f"{source}: capture.model_state: {e}") from None


def dump(cfg: dict[str, Any]) -> str:
    """``cfg`` as YAML that reads back the same (strings that look like numbers or booleans are quoted)."""
    return dump_yaml(cfg)


__all__ = ["DATA_DEFAULTS", "PARTIAL", "Section", "DataSpec", "Fraction", "Count", "Stds", "fedavg_lr",
           "Experiment", "Capture", "CaptureProtocol", "Attack", "merge_with_overrides", "load", "from_dict", "dump",
           "read_yaml", "parse_assignment", "set_dotted"]
