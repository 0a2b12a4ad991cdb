"""The exceptions of infdit. Every one carries the library's message (the words the CLI prints)."""

from __future__ import annotations

__all__ = [
    "InfditError",
    "InputError",
    "TooLargeError",
    "OptionError",
    "ModelError",
    "OutputError",
    "IoError",
    "NumericalError",
    "Cancelled",
    "ResumeError",
]


class InfditError(Exception):
    """Base class of every error infdit raises (a failure inside the tensor library is this class itself)."""


class InputError(InfditError, ValueError):
    """An input image or array is unusable: wrong shape or dtype, NaN, unreadable or corrupt file."""


class TooLargeError(InputError):
    """The work does not fit a limit: the pixel limit, the largest output side, the memory budget."""


class OptionError(InfditError, ValueError):
    """An option is out of range or contradicts another; the message starts with its name."""


class ModelError(InfditError):
    """The model cannot be loaded: a bad config, a checkpoint that does not fit, a missing CLIP tower."""


class OutputError(InfditError):
    """An output cannot be written where or how it was asked for (format, folder, permissions)."""


class IoError(InfditError, OSError):
    """A file could not be read or written."""


class NumericalError(InfditError, ArithmeticError):
    """The computation produced a non-finite value."""


class Cancelled(InfditError):
    """The run was stopped before it finished."""


class ResumeError(InfditError):
    """A saved state cannot be resumed: damaged, from another run, or in use by another process."""
