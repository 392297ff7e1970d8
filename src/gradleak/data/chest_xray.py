"""The Kaggle "Chest X-Ray Images (Pneumonia)" folders: ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``.

``ROOT`` may be the folder holding the split folders, or any folder above it, such as the top of the
unpacked Kaggle archive, which holds the tree twice (``chest_xray/{train,val,test}`` and the nested
duplicate ``chest_xray/chest_xray/{train,val,test}``) plus a ``__MACOSX`` folder of resource forks. Exactly
one tree is read: the shallowest folder under ``ROOT`` (``ROOT`` itself first) that holds a split folder
with a NORMAL or PNEUMONIA folder in it. Two such folders at the same depth are ambiguous and an error;
``__MACOSX`` and hidden entries are never searched.

Images are decoded to grey with Pillow's ``convert("L")`` (the files are grey content stored as RGB or
L), optionally centre-cropped to a square, and resized to ``size`` x ``size`` with Pillow's bicubic filter.
Label 0 = NORMAL, 1 = PNEUMONIA. Files are ordered by class, then by name. Patient ids (``person1234``,
``IM-0115``) and file names are kept only as keyed pseudonyms (:mod:`gradleak.data.pseudonym`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gradleak.data._image import RESAMPLE_NAME, check_bool, check_dir, check_size, read_image, to_square, visible
from gradleak.data.base import ImageDataset
from gradleak.errors import UserError

SPLITS = ("train", "val", "test")
CLASSES = ("NORMAL", "PNEUMONIA")
EXTENSIONS = {".jpeg", ".jpg", ".png"}
MAX_DEPTH = 4

# personN_bacteria_M / personN_virus_M (one file has a further _K: person447_virus_921_1) -> "personN".
_PERSON = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+(?:_\d+)*$", re.IGNORECASE)
# IM-XXXX-YYYY[-ZZZZ] -> "IM-XXXX"; NORMAL2-IM-XXXX-YYYY[-ZZZZ] -> "NORMAL2-IM-XXXX".
# The two prefixes are two numbering series and are kept apart. Evidence from the train split
# (../shared/data/chest_xray): IM- numbers run 0115..0766 and NORMAL2-IM- numbers 0383..1442, so 211
# numbers occur in both series; shown side by side, the images of IM-n and NORMAL2-IM-n are different
# children (body shape, size, position), and their pixel correlation (after removing the mean image) is
# no higher than that of random pairs. Merging them would invent 211 false "same patient" links.
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)


def match_patient_id(filename: str) -> str | None:
    """Patient id from a Kaggle file name, or None when the name follows no known pattern."""
    stem = Path(filename).stem
    for pattern in (_PERSON, _IM):
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return None


def parse_patient_id(filename: str) -> str:
    """Patient id from a Kaggle file name: ``person1_virus_6.jpeg`` -> ``person1``,
    ``IM-0115-0001.jpeg`` -> ``IM-0115``, ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``; any other
    name -> its stem (one patient per file)."""
    return match_patient_id(filename) or Path(filename).stem


def _child(d: Path, name: str) -> Path | None:
    """Sub-folder of ``d`` called ``name``, case-insensitively."""
    try:
        for c in d.iterdir():
            if c.is_dir() and c.name.lower() == name.lower():
                return c
    except OSError:
        return None
    return None


def _splits_in(d: Path) -> list[str]:
    found = []
    for s in SPLITS:
        sd = _child(d, s)
        if sd is not None and any(_child(sd, c) is not None for c in CLASSES):
            found.append(s)
    return found


def find_tree(root: Path) -> Path:
    """The shallowest folder at or under ``root`` that holds the split folders (see module docstring)."""
    level = [root]
    for _ in range(MAX_DEPTH + 1):
        hits = [d for d in level if _splits_in(d)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            names = ", ".join(str(h) for h in sorted(hits))
            raise UserError(f"kaggle: {root} holds more than one chest_xray tree at the same depth ({names}); "
                            f"pass the one to read")
        nxt = []
        for d in level:
            try:
                nxt.extend(sorted(c for c in d.iterdir() if c.is_dir() and visible(c)))
            except OSError:
                pass
        level = nxt
        if not level:
            break
    if any(_child(root, c) is not None for c in CLASSES):
        raise UserError(f"kaggle: {root} is a split folder (it holds NORMAL/PNEUMONIA); pass its parent "
                        f"and choose the split with split=")
    raise UserError(f"kaggle: no chest_xray tree ({'/'.join(SPLITS)} folders holding NORMAL/PNEUMONIA) "
                    f"found in {root}")


class ChestXrayDataset(ImageDataset):
    """One split of the Kaggle chest X-ray folders, decoded lazily."""

    source = "kaggle"

    def __init__(self, path, split: str = "train", size: int = 64, crop: bool = False):
        size = check_size("kaggle", size)
        crop = check_bool("kaggle", "crop", crop)
        if split not in SPLITS:
            raise UserError(f"kaggle: split must be one of {', '.join(SPLITS)}, got {split!r}")
        root = check_dir("kaggle", path)
        super().__init__(size=size)
        self.path = str(path)
        self.tree = find_tree(root)
        self.split, self.crop = split, crop
        available = _splits_in(self.tree)
        if split not in available:
            raise UserError(f"kaggle: split '{split}' not found in {self.tree} (found: {', '.join(available)})")
        split_dir = _child(self.tree, split)
        paths, labels = [], []
        for label, cls in enumerate(CLASSES):
            d = _child(split_dir, cls)
            if d is None:
                continue
            files = sorted((f for f in d.iterdir()
                            if f.is_file() and visible(f) and f.suffix.lower() in EXTENSIONS), key=lambda f: f.name)
            paths.extend(files)
            labels.extend([label] * len(files))
        if not paths:
            raise UserError(f"kaggle: no images (.jpeg/.jpg/.png) in {split_dir}")
        self.paths: list[Path] = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        matched = [match_patient_id(p.name) for p in paths]
        self.patient_id_fallbacks = sum(m is None for m in matched)
        self.set_identities([m or p.stem for m, p in zip(matched, paths)], [p.name for p in paths])
        self.classes = list(CLASSES)

    def _load_one(self, index: int) -> np.ndarray:
        return to_square(read_image(self.paths[index]), self.size, self.crop)

    def describe(self) -> dict:
        d = super().describe()
        d.update({
            "path": self.path, "tree": str(self.tree), "split": self.split, "crop": self.crop,
            "resample": RESAMPLE_NAME, "grey": 'Pillow convert("L")',
            "counts": {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)},
            "num_patients": len(set(self.patient_ids)),
            "patient_ids": "pseudonymised file-name patient numbers (keyed hash)",
            "patient_id_fallbacks": self.patient_id_fallbacks,
        })
        return d
