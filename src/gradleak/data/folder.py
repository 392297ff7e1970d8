"""A generic image folder: ``ROOT/<class>/.../*.png`` (one sub-folder per class).

Classes are the sub-folder names sorted alphabetically (label = position); images are found recursively
inside each class folder and ordered by their path. When every image lies directly in ``ROOT`` the
folder is one unlabelled class. Patient id = the file stem, unless ``ROOT/patients.csv`` (columns
``filename,patient_id``; filename relative to ROOT or a bare file name) names it. Images are decoded to
grey (Pillow ``convert("L")``; 16-bit images keep their depth), optionally centre-cropped, and resized
with Pillow's bicubic filter. Patient ids and file names are kept only as keyed pseudonyms
(:mod:`gradleak.data.pseudonym`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradleak.data._image import (RESAMPLE_NAME, check_bool, check_dir, check_size, class_layout, lookup,
                                  read_csv_map, read_image, to_square, visible)
from gradleak.data.base import ImageDataset
from gradleak.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
PATIENTS_CSV = "patients.csv"


def list_files(root: Path, extensions: set[str]) -> list[Path]:
    """Files under ``root`` with one of ``extensions``, skipping hidden entries and __MACOSX, sorted."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if p.is_file() and p.suffix.lower() in extensions and all(visible(Path(r)) for r in rel):
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


class FolderDataset(ImageDataset):
    """Images in one sub-folder per class."""

    source = "folder"

    def __init__(self, path, size: int = 64, crop: bool = False):
        size = check_size("folder", size)
        crop = check_bool("folder", "crop", crop)
        root = check_dir("folder", path)
        super().__init__(size=size)
        self.path, self.crop = str(path), crop
        self.paths = list_files(root, EXTENSIONS)
        if not self.paths:
            raise UserError(f"folder: no images ({'/'.join(sorted(EXTENSIONS))}) in {path}")
        self.classes, labels = class_layout(root, self.paths, "folder")
        self.labels = np.asarray(labels, dtype=np.int64)
        rels = [p.relative_to(root).as_posix() for p in self.paths]
        table = read_csv_map(root / PATIENTS_CSV, "filename", "patient_id", "folder") \
            if (root / PATIENTS_CSV).is_file() else {}
        self.patient_table = PATIENTS_CSV if table else None
        ids = [lookup(table, r, p.name) for r, p in zip(rels, self.paths)]
        self.patient_id_fallbacks = sum(not i for i in ids)
        self.set_identities([i or p.stem for i, p in zip(ids, self.paths)], rels)

    def _load_one(self, index: int) -> np.ndarray:
        return to_square(read_image(self.paths[index]), self.size, self.crop)

    def describe(self) -> dict:
        d = super().describe()
        d.update({
            "path": self.path, "split": None, "crop": self.crop, "resample": RESAMPLE_NAME,
            "counts": {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)},
            "num_patients": len(set(self.patient_ids)),
            "patient_ids": ("pseudonymised " + (f"ids from {self.patient_table}" if self.patient_table
                                                else "file stems") + " (keyed hash)"),
            "patient_id_fallbacks": self.patient_id_fallbacks if self.patient_table else None,
        })
        return d
