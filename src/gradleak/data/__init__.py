"""Data sources of the victim side: real chest X-rays and the synthetic phantoms.

    load_dataset("phantoms")                                   # the built-in default
    load_dataset("phantoms:n=200,seed=3", size=32)             # keyword overrides win unless None
    load_dataset("kaggle:../shared/data/chest_xray,split=val,crop=true")
    load_dataset({"source": "medmnist", "path": "pneumoniamnist.npz", "split": "test"})

Spec strings: ``SOURCE[:PATH][,key=value...]``. Values that look like integers, floats or booleans
(true/false/yes/no/on/off) become those; ``path`` and ``split`` stay text. For phantoms, which take no
path, ``phantoms:k=v,...`` is read as options. Sources: phantoms; kaggle (alias chest_xray); medmnist
(alias npz); folder; dicom.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Sequence

import numpy as np

from gradleak.data.base import Batch, ImageDataset
from gradleak.data.chest_xray import ChestXrayDataset, parse_patient_id
from gradleak.data.dicom import DicomDataset
from gradleak.data.folder import FolderDataset
from gradleak.data.medmnist import MedMNISTDataset, download_medmnist
from gradleak.data.phantoms import PhantomDataset, render_phantom
from gradleak.errors import UserError

__all__ = [
    "Batch", "ImageDataset", "ChestXrayDataset", "DicomDataset", "FolderDataset", "MedMNISTDataset",
    "PhantomDataset", "SOURCES", "download_medmnist", "load_dataset", "parse_patient_id", "parse_spec",
    "render_phantom", "split_by_patient",
]

# source -> (class, its options). "path" is an option of every source that reads files.
SOURCES: dict[str, tuple[type, tuple[str, ...]]] = {
    "phantoms": (PhantomDataset, ("n", "seed", "size", "images_per_patient", "pneumonia_fraction")),
    "kaggle": (ChestXrayDataset, ("path", "split", "size", "crop")),
    "medmnist": (MedMNISTDataset, ("path", "split", "size")),
    "folder": (FolderDataset, ("path", "size", "crop")),
    "dicom": (DicomDataset, ("path", "size", "crop")),
}
ALIASES = {"chest_xray": "kaggle", "npz": "medmnist"}
_TEXT_KEYS = {"path", "split", "source"}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _value(key: str, text: str) -> Any:
    t = text.strip()
    if key in _TEXT_KEYS:
        return t
    if t.lower() in _BOOLS:
        return _BOOLS[t.lower()]
    if t.lower() in ("none", "null"):
        return None
    if _INT.match(t):
        return int(t)
    if _FLOAT.match(t):
        return float(t)
    return t


def parse_spec(spec: str) -> dict:
    """``"kaggle:../data/chest_xray,split=val,size=32"`` -> ``{"source": "kaggle", "path": ..., ...}``."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"data spec must be a non-empty text like 'phantoms' or 'kaggle:PATH,split=train', "
                        f"got {spec!r}")
    head, *rest = spec.strip().split(",")
    source, sep, path = head.partition(":")
    source = source.strip().lower()
    if not source:
        raise UserError(f"data spec '{spec}' has no source before ':' (e.g. phantoms, kaggle, medmnist)")
    out: dict[str, Any] = {"source": source}
    if sep and path.strip():
        if _KEY.match(path.strip()) and not path.strip().lower().startswith("path="):
            rest = [path] + rest  # "phantoms:n=200": options, not a path
        else:
            out["path"] = path.strip().removeprefix("path=")
    for item in rest:
        if not item.strip():
            continue
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"data spec '{spec}': expected key=value, got '{item.strip()}'")
        if key in out:
            raise UserError(f"data spec '{spec}': option '{key}' given twice")
        out[key] = _value(key, val)
    return out


def _canonical(source: str) -> str:
    s = str(source).strip().lower()
    s = ALIASES.get(s, s)
    if s not in SOURCES:
        names = sorted(SOURCES) + sorted(ALIASES)
        near = difflib.get_close_matches(s, names, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else f" (known: {', '.join(sorted(SOURCES))})"
        raise UserError(f"unknown data source '{source}'{hint}")
    return s


def load_dataset(spec: str | dict, **overrides) -> ImageDataset:
    """Build a data set from a spec string or dict; ``overrides`` that are not None win over the spec."""
    if isinstance(spec, str):
        opts = parse_spec(spec)
    elif isinstance(spec, dict):
        opts = dict(spec)
    else:
        raise UserError(f"data spec must be a text or a mapping, got {type(spec).__name__}")
    opts.update({k: v for k, v in overrides.items() if v is not None})
    if "source" not in opts or opts["source"] in (None, ""):
        raise UserError(f"data spec {spec!r} names no source (e.g. phantoms, kaggle, medmnist, folder, dicom)")
    source = _canonical(opts.pop("source"))
    cls, valid = SOURCES[source]
    for key in opts:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1)
            if key == "path" and source == "phantoms":
                raise UserError(f"data source 'phantoms' takes no path, got path '{opts[key]}'")
            hint = f"; did you mean '{near[0]}'?" if near else f" (valid: {', '.join(valid)})"
            raise UserError(f"unknown option '{key}' for data source '{source}'{hint}")
    if "path" in valid and opts.get("path") in (None, ""):
        raise UserError(f"data source '{source}' needs a path, e.g. {source}:/path/to/data")
    return cls(**opts)


def split_by_patient(dataset, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split a data set's indices in two so that no patient is on both sides.

    Patients are shuffled with ``seed`` and taken in that order into the first part while it stays within
    ``round(fraction * len(dataset))`` images; the rest form the second part. Both lists are sorted."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise UserError(f"split fraction must be a number in [0, 1], got {fraction!r}")
    ids: Sequence[str] = dataset.patient_ids
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(ids):
        groups.setdefault(p, []).append(i)
    order = list(groups)
    perm = np.random.default_rng(seed).permutation(len(order))
    target = round(fraction * len(ids))
    a: list[int] = []
    b: list[int] = []
    for j in perm:
        members = groups[order[j]]
        (a if len(a) + len(members) <= target else b).extend(members)
    return sorted(a), sorted(b)
