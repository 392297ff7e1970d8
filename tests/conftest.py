"""Shared test helpers: where the real data lives, and how tests that need it skip or fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REQUIRE_SHARED_DATA = "GRADLEAK_REQUIRE_SHARED_DATA"
os.environ.setdefault("GRADLEAK_PSEUDONYM_KEY", "test key: pseudonyms made by the test suite")  # no home key


def shared_data_dir() -> Path:
    """``../shared/data`` seen from the repository root (see ../shared/data/README.md)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared(*parts: str) -> Path:
    """Path under the shared data folder; skip the test when it is absent, or fail when
    GRADLEAK_REQUIRE_SHARED_DATA=1 (as CI sets it)."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        reason = f"real data {path} is absent"
        if os.environ.get(REQUIRE_SHARED_DATA) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_SHARED_DATA}=1 requires it")
        pytest.skip(f"{reason} (set it up as ../shared/data/README.md says)")
    return path


@pytest.fixture
def shared_data() -> Path:
    """The shared real-data folder (skips or fails as :func:`require_shared` does)."""
    return require_shared()


TINY_SWEEP = {
    "name": "tiny",
    "base": {"data": {"source": "phantoms", "size": 16, "n": 24},
             "capture": {"arch": "lenet_zhu"},
             "attack": {"name": "ig", "settings": {"iterations": 20, "restarts": 1}}},
    "grid": {"capture.protocol": [{"algorithm": "fedsgd"},
                                  {"algorithm": "fedavg", "local_steps": 2, "local_lr": 0.1}],
             "capture.batch_size": [2, 40]},  # 40 > 24 images: those cells fail
    "reid": {"autoencoder_steps": 20},
}


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """A finished 4-cell sweep on 16 px phantoms (2 cells fail on purpose), run once per session."""
    from gradleak.experiment.sweep import run_sweep, spec_from_dict

    out = tmp_path_factory.mktemp("sweeps") / "tiny"
    summary = run_sweep(spec_from_dict(TINY_SWEEP), out, workers=2, progress=False)
    return out, summary


def pytest_configure(config):
    """Under pytest-xdist (``make test``: one worker per core) each worker runs torch on one thread, so the
    workers do not fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
