"""``gradleak report``'s entry points under their long-standing import path; the page is built by
:mod:`gradleak.report.render` (see there)."""

from __future__ import annotations

from .render import build_report, write_report

__all__ = ["build_report", "write_report"]
