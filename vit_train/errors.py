"""The one exception type for mistakes a user can fix.

Everything that is the user's input being wrong (a model name, a flag value, a file that is not a checkpoint)
raises `UserError` with a single-line message that says what is wrong and how to fix it. The command-line
entry points print it on one line and exit with status 2; library users can catch it.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (or its type's name when it has none), for a UserError."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
