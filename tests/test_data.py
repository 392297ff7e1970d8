"""The data package: loaders on small real files made here, phantoms, specs, errors, and the real data."""

from __future__ import annotations

import json
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require_shared
from gradleak.data import (ChestXrayDataset, DicomDataset, FolderDataset, ImageDataset, MedMNISTDataset,
                           PhantomDataset, download_medmnist, load_dataset, parse_patient_id, parse_spec,
                           render_phantom, split_by_patient)
from gradleak.data.chest_xray import match_patient_id
from gradleak.data.phantoms import patient_labels
from gradleak.data.pseudonym import PATTERN, name_pseudonym, patient_pseudonym
from gradleak.errors import UserError


def _jpeg(path: Path, w: int = 40, h: int = 30, mode: str = "RGB", seed: int = 0, fmt: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w), dtype=np.uint8)
    img = Image.fromarray(a).convert(mode)
    img.save(path, format=fmt)
    return path


KAGGLE_FILES = {
    "NORMAL": ["IM-0115-0001.jpeg", "NORMAL2-IM-0383-0001.jpeg", "IM-0429-0001-0002.jpeg", "IM-0115-0002.jpg"],
    "PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_virus_6.jpeg", "person447_virus_921_1.jpeg",
                  "person22_bacteria_77.png", "odd name.jpeg"],
}


def _kaggle_tree(root: Path, splits=("train", "val"), files=KAGGLE_FILES):
    k = 0
    for split in splits:
        for cls, names in files.items():
            for name in names:
                k += 1
                _jpeg(root / split / cls / name, mode="RGB" if k % 2 else "L", seed=k,
                      fmt="PNG" if name.endswith(".png") else "JPEG")
    return root


def _json_ok(d: dict):
    assert json.loads(json.dumps(d)) == d
    for key in ("source", "path", "split", "size", "counts"):
        assert key in d


# ------------------------------------------------------------------------------------------ patient ids


