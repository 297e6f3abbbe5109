"""The exception types for mistakes a user can fix (bad config, missing file, ...).

``S2dmError`` is the base: a problem with the user's input or files, reported as one line,
exit status 2, no traceback. One subclass per kind says where the problem lies; ``key`` names
the option or config key it is about (as the Python API and the configs spell it: ``"n"``,
``"steps"``, ``"sample.sampler"``), so the CLI can name the matching flag. Messages name keys,
files and values, never command-line flags: only ``cli.py`` speaks in flags. Everything else
is a bug and keeps its traceback.
"""

from typing import Optional


class S2dmError(Exception):
    """A problem with the user's input or files: reported as one line, exit status 2, no traceback.

    ``key``: the option or config key the error is about (``"n"``, ``"sample.sampler"``), or None.
    ``all_ranks``: every torchrun rank raises this same error after agreeing on it (the CLI then
    prints it once, without a rank prefix).
    ``remedy``: what to do about it, printed after the problem (``"{message}; {remedy}"``); a
    caller that offers other means replaces it (``remedied``).
    """

    def __init__(self, message: str = "", *, key: Optional[str] = None, all_ranks: bool = False,
                 remedy: Optional[str] = None):
        super().__init__(f"{message}; {remedy}" if remedy else message)
        self.key = key
        self.all_ranks = all_ranks
        self.problem = message
        self.remedy = remedy

    def copy(self, **changes) -> "S2dmError":
        """The same kind of error with ``changes`` to its fields (``message``, the problem;
        ``key``, ``all_ranks``, ``remedy``); every rebuilt error goes through here."""
        fields = {"message": self.problem, "key": self.key, "all_ranks": self.all_ranks, "remedy": self.remedy}
        fields.update(changes)
        return type(self)(fields.pop("message"), **fields)

    def retold(self, message: str, key: Optional[str] = None) -> "S2dmError":
        """The same kind of error with a new, whole message (and key, else this one's): for code
        that adds context, e.g. the option's name, without changing the error's class. The
        message is usually built from ``str(self)``, remedy included, so none is kept apart."""
        return self.copy(message=message, key=self.key if key is None else key, remedy=None)

    def remedied(self, remedy: str) -> "S2dmError":
        """The same error with another remedy: for a caller whose users mend it otherwise."""
        return self.copy(remedy=remedy)


class ConfigError(S2dmError):
    """A config file, key, value or override."""


class DataError(S2dmError):
    """A data set, an image folder or an image file."""


class CheckpointError(S2dmError):
    """A checkpoint file, a run folder's checkpoints, the ``latest`` pointer."""


class SamplerError(S2dmError):
    """A sampler option, a timestep grid, eps_scale."""


class MetricError(S2dmError):
    """FID/FD inputs, statistics files, Inception weights."""


class RunError(S2dmError):
    """A training run: its output folder, device, non-finite losses, a refused resume."""


class StudyError(S2dmError):
    """A study YAML."""


class InteropError(S2dmError):
    """Converting published weights or exporting a checkpoint."""


class GridWarning(UserWarning):
    """A timestep grid that walks other points than its name suggests (a quad grid's collapsed
    points; a uniform grid whose steps do not divide T). Said once per sampling run."""


class MetricWarning(UserWarning):
    """An image folder that ``s2dm fid`` reads otherwise than ``python -m pytorch_fid`` would
    (subfolders, upper-case suffixes, 16-bit grayscale): the two values then differ."""


# The name before typed errors; kept so code that catches or raises UserError keeps working.
UserError = S2dmError


class Interrupted(Exception):
    """A run stopped on request (SIGTERM/SIGINT) after saving; carries the exit code."""

    def __init__(self, message: str, exit_code: int = 130):
        # A default: unpickling (a study worker's stop reaching its parent) calls the class
        # with the message alone, then restores exit_code from the instance's __dict__.
        super().__init__(message)
        self.exit_code = exit_code
