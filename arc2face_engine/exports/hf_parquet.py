"""Hugging Face `datasets` Parquet: an Image column, a ClassLabel and the row metadata.

The features travel in the Parquet schema metadata under the "huggingface" key
(the format `datasets` itself writes), so `load_dataset("parquet", data_files=...)`
decodes `image` to PIL images and `label` to a ClassLabel named by identity id.
Files are data/train-00000-of-0000N.parquet (the Hub's naming), then
label_map.csv, then the dataset card README.md (YAML metadata: license, features,
splits, configs), written last.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine.exports.base import (
    ExportItem,
    ExportResult,
    ExportSelection,
    check_count_option,
    check_options,
    write_label_map,
)
from arc2face_engine.exports.hf_card import SplitSize, render_hf_card

STRING_COLUMNS = ("image_id", "identity_id", "pose_name", "expression_name", "reject_reason")


def hf_schema(identity_ids: list[str]) -> pa.Schema:
    fields = [
        pa.field(
            "image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
        ),
        pa.field("label", pa.int64()),
        *(pa.field(name, pa.string()) for name in STRING_COLUMNS),
        pa.field("similarity", pa.float32()),
        pa.field("accepted", pa.bool_()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
    value = {"bool": "bool", "float": "float32", "int32": "int32", "string": "string"}
    features = {
        "image": {"_type": "Image"},
        "label": {"names": list(identity_ids), "_type": "ClassLabel"},
    }
    for field in fields[2:]:
        features[field.name] = {"dtype": value[str(field.type)], "_type": "Value"}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=metadata)


def _row(item: ExportItem) -> dict:
    row = {name: item.metadata.get(name) for name in STRING_COLUMNS}
    row.update(
        image={"bytes": item.data, "path": f"{item.image_id}.jpg"},
        label=item.label,
        similarity=item.metadata.get("similarity"),
        accepted=item.metadata.get("accepted"),
        width=item.width,
        height=item.height,
    )
    return row


def _chunks(items: Iterable[ExportItem], size: int) -> Iterator[list[ExportItem]]:
    chunk: list[ExportItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_hf_parquet(
    items: Iterable[ExportItem], selection: ExportSelection, fs, root: str, info=None,
    rows_per_file: int = 5000, **options,
) -> ExportResult:  # fmt: skip
    """One Parquet file per `rows_per_file` rows (the count of files is known from the selection)."""
    check_options("hf", options, ("rows_per_file",))
    check_count_option("rows_per_file", rows_per_file)
    schema = hf_schema(selection.identity_ids)
    n_files = max(1, -(-len(selection) // rows_per_file))  # upper bound when align skips rows
    fs.makedirs(f"{root}/data", exist_ok=True)
    files, labels, images, sizes = [], Counter(), 0, SplitSize()
    for number, chunk in enumerate(_chunks(items, rows_per_file)):
        table = pa.Table.from_pylist([_row(item) for item in chunk], schema=schema)
        files.append(f"{root}/data/train-{number:05d}-of-{n_files:05d}.parquet")
        with fs.open(files[-1], "wb") as handle:
            pq.write_table(table, handle, row_group_size=1000)
        sizes.num_bytes += table.nbytes
        sizes.download_size += fs.size(files[-1])
        labels.update(item.label for item in chunk)
        images += len(chunk)
    files.append(write_label_map(fs, root, selection, labels))
    card = render_hf_card(info, selection, labels, schema, images, STRING_COLUMNS, sizes)
    fs.pipe_file(f"{root}/README.md", card.encode("utf-8"))  # last: the marker
    files.append(f"{root}/README.md")
    result = ExportResult(fmt="hf", out_uri=root, images=images, identities=len(labels))
    result.files = files
    return result
