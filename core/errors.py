"""Errors that `cli.py` prints as one line (no traceback) before exiting non-zero."""


class ReasoningLabError(Exception):
    """Base class of the errors a user is told about in one line."""


class UserInputError(ReasoningLabError, ValueError):
    """Bad input (a file, a config field, a model name): the message names what and where."""


class TrainingStopped(ReasoningLabError):
    """Training stopped on purpose (e.g. a non-finite loss); the last good checkpoint is kept."""
