"""The one exception type tutor raises for bad input.

The CLI prints a `TutorError` as a single line (no traceback), so its message must
name the file/line, the key, or the command that fixes the problem.
"""


class TutorError(Exception):
    """A user-facing error whose message says what is wrong and how to fix it."""


def warn(message: str) -> None:
    """Tell the user about something suspicious that does not stop the command, in one line."""
    import sys

    print(f"tutor: warning: {message}", file=sys.stderr, flush=True)
