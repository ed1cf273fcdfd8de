"""Exception types of sgcompress.

Every error a user can cause is a :class:`SgCompressError`; its message says what is
wrong and how to fix it. The CLI turns these into one line on stderr and a non-zero
exit; anything else escaping the library is a bug.
"""

from __future__ import annotations


class SgCompressError(Exception):
    """Base class of every error sgcompress raises on purpose."""

    exit_code = 2


class ConfigError(SgCompressError, ValueError):
    """A setting is out of range or inconsistent (e.g. ``ratio=1.5``)."""


class ArchitectureError(SgCompressError):
    """The architecture spec cannot be resolved or built."""


class CheckpointError(SgCompressError):
    """A checkpoint file is missing, unreadable, unsafe to load, or does not match."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled code and was not loaded; ``--trust-checkpoint`` opts in."""


class StateDictMismatchError(CheckpointError):
    """Keys or shapes of a state_dict do not match the model."""


class InputShapeError(SgCompressError):
    """The model does not accept the given input shape."""


class UnsupportedLayerError(SgCompressError):
    """A layer cannot be handled by the requested operation."""


class ArtifactError(SgCompressError):
    """An sgcompress artifact directory is missing, incomplete or inconsistent."""


class DataError(SgCompressError):
    """A dataset is missing, empty, or does not fit the model."""


class TrainingError(SgCompressError):
    """Training cannot go on (e.g. a non-finite loss)."""


class ExportError(SgCompressError):
    """Export to another format failed or its output differs from PyTorch."""


class CheckFailed(SgCompressError):
    """The regression gate found a regression."""

    exit_code = 1


class TrainingInterrupted(TrainingError):
    """Training stopped on SIGINT/SIGTERM; the resume state was saved when ``checkpoint`` is set.

    ``exit_code`` follows the shell convention 128 + signal number (130 for SIGINT,
    143 for SIGTERM).
    """

    def __init__(self, signal_number: int, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.checkpoint = checkpoint
        self.exit_code = 128 + signal_number
