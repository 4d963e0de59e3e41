"""Errors a user can cause. Each message is one line: the problem, then the fix."""


class UserError(Exception):
    """Bad input from the user; the CLI prints the message and exits with status 2."""


class ModelFileMissing(UserError, FileNotFoundError):
    """A file the models directory should hold is not there."""


class CheckpointMismatch(UserError, RuntimeError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


class BankError(UserError, ValueError):
    """A pose or expression bank is malformed."""


class SpecError(UserError, ValueError):
    """A job spec is invalid or does not match the existing dataset."""


class EmbeddingFileError(UserError, ValueError):
    """An identity embedding file is malformed."""
