"""The benchmark scripts end on a user's error as the command line does: one line on stderr, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradleak.errors import UserError, exit_code

from conftest import require_shared

ROOT = Path(__file__).resolve().parents[1]


def test_exit_code_turns_a_user_error_into_one_line_and_2(capsys):
    assert exit_code(lambda: None, "x.py") == 0
    assert exit_code(lambda: 3, "x.py") == 3

    def bad():
        raise UserError("no such\n  folder: /a/b")
    assert exit_code(bad, "x.py") == 2
    assert capsys.readouterr().err == "x.py: error: no such folder: /a/b\n"


def test_exit_code_keeps_a_bug_s_traceback():
    def bug():
        raise ValueError("a bug")
    try:
        exit_code(bug, "x.py")
    except ValueError as e:
        assert str(e) == "a bug"
    else:
        raise AssertionError("a bug must not pass for a user's error")


def test_leakage_benchmark_refuses_a_missing_data_folder_in_one_line(tmp_path):
    out = tmp_path / "results.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "leakage.py"), "--data", str(tmp_path / "missing"),
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("leakage.py: error: ") and "missing" in lines[0], lines
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _leakage_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("leakage_benchmark", ROOT / "benchmarks" / "leakage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_k_clients_of_b_images_hold_the_images_of_one_client_of_k_times_b():
    cells = _leakage_module().cells
    data = range(5000)
    one = cells(data, "report", 2, 3, 4)
    assert [b for b, _ in one] == [1, 1, 4, 4, 4] and [len(i) for _, i in one] == [1, 1, 4, 4, 4]
    assert cells(data, "report", 2, 3, 4, clients=1) == one
    four = cells(data, "report", 0, 2, 4, clients=4)
    assert [b for b, _ in four] == [4, 4]
    assert [i for _, i in four] == [i for _, i in cells(data, "report", 0, 2, 16)]
    singles = cells(data, "tune", 3, 0, 4, clients=2)
    assert [b for b, _ in singles] == [1, 1, 1] and all(len(i) == 2 for _, i in singles)
    flat = [i for _, idx in singles for i in idx]
    assert len(set(flat)) == 6 and flat == [i for _, idx in cells(data, "tune", 6, 0) for i in idx]


def test_leakage_benchmark_attacks_the_mean_update_of_k_clients(tmp_path):
    data = require_shared("chest_xray")
    out = tmp_path / "results.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "leakage.py"), "--data", str(data),
                        "--images", "0", "--batches", "1", "--batch-size", "1", "--clients", "2", "--size", "16",
                        "--attacks", "auto", "--obfuscations", "none", "--time-budget", "30", "--blind-images", "16",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 clients, the server seeing only the mean of their updates" in p.stdout
    assert "## 2 clients x B = 1 (2 images) (1 observation)" in p.stdout
    results = json.loads(out.read_text())["results"]
    assert {r["clients"] for r in results.values()} == {2} and all(k.endswith("|K2") for k in results)
    auto = next(r for r in results.values() if r["attack"] == "auto")
    assert len(auto["indices"]) == 2 and auto["B"] == 1
    # the mean of two one-image gradients is a batch of two for fc1: the leak reads both images exactly (alone the
    # inversion converges in 3 to 6 s at 100 dB; with 10 s, beside the other test worker, it once stopped at 33 dB)
    assert auto["psnr"] > 40, auto


def test_leakage_benchmark_fedavg_column_at_another_learning_rate(tmp_path):
    data = require_shared("chest_xray")
    out = tmp_path / "results.json"
    args = [sys.executable, str(ROOT / "benchmarks" / "leakage.py"), "--data", str(data), "--images", "0",
            "--batches", "1", "--batch-size", "2", "--size", "16", "--attacks", "auto", "--obfuscations",
            "fedavg5", "--time-budget", "5", "--blind-images", "16", "--json", str(out)]
    p = subprocess.run(args + ["--fedavg-lr", "0.025"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "FedAvg (5 full-batch local steps of learning rate 0.025)" in p.stdout
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2 and all(k.endswith("|lr0.025") for k in results), list(results)
    assert {r["fedavg_lr"] for r in results.values()} == {0.025}
    # the default rate's cells are other cells: resumed beside the first, each table shows its own rate's
    p = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert sorted(r["fedavg_lr"] for r in results.values()) == [0.025, 0.025, 0.1, 0.1]
    assert "learning rate 0.1)" in p.stdout
    default = [r for r in results.values() if r["attack"] == "auto" and r["fedavg_lr"] == 0.1][0]
    row = next(line for line in p.stdout.splitlines() if line.startswith("| auto"))
    assert f"{default['psnr']:.1f} / " in row, (row, default)


@pytest.mark.parametrize("lr", ["0", "-0.1", "nan", "inf"])
def test_leakage_benchmark_refuses_a_learning_rate_that_is_not_a_positive_number_in_one_line(lr):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "leakage.py"), "--fedavg-lr", lr],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("leakage.py: error: --fedavg-lr must be a positive number, got "), lines


def test_leakage_tables_show_each_fedavg_rate_its_own_cells():
    # a FedAvg cell written before the rate was recorded is the default rate's; a cell at another rate
    # never enters the default's table, nor the default's that one's
    m = _leakage_module()
    idx = [1, 2]

    def cell(attack, psnr, **lr):
        return {"obf": "fedavg5", "attack": attack, "B": 2, "clients": 1, "indices": idx, "psnr": psnr,
                "ssim": 0.5, "label_accuracy": 1.0, "reid_top1_hits": None, "reid_n": 0, "iip_hits": 1,
                "iip_n": 2, **lr}
    results = {"old|auto": cell("auto", 30.0), "old|blind": cell("blind", 15.0),
               "new|auto": cell("auto", 10.0, fedavg_lr=0.025), "new|blind": cell("blind", 14.0, fedavg_lr=0.025)}
    for lr, own, blind in [(0.1, "30.0 /", "+15.0 dB"), (0.025, "10.0 /", "-4.0 dB")]:
        text = m.table(results, 2, ["blind", "auto"], ["fedavg5"], 1, lr)
        row = next(line for line in text.splitlines() if line.startswith("| auto"))
        assert own in row and "20.0" not in row, (lr, row)
        assert blind in text, (lr, text)
        reid = m.reid_table(results, 2, ["blind", "auto"], ["fedavg5"], 1, lr)
        assert "1/2" in reid and "2/4" not in reid, (lr, reid)


def test_leakage_benchmark_refuses_fewer_than_one_client_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "leakage.py"), "--clients", "0"],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and lines == ["leakage.py: error: --clients must be a positive integer, got 0"], lines
