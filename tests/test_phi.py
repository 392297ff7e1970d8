"""No patient identifier leaves: DICOM files whose tags and file names carry planted identifiers go through
the real command line (capture, attack --truth, run, prior train, sweep, report), and every byte of every
file written (inside zips, npz, torch files, PNG chunks and base64 pictures too, in UTF-8, -16 and -32) is
searched for them. The pseudonym key must not appear either."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from gradleak.data.pseudonym import ENV_KEY, PATTERN, as_pseudonym, name_pseudonym, patient_pseudonym
from gradleak.errors import UserError
from test_data import _dicom, _jpeg

pytest.importorskip("pydicom")

# (PatientID, PatientName, class folder); every patient has two images
PATIENTS = [("PHI-7731", "DOE^JANE", "NORMAL"), ("PHI-5520", "ROE^RICHARD", "NORMAL"),
            ("PHI-3308", "POE^EDGAR", "PNEUMONIA"), ("PHI-9046", "LOE^ANNABEL", "PNEUMONIA")]
ACCESSION = "ACC-PHI-8812"
STUDY = "CHEST PA SECRETSTUDY"


def _planted() -> list[str]:
    out = [ACCESSION, STUDY, "SECRETSTUDY", os.environ[ENV_KEY]]
    for pid, name, _ in PATIENTS:
        out += [pid, name, name.replace("^", " "), f"{name}_{pid}"]
    return out


def _dicom_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for k, (pid, name, cls) in enumerate(PATIENTS):
        for j in range(2):
            pixels = (rng.random((24, 24)) * 3000 + k * 500).astype(np.uint16)
            _dicom(root / cls / f"{name}_{pid}_{j}.dcm", pixels, patient=pid, PatientName=name,
                   AccessionNumber=f"{ACCESSION}{k}{j}", StudyDescription=f"{STUDY} {name} {pid}")
    return root


def _gradleak(*args, cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "gradleak.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=600)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p


def _png_parts(blob: bytes):
    """The chunks of a PNG, its decompressed image data and its decompressed text chunks."""
    pos, idat = 8, b""
    while pos + 8 <= len(blob):
        n, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        data = blob[pos + 8:pos + 8 + n]
        pos += 12 + n
        yield kind + data
        if kind == b"IDAT":
            idat += data
        elif kind in (b"zTXt", b"iTXt"):
            for i in (m.start() for m in re.finditer(b"\x78", data)):
                try:
                    yield zlib.decompress(data[i:])
                except zlib.error:
                    continue
    if idat:
        yield zlib.decompress(idat)


def _expansions(blob: bytes, depth: int = 0):
    """``blob`` and everything packed inside it: zip members (npz, torch files), PNG chunks, base64 data."""
    yield blob
    if depth > 4:
        return
    if blob[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for member in z.infolist():
                yield member.filename.encode()
                yield from _expansions(z.read(member), depth + 1)
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        for part in _png_parts(blob):
            yield from _expansions(part, depth + 1)
    for m in re.finditer(rb"base64,([A-Za-z0-9+/=]{16,})", blob):
        yield from _expansions(base64.b64decode(m.group(1)), depth + 1)


def _leaks(folder: Path, planted: list[str]) -> list[str]:
    needles = [(p, p.lower().encode(enc)) for p in planted for enc in ("utf-8", "utf-16-le", "utf-32-le")]
    found = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        found += [f"{p} in the name {rel}" for p in planted if p.lower() in rel.lower()]
        if not f.is_file():
            continue
        for part in _expansions(f.read_bytes()):
            low = part.lower()
            found += [f"{p} in {rel}" for p, needle in needles if needle in low]
    return sorted(set(found))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Every command that writes, run once on the planted DICOM folder; returns the output folder."""
    base = tmp_path_factory.mktemp("pseudo")
    root = _dicom_tree(base / "dicom")
    out = base / "out"
    out.mkdir()
    data = f"dicom:{root},size=16"
    _gradleak("capture", "--data", data, "--batch-size", 2, "--arch", "lenet_zhu", "--seed", 1,
              "--out", out / "cap" / "obs.pt", cwd=base)
    _gradleak("attack", "--observation", out / "cap" / "obs.pt", "--truth", out / "cap" / "truth.npz",
              "--attack", "ig", "--iterations", 3, "--restarts", 1, "--out", out / "attack", "--quiet", cwd=base)
    _gradleak("report", out / "attack", cwd=base)
    cfg = base / "exp.yaml"
    cfg.write_text(json.dumps({
        "name": "phi", "output_dir": str(out / "runs"), "data": {"source": "dicom", "path": str(root), "size": 16},
        "capture": {"arch": "lenet_zhu", "batch_size": 2},
        "attack": {"name": "ig", "settings": {"iterations": 3, "restarts": 1}}}))
    _gradleak("run", cfg, "--quiet", cwd=base)
    (run,) = (out / "runs").iterdir()
    _gradleak("report", run, "--out", out / "run-report.html", cwd=base)
    _gradleak("prior", "train", "--data", data, "--size", 16, "--steps", 2, "--batch-size", 2, "--crop", 0,
              "--width", 4, "--exclude-from", out / "cap" / "truth.npz", "--exclude-patients", "PHI-9046",
              "--out", out / "prior.safetensors", "--quiet", cwd=base)
    sweep = base / "sweep.yaml"
    sweep.write_text(json.dumps({
        "name": "phi-sweep", "base": {"data": {"source": "dicom", "path": str(root), "size": 16},
                                      "capture": {"arch": "lenet_zhu", "batch_size": 2},
                                      "attack": {"name": "ig", "settings": {"iterations": 3, "restarts": 1}}},
        "grid": {"seed": [2]}, "reid": {"autoencoder_steps": 5}}))
    _gradleak("sweep", sweep, "--out", out / "sweep", "--workers", 1, "--quiet", cwd=base)
    return out