@pytest.mark.parametrize("name, pid", [
    ("person1_bacteria_1.jpeg", "person1"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("person447_virus_921_1.jpeg", "person447"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0429-0001-0002.jpeg", "IM-0429"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ("NORMAL2-IM-0395-0001-0001.jpeg", "NORMAL2-IM-0395"),
    ("some/dir/person3_virus_7.jpg", "person3"),
    ("scan_17.jpeg", "scan_17"),
    ("person_bacteria.jpeg", "person_bacteria"),
    ("IM-.jpeg", "IM-"),
])
def test_parse_patient_id(name, pid):
    assert parse_patient_id(name) == pid


def test_unknown_names_have_no_pattern_match():
    assert match_patient_id("scan_17.jpeg") is None
    assert match_patient_id("IM-0115-0001.jpeg") == "IM-0115"


# ------------------------------------------------------------------------------------------ kaggle


def test_kaggle_loader_labels_order_ids_sizes(tmp_path):
    root = _kaggle_tree(tmp_path / "cx")
    ds = load_dataset({"source": "kaggle", "path": str(root), "size": 16})
    assert isinstance(ds, ChestXrayDataset) and len(ds) == 9
    files = [p.name for p in ds.paths]
    assert files == sorted(KAGGLE_FILES["NORMAL"]) + sorted(KAGGLE_FILES["PNEUMONIA"])
    assert ds.labels.tolist() == [0] * 4 + [1] * 5
    ids = dict(zip(files, ds.patient_ids))
    assert ids["NORMAL2-IM-0383-0001.jpeg"] == patient_pseudonym("NORMAL2-IM-0383")
    assert ids["IM-0115-0001.jpeg"] == ids["IM-0115-0002.jpg"] == patient_pseudonym("IM-0115")
    assert ids["person1_bacteria_1.jpeg"] == ids["person1_virus_6.jpeg"] == patient_pseudonym("person1")
    assert ids["odd name.jpeg"] == patient_pseudonym("odd name")
    assert len(set(ds.patient_ids)) == 7 and all(PATTERN.match(i) for i in ds.patient_ids)
    # file names carry patient numbers: only their pseudonyms are kept, with the extension
    assert ds.names == [name_pseudonym(f) for f in files] and ds.names[0].startswith("im-")
    assert not any("person" in n or "IM-" in n for n in ds.names + ds.patient_ids)
    b = ds.batch(range(len(ds)))
    assert b.images.shape == (9, 1, 16, 16) and b.images.dtype == torch.float32
    assert 0.0 <= float(b.images.min()) and float(b.images.max()) <= 1.0
    assert b.labels.dtype == torch.int64
    d = ds.describe()
    _json_ok(d)
    assert d["counts"] == {"NORMAL": 4, "PNEUMONIA": 5} and d["split"] == "train"
    assert d["patient_id_fallbacks"] == 1 and d["path"] == str(root)


def test_kaggle_grey_matches_pillow_convert_L(tmp_path):
    p = _jpeg(tmp_path / "cx" / "train" / "NORMAL" / "IM-0001-0001.png", w=20, h=20, fmt="PNG")
    ds = ChestXrayDataset(tmp_path / "cx", size=20)
    want = np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(ds.load([0])[0, 0].numpy(), want, atol=1e-6)


def test_kaggle_nested_archive_reads_one_tree(tmp_path):
    top = tmp_path / "archive"
    _kaggle_tree(top / "chest_xray", splits=("train", "val", "test"))
    # the nested duplicate holds different files, so reading it too would change the counts
    _kaggle_tree(top / "chest_xray" / "chest_xray", splits=("train", "test"),
                 files={"NORMAL": ["IM-9999-0001.jpeg"], "PNEUMONIA": []})
    _jpeg(top / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "._IM-0115-0001.jpeg")
    _jpeg(top / "chest_xray" / "train" / "NORMAL" / "._IM-0115-0001.jpeg")  # resource fork beside it
    ds = load_dataset(f"kaggle:{top},size=8")
    assert ds.tree == top / "chest_xray"
    assert len(ds) == 9 and "IM-9999-0001.jpeg" not in [p.name for p in ds.paths]
    assert ds.describe()["counts"] == {"NORMAL": 4, "PNEUMONIA": 5}
    # only the nested copy present: it is found one level further down
    only = tmp_path / "only"
    _kaggle_tree(only / "chest_xray" / "chest_xray", splits=("train",))
    assert load_dataset(f"kaggle:{only},size=8").tree == only / "chest_xray" / "chest_xray"


def test_kaggle_split_selection_and_missing_split(tmp_path):
    root = _kaggle_tree(tmp_path / "cx", splits=("train",))
    _jpeg(root / "val" / "NORMAL" / "IM-0001-0001.jpeg")
    val = load_dataset(f"chest_xray:{root},split=val,size=8")
    assert val.names == [name_pseudonym("IM-0001-0001.jpeg")] and val.describe()["split"] == "val"
    with pytest.raises(UserError, match=r"split 'test' not found in .*found: train, val"):
        load_dataset(f"kaggle:{root},split=test")
    with pytest.raises(UserError, match="split must be one of"):
        load_dataset(f"kaggle:{root},split=validation")


def test_kaggle_crop(tmp_path):
    # 60 x 20: a white centre square 20 x 20 between black sides
    a = np.zeros((20, 60), dtype=np.uint8)
    a[:, 20:40] = 255
    p = tmp_path / "cx" / "train" / "PNEUMONIA" / "person5_virus_9.png"
    p.parent.mkdir(parents=True)
    Image.fromarray(a).save(p)
    cropped = load_dataset(f"kaggle:{tmp_path / 'cx'},size=10,crop=true").load([0])
    squashed = load_dataset(f"kaggle:{tmp_path / 'cx'},size=10,crop=false").load([0])
    assert cropped.shape == squashed.shape == (1, 1, 10, 10)
    assert float(cropped.mean()) > 0.99
    assert 0.25 < float(squashed.mean()) < 0.45
    assert float(squashed[0, 0, :, 0].max()) < 0.05  # the black side survives without the crop


def test_kaggle_errors(tmp_path):
    root = _kaggle_tree(tmp_path / "cx", splits=("train",))
    with pytest.raises(UserError, match="is a split folder"):
        load_dataset(f"kaggle:{root / 'train'}")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no chest_xray tree"):
        load_dataset(f"kaggle:{tmp_path / 'nothing'}")
    two = tmp_path / "two"
    _kaggle_tree(two / "a", splits=("train",))
    _kaggle_tree(two / "b", splits=("train",))
    with pytest.raises(UserError, match="more than one chest_xray tree"):
        load_dataset(f"kaggle:{two}")
    empty = tmp_path / "empty"
    (empty / "train" / "NORMAL").mkdir(parents=True)
    (empty / "train" / "NORMAL" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        load_dataset(f"kaggle:{empty}")
    bad = tmp_path / "bad" / "train" / "NORMAL" / "IM-0001-0001.jpeg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a jpeg")
    ds = load_dataset(f"kaggle:{tmp_path / 'bad'}")
    with pytest.raises(UserError, match="cannot read image .*IM-0001-0001.jpeg"):
        ds.load([0])


# ------------------------------------------------------------------------------------------ medmnist


def _npz(path: Path, size: int = 28, colour: bool = False, n=(6, 3, 4), drop=None):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, size, size, 3) if colour else (k, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % 2).reshape(k, 1).astype(np.uint8)
    if drop:
        arrays.pop(drop)
    np.savez(path, **arrays)
    return path, arrays


def test_medmnist_splits_native_size_and_ids(tmp_path):
    path, arrays = _npz(tmp_path / "pneumoniamnist.npz")
    ds = load_dataset(f"medmnist:{path},split=val")
    assert isinstance(ds, MedMNISTDataset) and len(ds) == 3 and ds.size == 28
    np.testing.assert_allclose(ds.load([1])[0, 0].numpy(), arrays["val_images"][1] / 255, atol=1e-6)
    assert ds.labels.tolist() == [0, 1, 0] and ds.classes == ["normal", "pneumonia"]
    assert ds.patient_ids == [patient_pseudonym(f"npz-val-{i}") for i in range(3)]
    assert ds.names == ["val[0]", "val[1]", "val[2]"]
    d = ds.describe()
    _json_ok(d)
    assert d["counts"] == {"normal": 2, "pneumonia": 1} and "npz-<split>-<index>" in d["patient_ids"]
    assert len(load_dataset(f"npz:{path}")) == 6 and len(load_dataset(f"npz:{path},split=test")) == 4


def test_medmnist_resize_and_colour(tmp_path):
    path, arrays = _npz(tmp_path / "bloodmnist_64.npz", size=64, colour=True)
    ds = load_dataset(f"medmnist:{path}", size=32)
    x = ds.load([0, 1])
    assert x.shape == (2, 1, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    grey = (arrays["train_images"][0] @ np.array([0.299, 0.587, 0.114])) / 255
    assert abs(float(x[0].mean()) - grey.mean()) < 0.01
    assert ds.classes == ["0", "1"]
    assert load_dataset(f"medmnist:{path}").load([0]).shape == (1, 1, 64, 64)


def test_medmnist_errors(tmp_path):
    with pytest.raises(UserError, match="file not found: .*missing.npz"):
        load_dataset(f"medmnist:{tmp_path / 'missing.npz'}")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"definitely not a zip")
    with pytest.raises(UserError, match="cannot read .*junk.npz"):
        load_dataset(f"medmnist:{junk}")
    path, _ = _npz(tmp_path / "nolabels.npz", drop="val_labels")
    with pytest.raises(UserError, match=r"nolabels.npz has no key 'val_labels'"):
        load_dataset(f"medmnist:{path},split=val")
    multi = tmp_path / "multi.npz"
    np.savez(multi, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 14), np.uint8))
    with pytest.raises(UserError, match="multi-label"):
        load_dataset(f"medmnist:{multi}")


