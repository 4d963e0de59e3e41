"""WebDataset tar shards: <key>.jpg, <key>.cls, <key>.json, `samples_per_shard` samples each.

Written with the standard tarfile module in streaming mode ("w|"), so object
stores get one sequential upload per shard. Keys are image ids (no dots, so
WebDataset's key/extension split is unambiguous). Shards are
`shard-000000.tar`, ...; the brace pattern for WebDataset is in the result.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections.abc import Iterable

from arc2face_engine.dataset.exports import ExportItem, ExportPlan, ExportResult

MTIME = 0  # fixed: the same dataset exports to the same bytes


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_sample(tar: tarfile.TarFile, item: ExportItem) -> None:
    key = item.image_id
    _add(tar, f"{key}.jpg", item.data)
    _add(tar, f"{key}.cls", str(item.label).encode())
    metadata = {**item.metadata, "label": item.label, "width": item.width, "height": item.height}
    _add(tar, f"{key}.json", json.dumps(metadata, sort_keys=True).encode())


def shard_pattern(root: str, shards: int) -> str:
    """WebDataset brace notation for all shards, e.g. out/shard-{000000..000003}.tar."""
    return f"{root}/shard-{{000000..{shards - 1:06d}}}.tar"


def write_webdataset(
    items: Iterable[ExportItem], plan: ExportPlan, fs, root: str, samples_per_shard: int = 1000
) -> ExportResult:
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    files: list[str] = []
    labels: set[int] = set()
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
                labels.add(item.label)
                images += 1
    result = ExportResult(fmt="webdataset", out_uri=root, images=images, identities=len(labels))
    result.files = files
    return result
