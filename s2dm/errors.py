"""The one exception type for mistakes a user can fix (bad config, missing file, ...).

The CLI turns it into a single error line and a non-zero exit; everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
