"""The ``gradleak`` command.

:func:`main` parses the command line, runs the subcommand, turns a :class:`~gradleak.errors.UserError` into one
line on stderr and exit code 2, and removes what a failed command's outputs had created. The argument types
live in :mod:`.arguments`, the parser in :mod:`.parser` and the subcommands in :mod:`.victim` (capture,
obfuscate), :mod:`.attack` (attack, inspect), :mod:`.prior` and :mod:`.experiments` (run, utility, sweep,
report, demo).
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..errors import exit_code
from ..files import remove_new
from ..logs import to_console
from .arguments import _NEW
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    to_console()  # progress messages; --quiet only turns the progress bars off
    _NEW.clear()

    def run() -> int | None:
        try:
            return args.func(args)
        except BaseException:
            remove_new(_NEW)
            raise
    try:
        return exit_code(run, "gradleak")
    except KeyboardInterrupt:
        print("gradleak: interrupted", file=sys.stderr)
        return 130
