"""torchvision ImageFolder layout: out/<label:05d>/<image_id>.jpg plus labels.csv."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable

from arc2face_engine.dataset.exports import ExportItem, ExportPlan, ExportResult


def write_imagefolder(
    items: Iterable[ExportItem], plan: ExportPlan, fs, root: str, **options
) -> ExportResult:
    """Folder names are zero-padded labels, so ImageFolder's sorted class order is the label order."""
    if options:
        raise TypeError(f"unexpected imagefolder options {sorted(options)}")
    per_label: Counter = Counter()
    for item in items:
        folder = f"{root}/{item.label:05d}"
        if not per_label[item.label]:
            fs.makedirs(folder, exist_ok=True)
        fs.pipe_file(f"{folder}/{item.image_id}.jpg", item.data)
        per_label[item.label] += 1
    buffer = io.StringIO()
    table = csv.writer(buffer, lineterminator="\n")
    table.writerow(["label", "identity_id", "images"])
    for label, identity_id in enumerate(plan.identity_ids):
        table.writerow([label, identity_id, per_label[label]])
    fs.pipe_file(f"{root}/labels.csv", buffer.getvalue().encode())
    return ExportResult(
        fmt="imagefolder", out_uri=root, images=sum(per_label.values()),
        identities=len(per_label), files=[f"{root}/labels.csv"],
    )  # fmt: skip
