"""Export a dataset for face-recognition training: RecordIO, ImageFolder, WebDataset, HF Parquet.

`export_dataset` checks the dataset's names and paths and the output before
anything is written, streams the items (`base`) into one writer (`recordio`,
`imagefolder`, `webdataset`, `hf_parquet`) and makes the result visible whole
(`output`). Every format writes `label_map.csv` (label -> identity id); faces are
aligned to 112x112 by default.
"""

from __future__ import annotations

from typing import Any

from arc2face_engine import stopping
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.exports.base import (
    FORMAT_ALIASES,
    FORMATS,
    LABEL_MAP,
    DamagedDataset,
    ExportError,
    ExportResult,
    iter_items,
    select_export,
)
from arc2face_engine.exports.output import prepare_output
from arc2face_engine.progress import ProgressReport, no_progress

__all__ = ["FORMATS", "LABEL_MAP", "DamagedDataset", "ExportError", "ExportResult", "export_dataset"]


def _writer(name: str):
    if name == "recordio":
        from arc2face_engine.exports.recordio import write_recordio

        return write_recordio
    if name == "imagefolder":
        from arc2face_engine.exports.imagefolder import write_imagefolder

        return write_imagefolder
    if name == "webdataset":
        from arc2face_engine.exports.webdataset import write_webdataset

        return write_webdataset
    from arc2face_engine.exports.hf_parquet import write_hf_parquet

    return write_hf_parquet


def export_dataset(
    uri: str,
    out_uri: str,
    fmt: str,
    storage_options: dict | None = None,
    include_rejected: bool = False,
    align: bool = True,
    out_storage_options: dict | None = None,
    *,
    overwrite: bool = False,
    labels: str = "contiguous",
    progress: ProgressReport = no_progress,
    allow_incomplete: bool = False,
    **options: Any,
) -> ExportResult:
    """Export the dataset at `uri` to `out_uri` as `fmt` (recordio | imagefolder | webdataset | hf).

    `align` (default) crops faces to 112x112 from the stored keypoints; `align=False`
    keeps the source size. `labels`: "contiguous" (0..K-1 over identities with an
    exported image) or "dataset" (identities.parquet's labels, empty classes kept).
    `overwrite` replaces a non-empty output. `out_storage_options` defaults to
    `storage_options`. A dataset still being generated is refused unless
    `allow_incomplete`; every manifest part is verified against its checksum before its
    rows are used. Extra `options` go to the format (webdataset: samples_per_shard; hf:
    rows_per_file; recordio: dali, shuffle_seed).
    """
    name = FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
    if name not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    write = _writer(name)
    reader = DatasetReader(uri, storage_options)
    info = reader.info()  # DatasetNotFound / DatasetInfoInvalid before anything else
    reader.require_complete(allow_incomplete, "--allow-incomplete")
    selection = select_export(reader, include_rejected, labels)
    output = prepare_output(
        reader, out_uri, out_storage_options if out_storage_options is not None else storage_options,
        overwrite,
    )  # fmt: skip
    skipped = [0]
    done = [0]

    def advance(units: int) -> None:
        done[0] += units
        progress("export", done[0], len(selection))

    progress("export", 0, len(selection))
    items = iter_items(reader, selection, align=align, skipped=skipped, advance=advance)
    try:
        with stopping.undo_on_stop(output.abort):  # Ctrl-C: no staging folder is left
            result = write(items, selection, output.fs, output.staging, info=info, **options)
        with stopping.critical():  # the swap into place is never cut in half
            output.commit()
    except BaseException:
        output.abort()
        raise
    result.fmt, result.out_uri, result.skipped = name, str(out_uri), skipped[0]
    result.files = [output.final_path(path) for path in result.files]
    result.dropped = len(selection.dropped)
    return result
