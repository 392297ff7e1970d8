"""Hostile and careless input, for every subcommand: the real ``gradleak`` command, run as a subprocess,
refuses each case with exit code 2 and exactly one line on stderr (no traceback) that names the problem,
and leaves nothing new where it would have written.

One small valid observation, truth file, attack folder, prior and set of configs (16 px phantoms) are
made once per module with the real command line; the bad inputs are made from them. The selected cases
run two at a time, each in a folder of its own that is also its output location.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from test_data import _png_header_only

GRADLEAK = [sys.executable, "-m", "gradleak.cli"]
CASE_TIMEOUT = 180
SHORT_TIMEOUT = {"run-empty-config": 30}  # runs the default experiment until its config is refused

# (id, command line, a fragment the one error line must hold (case-insensitive)). Placeholders: {obs}
# {truth} {other_truth} (another capture's truth) {attack} (an attack folder with metrics) {prior} {exp}
# {util} {sweep} (valid inputs); {bad} (the folder of bad inputs); {w} (the case's own folder, where it
# writes); {file} ({w}/afile, a regular file); {ro} (a folder nobody may write in).
CASES = [
    # ------------------------------------------------------------------------------------- global
    ("no-command", "", "command"),
    ("unknown-command", "captre", "captre"),
    ("unknown-option", "capture --out {w}/o.pt --sise 16", "--sise"),
    # ------------------------------------------------------------------------------------ capture
    ("capture-out-is-folder", "capture --size 16 --out {w}", "is a folder"),
    ("capture-out-below-file", "capture --size 16 --out {file}/obs.pt", "afile is a file"),
    ("capture-out-unwritable", "capture --size 16 --out {ro}/obs.pt", "not writable"),
    ("capture-truth-below-file", "capture --size 16 --out {w}/obs.pt --truth {file}/truth.npz", "--truth"),
    ("capture-truth-is-out", "capture --size 16 --out {w}/o.pt --truth {w}/o.pt", "same file"),
    ("capture-size-zero", "capture --size 0 --out {w}/o.pt", "--size"),
    ("capture-size-huge", "capture --size 100000 --out {w}/o.pt", "size"),
    ("capture-batch-zero", "capture --batch-size 0 --out {w}/o.pt", "--batch-size"),
    ("capture-batch-too-big", "capture --data phantoms:n=8 --size 16 --batch-size 50 --out {w}/o.pt", "50"),
    ("capture-indices-text", "capture --indices 1,x --out {w}/o.pt", "--indices"),
    ("capture-indices-negative", "capture --data phantoms:n=8 --size 16 --indices=-1 --out {w}/o.pt", "-1"),
    ("capture-indices-beyond", "capture --data phantoms:n=8 --size 16 --indices 999 --out {w}/o.pt", "999"),
    ("capture-unknown-arch", "capture --size 16 --arch lenet6 --out {w}/o.pt", "lenet6"),
    ("capture-classes-zero", "capture --num-classes 0 --out {w}/o.pt", "--num-classes"),
    ("capture-seed-negative", "capture --seed=-1 --out {w}/o.pt", "--seed"),
    ("capture-seed-text", "capture --seed abc --out {w}/o.pt", "--seed"),
    ("capture-local-lr-nan", "capture --algorithm fedavg --local-lr nan --out {w}/o.pt", "--local-lr"),
    ("capture-clip-negative", "capture --per-example-clip=-1 --out {w}/o.pt", "--per-example-clip"),
    ("capture-clients-uneven", "capture --data phantoms:n=8 --size 16 --num-clients-averaged 2 --indices 0,1,2 "
     "--out {w}/o.pt", "3 images"),
    ("capture-data-missing-folder", "capture --data kaggle:{w}/nothing --out {w}/o.pt", "nothing"),
    ("capture-data-empty-spec", "capture --data= --out {w}/o.pt", "data spec"),
    ("capture-data-unknown-source", "capture --data kagle:{w} --out {w}/o.pt", "kaggle"),
    ("capture-data-unknown-option", "capture --data phantoms:bogus=1 --out {w}/o.pt", "bogus"),
    ("capture-data-zero-images", "capture --data phantoms:n=0 --out {w}/o.pt", "n"),
    ("capture-data-negative-images", "capture --data phantoms:n=-5 --out {w}/o.pt", "-5"),
    ("capture-npz-empty-file", "capture --data medmnist:{bad}/empty.npz --out {w}/o.pt", "empty.npz"),
    ("capture-npz-junk", "capture --data medmnist:{bad}/junk.npz --out {w}/o.pt", "junk.npz"),
    ("capture-npz-fractional-labels", "capture --data medmnist:{bad}/med_fraction.npz --out {w}/o.pt", "1.5"),
    ("capture-npz-negative-labels", "capture --data medmnist:{bad}/med_negative.npz --out {w}/o.pt", "negative"),
    ("capture-npz-text-labels", "capture --data medmnist:{bad}/med_textlabels.npz --out {w}/o.pt", "labels"),
    ("capture-npz-text-images", "capture --data medmnist:{bad}/med_textimages.npz --out {w}/o.pt", "pixels"),
    ("capture-npz-nan-images", "capture --data medmnist:{bad}/med_nan.npz --out {w}/o.pt", "nan"),
    ("capture-npz-bomb", "capture --data medmnist:{bad}/med_bomb.npz --out {w}/o.pt", "15000 x 15000"),
    ("capture-label-beyond-classes", "capture --data medmnist:{bad}/med_label3.npz --size 16 --indices 1 "
     "--out {w}/o.pt", "label 3"),
    ("capture-png-bomb", "capture --data folder:{bad}/bomb --size 16 --batch-size 1 --out {w}/o.pt", "big.png"),
    ("capture-folder-no-images", "capture --data folder:{bad}/noimages --out {w}/o.pt", "no images"),
    ("capture-folder-is-file", "capture --data folder:{bad}/empty.txt --out {w}/o.pt", "expected a folder"),
    ("capture-dicom-broken", "capture --data dicom:{bad}/brokendicom --out {w}/o.pt", "broken.dcm"),
    ("capture-unknown-obfuscation", "capture --obfuscation nosuch --out {w}/o.pt", "nosuch"),
    ("capture-obfuscation-bad-value", "capture --obfuscation qsgd:levels=abc --out {w}/o.pt", "levels"),
    ("capture-obfuscation-zero-keep", "capture --obfuscation topk:keep=0 --out {w}/o.pt", "keep"),
    ("capture-obfuscation-nan-noise", "capture --obfuscation gaussian:clip=1,noise_multiplier=nan "
     "--out {w}/o.pt", "noise_multiplier"),
    ("capture-model-state-junk", "capture --model-state {bad}/junk.pt --out {w}/o.pt", "junk.pt"),
    ("capture-model-state-folder", "capture --model-state {bad} --out {w}/o.pt", "bad"),
    # ---------------------------------------------------------------------------------- obfuscate
    ("obfuscate-missing", "obfuscate --observation {w}/missing.pt --spec sign --out {w}/o.pt", "missing.pt"),
    ("obfuscate-folder", "obfuscate --observation {bad} --spec sign --out {w}/o.pt", "bad"),
    ("obfuscate-empty-file", "obfuscate --observation {bad}/empty.pt --spec sign --out {w}/o.pt", "empty.pt"),
    ("obfuscate-truth-as-observation", "obfuscate --observation {truth} --spec sign --out {w}/o.pt", "truth.npz"),
    ("obfuscate-unknown-spec", "obfuscate --observation {obs} --spec nosuch --out {w}/o.pt", "nosuch"),
    ("obfuscate-zero-levels", "obfuscate --observation {obs} --spec qsgd:levels=0 --out {w}/o.pt", "levels"),
    ("obfuscate-out-is-folder", "obfuscate --observation {obs} --spec sign --out {w}", "is a folder"),
    ("obfuscate-out-below-file", "obfuscate --observation {obs} --spec sign --out {file}/o.pt", "afile"),
    # ------------------------------------------------------------------------------------- attack
    ("attack-out-is-file", "attack --observation {obs} --iterations 1 --out {file}", "is a file"),
    ("attack-out-below-file", "attack --observation {obs} --iterations 1 --out {file}/sub", "afile is a file"),
    ("attack-out-unwritable", "attack --observation {obs} --iterations 1 --out {ro}/a", "not writable"),
    ("attack-device-tpu", "attack --observation {obs} --device tpu7 --out {w}/a", "tpu7"),
    ("attack-device-cuda-absent", "attack --observation {obs} --device cuda --out {w}/a", "cuda"),
    ("attack-device-cuda-99", "attack --observation {obs} --device cuda:99 --out {w}/a", "cuda"),
    ("attack-iterations-zero", "attack --observation {obs} --iterations 0 --out {w}/a", "--iterations"),
    ("attack-iterations-negative", "attack --observation {obs} --iterations=-5 --out {w}/a", "--iterations"),
    ("attack-time-nan", "attack --observation {obs} --time-budget nan --out {w}/a", "--time-budget"),
    ("attack-time-inf", "attack --observation {obs} --time-budget inf --out {w}/a", "--time-budget"),
    ("attack-restarts-zero", "attack --observation {obs} --restarts 0 --out {w}/a", "--restarts"),
    ("attack-unknown-attack", "attack --observation {obs} --attack dgl --out {w}/a", "dgl"),
    ("attack-unknown-setting", "attack --observation {obs} --set tv_wieght=1 --out {w}/a", "tv_wieght"),
    ("attack-setting-without-value", "attack --observation {obs} --set restarts --out {w}/a", "restarts"),
    ("attack-setting-text-restarts", "attack --observation {obs} --set restarts=abc --out {w}/a", "restarts"),
    ("attack-missing-observation", "attack --observation {w}/nope.pt --out {w}/a", "nope.pt"),
    ("attack-text-observation", "attack --observation {bad}/text.pt --out {w}/a", "text.pt"),
    ("attack-obfuscation-not-records", "attack --observation {bad}/obs_notrecords.pt --iterations 1 --out {w}/a",
     "obfuscation"),
    ("attack-unknown-obfuscation-record", "attack --observation {bad}/obs_unknown.pt --iterations 1 "
     "--out {w}/a", "bogus"),
    ("attack-huge-image-size", "attack --observation {bad}/obs_huge.pt --iterations 1 --out {w}/a",
     "image_size"),
    ("attack-truth-missing", "attack --observation {obs} --truth {w}/t.npz --out {w}/a", "t.npz"),
    ("attack-truth-empty", "attack --observation {obs} --truth {bad}/empty.npz --out {w}/a", "empty.npz"),
    ("attack-truth-wrong-shape", "attack --observation {obs} --truth {bad}/truth_shape.npz --out {w}/a",
     "truth_shape.npz"),
    ("attack-truth-text-labels", "attack --observation {obs} --truth {bad}/truth_textlabels.npz --out {w}/a",
     "truth_textlabels.npz"),
    ("attack-truth-fractional-labels", "attack --observation {obs} --truth {bad}/truth_fraction.npz --iterations 1 "
     "--out {w}/a", "truth_fraction.npz"),
    ("attack-truth-nan-images", "attack --observation {obs} --truth {bad}/truth_nan.npz --iterations 1 "
     "--out {w}/a", "truth_nan.npz"),
    ("attack-truth-of-another-capture", "attack --observation {obs} --truth {other_truth} --iterations 1 "
     "--out {w}/a", "truth"),
    ("attack-prior-junk", "attack --observation {obs} --prior {bad}/junk.safetensors --out {w}/a", "junk"),
    ("attack-prior-folder", "attack --observation {obs} --prior {bad} --out {w}/a", "bad"),
    ("attack-reference-typo", "attack --observation {obs} --truth {truth} --reference-data phantom:n=8 "
     "--out {w}/a", "phantoms"),
    # --------------------------------------------------------------------------------------- prior
    ("prior-out-is-folder", "prior train --data phantoms:n=8 --size 16 --steps 1 --out {w}", "is a folder"),
    ("prior-out-below-file", "prior train --data phantoms:n=8 --steps 1 --out {file}/p.safetensors", "afile"),
    ("prior-steps-zero", "prior train --data phantoms:n=8 --steps 0 --out {w}/p.safetensors", "--steps"),
    ("prior-lr-negative", "prior train --data phantoms:n=8 --lr=-1 --out {w}/p.safetensors", "--lr"),
    ("prior-crop-negative", "prior train --data phantoms:n=8 --crop=-4 --out {w}/p.safetensors", "--crop"),
    ("prior-loss-unknown", "prior train --data phantoms:n=8 --loss l3 --out {w}/p.safetensors", "l3"),
    ("prior-exclude-from-missing", "prior train --data phantoms:n=8 --exclude-from {w}/ids.txt "
     "--out {w}/p.safetensors", "ids.txt"),
    ("prior-exclude-from-binary", "prior train --data phantoms:n=8 --exclude-from {bad}/binary.txt "
     "--out {w}/p.safetensors", "binary.txt"),
    ("prior-everyone-excluded", "prior train --data phantoms:n=8 --size 16 --exclude-patients phantom0,phantom1 "
     "--out {w}/p.safetensors", "exclu"),
    ("prior-degradation-unknown", "prior train --data phantoms:n=8 --degradation bogus=1 "
     "--out {w}/p.safetensors", "bogus"),
    ("prior-calibrate-for-auto", "prior train --data phantoms:n=8 --for-attack auto --calibrate-like {bad}/junk.pt "
     "--out {w}/p.safetensors", "--for-attack auto"),
    ("prior-calibrate-junk", "prior train --data phantoms:n=8 --calibrate-like {bad}/junk.pt "
     "--out {w}/p.safetensors", "junk.pt"),
    ("prior-inspect-missing", "prior inspect {w}/p.safetensors", "p.safetensors"),
    ("prior-inspect-folder", "prior inspect {bad}", "bad"),
    ("prior-inspect-empty", "prior inspect {bad}/empty.safetensors", "empty.safetensors"),
    ("prior-inspect-junk", "prior inspect {bad}/junk.safetensors", "junk.safetensors"),
    ("prior-inspect-observation", "prior inspect {obs}", "obs.pt"),
    # ------------------------------------------------------------------------------------- inspect
    ("inspect-missing", "inspect {w}/o.pt", "o.pt"),
    ("inspect-folder", "inspect {bad}", "bad"),
    ("inspect-empty", "inspect {bad}/empty.pt", "empty.pt"),
    ("inspect-truth", "inspect {truth}", "truth.npz"),
    ("inspect-junk", "inspect {bad}/junk.pt", "junk.pt"),
    # ----------------------------------------------------------------------------------------- run
    ("run-missing-config", "run {w}/exp.yaml", "exp.yaml"),
    ("run-config-folder", "run {bad}", "bad"),
    ("run-bad-yaml", "run {bad}/bad.yaml", "bad.yaml"),
    ("run-empty-config", "run {bad}/empty.yaml", "empty.yaml"),
    ("run-list-config", "run {bad}/list.yaml", "list.yaml"),
    ("run-binary-config", "run {bad}/binary.yaml", "binary.yaml"),
    ("run-unknown-key", "run {bad}/captur.yaml", "captur"),
    ("run-output-dir-is-file", "run {exp} --set output_dir={file}", "afile"),
    ("run-output-dir-below-file", "run {exp} --set output_dir={file}/runs", "afile"),
    ("run-device-tpu", "run {exp} --set attack.device=tpu7", "tpu7"),
    ("run-negative-size", "run {exp} --set data.size=-1", "size"),
    ("run-zero-batch", "run {exp} --set capture.batch_size=0", "batch_size"),
    ("run-set-without-value", "run {exp} --set name", "name"),
    ("run-unknown-set-key", "run {exp} --set captur.arch=lenet5", "captur"),
    # ------------------------------------------------------------------------------------- utility
    ("utility-missing-config", "utility {w}/u.yaml", "u.yaml"),
    ("utility-bad-yaml", "utility {bad}/bad.yaml", "bad.yaml"),
    ("utility-out-is-file", "utility {util} --out {file}", "afile"),
    ("utility-zero-rounds", "utility {util} --set federation.rounds=0 --out {w}/u", "rounds"),
    ("utility-holdout-above-one", "utility {util} --set holdout=1.5 --out {w}/u", "holdout"),
    ("utility-unknown-eval-data", "utility {util} --eval-data nosuch:x --out {w}/u", "nosuch"),
    ("utility-save-rounds-text", "utility {util} --save-rounds 1,x --out {w}/u", "--save-rounds"),
    # --------------------------------------------------------------------------------------- sweep
    ("sweep-missing-spec", "sweep {w}/s.yaml --out {w}/s", "s.yaml"),
    ("sweep-bad-yaml", "sweep {bad}/bad.yaml --out {w}/s", "bad.yaml"),
    ("sweep-out-is-file", "sweep {sweep} --out {file}", "afile"),
    ("sweep-out-below-file", "sweep {sweep} --out {file}/s", "afile"),
    ("sweep-workers-zero", "sweep {sweep} --workers 0 --out {w}/s", "--workers"),
    ("sweep-unknown-key", "sweep {bad}/sweep_unknown.yaml --out {w}/s", "gird"),
    ("sweep-huge-range", "sweep {bad}/sweep_huge.yaml --out {w}/s", "range"),
    ("sweep-missing-data", "sweep {bad}/sweep_nodata.yaml --out {w}/s", "nothing-here"),
    # -------------------------------------------------------------------------------------- report
    ("report-missing-folder", "report {w}/nothing", "nothing"),
    ("report-file-not-folder", "report {file}", "afile"),
    ("report-empty-folder", "report {bad}/emptydir", "emptydir"),
    ("report-damaged-results", "report {bad}/damaged_sweep --out {w}/r.html", "results.jsonl"),
    ("report-damaged-metrics", "report {bad}/damaged_experiment --out {w}/r.html", "metrics.json"),
    ("report-out-is-folder", "report {attack} --out {w}", "is a folder"),
    ("report-out-below-file", "report {attack} --out {file}/r.html", "afile"),
    # ---------------------------------------------------------------------------------------- demo
    ("demo-out-is-file", "demo --out {file}", "afile"),
    ("demo-out-below-file", "demo --out {file}/d", "afile"),
    ("demo-out-unwritable", "demo --out {ro}/d", "not writable"),
    ("demo-iterations-zero", "demo --iterations 0 --out {w}/d", "--iterations"),
]
IDS = [c[0] for c in CASES]
assert len(IDS) == len(set(IDS))


def _run(args, cwd: Path, timeout: float = CASE_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*GRADLEAK, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _ok(args, cwd: Path) -> None:
    p = _run(args, cwd, timeout=600)
    assert p.returncode == 0, (args, p.stdout, p.stderr)


def _can_create_in(folder: Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _unwritable(base: Path) -> Path | None:
    """A folder this process cannot create files in: a read-only folder, or (for root) a system one."""
    ro = base / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return next((c for c in (ro, Path("/sys"), Path("/proc/self")) if c.is_dir() and not _can_create_in(c)), None)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry below ``folder`` (hidden ones too), files with their size and modification time (a folder's
    own time changes when the writability check creates and removes its probe file)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[p.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns) if p.is_file() else (0, 0)
    return out


def _bad_observations(obs: Path, bad: Path) -> None:
    raw = torch.load(obs, weights_only=True)
    for name, change in (("obs_foreign", {"obfuscation": [{"name": "qsgd", "levels": 16}]}),
                         ("obs_unknown", {"obfuscation": [{"name": "bogus"}]}),
                         ("obs_notrecords", {"obfuscation": ["qsgd"]}),
                         ("obs_huge", {"model": {**raw["model"], "image_size": 100000}})):
        torch.save({**raw, **change}, bad / f"{name}.pt")


def _bad_truths(truth: Path, bad: Path) -> None:
    z = dict(np.load(truth))
    n = len(z["labels"])
    np.savez(bad / "truth_shape.npz", **{**z, "images": np.zeros((n + 1, 1, 8, 8), np.float32)})
    np.savez(bad / "truth_textlabels.npz", **{**z, "labels": np.array(["a"] * n)})
    np.savez(bad / "truth_fraction.npz", **{**z, "labels": np.arange(n) + 0.5})
    np.savez(bad / "truth_nan.npz", **{**z, "images": np.full_like(z["images"], np.nan)})


def _bad_data(bad: Path) -> None:
    images = np.zeros((4, 16, 16), np.uint8)
    for name, arrays in {
        "med_fraction": {"train_images": images, "train_labels": np.array([0, 1.5, 0, 1])},
        "med_negative": {"train_images": images, "train_labels": np.array([0, -1, 0, 1])},
        "med_textlabels": {"train_images": images, "train_labels": np.array(["a", "b", "a", "b"])},
        "med_textimages": {"train_images": np.full((4, 16, 16), "x"), "train_labels": np.zeros(4)},
        "med_nan": {"train_images": np.full((4, 16, 16), np.nan), "train_labels": np.zeros(4)},
        "med_label3": {"train_images": images, "train_labels": np.array([0, 3, 1, 0])},
    }.items():
        np.savez(bad / f"{name}.npz", **arrays)
    with zipfile.ZipFile(bad / "med_bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("train_images.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (1, 15000, 15000)})
        with z.open("train_labels.npy", "w") as f:
            np.save(f, np.zeros(1, np.uint8))
    _png_header_only(bad / "bomb" / "big.png", 15000, 15000)
    (bad / "noimages" / "cls").mkdir(parents=True)
    (bad / "brokendicom").mkdir()
    (bad / "brokendicom" / "broken.dcm").write_bytes(b"DICM? no")


def _bad_files(bad: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("empty.pt", "empty.npz", "empty.yaml", "empty.safetensors", "empty.txt"):
        (bad / name).write_bytes(b"")
    for name in ("junk.pt", "junk.npz", "junk.safetensors"):
        (bad / name).write_bytes(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
    (bad / "text.pt").write_text("hello")
    (bad / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (bad / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (bad / "bad.yaml").write_text("name: [unclosed\n")
    (bad / "list.yaml").write_text("- 1\n- 2\n")
    (bad / "captur.yaml").write_text("captur: {}\n")
    (bad / "emptydir").mkdir()
    (bad / "damaged_sweep").mkdir()
    (bad / "damaged_sweep" / "results.jsonl").write_text('{"cell": "c0", "status": "ok"\n{not json\n')
    (bad / "damaged_experiment").mkdir()
    (bad / "damaged_experiment" / "metrics.json").write_text("{]")


def _configs(root: Path, bad: Path) -> dict[str, Path]:
    base = {"data": {"source": "phantoms", "size": 16, "n": 16}, "capture": {"arch": "lenet_zhu", "batch_size": 2},
            "attack": {"name": "ig", "settings": {"iterations": 2, "restarts": 1}}}
    files = {"exp": root / "exp.yaml", "util": root / "util.yaml", "sweep": root / "sweep.yaml"}
    files["exp"].write_text(json.dumps({"name": "h", **base}))
    files["util"].write_text(json.dumps({
        "name": "u", "data": {"source": "phantoms", "n": 32, "size": 16}, "model": {"arch": "lenet_zhu"},
        "federation": {"num_clients": 2, "rounds": 1, "algorithm": "fedsgd"}}))
    files["sweep"].write_text(json.dumps({"name": "s", "base": base, "grid": {"seed": [0]}}))
    (bad / "sweep_unknown.yaml").write_text(json.dumps({"name": "s", "base": base, "gird": {"seed": [0]}}))
    (bad / "sweep_huge.yaml").write_text(json.dumps({"name": "s", "base": base,
                                                     "grid": {"seed": {"range": [0, 10 ** 12]}}}))
    nodata = {**base, "data": {"source": "kaggle", "path": str(root / "nothing-here"), "size": 16}}
    (bad / "sweep_nodata.yaml").write_text(json.dumps({"name": "s", "base": nodata, "grid": {"seed": [0]}}))
    return files


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """The valid inputs, made with the real command line, and the bad ones made from them."""
    root = tmp_path_factory.mktemp("hostile")
    bad = root / "bad"
    bad.mkdir()
    tiny = ["--data", "phantoms:n=16", "--size", 16, "--arch", "lenet_zhu", "--batch-size", 2]
    _ok(["capture", *tiny, "--out", root / "obs.pt"], root)
    _ok(["capture", *tiny, "--indices", "3,7", "--out", root / "other" / "obs.pt"], root)
    _ok(["attack", "--observation", root / "obs.pt", "--truth", root / "truth.npz", "--attack", "ig",
         "--iterations", 2, "--restarts", 1, "--out", root / "attack", "--quiet"], root)
    _ok(["prior", "train", "--data", "phantoms:n=8", "--size", 16, "--steps", 1, "--batch-size", 2, "--crop", 0,
         "--width", 4, "--out", root / "prior.safetensors", "--quiet"], root)
    _bad_observations(root / "obs.pt", bad)
    _bad_truths(root / "truth.npz", bad)
    _bad_data(bad)
    _bad_files(bad)
    return {"root": root, "bad": bad, "obs": root / "obs.pt", "truth": root / "truth.npz",
            "other_truth": root / "other" / "truth.npz", "attack": root / "attack",
            "prior": root / "prior.safetensors", **_configs(root, bad), "ro": _unwritable(root)}


def _argv(case: str, shared: dict[str, Path], w: Path) -> list[str]:
    template = dict((c[0], c[1]) for c in CASES)[case]
    values = {k: str(v) for k, v in shared.items()} | {"w": str(w), "file": str(w / "afile")}
    return [token.format(**values) for token in shlex.split(template)]


def _run_case(case: str, shared: dict[str, Path]) -> dict:
    w = shared["root"] / "cases" / case
    w.mkdir(parents=True)
    (w / "afile").write_text("a regular file\n")
    argv = _argv(case, shared, w)
    before = _snapshot(w)
    timeout = SHORT_TIMEOUT.get(case, CASE_TIMEOUT)
    try:
        p = _run(argv, w, timeout)
    except subprocess.TimeoutExpired:
        p = subprocess.CompletedProcess(argv, "timeout", "", f"still running after {timeout} s")
    outside = [a for a in argv if shared["ro"] is not None and a.startswith(str(shared["ro"]) + "/")]
    return {"p": p, "new": sorted(set(_snapshot(w).items()) ^ set(before.items())),
            "outside": [a for a in outside if os.path.lexists(a)]}


@pytest.fixture(scope="module")
def results(shared, request) -> dict[str, dict]:
    """The cases this session selected, run two at a time; the shared inputs must come out unchanged."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params]
    skip = {"attack-device-cuda-absent"} if torch.cuda.is_available() else set()
    skip |= {c[0] for c in CASES if "{ro}" in c[1]} if shared["ro"] is None else set()
    todo = [c for c in dict.fromkeys(selected) if c not in skip]
    keep = {k: v for k, v in shared.items() if k not in ("root", "ro")}
    before = {k: _snapshot(v) if v.is_dir() else v.stat().st_mtime_ns for k, v in keep.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        out = dict(zip(todo, pool.map(lambda c: _run_case(c, shared), todo)))
    after = {k: _snapshot(v) if v.is_dir() else v.stat().st_mtime_ns for k, v in keep.items()}
    out["__shared_changed__"] = [(k, sorted(set(before[k].items()) ^ set(after[k].items()))
                                  if isinstance(before[k], dict) else after[k]) for k in keep if before[k] != after[k]]
    return out


@pytest.mark.parametrize("case", IDS)
def test_refused_in_one_line_leaving_nothing(case, results):
    if case not in results:
        pytest.skip("needs CUDA to be absent" if "cuda" in case else "no unwritable folder on this machine")
    r, fragment = results[case], dict((c[0], c[2]) for c in CASES)[case]
    p = r["p"]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr
    assert len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("gradleak: error:") and fragment.lower() in lines[0].lower(), lines[0]
    assert r["new"] == [] and r["outside"] == [], (r["new"], r["outside"])


def test_corpus_covers_every_subcommand():
    from gradleak.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    commands = set(sub.choices) - {"prior"} | {"prior train", "prior inspect"}
    covered = {" ".join(shlex.split(c[1])[:2]) if c[1].startswith("prior") else c[1].split(" ")[0] for c in CASES}
    assert commands <= covered, commands - covered
    assert len(CASES) >= 60


def test_foreign_obfuscation_record_is_read(shared, tmp_path):
    """A record written by another tool (name and parameters only, no server-side extras) is read, not a crash."""
    p = _run(["attack", "--observation", shared["bad"] / "obs_foreign.pt", "--attack", "ig", "--iterations", 1,
              "--restarts", 1, "--out", tmp_path / "a", "--quiet"], tmp_path)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert (tmp_path / "a" / "reconstruction.npz").is_file()


def test_shared_inputs_unchanged(results):
    assert results["__shared_changed__"] == []
