"""The one exception type for mistakes a user can fix (bad config, missing file, ...).

The CLI turns it into a single error line and a non-zero exit; everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class Interrupted(Exception):
    """A run stopped on request (SIGTERM/SIGINT) after saving; carries the exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
