"""The Observation file: everything an honest-but-curious server receives from one client, and nothing else.

This is the seam between the victim side and the attacker side. ``gradleak capture`` writes one; any
tool may write one (e.g. from a real deployment), and ``gradleak attack`` reads it. The format is
documented in ``docs/observation-format.md``. Files are written with :func:`torch.save` and read with
``torch.load(weights_only=True)``, so loading never runs code from the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .files import atomic_path
from .federated.protocol import ALGORITHMS, Protocol
from .models import build_from_header, parameter_names

FORMAT = "gradleak-observation/1"
REQUIRED_KEYS = ("format", "model", "global_state", "update", "protocol", "labels", "obfuscation", "data")
MODEL_KEYS = ("arch", "num_classes", "in_channels", "image_size")
PROTOCOL_KEYS = ("algorithm", "update_is", "num_images", "local_steps", "local_lr", "local_batch_size")


@dataclass
class Observation:
    """An in-memory Observation. ``labels`` is None unless the threat model grants them."""

    model: dict[str, Any]
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    protocol: dict[str, Any]
    labels: torch.Tensor | None = None
    obfuscation: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=lambda: {"value_range": [0, 1], "mean": [0.5], "std": [0.5]})
    buffers: dict[str, torch.Tensor] | None = None  # BN running statistics after training, if sent
    meta: dict[str, Any] = field(default_factory=dict)  # free-form provenance (not used by attacks)

    @property
    def num_images(self) -> int:
        return int(self.protocol["num_images"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = int(self.model["image_size"])
        return (int(self.model["in_channels"]), s, s)

    def protocol_obj(self) -> Protocol:
        return Protocol.from_header(self.protocol)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": FORMAT,
            "model": dict(self.model),
            "global_state": {k: v.detach().cpu().contiguous() for k, v in self.global_state.items()},
            "update": {k: v.detach().cpu().contiguous() for k, v in self.update.items()},
            "protocol": dict(self.protocol),
            "labels": None if self.labels is None else self.labels.detach().cpu().to(torch.int64),
            "obfuscation": [dict(o) for o in self.obfuscation],
            "data": dict(self.data),
        }
        if self.buffers is not None:
            d["buffers"] = {k: v.detach().cpu().contiguous() for k, v in self.buffers.items()}
        if self.meta:
            d["meta"] = dict(self.meta)
        return d


def save(obs: Observation, path: str | os.PathLike) -> Path:
    """Validate and write ``obs`` atomically (a temporary file renamed into place)."""
    validate(obs.to_dict(), where=str(path))
    with atomic_path(path) as tmp:
        torch.save(obs.to_dict(), tmp)
    return Path(path)


def load(path: str | os.PathLike) -> Observation:
    """Read and validate an Observation file; any problem is a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"observation file not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign or corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable observation file ({first[:160]})") from None
    validate(raw, where=str(path))
    return Observation(model=raw["model"], global_state=raw["global_state"], update=raw["update"],
                       protocol=raw["protocol"], labels=raw["labels"], obfuscation=list(raw["obfuscation"]),
                       data=raw["data"], buffers=raw.get("buffers"), meta=raw.get("meta") or {})


def _fmt_shape(s) -> str:
    return "(" + ", ".join(str(int(d)) for d in s) + ")"


