"""Errors a user can cause. Each message is one line: what was wrong, which input, how to fix it.

The CLI prints ``error: <message>`` and exits with status 2 for any of these, without a traceback.
"""


class CnnkitError(Exception):
    """Base class for every error caused by user input (files, arguments, checkpoints)."""


class DataError(CnnkitError):
    """A dataset path, file or format is missing, empty or corrupt."""


class CheckpointError(CnnkitError):
    """A checkpoint cannot be read, is not a cnnkit checkpoint, or belongs to another model."""


class ConfigError(CnnkitError):
    """An argument or option has an invalid value (unknown model, bad size, ...)."""


class TrainingError(CnnkitError):
    """Training diverged (NaN or infinite loss)."""


class OutputError(CnnkitError):
    """An output folder or file cannot be written."""


class UnsupportedLayerError(CnnkitError):
    """A layer cannot be converted exactly (dense conversion, summary, ...)."""
