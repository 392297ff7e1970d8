"""Shared helpers of the file-based loaders: decoding to grey, square resizing, option checks."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gradleak.errors import UserError

# Resampling filter for every resize in the data package. Bicubic (Pillow's, which widens its support
# when shrinking, so it also anti-aliases) rather than Lanczos: less ringing at the hard edges of
# radiographs (body outline, burnt-in markers) and the same interpolation the attacks use to decode.
RESAMPLE = Image.Resampling.BICUBIC
RESAMPLE_NAME = "bicubic (Pillow)"
# ITU-R 601-2 luma, the weights of Pillow's convert("L"); used where colour arrives as numbers.
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])

MIN_SIZE, MAX_SIZE = 8, 2048
# The largest image decoded: far above any radiograph (a 43 x 43 cm detector at 0.1 mm is 18 Mpx), far below
# what exhausts memory. Pillow's own bomb warning and error are turned into the same one-line refusal.
MAX_PIXELS = 64_000_000
MAX_CLASSES = 10_000
SKIP_DIRS = {"__MACOSX"}


def check_size(source: str, size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"{source}: size must be an integer from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")
    return int(size)


def check_bool(source: str, key: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise UserError(f"{source}: option {key} must be true or false, got {value!r}")
    return bool(value)


def check_dir(source: str, path) -> Path:
    if path is None or str(path) == "":
        raise UserError(f"{source}: needs a path, e.g. {source}:/data/folder")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{source}: path does not exist: {path}")
    if not p.is_dir():
        raise UserError(f"{source}: expected a folder, got a file: {path}")
    return p


def visible(p: Path) -> bool:
    """False for hidden entries, macOS resource forks ('._x.jpeg') and __MACOSX folders."""
    return not p.name.startswith(".") and p.name not in SKIP_DIRS


def grey_float(img: Image.Image) -> np.ndarray:
    """A Pillow image as float H x W in [0, 1]; colour becomes grey with convert("L"), 16-bit stays 16-bit."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img, dtype=np.float64) / 65535.0
    if img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        return a / (65535.0 if a.max(initial=0) <= 65535 else a.max())
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.asarray(img.convert("L"), dtype=np.float64) / 255.0


def check_pixels(where, width: int, height: int, frames: int = 1) -> None:
    """Refuse an image larger than :data:`MAX_PIXELS` before its pixels are decoded (a decompression bomb
    or a wrong file costs no memory)."""
    if int(width) * int(height) * max(int(frames), 1) > MAX_PIXELS:
        raise UserError(f"{where}: image of {int(width)} x {int(height)} px"
                        + (f" x {int(frames)} frames" if int(frames) > 1 else "")
                        + f" is larger than the limit of {MAX_PIXELS // 1_000_000} megapixels")


def integer_labels(values: np.ndarray, where: str) -> np.ndarray:
    """Class labels as int64, refusing text, negative, non-finite and fractional values (a float label
    that is a whole number is taken, never truncated)."""
    a = np.asarray(values)
    if a.dtype.kind not in "biuf":
        raise UserError(f"{where} holds {a.dtype} values; labels must be whole numbers 0, 1, ...")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise UserError(f"{where} holds NaN or infinite labels; labels must be whole numbers 0, 1, ...")
        fractional = a[a != np.round(a)]
        if fractional.size:
            raise UserError(f"{where} holds the fractional label {fractional.flat[0]:g}; labels must be whole "
                            f"numbers 0, 1, ...")
    if a.size and a.min() < 0:
        raise UserError(f"{where} holds the negative label {a.min()}; labels must be 0, 1, ...")
    if a.size and a.max() >= MAX_CLASSES:
        raise UserError(f"{where} holds the label {a.max():g}; at most {MAX_CLASSES} classes (0 to "
                        f"{MAX_CLASSES - 1}) are supported")
    return a.astype(np.int64)


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to float grey in [0, 1]; an unreadable file, and one larger than
    :data:`MAX_PIXELS` (checked from its header, before decoding), is the user's error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_pixels(f"cannot read image {path}", *img.size)
                img.load()
                return grey_float(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, UnidentifiedImageError, OSError,
            ValueError, SyntaxError, EOFError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def to_square(a: np.ndarray, size: int, crop: bool = False) -> np.ndarray:
    """Grey H x W in [0, 1] to float32 size x size: optional centre crop to a square, then bicubic resize
    (ignoring the aspect ratio when not cropped)."""
    a = np.asarray(a, dtype=np.float32)
    if crop:
        h, w = a.shape
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        a = a[top:top + s, left:left + s]
    if a.shape != (size, size):
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((size, size), RESAMPLE))
    return np.clip(a, 0.0, 1.0).astype(np.float32, copy=False)


def read_csv_map(path: Path, key_col: str, value_col: str, source: str) -> dict[str, str]:
    """Two columns of a CSV file as a dict (e.g. filename -> patient_id)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            fields = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{source}: cannot read {path}: {e}") from None
    for col in (key_col, value_col):
        if col not in fields:
            raise UserError(f"{source}: {path} has no column '{col}' (it needs columns {key_col},{value_col})")
    out = {}
    for r in rows:
        r = {(k or "").strip(): (v or "").strip() for k, v in r.items()}
        if r[key_col]:
            out[r[key_col].replace("\\", "/")] = r[value_col]
    return out


def lookup(table: dict[str, str], rel: str, name: str):
    """Find a file in a CSV table by its path relative to the root, else by its bare name."""
    if rel in table:
        return table[rel]
    return table.get(name)


def class_layout(root: Path, files: list[Path], source: str) -> tuple[list[str], list[int]]:
    """Classes from the first folder under ``root`` (sorted names -> 0, 1, ...). Files lying in the root
    itself form one class named after the root, when there are no class folders."""
    tops = [f.relative_to(root).parts for f in files]
    loose = [f for f, t in zip(files, tops) if len(t) == 1]
    if loose and len(loose) < len(files):
        raise UserError(f"{source}: {loose[0]} lies beside the class sub-folders of {root}; "
                        f"move it into a class folder")
    if loose:
        return [root.resolve().name or "images"], [0] * len(files)
    classes = sorted({t[0] for t in tops})
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[t[0]] for t in tops]
