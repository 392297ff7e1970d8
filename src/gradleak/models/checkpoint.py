"""Model files (``model.pt``): a trained global model that can be the victim of an attack.

The file is a dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``::

    {"format": "gradleak-model/1",
     "model": {"arch": "convnet", "num_classes": 2, "in_channels": 1, "image_size": 64,
               "options": {...}},            # optional, arch-specific
     "data": {"mean": [0.5], "std": [0.5]},  # the normalisation the model applies to [0, 1] images
     "state_dict": {name: tensor},           # model.state_dict(): weights and buffers
     "round": 12,                            # federated round it was taken after (optional)
     "meta": {...}}                          # optional provenance (plain values)

Only ``model`` and ``state_dict`` are required, so a file written by other code loads as long as it
holds those two.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import atomic_path

FORMAT = "gradleak-model/1"
HEADER_KEYS = ("arch", "num_classes", "in_channels", "image_size")


def _shape(s) -> str:
    return "x".join(str(int(d)) for d in s) or "scalar"


def save_model(path: str | os.PathLike, header: dict[str, Any], state_dict: dict[str, torch.Tensor], *,
               mean=(0.5,), std=(0.5,), round: int | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Write a model file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {k: (str(header[k]) if k == "arch" else int(header[k])) for k in HEADER_KEYS}
    if header.get("options"):
        head["options"] = dict(header["options"])
    obj = {"format": FORMAT, "model": head, "data": {"mean": [float(m) for m in mean],
                                                      "std": [float(s) for s in std]},
           "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()}}
    if round is not None:
        obj["round"] = int(round)
    if meta:
        obj["meta"] = meta
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def load_model(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a model file: the header must build a registered architecture and the state dict
    must hold exactly that architecture's names and shapes. Any problem is one :class:`UserError` line."""
    from . import build

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable model file ({type(e).__name__})") from None
    if not isinstance(raw, dict) or "model" not in raw or "state_dict" not in raw:
        raise UserError(f"{path}: a model file needs 'model' and 'state_dict' keys")
    if raw.get("format", FORMAT) != FORMAT:
        raise UserError(f"{path}: format is {raw.get('format')!r}, expected '{FORMAT}'")
    head, state = raw["model"], raw["state_dict"]
    if not isinstance(head, dict) or not isinstance(state, dict):
        raise UserError(f"{path}: 'model' and 'state_dict' must be mappings")
    missing = [k for k in HEADER_KEYS if k not in head]
    if missing:
        raise UserError(f"{path}: model header lacks '{missing[0]}'")
    data = raw.get("data") or {}
    try:
        ref = build(head["arch"], int(head["num_classes"]), int(head["in_channels"]), int(head["image_size"]),
                    options=head.get("options") or None).state_dict()
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:
        raise UserError(f"{path}: cannot build model {head.get('arch')!r} from its header ({e})") from None
    lacking = [k for k in ref if k not in state]
    if lacking:
        raise UserError(f"{path}: state_dict lacks '{lacking[0]}' required by {head['arch']}")
    extra = [k for k in state if k not in ref]
    if extra:
        raise UserError(f"{path}: state_dict has '{extra[0]}', which {head['arch']} does not have")
    for k, v in ref.items():
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape):
            got = _shape(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
            raise UserError(f"{path}: state_dict['{k}'] has shape {got}, {head['arch']} expects {_shape(v.shape)}")
    return {"model": dict(head), "state_dict": {k: state[k] for k in ref},
            "data": {"mean": list(data.get("mean", [0.5])), "std": list(data.get("std", [0.5]))},
            "round": raw.get("round"), "meta": raw.get("meta") or {}, "path": str(path)}


def check_matches(ckpt: dict[str, Any], *, where: str, arch: str | None = None, image_size: int | None = None,
                  in_channels: int | None = None, num_classes: int | None = None,
                  options: dict[str, Any] | None = None) -> None:
    """One-line error when the model file does not fit what the caller is about to run."""
    head = ckpt["model"]
    for key, want in (("arch", arch), ("image_size", image_size), ("in_channels", in_channels),
                      ("num_classes", num_classes)):
        if want is not None and head[key] != want:
            raise UserError(f"{ckpt['path']} holds a model with {key} {head[key]!r}, but {where} has {key} {want!r}")
    if options and dict(options) != dict(head.get("options") or {}):
        raise UserError(f"{ckpt['path']} holds a model with options {head.get('options') or {}}, "
                        f"but {where} has options {dict(options)}")


__all__ = ["FORMAT", "check_matches", "load_model", "save_model"]
