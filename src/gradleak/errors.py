"""Errors a user can cause.

A :class:`UserError` is a bad path, a bad file or a bad setting. The command line turns it into one
line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (path, file, config, parameter), not with gradleak."""

