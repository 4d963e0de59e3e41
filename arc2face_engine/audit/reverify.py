"""Re-verification: re-run face analysis on a sample of images, compare with the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from arc2face_engine.audit.identities import Identities
from arc2face_engine.audit.report import ReverifyMismatch, ReverifySection
from arc2face_engine.dataset.codec import decode_image
from arc2face_engine.dataset.reader import DatasetReader


def reverify_rows(
    reader: DatasetReader,
    rows: list[dict],
    identities: Identities,
    models_dir: str | Path,
    requested: int,
    det_size: int = 640,
    det_thresh: float = 0.5,
    similarity_tolerance: float = 0.05,
    embedding_min_cosine: float = 0.95,
) -> ReverifySection:
    """Re-run face analysis on sampled images and compare with the stored analysis.

    The job verifies the decoded stored file with the same detection settings, so a
    faithful dataset matches up to float noise across machines; tolerances absorb that.
    """
    from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer

    analyzer = FaceAnalyzer.from_models_dir(models_dir, det_size=det_size, det_thresh=det_thresh)
    section = ReverifySection(
        requested=requested,
        similarity_tolerance=similarity_tolerance,
        embedding_min_cosine=embedding_min_cosine,
    )
    known = {identity: i for i, identity in enumerate(identities.ids.to_pylist())}
    for row in rows:
        try:
            image = decode_image(reader.read_image_bytes(row["path"]))
        except Exception:
            section.mismatches.append(
                ReverifyMismatch(image_id=row["image_id"], check="unreadable")
            )
            continue
        record = analyzer.analyze([image])[0]
        section.checked += 1
        section.mismatches.extend(
            _compare(
                row,
                record,
                identities.embeddings[known[row["identity_id"]]],
                similarity_tolerance,
                embedding_min_cosine,
            )
        )
    return section


def _compare(
    row: dict, record, identity_embedding: np.ndarray, similarity_tolerance: float,
    embedding_min_cosine: float,
) -> list[ReverifyMismatch]:  # fmt: skip
    image_id = row["image_id"]
    found = []
    if record.face_count != row["face_count"]:
        found.append(ReverifyMismatch(image_id=image_id, check="face_count",
                                      stored=row["face_count"], measured=record.face_count))  # fmt: skip
    if record.embedding is None or row["face_embedding"] is None:
        return found
    measured = np.asarray(record.embedding, np.float32)
    measured = measured / max(float(np.linalg.norm(measured)), 1e-12)
    stored = np.asarray(row["face_embedding"], np.float32)
    agreement = float(measured @ (stored / max(float(np.linalg.norm(stored)), 1e-12)))
    if agreement < embedding_min_cosine:
        found.append(ReverifyMismatch(image_id=image_id, check="embedding", stored=1.0,
                                      measured=agreement))  # fmt: skip
    similarity = float(measured @ identity_embedding)
    if row["similarity"] is not None and abs(similarity - row["similarity"]) > similarity_tolerance:
        found.append(ReverifyMismatch(image_id=image_id, check="similarity",
                                      stored=row["similarity"], measured=similarity))  # fmt: skip
    return found
