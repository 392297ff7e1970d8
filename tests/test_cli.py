"""The real ``gradleak`` command, run as a subprocess."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def gradleak(*args, cwd=None, check=True, umask=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "gradleak.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=600, preexec_fn=None if umask is None else lambda: os.umask(umask))
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def assert_user_error(p, *fragments):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradleak: error:"), p.stderr
    assert "Traceback" not in p.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_capture_attack_metrics_end_to_end(tmp_path):
    obs = tmp_path / "cap" / "obs.pt"
    gradleak("capture", "--data", "phantoms", "--size", 32, "--batch-size", 2, "--arch", "lenet_zhu",
             "--seed", 3, "--out", obs)
    truth = tmp_path / "cap" / "truth.npz"
    assert obs.is_file() and truth.is_file()
    out = tmp_path / "attack"
    p = gradleak("attack", "--observation", obs, "--attack", "ig", "--out", out, "--truth", truth,
                 "--iterations", 20, "--restarts", 2, "--quiet")
    assert "PSNR" in p.stdout
    rec = np.load(out / "reconstruction.npz")
    assert rec["images"].shape == (2, 1, 32, 32) and rec["images"].dtype == np.float32
    assert 0 <= rec["images"].min() and rec["images"].max() <= 1
    assert (out / "reconstruction.png").stat().st_size > 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"psnr", "ssim", "per_image", "metric_variants", "threat_model", "label_accuracy"} <= set(m)
    assert m["threat_model"]["labels_known"] is False
    assert len(m["per_image"]) == 2
    # the blind baseline from the observation's own data set (attacked patients excluded), its gain, the budget
    assert m["baseline"]["auxiliary_data"]["data"] == "phantoms" and m["baseline"]["auxiliary_data"]["excluded_patients"]
    assert m["gain_over_baseline"]["ssim"] == pytest.approx(m["ssim"] - m["baseline"]["ssim"])
    assert m["budget"]["iterations"] == 20 and m["budget"]["restarts"] == 2 and "converged" in m
    # patient re-identification, leave-the-image-out, with the chance level
    assert m["reid"]["leave_the_image_out"] and m["reid"]["strongest"]["n"] == 2
    assert 0 < m["reid"]["chance_top1"] < m["reid"]["chance_top5"] < 1
    assert "blind baseline" in p.stdout and (out / "baseline.npz").is_file()
    # a bad reference data set is refused in one line, before any work
    assert_user_error(gradleak("attack", "--observation", obs, "--out", tmp_path / "x", "--truth", truth,
                               "--iterations", 1, "--reference-data", "phantom:n=8", check=False),
                      "--reference-data", "did you mean 'phantoms'")
    assert not (tmp_path / "x").exists()
    # inspect reads the same file
    assert "lenet_zhu" in gradleak("inspect", obs).stdout


def test_attack_without_truth_writes_no_metrics(tmp_path):
    obs = tmp_path / "obs.pt"
    gradleak("capture", "--size", 16, "--arch", "lenet_zhu", "--labels-known", "--out", obs)
    out = tmp_path / "a"
    gradleak("attack", "--observation", obs, "--out", out, "--iterations", 3, "--quiet")
    assert (out / "reconstruction.npz").is_file() and not (out / "metrics.json").exists()


def test_run_writes_an_experiment_folder(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
name: tiny
output_dir: {tmp_path / 'experiments'}
data: {{source: phantoms, size: 16, n: 16}}
capture: {{arch: lenet_zhu, batch_size: 2}}
attack: {{name: ig, settings: {{iterations: 5, restarts: 1}}}}
""")
    p = gradleak("run", cfg, "--quiet")
    folders = list((tmp_path / "experiments").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("tiny-")
    names = {f.name for f in folders[0].iterdir()}
    assert {"config.yaml", "metrics.json", "reconstruction.png", "reconstruction.npz", "log.txt",
            "observation.pt", "truth.npz"} <= names
    assert str(folders[0]) in p.stdout


def test_user_errors_are_one_line_exit_2_and_leave_nothing(tmp_path):
    assert_user_error(gradleak("attack", "--observation", tmp_path / "nope.pt", "--out", tmp_path / "o",
                               check=False), "not found")
    assert not (tmp_path / "o").exists()
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    assert_user_error(gradleak("attack", "--observation", junk, "--out", tmp_path / "o", check=False),
                      "junk.pt")
    assert not (tmp_path / "o").exists()
    obs = tmp_path / "obs.pt"
    gradleak("capture", "--size", 16, "--arch", "lenet_zhu", "--out", obs)
    assert_user_error(gradleak("attack", "--observation", obs, "--attack", "dgl", "--out", tmp_path / "o",
                               check=False), "unknown attack")
    assert_user_error(gradleak("attack", "--observation", obs, "--set", "tv_wieght=1", "--out",
                               tmp_path / "o", check=False), "tv_weight")
    assert not (tmp_path / "o").exists()
    assert_user_error(gradleak("capture", "--data", "kaggle:/does/not/exist", "--out", tmp_path / "x.pt",
                               check=False), "/does/not/exist")
    assert_user_error(gradleak("capture", "--arch", "lenet6", "--out", tmp_path / "x.pt", check=False),
                      "lenet5")
    assert not (tmp_path / "x.pt").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("captur: {}\n")
    assert_user_error(gradleak("run", bad, check=False), "captur", "capture")
    wrong_truth = tmp_path / "t.npz"
    np.savez(wrong_truth, images=np.zeros((3, 1, 8, 8), np.float32), labels=np.zeros(3, np.int64))
    assert_user_error(gradleak("attack", "--observation", obs, "--truth", wrong_truth, "--out",
                               tmp_path / "o", check=False), "t.npz")
    assert not (tmp_path / "o").exists()


def test_demo_runs_quickly_when_asked(tmp_path):
    p = gradleak("demo", "--out", tmp_path, "--iterations", 3, "--quiet")
    assert "PSNR" in p.stdout and "SSIM" in p.stdout and "threat model" in p.stdout
    folders = [f for f in tmp_path.glob("demo-*") if f.is_dir()]
    assert len(folders) == 1
    demo = folders[0]
    assert (tmp_path / f"{demo.name}.prior.safetensors").is_file()  # ROG's post-processing prior
    assert (demo / "sweep.yaml").is_file() and (demo / "report.html").is_file()
    assert f"report: {demo / 'report.html'}" in p.stdout
    rows = [json.loads(line) for line in (demo / "results.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and all(r["status"] == "ok" for r in rows)
    assert len(list(demo.glob("cells/*/reconstruction.png"))) == len(rows)
    # the spec it wrote resumes the same sweep: nothing left to run
    again = gradleak("sweep", demo / "sweep.yaml", "--out", demo, "--quiet", "--no-report")
    assert f"{len(rows)} already done, 0 run" in again.stdout


@pytest.mark.parametrize("umask, file_mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, file_mode):
    """Files get 0o666 and folders 0o777 less the umask, as open() and mkdir() give them, so that colleagues
    and web servers can read results where the umask allows it."""
    obs = tmp_path / "cap" / "obs.pt"
    gradleak("capture", "--size", 16, "--arch", "lenet_zhu", "--out", obs, umask=umask)
    gradleak("attack", "--observation", obs, "--truth", tmp_path / "cap" / "truth.npz", "--attack", "ig",
             "--iterations", 1, "--restarts", 1, "--out", tmp_path / "a", "--quiet", umask=umask)
    gradleak("report", tmp_path / "a", umask=umask)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"obs.pt", "truth.npz", "reconstruction.npz", "metrics.json", "report.html"} <= {p.name for p in written}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: oct(file_mode) for p in written}
    for d in (tmp_path / "cap", tmp_path / "a"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask
