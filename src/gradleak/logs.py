"""Progress messages through the standard :mod:`logging` module.

Every module logs to ``logging.getLogger(__name__)``, all below the ``gradleak`` logger. The command line
shows INFO messages on stdout (:func:`to_console`; ``--quiet`` leaves it off); a run folder keeps what
was logged while it ran in ``log.txt`` (:func:`recording`), each line prefixed with the seconds since
the run started.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterator

ROOT = "gradleak"

logging.getLogger(ROOT).setLevel(logging.INFO)
# gradleak's own handlers only: a library that configures the root logger (Opacus calls basicConfig when it
# is imported) must not print every message a second time
logging.getLogger(ROOT).propagate = False


class _Elapsed(logging.Formatter):
    def __init__(self, start: float):
        super().__init__()
        self.start = start

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.created - self.start:7.1f}s] {record.getMessage()}"


class Recorder(logging.Handler):
    """Keeps the formatted lines of one run (for its ``log.txt``)."""

    def __init__(self, start: float | None = None):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(_Elapsed(time.time() if start is None else start))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n" if self.lines else ""


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Collect what ``gradleak`` logs inside the block; ``recorder.text()`` is the run's ``log.txt``."""
    rec = Recorder()
    logger = logging.getLogger(ROOT)
    logger.addHandler(rec)
    try:
        yield rec
    finally:
        logger.removeHandler(rec)


class _Console(logging.Handler):
    """stdout, written around any progress bar on the terminal (``tqdm.write``)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - as logging.StreamHandler does
            self.handleError(record)


def to_console(enabled: bool = True) -> None:
    """Show INFO messages on stdout (once; calling again with ``enabled=False`` removes the handler)."""
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if isinstance(h, _Console)]:
        logger.removeHandler(h)
    if enabled:
        h = _Console()
        h.setLevel(logging.INFO)
        h.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(h)
