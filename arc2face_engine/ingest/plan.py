"""An import's plan: the source's identities with safe ids, cut into shards that hold whole
identities (about `shard_size` items each); items without a label come last, in shards
of their own.

Planning reads the source's listing or headers, never its images, and runs before
anything is written: a source that cannot be imported fails here, in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arc2face_engine.imports import (
    ItemRef,
    SourceError,
    SourcePlan,
    SourceReader,
    open_source,
    safe_identity_ids,
)
from schemas.imports import ImportSpec
from schemas.tables import UNLABELLED_ID


@dataclass(frozen=True)
class PlannedIdentity:
    """One source label (or the unlabelled items) and where its items are."""

    identity_id: str
    source_label: str | None  # None: the items that carry no label
    refs: list[ItemRef]
    first_variant: int = 0  # unlabelled items split over shards keep unique image ids


@dataclass
class ImportWork:
    """One shard of an import: whole identities, read from `reader`."""

    shard: int
    identities: list[PlannedIdentity]
    reader: SourceReader
    lease_token: str | None = None

    @property
    def items(self) -> int:
        return sum(len(identity.refs) for identity in self.identities)


@dataclass
class ImportPlan:
    works: list[ImportWork]
    fingerprint: str
    layout: str | None
    items: int
    labels: int
    reader: SourceReader = field(repr=False, default=None)  # type: ignore[assignment]

    def with_lease(self, token: str) -> list[ImportWork]:
        for work in self.works:
            work.lease_token = token
        return self.works


def plan_import(spec: ImportSpec) -> ImportPlan:
    """Plan `spec.source` (SourceError when it cannot be imported as asked)."""
    reader = open_source(spec)
    source = reader.plan()
    if source.items == 0:
        raise SourceError(f"{spec.source} holds no items in {spec.format} layout: check the path and --format")
    if source.items > spec.max_images:
        raise SourceError(
            f"{spec.source} holds {source.items} items, more than --max-images "
            f"{spec.max_images}: raise --max-images to import it"
        )
    identities = _planned(source)
    return ImportPlan(
        works=_cut(identities, spec.shard_size, reader),
        fingerprint=source.fingerprint(),
        layout=source.layout,
        items=source.items,
        labels=len(source.identities),
        reader=reader,
    )


def _planned(source: SourcePlan) -> list[PlannedIdentity]:
    ids = safe_identity_ids(source.identities)
    planned = [
        PlannedIdentity(identity_id, identity.label, identity.refs)
        for identity_id, identity in zip(ids, source.identities, strict=True)
    ]
    if source.unlabelled:
        planned.append(PlannedIdentity(UNLABELLED_ID, None, source.unlabelled))
    return planned


def _cut(
    identities: list[PlannedIdentity], shard_size: int, reader: SourceReader
) -> list[ImportWork]:
    """Shards of whole identities, each closed once it holds `shard_size` items (an identity
    larger than that gets a shard of its own); unlabelled items in chunks of `shard_size`."""
    works: list[ImportWork] = []
    current: list[PlannedIdentity] = []
    count = 0
    for identity in identities:
        if identity.source_label is None:
            continue
        current.append(identity)
        count += len(identity.refs)
        if count >= shard_size:
            works.append(ImportWork(len(works), current, reader))
            current, count = [], 0
    if current:
        works.append(ImportWork(len(works), current, reader))
    for identity in identities:
        if identity.source_label is not None:
            continue
        for start in range(0, len(identity.refs), shard_size):
            chunk = PlannedIdentity(
                identity.identity_id, None, identity.refs[start : start + shard_size], start
            )
            works.append(ImportWork(len(works), [chunk], reader))
    return works
