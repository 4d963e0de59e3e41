"""Errors a user can cause: re-exported from `schemas.errors`, their home (so `schemas`
never imports the engine); `from arc2face_engine.errors import UserError` keeps working."""

from schemas.errors import (
    BankError,
    CheckpointMismatch,
    DatasetCorrupt,
    EmbeddingFileError,
    LeaseLost,
    ModelFileCorrupt,
    ModelFileMissing,
    OutputError,
    OutputInUse,
    ResumeMismatch,
    SpecError,
    UserError,
    first_line,
)

__all__ = [
    "BankError",
    "CheckpointMismatch",
    "DatasetCorrupt",
    "EmbeddingFileError",
    "LeaseLost",
    "ModelFileCorrupt",
    "ModelFileMissing",
    "OutputError",
    "OutputInUse",
    "ResumeMismatch",
    "SpecError",
    "UserError",
    "first_line",
]
