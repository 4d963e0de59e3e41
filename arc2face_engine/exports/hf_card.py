"""The dataset card (README.md) of a Hugging Face export: YAML metadata, then Markdown.

The YAML block is what the Hub reads: `license` (from the job spec's `license`,
`other` when unset), `dataset_info.features` (the same features the Parquet
schema metadata carries), the split's rows and bytes and a `configs` entry pointing at
data/train-*.parquet. Class names are listed up to MAX_LISTED_CLASSES; beyond
that the label is declared as int64 and label_map.csv names the classes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import yaml

from arc2face_engine.exports.base import LABEL_MAP, ExportSelection
from schemas.tables import DatasetInfo

MAX_LISTED_CLASSES = 10_000
DEFAULT_LICENSE = "other"
_DTYPES = {"string": "string", "float": "float32", "int32": "int32", "bool": "bool"}


def _feature(field: pa.Field, class_names: list[str] | None) -> dict[str, Any]:
    if field.name == "image":
        return {"name": "image", "dtype": "image"}
    if field.name == "label":
        if class_names is None:
            return {"name": "label", "dtype": "int64"}
        names = {str(label): name for label, name in enumerate(class_names)}
        return {"name": "label", "dtype": {"class_label": {"names": names}}}
    return {"name": field.name, "dtype": _DTYPES[str(field.type)]}


def _size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):  # fmt: skip
        if rows < limit:
            return name
    return "10M<n<100M"


@dataclass
class SplitSize:
    """The train split's bytes, as the card's dataset_info states them: `num_bytes` (and
    `dataset_size`) the Arrow size of its rows, `download_size` the Parquet files' size.
    `datasets` ignores a split without num_bytes, with a warning."""

    num_bytes: int = 0
    download_size: int = 0


def card_metadata(
    info: DatasetInfo | None, selection: ExportSelection, schema: pa.Schema, images: int,
    sizes: SplitSize | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The YAML front matter as a dict."""
    spec = info.spec if info is not None else {}
    license_id = spec.get("license") if isinstance(spec, dict) else None
    if not isinstance(license_id, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9.+-]{0,99}$", license_id):
        license_id = DEFAULT_LICENSE
    names = selection.identity_ids if len(selection.identity_ids) <= MAX_LISTED_CLASSES else None
    sizes = sizes or SplitSize()
    return {
        "license": license_id,
        "pretty_name": info.name if info is not None else "arc2face-synth export",
        "task_categories": ["image-classification"],
        "tags": ["face-recognition", "synthetic", "arc2face"],
        "size_categories": [_size_category(images)],
        "dataset_info": {
            "features": [_feature(field, names) for field in schema],
            "splits": [{"name": "train", "num_bytes": sizes.num_bytes, "num_examples": images}],
            "download_size": sizes.download_size,
            "dataset_size": sizes.num_bytes,
        },
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": "data/train-*"}],
            }
        ],
    }


def render_hf_card(
    info: DatasetInfo | None,
    selection: ExportSelection,
    per_label: Mapping[int, int],
    schema: pa.Schema,
    images: int,
    string_columns: tuple[str, ...],
    sizes: SplitSize | None = None,
) -> str:
    from arc2face_engine.dataset.card import LIMITATIONS

    metadata = card_metadata(info, selection, schema, images, sizes)
    name = metadata["pretty_name"]
    license_note = (
        "" if metadata["license"] != DEFAULT_LICENSE
        else " (set `license:` in the job spec to a Hugging Face license id to fill it in)"
    )  # fmt: skip
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        "Synthetic face images made by arc2face-synth with Arc2Face (Stable Diffusion 1.5",
        "conditioned on ArcFace identity embeddings), re-verified with ArcFace.",
        "",
        f"- images: {images}; identities (classes): {len(selection.identity_ids)}, "
        f"{len(per_label)} with at least one image",
        f"- license: `{metadata['license']}`{license_note}",
        f"- `label` is a class index; `{LABEL_MAP}` maps it to the identity id and to the label "
        "in the source dataset",
        f"- other columns: {', '.join(f'`{column}`' for column in string_columns)}, "
        "`similarity` (cosine to the identity embedding), `accepted`, `width`, `height`",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("parquet", data_files="data/train-*.parquet", split="train")',
        "```",
        "",
        "## Limitations",
        "",
        LIMITATIONS,
    ]
    return "\n".join(lines)