def validate(raw: Any, where: str = "observation") -> None:
    """Check an Observation dict against the format and its own model header.

    Raises :class:`UserError` naming the file and the offending key.
    """
    def bad(msg: str) -> UserError:
        return UserError(f"{where}: {msg}")

    if not isinstance(raw, dict):
        raise bad(f"expected a dict at the top level, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise bad(f"format tag is {raw.get('format')!r}, expected {FORMAT!r}")
    for k in REQUIRED_KEYS:
        if k not in raw:
            raise bad(f"missing key '{k}'")
    model = raw["model"]
    if not isinstance(model, dict):
        raise bad("'model' must be a dict")
    for k in MODEL_KEYS:
        if k not in model:
            raise bad(f"missing key 'model.{k}'")
    proto = raw["protocol"]
    if not isinstance(proto, dict):
        raise bad("'protocol' must be a dict")
    for k in PROTOCOL_KEYS:
        if k not in proto:
            raise bad(f"missing key 'protocol.{k}'")
    if proto["algorithm"] not in ALGORITHMS:
        raise bad(f"protocol.algorithm is {proto['algorithm']!r}, expected one of {', '.join(ALGORITHMS)}")
    expected_is = "gradient" if proto["algorithm"] == "fedsgd" else "weight_delta"
    if proto["update_is"] != expected_is:
        raise bad(f"protocol.update_is is {proto['update_is']!r} but {proto['algorithm']} sends a {expected_is}")
    n = proto["num_images"]
    if not isinstance(n, int) or n < 1:
        raise bad(f"protocol.num_images must be a positive integer, got {n!r}")
    k = proto.get("num_clients_averaged", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or n % k:
        raise bad(f"protocol.num_clients_averaged must be a positive integer dividing num_images ({n}), got {k!r}")
    ipc = proto.get("images_per_client")
    if ipc is not None and (isinstance(ipc, bool) or not isinstance(ipc, int) or ipc * k != n):
        raise bad(f"protocol.images_per_client is {ipc!r} but num_images / num_clients_averaged is {n // k}")
    pec = proto.get("per_example_clip")
    if pec is not None and (isinstance(pec, bool) or not isinstance(pec, (int, float)) or not 0 < pec < math.inf):
        raise bad(f"protocol.per_example_clip must be null or a positive number, got {pec!r}")
    data = raw["data"]
    if not isinstance(data, dict):
        raise bad("'data' must be a dict")
    try:
        template = build_from_header(model, data)
    except UserError as e:
        raise bad(str(e)) from None
    except Exception as e:
        raise bad(f"cannot build model {model.get('arch')!r} from its header ({e})") from None
    reference = template.state_dict()
    for section in ("global_state", "update"):
        if not isinstance(raw[section], dict):
            raise bad(f"'{section}' must be a dict of tensors")
    gs = raw["global_state"]
    missing = [k for k in reference if k not in gs]
    extra = [k for k in gs if k not in reference]
    if missing:
        raise bad(f"global_state lacks '{missing[0]}' required by {model['arch']}"
                  + (f" ({len(missing)} names missing)" if len(missing) > 1 else ""))
    if extra:
        raise bad(f"global_state has '{extra[0]}', which {model['arch']} does not have")
    for k, ref in reference.items():
        v = gs[k]
        if not isinstance(v, torch.Tensor):
            raise bad(f"global_state['{k}'] is not a tensor")
        if tuple(v.shape) != tuple(ref.shape):
            raise bad(f"global_state['{k}'] has shape {_fmt_shape(v.shape)}, {model['arch']} expects {_fmt_shape(ref.shape)}")
    pnames = parameter_names(template)
    upd = raw["update"]
    if list(upd) != pnames:
        missing = [k for k in pnames if k not in upd]
        extra = [k for k in upd if k not in pnames]
        if missing:
            raise bad(f"update lacks parameter '{missing[0]}' of {model['arch']}")
        if extra:
            raise bad(f"update has '{extra[0]}', which is not a parameter of {model['arch']}")
        raise bad(f"update keys are not in {model['arch']}'s parameter order")
    for k in pnames:
        v = upd[k]
        if not isinstance(v, torch.Tensor):
            raise bad(f"update['{k}'] is not a tensor")
        if tuple(v.shape) != tuple(reference[k].shape):
            raise bad(f"update['{k}'] has shape {_fmt_shape(v.shape)}, {model['arch']} expects {_fmt_shape(reference[k].shape)}")
        if not v.is_floating_point():
            raise bad(f"update['{k}'] has dtype {v.dtype}, expected a floating-point tensor")
        if not torch.isfinite(v).all():
            raise bad(f"update['{k}'] contains NaN or Inf")
    labels = raw["labels"]
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dim() != 1:
            raise bad("labels must be None or a 1-D integer tensor")
        if labels.numel() != n:
            raise bad(f"labels has {labels.numel()} entries but protocol.num_images is {n}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= int(model["num_classes"])):
            raise bad(f"labels must lie in [0, {int(model['num_classes']) - 1}]")
    if not isinstance(raw["obfuscation"], list) or not all(isinstance(o, dict) and "name" in o
                                                           for o in raw["obfuscation"]):
        raise bad("'obfuscation' must be a list of dicts, each with a 'name'")
    for k in ("mean", "std"):
        if k in data and (not isinstance(data[k], (list, tuple)) or len(data[k]) not in (1, int(model["in_channels"]))):
            raise bad(f"data.{k} must be a list of 1 or in_channels numbers")
    if "std" in data and any((not isinstance(s, (int, float))) or not s > 0 or not math.isfinite(s) for s in data["std"]):
        raise bad("data.std must be positive")
    buffers = raw.get("buffers")
    if buffers is not None:
        if not isinstance(buffers, dict):
            raise bad("'buffers' must be a dict of tensors")
        for k, v in buffers.items():
            if k not in reference or k in pnames:
                raise bad(f"buffers has '{k}', which is not a buffer of {model['arch']}")
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(reference[k].shape):
                raise bad(f"buffers['{k}'] has the wrong shape or type")
