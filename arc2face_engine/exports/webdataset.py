"""WebDataset tar shards: <key>.jpg, <key>.cls, <key>.json, `samples_per_shard` samples each.

Written with the standard tarfile module in streaming mode ("w|"), so object
stores get one sequential upload per shard. Keys are image ids (no dots, so
WebDataset's key/extension split is unambiguous). Shards are
`shard-000000.tar`, ...; the brace pattern for WebDataset is in the result.
label_map.csv is written after the last shard.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from collections.abc import Iterable

from arc2face_engine.exports.base import (
    ExportError,
    ExportItem,
    ExportResult,
    ExportSelection,
    check_count_option,
    check_options,
    write_label_map,
)

MTIME = 0  # fixed: the same dataset exports to the same bytes


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_sample(tar: tarfile.TarFile, item: ExportItem) -> None:
    key = item.image_id
    if "." in key:  # WebDataset splits key and extension at the first dot
        raise ExportError(
            f"image_id {key!r} holds a dot, which WebDataset would read as an extension: "
            "export as imagefolder, recordio or hf"
        )
    _add(tar, f"{key}.jpg", item.data)
    _add(tar, f"{key}.cls", str(item.label).encode())
    metadata = {**item.metadata, "label": item.label, "width": item.width, "height": item.height}
    _add(tar, f"{key}.json", json.dumps(metadata, sort_keys=True).encode())


def write_webdataset(
    items: Iterable[ExportItem], selection: ExportSelection, fs, root: str, info=None,
    samples_per_shard: int = 1000, **options,
) -> ExportResult:  # fmt: skip
    check_options("webdataset", options, ("samples_per_shard",))
    check_count_option("samples_per_shard", samples_per_shard)
    files: list[str] = []
    labels: Counter = Counter()
    images = 0
    stream = iter(items)
    while first := next(stream, None):
        files.append(f"{root}/shard-{len(files):06d}.tar")
        with (
            fs.open(files[-1], "wb") as handle,
            tarfile.open(fileobj=handle, mode="w|", format=tarfile.USTAR_FORMAT) as tar,
        ):
            for item in itertools.chain([first], itertools.islice(stream, samples_per_shard - 1)):
                _add_sample(tar, item)
                labels[item.label] += 1
                images += 1
    files.append(write_label_map(fs, root, selection, labels))  # last: the marker
    result = ExportResult(fmt="webdataset", out_uri=root, images=images, identities=len(labels))
    result.files = files
    return result
