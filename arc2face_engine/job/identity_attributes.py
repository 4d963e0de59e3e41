"""identities.parquet's attribute columns filled at finalize, over each identity's accepted
images (dataset.identity_stats); identities placed by a balanced job keep their probe's
attributes. Light: no model library."""

from __future__ import annotations

import pyarrow as pa

from arc2face_engine.dataset.attributes import (
    FROM_PROBE,
    NO_ATTRIBUTES,
    IdentityAttributes,
    with_attributes,
)
from arc2face_engine.dataset.identity_stats import iter_identity_stats
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from schemas.tables import DatasetInfo

_RECORDED = ["identity_id", "gender", "gender_probability", "age", "skin_ita", "attributes_from"]


def identity_attributes(reader: DatasetReader, identities: pa.Table) -> list[IdentityAttributes]:
    """Each identity's attributes in row order: its probe's when a balanced job placed it,
    else over its accepted images in the committed manifest."""
    recorded = identities.select(_RECORDED).to_pylist()
    if all(row["attributes_from"] == FROM_PROBE for row in recorded):
        measured = {}
    else:
        measured = {stats.identity_id: stats.attributes for stats in iter_identity_stats(reader)}
    result = []
    for row in recorded:
        if row["attributes_from"] == FROM_PROBE:
            result.append(
                IdentityAttributes(row["gender"], row["gender_probability"], row["age"],
                                   row["skin_ita"], FROM_PROBE)
            )  # fmt: skip
        else:
            result.append(measured.get(row["identity_id"]) or NO_ATTRIBUTES)
    return result


def refresh_identity_attributes(writer: DatasetWriter, info: DatasetInfo) -> DatasetInfo:
    """Rewrite identities.parquet with its attributes over the accepted images, when they
    changed, and record its new sha256. The checksum is cleared first, so a crash between
    the two writes leaves a state that the next run re-records (identities_step)."""
    reader = DatasetReader(writer.uri, writer.storage_options)
    table = reader.identities()
    updated = with_attributes(table, identity_attributes(reader, table))
    if updated.equals(table):
        return info
    info.identities_sha256 = None
    writer.write_dataset_json(info)
    info.identities_sha256 = writer.write_identities(updated)
    writer.write_dataset_json(info)
    return info
