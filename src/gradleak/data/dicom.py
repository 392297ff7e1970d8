"""DICOM radiographs: every ``.dcm`` file under a folder (recursive), read with pydicom.

Pixel values go through the modality transform (RescaleSlope / RescaleIntercept), then the first VOI
window (WindowCenter / WindowWidth, the linear function of DICOM PS3.3 C.11.2.1.2) when the file has one,
else a min-max stretch; MONOCHROME1 images (bright = low value) are inverted so that bone is always bright.
Multi-frame files give their first frame; colour files become grey with the ITU-R 601-2 weights.

Labels come from ``ROOT/labels.csv`` (columns ``filename,label``; filename relative to ROOT or a bare
file name; labels are integers or class names), else from the first folder under ROOT as in
:mod:`gradleak.data.folder`. Patient id = the PatientID tag (the file stem when the tag is empty), kept
only as a keyed pseudonym, as are the file names (:mod:`gradleak.data.pseudonym`); no other tag (names,
accession numbers, descriptions) is read.
pydicom is imported only here; without it the loader says to install ``gradleak[dicom]``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gradleak.data._image import (GREY_WEIGHTS, RESAMPLE_NAME, check_bool, check_dir, check_pixels, check_size,
                                  class_layout, integer_labels, lookup, read_csv_map, to_square)
from gradleak.data.base import ImageDataset
from gradleak.data.folder import list_files
from gradleak.errors import UserError

LABELS_CSV = "labels.csv"


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise UserError("dicom: reading DICOM files needs pydicom; install gradleak[dicom] "
                        "(pip install 'gradleak[dicom]')") from None
    return pydicom


def _first(value, default=None):
    """First value of a possibly multi-valued DICOM element, as float."""
    if value is None or value == "":
        return default
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = value[0] if len(value) else default
        return default if value is None else float(value)
    except (TypeError, ValueError):
        return default


def dicom_to_unit(ds) -> np.ndarray:
    """Pixel data of a pydicom data set as float H x W in [0, 1], bright = dense."""
    a = np.asarray(ds.pixel_array)
    frames = int(_first(ds.get("NumberOfFrames", 1), 1))
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        a = a[0]
    if spp == 3 and a.ndim == 3:
        a = a @ GREY_WEIGHTS
    a = a.astype(np.float64)
    slope = _first(ds.get("RescaleSlope"), 1.0)
    intercept = _first(ds.get("RescaleIntercept"), 0.0)
    a = a * slope + intercept
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        if width == 1:
            v = (a >= center - 0.5).astype(np.float64)
        else:
            v = np.clip((a - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    else:
        lo, hi = float(a.min()), float(a.max())
        v = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() == "MONOCHROME1":
        v = 1.0 - v
    return v


def _labels_from_csv(table_path: Path, rels: list[str], paths: list[Path]) -> tuple[list[str], list[int]]:
    """Classes and labels from ``labels.csv``: whole numbers, or class names (sorted -> 0, 1, ...)."""
    table = read_csv_map(table_path, "filename", "label", "dicom")
    raw = []
    for r, p in zip(rels, paths):
        v = lookup(table, r, p.name)
        if v is None or v == "":
            raise UserError(f"dicom: {r} has no row in {table_path}")
        raw.append(v)
    if all(v.lstrip("-").isdigit() for v in raw):
        labels = integer_labels(np.array([float(v) for v in raw]), f"dicom: {table_path}")
        return [str(i) for i in range(int(labels.max()) + 1)], labels.tolist()
    classes = sorted(set(raw))
    return classes, [classes.index(v) for v in raw]


def _plain(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(text).lower())


def _check_classes_name_nobody(root: Path, classes: list[str], identities: list[str]) -> None:
    """Refuse class folders named after a patient (an export with one folder per patient): the class names
    are written to every output, and would carry the patient's id or name."""
    known = {_plain(t) for t in identities} - {""}
    for k, c in enumerate(classes):
        if _plain(c) in known:
            raise UserError(f"dicom: class folder {k + 1} of {len(classes)} in {root} is named after a patient "
                            f"(one folder per patient?); give the labels in {LABELS_CSV} instead")


class DicomDataset(ImageDataset):
    """A folder of DICOM radiographs, decoded lazily."""

    source = "dicom"

    def __init__(self, path, size: int = 64, crop: bool = False):
        size = check_size("dicom", size)
        crop = check_bool("dicom", "crop", crop)
        root = check_dir("dicom", path)
        _pydicom()
        super().__init__(size=size)
        self.path, self.crop = str(path), crop
        self.paths = list_files(root, {".dcm"})
        if not self.paths:
            raise UserError(f"dicom: no .dcm files in {path}")
        rels = [p.relative_to(root).as_posix() for p in self.paths]
        if (root / LABELS_CSV).is_file():
            self.classes, labels = _labels_from_csv(root / LABELS_CSV, rels, self.paths)
            self.labels_from = LABELS_CSV
        else:
            self.classes, labels = class_layout(root, self.paths, "dicom")
            self.labels_from = "folders"
        self.labels = np.asarray(labels, dtype=np.int64)
        heads = [self._read(p, header_only=True) for p in self.paths]
        ids = [str(h.get("PatientID", "") or "").strip() for h in heads]
        if self.labels_from == "folders":
            _check_classes_name_nobody(root, self.classes, ids + [str(h.get("PatientName", "") or "") for h in heads])
        self.patient_id_fallbacks = sum(not i for i in ids)
        self.set_identities([i or p.stem for i, p in zip(ids, self.paths)], rels)

    def _read(self, p: Path, header_only: bool = False):
        try:
            return _pydicom().dcmread(p, stop_before_pixels=header_only)
        except Exception as e:  # pydicom raises several types for a broken file
            raise UserError(f"dicom: cannot read {p}: {e}") from None

    def _load_one(self, index: int) -> np.ndarray:
        p = self.paths[index]
        head = self._read(p, header_only=True)  # the size is checked before the pixels are read
        check_pixels(f"dicom: {p}", _first(head.get("Columns"), 0), _first(head.get("Rows"), 0),
                     _first(head.get("NumberOfFrames", 1), 1))
        ds = self._read(p)
        try:
            a = dicom_to_unit(ds)
        except Exception as e:  # missing pixel data, or a compression without its decoder
            raise UserError(f"dicom: cannot decode the pixels of {p}: {e}") from None
        return to_square(a, self.size, self.crop)

    def describe(self) -> dict:
        d = super().describe()
        d.update({
            "path": self.path, "split": None, "crop": self.crop, "resample": RESAMPLE_NAME,
            "counts": {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)},
            "labels_from": self.labels_from,
            "num_patients": len(set(self.patient_ids)),
            "patient_ids": "pseudonymised PatientID tag (keyed hash)",
            "patient_id_fallbacks": self.patient_id_fallbacks,
        })
        return d
