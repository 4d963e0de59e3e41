"""Errors a user can cause. Each message is one line: the problem, then the fix.

They live in `schemas` (which imports nothing of the engine) so that both the spec
models and the engine can raise them (the one errors module).
"""

import os


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none), to quote a
    library's error inside a one-line UserError."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def resolved_against(path: str) -> str | None:
    """The folder a relative local path was resolved against (the working folder), or None
    for an absolute path or a URI: a message about a path that does not resolve names it,
    since a relative path means something else in a deployment run's working folder."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        return None
    if os.path.isabs(text.removeprefix("file://")):
        return None
    return os.getcwd()


class UserError(Exception):
    """Bad input from the user; the CLI prints the message and exits with status 2."""


class ModelFileMissing(UserError, FileNotFoundError):
    """A file the models directory should hold is not there."""


class ModelFileCorrupt(UserError, ValueError):
    """A model file is there but does not open (truncated, wrong format, bad checksum)."""


class CheckpointMismatch(UserError, RuntimeError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


class BankError(UserError, ValueError):
    """A pose or expression bank is malformed."""


class SpecError(UserError, ValueError):
    """A job spec is invalid or does not match the existing dataset."""


class ResumeMismatch(SpecError):
    """Resuming would mix models or precisions inside one dataset."""


class EmbeddingFileError(UserError, ValueError):
    """An identity embedding file is malformed."""


class DatasetCorrupt(UserError, ValueError):
    """A file of an existing dataset is unreadable or does not match its recorded checksum."""


class OutputError(UserError):
    """The output location cannot hold a dataset (a file, unknown protocol, not writable, full)."""


class OutputInUse(OutputError):
    """Another live writer holds the output's lease."""


class LeaseLost(OutputError):
    """This run's lease on the output was taken over (it expired while the run was stalled)."""
