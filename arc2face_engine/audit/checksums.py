"""Checksums recorded at commit, verified: manifest part sidecars and identities.parquet.

The writer records `manifest/part-NNNNN.parquet.sha256` (hex sha256 of the part's
bytes) before each part, and identities.parquet's sha256 in dataset.json as
`identities_sha256`. A part with no sidecar, or whose bytes disagree with it, is
an integrity failure; the later checks still stream it when it reads through, so
the report also says what the damage changed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from arc2face_engine.audit.report import IntegritySection
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.paths import UnsafePath
from arc2face_engine.dataset.reader import DatasetReader

CHUNK = 1 << 20
MAX_SIDECAR_BYTES = 1024
_HEX = re.compile(r"^[0-9a-f]{64}$")


def part_checksum_path(part: str) -> str:
    """The sidecar of a committed part (layout's helper once the writer records them)."""
    helper = getattr(layout, "part_checksum_path", None)
    shard = layout.shard_of_part(part)
    if helper is not None and shard is not None:
        return helper(shard)
    return f"{part}.sha256"


def file_sha256(reader: DatasetReader, relative: str) -> str:
    digest = hashlib.sha256()
    with reader.open(relative) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded(reader: DatasetReader, sidecar: str) -> str | None:
    """The hex digest a sidecar records; None when there is none."""
    try:
        with reader.open(sidecar) as handle:
            text = handle.read(MAX_SIDECAR_BYTES).decode("ascii", "replace")
    except FileNotFoundError:
        return None
    fields = text.split()
    return fields[0].lower() if fields else ""


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
        sidecar = part_checksum_path(part)
        try:
            recorded = _recorded(reader, sidecar)
            if recorded is None:
                section.missing_checksums.add(f"{part}: manifest part has no checksum ({sidecar})")
                good.append(part)  # no evidence either way: the other checks still read it
                continue
            actual = file_sha256(reader, part)
        except UnsafePath as error:
            section.unsafe_paths.add(str(error))
            continue
        except OSError as error:
            section.unreadable_parts.add(f"{part}: {error}")
            continue
        if not _HEX.match(recorded):
            section.checksum_mismatches.add(f"{sidecar} does not hold a sha256 hex digest")
        elif recorded != actual:
            section.checksum_mismatches.add(
                f"{part}: sha256 {actual[:16]}... differs from its sidecar {recorded[:16]}..."
            )
        good.append(part)
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
