"""Errors a user can cause. Each message is one line: the problem, then the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none), to quote a
    library's error inside a one-line UserError."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
