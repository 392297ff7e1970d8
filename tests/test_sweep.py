"""Sweeps: grid expansion, resumption (also after SIGKILL), failures, exports, the Ray backend, the CLI,
and hostile input (huge grids, missing data, a killed sweep's workers)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SWEEP
from test_cli import assert_user_error, gradleak

from gradleak.errors import UserError
from gradleak.experiment.grid import MAX_CELLS, check_cells, count_cells, expand
from gradleak.experiment.labels import setting_label
from gradleak.experiment.spec import load_spec, normalize_obfuscation, spec_from_dict
from gradleak.experiment.store import ResultRow, ResultStore
from gradleak.experiment.sweep import run_sweep


def _rows(folder):
    return [json.loads(line) for line in (Path(folder) / "results.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- grid
def test_grid_expands_to_the_cartesian_product_with_unique_stable_ids():
    spec = spec_from_dict({
        "base": {"data": {"source": "phantoms", "size": 16}, "capture": {"arch": "lenet_zhu"}},
        "grid": {"capture.obfuscation": ["none", "qsgd:levels=16", [{"name": "topk", "keep": 0.1}, "qsgd:levels=4"]],
                 "attack.name": ["ig", "rog"],
                 "seed": {"range": [0, 3]},
                 "attack.settings.tv_weight": {"linspace": [0.0, 0.1, 2]}}})
    cells = expand(spec)
    assert len(cells) == 3 * 2 * 3 * 2
    assert len({c.id for c in cells}) == len(cells)
    assert [c.index for c in cells] == list(range(len(cells)))
    assert [c.id for c in expand(spec)] == [c.id for c in cells]  # stable
    first, last = cells[0], cells[-1]
    assert first.params == {"capture.obfuscation": [], "attack.name": "ig", "seed": 0,
                            "attack.settings.tv_weight": 0.0}
    assert last.config["capture"]["obfuscation"] == [{"name": "topk", "keep": 0.1}, {"name": "qsgd", "levels": 4}]
    assert last.config["seed"] == 2 and last.config["attack"]["settings"]["tv_weight"] == 0.1
    assert last.config["capture"]["arch"] == "lenet_zhu" and last.config["capture"]["batch_size"] == 4  # base, defaults
    assert setting_label(last.config) == "topk(keep=0.1) + qsgd(levels=4)"
    assert setting_label(first.config) == "none"
    assert spec_from_dict({"grid": {"seed": {"range": [3]}}})["grid"]["seed"] == [0, 1, 2]
    assert spec_from_dict({"grid": {"seed": 5}})["grid"]["seed"] == [5]
    assert spec_from_dict({"grid": {"data.n": {"logspace": [1, 2, 2]}}})["grid"]["data.n"] == [10.0, 100.0]


def test_example_spec_is_valid():
    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "sweep_phantoms.yaml")
    cells = expand(spec)
    check_cells(cells)
    assert len(cells) == 2 * 2 * 2


def test_obfuscation_values_normalise():
    assert normalize_obfuscation("none") == [] and normalize_obfuscation(None) == []
    assert normalize_obfuscation("gaussian:noise_multiplier=0.5,clip=1") == [
        {"name": "gaussian", "noise_multiplier": 0.5, "clip": 1}]
    assert normalize_obfuscation({"name": "sign"}) == [{"name": "sign"}]
    with pytest.raises(UserError, match="no 'name'"):
        normalize_obfuscation({"levels": 3})


@pytest.mark.parametrize("user,message", [
    ({"gird": {}}, "did you mean 'grid'"),
    ({"grid": {"capture.batchsize": [1]}}, "unknown grid key 'capture.batchsize' (did you mean 'capture.batch_size'?)"),
    ({"grid": {"seed": []}}, "has no values"),
    ({"grid": {"seed": [1, 1]}}, "twice"),
    ({"grid": {"seed": {"range": [0, "a"]}}}, "list of numbers"),
    ({"base": {"captur": {}}}, "did you mean 'base.capture'"),
    ({"grid": {"capture.batch_size": ["two"]}}, "'capture.batch_size' must be an integer"),
    ({"reid": {"distances": ["ssmi"]}}, "did you mean 'ssim'"),
])
def test_spec_errors_name_the_key(user, message):
    with pytest.raises(UserError) as e:
        expand(spec_from_dict(user, source="s.yaml"), source="s.yaml")
    assert message in str(e.value)


def test_unknown_names_fail_before_any_work():
    with pytest.raises(UserError, match=r"cell 1\b.*unknown obfuscation 'qsdg'"):
        check_cells(expand(spec_from_dict({"grid": {"capture.obfuscation": ["none", "qsdg:levels=4"]}})))
    with pytest.raises(UserError, match="unknown attack"):
        check_cells(expand(spec_from_dict({"grid": {"attack.name": ["ig", "igg"]}})))


def test_a_huge_grid_is_refused_before_it_is_built():
    with pytest.raises(UserError, match=r"grid 'seed': range \[0, 1000000000000\] would give 1e\+12 values"):
        spec_from_dict({"grid": {"seed": {"range": [0, 10 ** 12]}}}, source="s.yaml")
    with pytest.raises(UserError, match="linspace"):
        spec_from_dict({"grid": {"attack.settings.tv_weight": {"linspace": [0, 1, 10 ** 9]}}})
    # each entry is small, their product is not: counted, never expanded
    spec = spec_from_dict({"grid": {"seed": {"range": [1000]}, "capture.model_seed": {"range": [1000]}}})
    assert count_cells(spec) == 10 ** 6 > MAX_CELLS
    with pytest.raises(UserError, match=r"s.yaml: the grid holds 1,000,000 cells \(1000 seed x 1000 capture.model_seed\)"):
        expand(spec, source="s.yaml")
    with pytest.raises(UserError, match="step must not be 0"):
        spec_from_dict({"grid": {"seed": {"range": [0, 4, 0]}}})
    assert spec_from_dict({"grid": {"attack.settings.tv_weight": {"range": [0.5]}}})["grid"][
        "attack.settings.tv_weight"] == [0.0]


# ------------------------------------------------------------------------------------ running, resuming
def test_sweep_writes_rows_records_failures_and_exports(tiny_sweep):
    out, summary = tiny_sweep
    assert summary.cells == 4 and summary.ran == 4 and len(summary.failed) == 2
    rows = _rows(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and len({r["cell"] for r in rows}) == 4
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] == "failed"]
    assert len(ok) == 2 and len(bad) == 2
    assert all("larger than the data set" in r["error"] for r in bad)
    assert {r["setting"] for r in ok} == {"none", "fedavg(local_steps=2, local_lr=0.1)"}
    r = ok[0]
    for key in ("params", "metrics", "metric_variants", "threat_model", "reid", "bits", "epsilon", "timings",
                "versions", "config", "attack"):
        assert key in r, key
    assert r["metrics"]["num_images"] == 2 and 0 <= r["metrics"]["ms_ssim"] <= 1
    assert r["threat_model"]["labels_known"] is False and r["bits"] > 0
    assert r["timings"]["attack_s"] > 0 and r["versions"]["torch"]
    reid = r["reid"]
    assert set(reid["by_distance"]) == {"mse", "ssim", "embedding"}
    assert reid["gallery"]["images"] == 24 and reid["embedding"]["kind"] == "autoencoder"
    assert sorted(reid["by_distance"]["mse"]["true_image_rank"])[0] >= 1
    # patient re-identification with the attacked image left out; the image level kept apart
    assert reid["leave_the_image_out"] and 0 < reid["chance_top1"] <= reid["chance_top5"] <= 1
    assert reid["strongest"]["iip_n"] == 2 and reid["num_with_other_images"] == 2  # phantoms: 4 images a patient
    # every row carries its blind baseline, the gain over it and the attack's budget
    assert r["baseline"]["ssim"] > 0 and "mean of its auxiliary images" in r["baseline"]["variant"]
    assert r["gain_over_baseline"]["ssim"] == pytest.approx(r["metrics"]["ssim"] - r["baseline"]["ssim"])
    assert r["budget"]["iterations"] == 20 and r["budget"]["seconds"] > 0 and "converged" in r
    # each cell's files, renamed into place; no leftovers
    for row in rows:
        assert (out / "cells" / row["cell"] / "row.json").is_file()
        assert (out / "cells" / row["cell"] / "log.txt").is_file()
    assert (out / "cells" / ok[0]["cell"] / "reconstruction.png").is_file()
    assert not (out / "cells" / ok[0]["cell"] / "observation.pt").exists()  # not kept by default
    assert not [p for p in (out / "cells").iterdir() if p.name.startswith(".")]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"cell", "status", "metrics.psnr", "metrics.ssim", "reid.strongest.top1", "bits", "epsilon",
            "error", "params.capture.batch_size", "baseline.ssim", "gain_over_baseline.ssim_skill",
            "budget.iterations", "budget.converged", "reid.chance_top5"} <= set(header)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        assert not (out / "results.parquet").exists()
    else:
        t = pq.read_table(out / "results.parquet")
        assert t.num_rows == 4 and "metrics.psnr" in t.column_names


def test_every_row_round_trips_through_the_typed_row(tiny_sweep):
    out, _ = tiny_sweep
    lines = (out / "results.jsonl").read_text().splitlines()
    for line in lines:
        row = ResultRow.from_json(line, "results.jsonl")
        assert row.to_json() == line and row.as_dict() == json.loads(line)
        assert list(row.as_dict()) == list(json.loads(line))  # the file's key order
    stored = ResultStore(out).read()
    assert [r.as_dict() for r in stored.values()] == _rows(out)
    ok = next(r for r in stored.values() if r.status == "ok")
    assert ok.metrics["num_images"] == 2 and ok.reid["strongest"]["iip_n"] == 2
    failed = next(r for r in stored.values() if r.status == "failed")
    assert "metrics" not in failed.as_dict() and "larger than the data set" in failed.error
    cell = json.loads((out / "cells" / ok.cell / "row.json").read_text())
    assert cell == ok.as_dict()


def test_rerun_skips_done_cells_retries_failed_and_repairs_the_store(tiny_sweep, tmp_path):
    src, _ = tiny_sweep
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    before = {r["cell"]: r for r in _rows(out) if r["status"] == "ok"}
    lines = (out / "results.jsonl").read_text().splitlines()
    # a run killed between renaming a cell into place and appending its row, and a line cut short
    (out / "results.jsonl").write_text(lines[1] + "\n" + lines[0][:25])
    summary = run_sweep(spec_from_dict(TINY_SWEEP), out, workers=1, progress=False)
    assert summary.skipped == 2 and summary.ran == 2 and len(summary.failed) == 2
    rows = _rows(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    for cid, row in before.items():  # recovered, not rerun
        assert next(r for r in rows if r["cell"] == cid) == row
    # the sweep.yaml written into the folder is a spec that reruns the same sweep
    again = run_sweep(load_spec(out / "sweep.yaml"), out, progress=False)
    assert again.skipped == 2 and again.ran == 2
    # a different spec in the same folder is refused
    other = {**TINY_SWEEP, "grid": {"capture.batch_size": [1]}}
    with pytest.raises(UserError, match="different sweep"):
        run_sweep(spec_from_dict(other), out, progress=False)
    # a damaged store is refused with its line, and restored from the cells' row.json once moved away
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n{oops\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(UserError, match=r"results.jsonl line 2: not JSON .*move it away.*row.json"):
        run_sweep(spec_from_dict(TINY_SWEEP), out, progress=False)
    (out / "results.jsonl").unlink()
    restored = run_sweep(spec_from_dict(TINY_SWEEP), out, workers=1, progress=False)
    assert restored.skipped == 2 and [r["index"] for r in _rows(out)] == [0, 1, 2, 3]


def test_sigkill_and_rerun_completes_with_no_lost_or_duplicated_rows(tmp_path):
    spec = {**TINY_SWEEP, "grid": {"seed": [0, 1, 2, 3]},
            "base": {**TINY_SWEEP["base"], "capture": {"arch": "lenet_zhu", "batch_size": 1},
                     "attack": {"name": "ig", "settings": {"iterations": 30, "restarts": 1}}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gradleak.cli", "sweep", str(path), "--out", str(out), "--workers", "2",
           "--quiet", "--no-report"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    results = out / "results.jsonl"
    while time.time() < deadline and p.poll() is None:
        if results.is_file() and results.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the sweep ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done_before = {r["cell"]: r for r in _rows(out)}
    assert 1 <= len(done_before) < 4
    time.sleep(0.5)  # the orphaned worker dies with its parent
    q = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr
    rows = _rows(out)
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    assert len({r["cell"] for r in rows}) == 4 and all(r["status"] == "ok" for r in rows)
    for cid, row in done_before.items():
        assert next(r for r in rows if r["cell"] == cid) == row
    # cells renamed into place just before the kill count as done too (recovered from their row.json)
    skipped = int(re.search(r"(\d+) already done", q.stdout).group(1))
    assert len(done_before) <= skipped < 4
    assert not [x for x in (out / "cells").iterdir() if x.name.startswith(".")]


def test_ray_backend_end_to_end(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        spec = spec_from_dict({**TINY_SWEEP, "grid": {"seed": [0, 1]}})
        summary = run_sweep(spec, tmp_path / "ray", backend="ray", progress=False)
        assert summary.ran == 2 and not summary.failed
        rows = _rows(tmp_path / "ray")
        assert [r["status"] for r in rows] == ["ok", "ok"] and {r["backend"] for r in rows} == {"ray"}
        assert (tmp_path / "ray" / "cells" / rows[0]["cell"] / "reconstruction.npz").is_file()
        assert rows[0]["reid"]["by_distance"]["mse"]["n"] == 4
        # cells on cuda ask Ray for a GPU; a cluster without one is refused up front
        gpu = spec_from_dict({**TINY_SWEEP, "grid": {"seed": [0]},
                              "base": {**TINY_SWEEP["base"], "attack": {"device": "cuda"}}})
        if not ray.cluster_resources().get("GPU"):
            with pytest.raises(UserError, match="GPU"):
                run_sweep(gpu, tmp_path / "gpu", backend="ray", progress=False)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------------- CLI
def test_sweep_cli_errors_are_one_line(tmp_path):
    assert_user_error(gradleak("sweep", tmp_path / "nope.yaml", "--out", tmp_path / "o", check=False), "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  capture.obfuscation: [none, 'qsdg:levels=4']\n")
    assert_user_error(gradleak("sweep", bad, "--out", tmp_path / "o", check=False), "qsdg")
    bad.write_text("grid:\n  capture.batchsize: [1, 2]\n")
    assert_user_error(gradleak("sweep", bad, "--out", tmp_path / "o", check=False), "capture.batch_size")
    bad.write_text("grid:\n  seed: {range: [0, 1000000000000]}\n")
    assert_user_error(gradleak("sweep", bad, "--out", tmp_path / "o", check=False), "seed", "at most 100000")
    assert not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    bad.write_text("grid:\n  seed: [0]\n")
    assert_user_error(gradleak("sweep", bad, "--out", tmp_path / "full", check=False), "sweep.yaml")
    assert_user_error(gradleak("report", tmp_path / "full", check=False), "results.jsonl")
    assert_user_error(gradleak("report", tmp_path / "missing", check=False), "not found")


def test_a_sweep_on_a_missing_data_path_stops_before_any_cell(tmp_path):
    spec = {**TINY_SWEEP, "base": {**TINY_SWEEP["base"],
                                   "data": {"source": "folder", "path": str(tmp_path / "no-such-data"), "size": 16}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert_user_error(gradleak("sweep", path, "--out", out, check=False), "cell 0", "no-such-data")
    assert not out.exists()  # no results, no report, no folder
    # in an existing sweep folder it stops the same way, before the folder is touched
    out.mkdir()
    (out / "sweep.yaml").write_text("x: 1\n")
    assert_user_error(gradleak("sweep", path, "--out", out, check=False), "no-such-data")
    assert sorted(p.name for p in out.iterdir()) == ["sweep.yaml"]


def _process_group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            found.append(int(d.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process table from /proc")
def test_workers_exit_when_the_sweep_is_killed(tmp_path):
    spec = {"name": "orphans", "base": {"data": {"source": "phantoms", "size": 16, "n": 24},
                                        "capture": {"arch": "lenet_zhu", "batch_size": 1},
                                        "attack": {"name": "ig", "settings": {"iterations": 100000, "restarts": 1}}},
            "grid": {"seed": [0, 1]}, "reid": {"enabled": False}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("gradleak")
    p = subprocess.Popen([str(exe), "sweep", str(path), "--out", str(out), "--workers", "2", "--quiet", "--no-report"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        running = []
        while time.time() < deadline and p.poll() is None and len(running) < 2:
            running = list((out / "cells").glob(".*.partial/config.yaml"))  # written by a worker as it starts
            time.sleep(0.05)
        assert p.poll() is None and len(running) == 2, "the workers did not start"
        assert len(_process_group(p.pid)) >= 3  # the sweep and its two workers (and multiprocessing's helpers)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        time.sleep(5)
        assert _process_group(p.pid) == []
        assert not list((out / "cells").glob(".*.result.json"))  # no worker finished into the void
    finally:
        for pid in _process_group(p.pid):  # only on failure: leave nothing behind
            os.kill(pid, signal.SIGKILL)
