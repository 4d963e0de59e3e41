"""Checksums recorded at commit, verified: manifest part sidecars and identities.parquet.

The writer records `manifest/part-NNNNN.parquet.sha256` (hex sha256 of the part's
bytes) before each part, and identities.parquet's sha256 in dataset.json as
`identities_sha256`. A part with no sidecar, or whose bytes disagree with it, is
an integrity failure; the later checks still stream it when it reads through, so
the report also says what the damage changed. The checks themselves are the dataset
reader's (`DatasetReader.check_part`, the one place that verifies a part); the audit
records every damaged part instead of stopping at the first.
"""

from __future__ import annotations

from collections.abc import Callable

from arc2face_engine.audit.report import IntegritySection
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.paths import UnsafePath
from arc2face_engine.dataset.reader import DatasetReader

# PartProblem.kind -> the integrity finding it is reported under
_FINDINGS = {
    "no_checksum": "missing_checksums",
    "bad_checksum": "checksum_mismatches",
    "mismatch": "checksum_mismatches",
    "unreadable": "unreadable_parts",
}


def file_sha256(reader: DatasetReader, relative: str) -> str:
    return reader.sha256_of(relative)


def verify_parts(
    reader: DatasetReader,
    parts: list[str],
    section: IntegritySection,
    progress: Callable[[int], None] = lambda units: None,
) -> list[str]:
    """Check every part against its sidecar; returns the parts that can be opened."""
    good = []
    for part in parts:
        progress(1)
        try:
            problem = reader.check_part(part)
        except UnsafePath as error:
            section.unsafe_paths.add(str(error))
            continue
        except OSError as error:
            section.unreadable_parts.add(f"{part}: {error}")
            continue
        if problem is not None:
            getattr(section, _FINDINGS[problem.kind]).add(str(problem))
            if problem.kind == "unreadable":
                continue
        good.append(part)  # damaged parts are still read: the report says what changed
    return good


def verify_identities(
    reader: DatasetReader, recorded: object, section: IntegritySection
) -> bool:
    """identities.parquet against dataset.json's `identities_sha256` (when recorded)."""
    if recorded is None or not reader.has_identities():
        return True
    try:
        actual = file_sha256(reader, layout.IDENTITIES)
    except UnsafePath as error:
        section.unsafe_paths.add(str(error))
        return False
    if not isinstance(recorded, str) or recorded.lower() != actual:
        section.checksum_mismatches.add(
            f"{layout.IDENTITIES}: sha256 {actual[:16]}... differs from dataset.json's "
            f"identities_sha256 {str(recorded)[:16]}..."
        )
        return False
    return True