@pytest.mark.parametrize("labels, message", [
    (np.array([0.0, 1.5]), "fractional label 1.5"),
    (np.array([0, -1]), "negative label -1"),
    (np.array([0.0, np.nan]), "NaN or infinite labels"),
    (np.array(["0", "1"]), "<U1 values"),
    (np.array([0, 10 ** 12]), "at most 10000 classes"),
])
def test_medmnist_labels_are_whole_numbers_never_truncated(tmp_path, labels, message):
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=labels)
    with pytest.raises(UserError, match=message):
        load_dataset(f"medmnist:{path}")
    np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.array([[1.0], [0.0]]))
    assert load_dataset(f"medmnist:{path}").labels.tolist() == [1, 0]  # whole floats are taken


def test_medmnist_refuses_text_pixels_nan_and_huge_images_before_reading(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, train_images=np.array([[["a"] * 8] * 8]), train_labels=np.zeros(1))
    with pytest.raises(UserError, match="<U1 values; expected image pixels"):
        load_dataset(f"medmnist:{path}")
    np.savez(path, train_images=np.full((1, 8, 8), np.nan, np.float32), train_labels=np.zeros(1))
    with pytest.raises(UserError, match="NaN or infinite pixels"):
        load_dataset(f"medmnist:{path}")
    # a compressed 15000 x 15000 image: refused from the array header, before 225 MB are decompressed
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("train_images.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (1, 15000, 15000)})
            f.write(b"\0" * 1000)
        with z.open("train_labels.npy", "w") as f:
            np.save(f, np.zeros(1, np.uint8))
    with pytest.raises(UserError, match="15000 x 15000 px is larger than the limit"):
        load_dataset(f"medmnist:{path}")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` grey pixels and holds (almost) none of them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [9000, 15000])  # 81 Mpx: Pillow warns; 225 Mpx: Pillow refuses
def test_decompression_bomb_is_one_line_before_decoding(tmp_path, side):
    _png_header_only(tmp_path / "imgs" / "big.png", side, side)
    ds = load_dataset(f"folder:{tmp_path / 'imgs'},size=8")
    with pytest.raises(UserError, match=r"big.png: .*(px is larger than the limit of 64 megapixels|"
                                        r"decompression bomb)") as e:
        ds.load([0])
    assert "\n" not in str(e.value)


def test_dicom_folders_named_after_patients_are_refused(tmp_path):
    """An export with one folder per patient would make patients' names the class names, written everywhere."""
    root = tmp_path / "export"
    _dicom(root / "DOE_JANE" / "1.dcm", _ramp(8), patient="PHI-1", PatientName="DOE^JANE")
    _dicom(root / "ROE_RICHARD" / "1.dcm", _ramp(8), patient="PHI-2", PatientName="ROE^RICHARD")
    with pytest.raises(UserError, match="class folder 1 of 2 .* named after a patient.*labels.csv") as e:
        load_dataset(f"dicom:{root}")
    assert "DOE" not in str(e.value)
    (root / "labels.csv").write_text("filename,label\n1.dcm,0\nROE_RICHARD/1.dcm,1\n")
    assert load_dataset(f"dicom:{root}").classes == ["0", "1"]


def test_dicom_too_many_pixels_refused_from_the_header(tmp_path):
    p = _dicom(tmp_path / "d" / "a.dcm", _ramp(8))
    import pydicom

    ds = pydicom.dcmread(p)
    ds.Rows = ds.Columns = 9000
    ds.save_as(p)
    with pytest.raises(UserError, match="9000 x 9000 px is larger than the limit"):
        load_dataset(f"dicom:{tmp_path / 'd'}").load([0])


def test_download_medmnist_offline_says_what_to_do(tmp_path):
    with pytest.raises(UserError) as e:
        download_medmnist("pneumoniamnist", 64, tmp_path, base_url="http://127.0.0.1:9/", timeout=5)
    msg = str(e.value)
    assert "\n" not in msg and "download of http://127.0.0.1:9/pneumoniamnist_64.npz" in msg
    assert "by hand" in msg and str(tmp_path / "pneumoniamnist_64.npz") in msg
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    with pytest.raises(UserError, match="size must be one of"):
        download_medmnist("pneumoniamnist", 32, tmp_path)


# ------------------------------------------------------------------------------------------ folder


def test_folder_classes_patients_and_16bit(tmp_path):
    root = tmp_path / "imgs"
    _jpeg(root / "sick" / "b.png", fmt="PNG")
    _jpeg(root / "sick" / "a.jpg", fmt="JPEG")
    _jpeg(root / "healthy" / "deep" / "c.bmp", fmt="BMP")
    _jpeg(root / "healthy" / "d.tif", fmt="TIFF")
    (root / "healthy" / "readme.txt").write_text("ignored")
    ds = load_dataset(f"folder:{root}", size=12)
    assert isinstance(ds, FolderDataset)
    assert ds.classes == ["healthy", "sick"]
    rels = ["healthy/d.tif", "healthy/deep/c.bmp", "sick/a.jpg", "sick/b.png"]
    assert [p.relative_to(root).as_posix() for p in ds.paths] == rels
    assert ds.names == [name_pseudonym(r) for r in rels] and ds.names[0].endswith(".tif")
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.patient_ids == [patient_pseudonym(x) for x in "dcab"]
    assert ds.load(range(4)).shape == (4, 1, 12, 12)
    _json_ok(ds.describe())
    (root / "patients.csv").write_text("filename,patient_id\nsick/a.jpg,P1\nb.png,P1\n")
    ds = load_dataset(f"folder:{root}")
    assert ds.patient_ids == [patient_pseudonym(x) for x in ("d", "c", "P1", "P1")]
    assert ds.describe()["patient_id_fallbacks"] == 2
    # 16-bit grey keeps its depth
    a16 = np.full((8, 8), 30000, dtype=np.uint16)
    p16 = tmp_path / "deep16" / "x" / "img.png"
    p16.parent.mkdir(parents=True)
    Image.fromarray(a16).save(p16)
    assert abs(float(load_dataset(f"folder:{p16.parents[1]},size=8").load([0]).mean()) - 30000 / 65535) < 1e-4


def test_folder_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    root = tmp_path / "mixed"
    _jpeg(root / "cls" / "a.png", fmt="PNG")
    _jpeg(root / "loose.png", fmt="PNG")
    with pytest.raises(UserError, match="loose.png lies beside the class sub-folders"):
        load_dataset(f"folder:{root}")
    flat = tmp_path / "flat"
    _jpeg(flat / "a.png", fmt="PNG")
    assert load_dataset(f"folder:{flat}").classes == ["flat"]
    (flat / "patients.csv").write_text("file,patient\na.png,P\n")
    with pytest.raises(UserError, match="patients.csv has no column 'filename'"):
        load_dataset(f"folder:{flat}")
    with pytest.raises(UserError, match="expected a folder"):
        load_dataset(f"folder:{flat / 'a.png'}")


# ------------------------------------------------------------------------------------------ dicom


def _dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", patient="P1", slope=None,
           intercept=None, center=None, width=None, signed=False, **tags):
    """A small DICOM radiograph; ``tags`` set further elements (PatientName=..., AccessionNumber=...)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    path.parent.mkdir(parents=True, exist_ok=True)
    uid = "1.2.826.0.1.3680043.8.498." + str(zlib.crc32(str(path).encode()))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid
    ds.PatientID, ds.Modality = patient, "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == pixels.shape
    return path


def _ramp(size=16):
    return np.repeat(np.array([0, 1000, 2000, 3000], dtype=np.uint16), size // 4)[:, None].repeat(size, 1)


def test_dicom_monochrome_rescale_window_and_ids(tmp_path):
    root = tmp_path / "dcm"
    # rescale: [0,1000,2000,3000] * 2 - 1000 -> [-1000, 1000, 3000, 5000]; window 2000 +- 2000
    _dicom(root / "NORMAL" / "a.dcm", _ramp(), patient="PA", slope=2, intercept=-1000, center=2000, width=4001)
    _dicom(root / "NORMAL" / "b.dcm", _ramp(), patient="PA")  # no window: min-max
    _dicom(root / "PNEUMONIA" / "sub" / "c.dcm", _ramp(), photometric="MONOCHROME1", patient="PB")
    _dicom(root / "PNEUMONIA" / "d.dcm", _ramp() + 50000, patient="")  # high 16-bit values, no PatientID
    ds = load_dataset(f"dicom:{root},size=16")
    assert isinstance(ds, DicomDataset)
    rels = ["NORMAL/a.dcm", "NORMAL/b.dcm", "PNEUMONIA/d.dcm", "PNEUMONIA/sub/c.dcm"]
    assert [p.relative_to(root).as_posix() for p in ds.paths] == rels and ds.names == [name_pseudonym(r) for r in rels]
    assert ds.classes == ["NORMAL", "PNEUMONIA"] and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.patient_ids == [patient_pseudonym(x) for x in ("PA", "PA", "d", "PB")]
    x = ds.load(range(4))[:, 0, :, 0].numpy()  # first column: one value per 4-row band
    # DICOM linear window: (v - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1]
    want = np.clip((np.array([-1000, 1000, 3000, 5000]) - 1999.5) / 4000 + 0.5, 0, 1)
    np.testing.assert_allclose(x[0][::4], want, atol=1e-6)
    assert want[0] == 0 and want[3] == 1 and abs(want[1] - 0.25) < 1e-3
    np.testing.assert_allclose(x[1][::4], [0.0, 1 / 3, 2 / 3, 1.0], atol=1e-4)
    np.testing.assert_allclose(x[2][::4], [0.0, 1 / 3, 2 / 3, 1.0], atol=1e-4)
    np.testing.assert_allclose(x[3][::4], [1.0, 2 / 3, 1 / 3, 0.0], atol=1e-4)  # MONOCHROME1 inverted
    d = ds.describe()
    _json_ok(d)
    assert d["labels_from"] == "folders" and d["patient_id_fallbacks"] == 1
    assert ds.load([0], ).shape == (1, 1, 16, 16)
    assert load_dataset(f"dicom:{root},size=8").load([0]).shape == (1, 1, 8, 8)


def test_dicom_labels_csv_and_errors(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    _dicom(root / "x.dcm", _ramp(8), patient="P1")
    _dicom(root / "y.dcm", _ramp(8), patient="P2")
    (root / "labels.csv").write_text("filename,label\nx.dcm,1\ny.dcm,0\n")
    ds = load_dataset(f"dicom:{root}")
    assert ds.labels.tolist() == [1, 0] and ds.classes == ["0", "1"] and ds.describe()["labels_from"] == "labels.csv"
    (root / "labels.csv").write_text("filename,label\nx.dcm,pneumonia\n")
    with pytest.raises(UserError, match="y.dcm has no row in .*labels.csv"):
        load_dataset(f"dicom:{root}")
    (root / "labels.csv").unlink()
    (root / "broken.dcm").write_bytes(b"nope")
    with pytest.raises(UserError, match="cannot read .*broken.dcm"):
        load_dataset(f"dicom:{root}")
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="no .dcm files"):
        load_dataset(f"dicom:{tmp_path / 'none'}")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if pydicom were not installed
    with pytest.raises(UserError, match=r"install gradleak\[dicom\]"):
        load_dataset(f"dicom:{root}")


# ------------------------------------------------------------------------------------------ phantoms


def test_phantoms_deterministic_and_seeded():
    a = PhantomDataset(n=8, seed=0, size=32).load(range(8))
    b = PhantomDataset(n=8, seed=0, size=32).load(range(8))
    c = PhantomDataset(n=8, seed=1, size=32).load(range(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=0.05)


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_phantoms_any_size(size):
    ds = PhantomDataset(n=4, size=size)
    x = ds.load(range(4))
    assert x.shape == (4, 1, size, size) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and float(x.std()) > 0.1
    # an X-ray: dark air at the top corners, bright mediastinum, darker lungs beside it
    img = x.mean(0)[0]
    s = size
    corner = float(img[: s // 10 + 1, : s // 10 + 1].mean())
    centre = float(img[s // 2 - s // 16: s // 2 + s // 16, s // 2 - s // 32 - 1: s // 2 + s // 32 + 1].mean())
    lung = float(img[s // 3: s // 2, s // 5: s // 3].mean())
    assert corner < lung < centre


def test_phantoms_patients_labels_and_single_draw():
    ds = PhantomDataset(n=64, seed=2, size=32, images_per_patient=4)
    assert set(ds.labels.tolist()) == {0, 1} and int(ds.labels.sum()) == 32
    assert ds.patient_ids[:5] == ["phantom0"] * 4 + ["phantom1"]
    for p in set(ds.patient_ids):
        idx = [i for i, q in enumerate(ds.patient_ids) if q == p]
        assert len(idx) == 4 and len(set(ds.labels[idx].tolist())) == 1
    x = ds.load(range(8))
    for i in (0, 5, 7):
        assert torch.equal(ds.load([i])[0], x[i])
    assert torch.equal(x[1, 0], torch.from_numpy(render_phantom(32, seed=2, patient=0, image=1,
                                                                label=int(ds.labels[1]))))
    assert not torch.equal(x[0], x[1])  # a patient's images differ (pose, exposure, grain)
    # ... but resemble each other more than other patients' images do
    z = ds.load(range(64)).reshape(64, -1)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    corr = z @ z.T / z.shape[1]
    p = torch.arange(64) // 4
    same = (p[:, None] == p[None]) & ~torch.eye(64, dtype=torch.bool)
    assert float(corr[same].mean()) > float(corr[p[:, None] != p[None]].mean()) + 0.03
    d = ds.describe()
    _json_ok(d)
    assert d["counts"] == {"normal": 32, "pneumonia": 32} and d["num_patients"] == 16


def test_phantom_class_fraction_and_opacity_only_difference():
    assert patient_labels(80, 0, 0.25).sum() == 20
    assert patient_labels(10, 0, 0.0).sum() == 0 and patient_labels(10, 0, 1.0).sum() == 10
    ds = load_dataset("phantoms:n=40,pneumonia_fraction=0.25,images_per_patient=1")
    assert int(ds.labels.sum()) == 10
    # the same patient and image with and without disease differ only inside the lungs, by adding density
    a = render_phantom(64, seed=0, patient=3, image=0, label=0)
    b = render_phantom(64, seed=0, patient=3, image=0, label=1)
    assert (b - a).max() > 0.05 and (b - a).min() > -0.05


def test_phantom_option_errors():
    for spec, msg in [("phantoms:size=8", "size must be between 16 and 512"),
                      ("phantoms:n=0", "n must be at least 1"),
                      ("phantoms:pneumonia_fraction=1.5", "pneumonia_fraction"),
                      ("phantoms:seed=x", "seed must be an integer"),
                      ("phantoms:images_per_patient=0", "images_per_patient")]:
        with pytest.raises(UserError, match=msg):
            load_dataset(spec)


# ------------------------------------------------------------------------------------------ specs


def test_parse_spec_grammar():
    assert parse_spec("phantoms") == {"source": "phantoms"}
    assert parse_spec("phantoms:n=200,seed=3") == {"source": "phantoms", "n": 200, "seed": 3}
    assert parse_spec("kaggle:../shared/data/chest_xray,split=train,size=64,crop=true") == {
        "source": "kaggle", "path": "../shared/data/chest_xray", "split": "train", "size": 64, "crop": True}
    assert parse_spec("medmnist:a.npz,split=val") == {"source": "medmnist", "path": "a.npz", "split": "val"}
    assert parse_spec("Folder:/some/dir,crop=off,x=0.5,y=1e-3,z=abc,w=none") == {
        "source": "folder", "path": "/some/dir", "crop": False, "x": 0.5, "y": 1e-3, "z": "abc", "w": None}
    assert parse_spec("dicom:C:/data/x,") == {"source": "dicom", "path": "C:/data/x"}
    assert parse_spec("folder:path=/d") == {"source": "folder", "path": "/d"}
    for bad, msg in [("", "non-empty"), (":x", "no source"), ("phantoms,n", "expected key=value"),
                     ("phantoms:n=1,n=2", "given twice")]:
        with pytest.raises(UserError, match=msg):
            parse_spec(bad)


def test_load_dataset_overrides_and_default():
    ds = load_dataset("phantoms:n=12,size=32", size=16, seed=None)
    assert isinstance(ds, ImageDataset) and ds.size == 16 and len(ds) == 12 and ds.seed == 0
    assert load_dataset({"source": "phantoms", "n": 4}).describe()["size"] == 64
    assert len(load_dataset("phantoms")) == 512


def test_load_dataset_user_errors_are_one_line(tmp_path):
    cases = [
        ("phantom", "unknown data source 'phantom'; did you mean 'phantoms'"),
        ("xyz:/a", "unknown data source 'xyz'"),
        ("phantoms:sise=32", "unknown option 'sise' for data source 'phantoms'; did you mean 'size'"),
        (f"kaggle:{tmp_path},splt=val", "did you mean 'split'"),
        ("phantoms:/some/where", "takes no path"),
        ("kaggle", "needs a path"),
        (f"kaggle:{tmp_path / 'nope'}", f"path does not exist: {tmp_path / 'nope'}"),
        (f"medmnist:{tmp_path / 'nope.npz'}", "file not found"),
        (f"folder:{tmp_path}", "no images"),
        (f"dicom:{tmp_path / 'nope'}", "path does not exist"),
        (f"kaggle:{tmp_path},size=big", "size must be an integer"),
        (f"folder:{tmp_path},crop=2", "crop must be true or false"),
        ({"path": "x"}, "names no source"),
    ]
    for spec, msg in cases:
        with pytest.raises(UserError) as e:
            load_dataset(spec)
        assert msg in str(e.value), (spec, str(e.value))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="did you mean 'crop'"):
        load_dataset("folder:/x", corp=True)


# ------------------------------------------------------------------------------------------ splits


def test_split_by_patient_disjoint_and_deterministic(tmp_path):
    ds = PhantomDataset(n=101, size=16, images_per_patient=3)
    a, b = split_by_patient(ds, 0.3, seed=1)
    assert sorted(a + b) == list(range(101))
    assert not {ds.patient_ids[i] for i in a} & {ds.patient_ids[i] for i in b}
    assert 27 <= len(a) <= 30
    assert (a, b) == split_by_patient(ds, 0.3, seed=1) and (a, b) != split_by_patient(ds, 0.3, seed=2)
    assert split_by_patient(ds, 0.0, 0) == ([], list(range(101)))
    assert split_by_patient(ds, 1.0, 0) == (list(range(101)), [])
    kg = ChestXrayDataset(_kaggle_tree(tmp_path / "cx", splits=("train",)), size=8)
    a, b = split_by_patient(kg, 0.5, seed=0)
    assert not {kg.patient_ids[i] for i in a} & {kg.patient_ids[i] for i in b}
    with pytest.raises(UserError, match="fraction"):
        split_by_patient(ds, 1.5)


# ------------------------------------------------------------------------------------------ real data


def test_real_kaggle_train_listing():
    root = require_shared("chest_xray")
    ds = load_dataset(f"kaggle:{root},split=train")
    d = ds.describe()
    assert d["counts"] == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert all(match_patient_id(p.name) is not None for p in ds.paths) and d["patient_id_fallbacks"] == 0
    assert ds.load([0, len(ds) - 1]).shape == (2, 1, 64, 64)
    # the top of the shared folder also finds (exactly) this tree
    assert load_dataset(f"kaggle:{root.parent},split=val").tree == root


def test_real_kaggle_val_full_resolution():
    root = require_shared("chest_xray")
    for crop in (False, True):
        ds = load_dataset(f"kaggle:{root},split=val,size=64,crop={crop}")
        assert len(ds) == 16 and ds.describe()["patient_id_fallbacks"] == 0
        x = ds.load(range(len(ds)))
        assert x.shape == (16, 1, 64, 64) and float(x.min()) >= 0 and float(x.max()) <= 1
        assert float(x.std()) > 0.1


def test_real_pneumoniamnist():
    path = require_shared("pneumoniamnist.npz")
    sizes = {s: len(load_dataset(f"medmnist:{path},split={s}")) for s in ("train", "val", "test")}
    assert sizes == {"train": 3882, "val": 524, "test": 624}
    x = load_dataset(f"medmnist:{path},split=val", size=64).load([0])
    assert x.shape == (1, 1, 64, 64)

