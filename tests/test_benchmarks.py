"""The benchmark scripts end on a user's error as the command line does: one line on stderr, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gradleak.errors import UserError, exit_code

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
