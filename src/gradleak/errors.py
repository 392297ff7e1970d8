"""Errors a user can cause.

A :class:`UserError` is a bad path, a bad file or a bad setting. The command line and the benchmark scripts
turn it, through :func:`exit_code`, into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (path, file, config, parameter), not with gradleak."""


def exit_code(main: Callable[[], int | None], prog: str) -> int:
    """``main()``'s exit code, a :class:`UserError` turned into one line on stderr (``prog: error: ...``) and 2: how
    a script outside the command line (the benchmarks) ends on a bad path or setting."""
    try:
        return int(main() or 0)
    except UserError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
