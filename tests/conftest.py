"""Shared test helpers: where the real data lives, and how tests that need it skip or fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REQUIRE_SHARED_DATA = "GRADLEAK_REQUIRE_SHARED_DATA"


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
