"""Read face datasets that others publish: the mirror of exports/.

`open_source` gives the reader of a format: `recordio` (insightface's and the shuffled
layout), `imagefolder`, `webdataset`, `hf` (Hugging Face Parquet). A reader plans the
source once (its identities, grouped by label, and where each item is) and reads the
items of any part of the plan; `images.inspect_image` checks an item's bytes. The import
job that turns a plan into a dataset is arc2face_engine/ingest/. LMDB (Vec2Face's HSFace)
is not read: its layout cannot be checked here.
"""

from __future__ import annotations

from arc2face_engine.imports.base import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_SIDE,
    MAX_IMAGES,
    ItemRef,
    SourceError,
    SourceIdentity,
    SourceItem,
    SourcePlan,
    SourceReader,
    safe_identity_ids,
)
from schemas.imports import ImportSpec

__all__ = [
    "MAX_IMAGES", "MAX_IMAGE_BYTES", "MAX_IMAGE_SIDE", "ItemRef", "SourceError",
    "SourceIdentity", "SourceItem", "SourcePlan", "SourceReader", "open_source",
    "safe_identity_ids",
]  # fmt: skip


def open_source(spec: ImportSpec) -> SourceReader:
    """The reader of `spec.source` in `spec.format` (nothing is read yet)."""
    if spec.format == "recordio":
        from arc2face_engine.imports.recordio import RecordIOSource

        return RecordIOSource(spec.source, spec.storage_options, max_records=spec.max_images)
    if spec.format == "imagefolder":
        from arc2face_engine.imports.imagefolder import ImageFolderSource

        return ImageFolderSource(spec.source, spec.storage_options)
    if spec.format == "webdataset":
        from arc2face_engine.imports.webdataset import WebDatasetSource

        return WebDatasetSource(spec.source, spec.storage_options, spec.label_field or "cls")
    from arc2face_engine.imports.hf_parquet import HfParquetSource

    return HfParquetSource(
        spec.source, spec.storage_options, spec.label_field or "label", spec.image_field
    )
