"""What an import is asked to do (`arc2face-synth import`): `ImportSpec`, its content
hash (a resumed import must be asked the same) and the form dataset.json records."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import SpecError

IMPORT_FORMATS = ("recordio", "imagefolder", "webdataset", "hf")
FORMAT_ALIASES = {"rec": "recordio", "wds": "webdataset", "hf_parquet": "hf", "huggingface": "hf"}
DEFAULT_LABEL_FIELDS = {"webdataset": "cls", "hf": "label"}
DEFAULT_MAX_IMAGES = 10_000_000
# The fields that decide the dataset's content: a resume must repeat them.
HASH_FIELDS = (
    "source", "format", "aligned", "label_field", "image_field", "shard_size", "max_images",
    "min_det_score", "min_feature_norm",
)  # fmt: skip
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ImportSpec(BaseModel):
    """One import: where from, in which format, where to, and how images are analysed."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="The dataset to import: local folder/file or fsspec URI.")
    format: Literal["recordio", "imagefolder", "webdataset", "hf"] = Field(
        description="recordio: train.rec + train.idx (insightface's or the shuffled layout); "
        "imagefolder: one sub-folder per identity; webdataset: .tar shards; hf: Hugging Face "
        "Parquet files."
    )
    out: str = Field(description="The dataset to write (new, or an import to resume).")
    models_dir: str = Field(description="Models directory holding antelopev2/ (face analysis).")
    name: str | None = Field(None, description="Dataset name; default: the source's folder name.")
    aligned: bool = Field(
        False,
        description="Take every image as an aligned 112x112 ArcFace crop and embed it without "
        "detection (how FR training sets are stored); default true for recordio.",
    )
    label_field: str | None = Field(
        None,
        description="webdataset: `cls` (default) or `json.FIELD`; hf: the label column "
        "(default `label`).",
    )
    image_field: str = Field("image", description="hf: the image column.")
    shard_size: int = Field(
        1000, gt=0, le=100_000, description="Images per shard (shards hold whole identities)."
    )
    max_images: int = Field(
        DEFAULT_MAX_IMAGES, gt=0, description="Refuse a source holding more items than this."
    )
    min_det_score: float = Field(
        0.5, ge=0.0, le=1.0, description="Reject faces detected with a lower score."
    )
    min_feature_norm: float = Field(
        0.0, ge=0.0, description="Reject faces whose ArcFace feature norm is lower (0: off)."
    )
    device: str = Field("cpu", description="Face analysis device: auto, cpu, cuda or cuda:N.")
    workers: int = Field(1, ge=1, le=64, description="Shards analysed at the same time.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of the source."
    )
    out_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of the output."
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        fmt = str(data.get("format", "")).lower()
        fmt = FORMAT_ALIASES.get(fmt, fmt)
        data["format"] = fmt
        if data.get("aligned") is None:
            data["aligned"] = fmt == "recordio"
        if data.get("label_field") is None:
            data["label_field"] = DEFAULT_LABEL_FIELDS.get(fmt)
        elif fmt not in DEFAULT_LABEL_FIELDS:
            raise ValueError(f"--label-field is for webdataset and hf, not {fmt}")
        return data

    @model_validator(mode="after")
    def _check_device(self) -> ImportSpec:
        if not _DEVICE.match(self.device):
            raise ValueError(f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N")
        return self


def parse_import_spec(values: dict[str, Any]) -> ImportSpec:
    """An ImportSpec, or a SpecError naming the first bad option and the fix."""
    try:
        return ImportSpec.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "options"
        message = first["msg"].removeprefix("Value error, ")
        if where == "format":
            message = f"unknown format {values.get('format')!r}: use one of {', '.join(IMPORT_FORMATS)}"
        raise SpecError(f"import {where}: {message}") from None


def import_spec_hash(spec: ImportSpec) -> str:
    """sha256 of the canonical JSON of the fields that decide the content (HASH_FIELDS)."""
    content = spec.model_dump(mode="json", include=set(HASH_FIELDS))
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def recorded_import_spec(spec: ImportSpec) -> dict[str, Any]:
    """The spec for dataset.json, storage option values redacted (they hold credentials)."""
    data = spec.model_dump(mode="json")
    for key in ("storage_options", "out_storage_options"):
        data[key] = {name: "<redacted>" for name in data[key]}
    return data
