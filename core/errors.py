"""Errors that `cli.py` prints as one line (no traceback) before exiting non-zero."""

import signal


class ReasoningLabError(Exception):
    """Base class of the errors a user is told about in one line; `cli.main` exits with `exit_code`."""

    exit_code = 2


class UserInputError(ReasoningLabError, ValueError):
    """Bad input (a file, a config field, a model name): the message names what and where."""


class TrainingStopped(ReasoningLabError):
    """Training stopped on purpose (e.g. a non-finite loss); the last good checkpoint is kept."""


class NotSaved(ReasoningLabError):
    """An output (a checkpoint, an epoch export) could not be written, e.g. on a full disk: nothing partial was
    left, and what was saved before it is kept."""


class TrainingInterrupted(ReasoningLabError):
    """Training was stopped by a signal (SIGTERM) after saving its state: the run can be resumed. Exits with
    128 + SIGTERM, as a process ended by the signal does, so no wrapper takes the run for finished."""

    exit_code = 128 + signal.SIGTERM
