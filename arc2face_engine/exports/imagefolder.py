"""torchvision ImageFolder layout: out/<label:05d>/<image_id>.jpg plus label_map.csv and labels.csv.

labels.csv (what ImageFolder users look for first) is written last, after
label_map.csv; both hold label, identity_id, source_label, images.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from arc2face_engine.exports.base import (
    ExportItem,
    ExportResult,
    ExportSelection,
    check_options,
    label_map_csv,
    write_label_map,
)

LABELS_CSV = "labels.csv"


def write_imagefolder(
    items: Iterable[ExportItem], selection: ExportSelection, fs, root: str, info=None, **options
) -> ExportResult:
    """Folder names are zero-padded labels, so ImageFolder's sorted class order is the label order."""
    check_options("imagefolder", options, ())
    per_label: Counter = Counter()
    for item in items:
        folder = f"{root}/{item.label:05d}"
        if not per_label[item.label]:
            fs.makedirs(folder, exist_ok=True)
        fs.pipe_file(f"{folder}/{item.image_id}.jpg", item.data)
        per_label[item.label] += 1
    label_map = write_label_map(fs, root, selection, per_label)
    fs.pipe_file(f"{root}/{LABELS_CSV}", label_map_csv(selection, per_label))  # last: the marker
    return ExportResult(
        fmt="imagefolder", out_uri=root, images=sum(per_label.values()),
        identities=len(per_label), files=[label_map, f"{root}/{LABELS_CSV}"],
    )  # fmt: skip
