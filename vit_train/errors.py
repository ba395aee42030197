"""The one exception type for mistakes a user can fix.

Everything that is the user's input being wrong (a model name, a flag value, a file that is not a checkpoint)
raises `UserError` with a single-line message that says what is wrong and how to fix it. The command-line
entry points print it on one line and exit with status 2; library users can catch it. What the user should know
but need not fix (a setting that does nothing, a cache rebuilt) is one `warning: ...` line (`warn`).
"""
import os
import sys


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (or its type's name when it has none), for a UserError."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def warn(message: str) -> None:
    """One `warning: <message>` line on stderr; under torchrun only rank 0's, as every process would say the same."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)