def test_no_planted_identifier_in_any_output(outputs):
    files = [f for f in outputs.rglob("*") if f.is_file()]
    kinds = {f.suffix for f in files}
    assert {".pt", ".npz", ".json", ".jsonl", ".png", ".html", ".safetensors"} <= kinds, kinds
    assert _leaks(outputs, _planted()) == []


def test_the_search_finds_what_it_looks_for(tmp_path):
    """The search itself: an identifier hidden in a compressed npz, a PNG text chunk and a base64 picture is
    found (so the empty result above means something)."""
    from PIL import Image, PngImagePlugin

    np.savez_compressed(tmp_path / "t.npz", patient_ids=np.array(["PHI-7731"]))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "DOE^JANE", zip=True)
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG", pnginfo=info)
    (tmp_path / "i.png").write_bytes(buf.getvalue())
    (tmp_path / "r.html").write_text(f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>")
    assert _leaks(tmp_path, ["PHI-7731", "DOE^JANE"]) == ["DOE^JANE in i.png", "DOE^JANE in r.html",
                                                           "PHI-7731 in t.npz"]


def test_outputs_carry_the_same_pseudonyms_everywhere(outputs):
    truth = np.load(outputs / "cap" / "truth.npz")
    pids = [str(p) for p in truth["patient_ids"]]
    known = {patient_pseudonym(pid): pid for pid, _, _ in PATIENTS}
    assert pids and all(PATTERN.match(p) and p in known for p in pids)
    assert all(str(n).startswith("im-") and str(n).endswith(".dcm") for n in truth["names"])
    metrics = json.loads((outputs / "attack" / "metrics.json").read_text())
    assert sorted(p["patient_id"] for p in metrics["per_image"]) == sorted(pids)
    header = json.loads(subprocess.run([sys.executable, "-m", "gradleak.cli", "prior", "inspect",
                                        outputs / "prior.safetensors"], capture_output=True, text=True,
                                       check=True).stdout)
    excluded = set(header["training"]["excluded_patients"])
    assert set(pids) | {patient_pseudonym("PHI-9046")} <= excluded  # raw ids given are matched as pseudonyms


# ------------------------------------------------------------------------------------------ the key


def test_pseudonyms_are_keyed_stable_and_recognisable(monkeypatch):
    a = patient_pseudonym("person1234")
    assert PATTERN.match(a) and a == patient_pseudonym("person1234") != patient_pseudonym("person1235")
    assert name_pseudonym("DOE^JANE/scan 1.DCM").endswith(".dcm") and "DOE" not in name_pseudonym("DOE^JANE.dcm")
    assert as_pseudonym(a) == a and as_pseudonym(" person1234 ") == a and as_pseudonym("phantom3") == "phantom3"
    monkeypatch.setenv(ENV_KEY, "another key of the right length")
    assert patient_pseudonym("person1234") != a  # another key, other pseudonyms
    monkeypatch.setenv(ENV_KEY, "short")
    with pytest.raises(UserError, match=f"{ENV_KEY} must hold at least 16 characters"):
        patient_pseudonym("x")


def test_pseudonym_key_file_is_made_once_private_and_stable(tmp_path):
    """Without the variable, a key file in XDG_CONFIG_HOME (never the real home) is created with mode 0600 and
    gives the same pseudonyms in every later process; the key itself appears in no pseudonym."""
    env = {k: v for k, v in os.environ.items() if k != ENV_KEY}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "cfg"), HOME=str(tmp_path / "home"))
    code = "from gradleak.data.pseudonym import patient_pseudonym as p; print(p('person7'))"
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    key = tmp_path / "cfg" / "gradleak" / "pseudonym.key"
    assert runs[0].stdout == runs[1].stdout and PATTERN.match(runs[0].stdout.strip())
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and not (tmp_path / "home").exists()
    assert len(key.read_text().strip()) == 64 and key.read_text().strip() not in runs[0].stdout
    key.write_text("x")  # a damaged key file is one line, not a silent new key
    _jpeg(tmp_path / "imgs" / "a.png", fmt="PNG")
    bad = subprocess.run([sys.executable, "-m", "gradleak.cli", "capture", "--data", f"folder:{tmp_path / 'imgs'}",
                          "--out", tmp_path / "o.pt"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "pseudonym key" in bad.stderr and "Traceback" not in bad.stderr
