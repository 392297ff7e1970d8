"""MedMNIST ``.npz`` files (PneumoniaMNIST and any other 2-D MedMNIST set, at 28, 64, 128 or 224 px).

Keys ``{train,val,test}_images`` (N x H x W uint8 grey, or N x H x W x 3 colour, turned grey with the
ITU-R 601-2 weights of Pillow's ``convert("L")``) and ``{split}_labels`` (N x 1). Images are resized with
Pillow's bicubic filter when ``size`` differs from the stored size (default: keep the stored size).
MedMNIST carries no patient identity, so every image gets its own id, the pseudonym of
``npz-<split>-<index>`` (:mod:`gradleak.data.pseudonym`): splitting "by patient" is then splitting by
image, and re-identification cannot be scored on this source.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from gradleak.data._image import GREY_WEIGHTS, RESAMPLE_NAME, check_pixels, check_size, integer_labels, to_square
from gradleak.data.base import ImageDataset
from gradleak.errors import UserError

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
# MedMNIST v2 / v3 files on Zenodo (record 10519652): NAME.npz is the 28 px file, NAME_SIZE.npz the others.
ZENODO_URL = "https://zenodo.org/records/10519652/files/"
_NAMED_CLASSES = {"pneumoniamnist": ["normal", "pneumonia"]}


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"medmnist: cannot read {path} as a MedMNIST .npz file ({e})") from None


def _get(npz, path: Path, key: str) -> np.ndarray:
    if key not in npz.files:
        raise UserError(f"medmnist: {path} has no key '{key}' (keys: {', '.join(sorted(npz.files)) or 'none'})")
    try:
        return npz[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"medmnist: cannot read key '{key}' of {path} ({e})") from None


def _peek(npz, path: Path, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of an npz member read from its header, before its data are decompressed (None for a
    header version this reader does not know; the array is then checked after reading)."""
    if key not in npz.files:
        _get(npz, path, key)  # says which keys there are
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with npz.zip.open(f"{key}.npy") as f:
            reader = readers.get(np.lib.format.read_magic(f))
            return None if reader is None else reader(f)[::2]
    except (KeyError, OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"medmnist: cannot read key '{key}' of {path} ({e})") from None


def _check_images_header(path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype.kind not in "uif":
        raise UserError(f"medmnist: {path} key '{key}' holds {dtype} values; expected image pixels (numbers)")
    if len(shape) in (3, 4):
        check_pixels(f"medmnist: {path} key '{key}'", shape[2], shape[1])


def _read_split(p: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x H x W or N x H x W x 3) and integer labels (N) of one split, checked."""
    key, lkey = f"{split}_images", f"{split}_labels"
    with _open_npz(p) as npz:
        head = _peek(npz, p, key)
        if head is not None:
            _check_images_header(p, key, *head)
        images = _get(npz, p, key)
        labels = _get(npz, p, lkey)
    _check_images_header(p, key, images.shape, images.dtype)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise UserError(f"medmnist: {p} key '{key}' has shape {images.shape}; expected N x H x W or N x H x W x 3")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise UserError(f"medmnist: {p} key '{key}' holds NaN or infinite pixels")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise UserError(f"medmnist: {p} key '{lkey}' has shape {labels.shape}: multi-label sets "
                        f"are not supported (one label per image needed)")
    labels = integer_labels(labels.reshape(-1), f"medmnist: {p} key '{lkey}'")
    if len(labels) != len(images):
        raise UserError(f"medmnist: {p} has {len(images)} '{key}' but {len(labels)} '{lkey}'")
    if len(images) == 0:
        raise UserError(f"medmnist: {p} key '{key}' holds no images")
    return images, labels


def _to_unit(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    return np.clip(a.astype(np.float32), 0.0, 1.0)


class MedMNISTDataset(ImageDataset):
    """One split of a MedMNIST npz file, held in memory (uint8) and resized per image on demand."""

    source = "medmnist"

    def __init__(self, path, split: str = "train", size: int | None = None):
        if split not in SPLITS:
            raise UserError(f"medmnist: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if path is None or str(path) == "":
            raise UserError("medmnist: needs the path of an .npz file, e.g. medmnist:pneumoniamnist.npz")
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"medmnist: file not found: {path}")
        images, labels = _read_split(p, split)
        self.stored_size = int(images.shape[1])
        super().__init__(size=check_size("medmnist", self.stored_size if size is None else size))
        self.path, self.split = str(path), split
        self._images = images
        self.labels = labels
        self.names = [f"{split}[{i}]" for i in range(len(labels))]
        self.set_identities([f"npz-{split}-{i}" for i in range(len(labels))])
        named = _NAMED_CLASSES.get(p.stem.split("_")[0].lower())
        n_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.classes = named if named and n_classes <= len(named) else [str(i) for i in range(n_classes)]

    def _load_one(self, index: int) -> np.ndarray:
        a = _to_unit(self._images[index])
        if a.ndim == 3:
            a = (a @ GREY_WEIGHTS).astype(np.float32)
        return to_square(a, self.size)

    def describe(self) -> dict:
        d = super().describe()
        d.update({
            "path": self.path, "split": self.split, "stored_size": self.stored_size,
            "resample": RESAMPLE_NAME if self.stored_size != self.size else None,
            "counts": {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)},
            "num_patients": len(self),
            "patient_ids": "none in MedMNIST: one id per image, the pseudonym of npz-<split>-<index>",
        })
        return d


def medmnist_url(name: str, size: int = 28, base_url: str = ZENODO_URL) -> str:
    filename = f"{name}.npz" if size == 28 else f"{name}_{size}.npz"
    return base_url.rstrip("/") + "/" + filename + "?download=1"


def download_medmnist(name: str = "pneumoniamnist", size: int = 28, dest=".", *,
                      base_url: str = ZENODO_URL, timeout: float = 60.0) -> Path:
    """Fetch ``NAME.npz`` (28 px) or ``NAME_SIZE.npz`` from the MedMNIST Zenodo record into ``dest`` (a
    folder, or a file path ending in .npz) and return the file's path. Nothing in gradleak calls this on
    its own; a failed download raises a UserError that says how to place the file by hand."""
    if size not in SIZES:
        raise UserError(f"medmnist: size must be one of {', '.join(map(str, SIZES))}, got {size!r}")
    if not name or "/" in name or "\\" in name:
        raise UserError(f"medmnist: bad data set name {name!r} (e.g. pneumoniamnist)")
    url = medmnist_url(name, size, base_url)
    dest = Path(dest).expanduser()
    target = dest if dest.suffix == ".npz" else dest / url.rsplit("/", 1)[1].split("?")[0]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".part", dir=target.parent)
    except OSError as e:
        raise UserError(f"medmnist: cannot write to {target.parent}: {e}") from None
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        with _open_npz(Path(tmp)) as npz:
            _get(npz, target, "train_images")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, TimeoutError, ValueError, UserError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"medmnist: download of {url} failed ({reason}); download that file by hand "
                        f"(in a browser) and save it as {target}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
