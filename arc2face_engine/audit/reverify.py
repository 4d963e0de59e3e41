"""Re-verification: re-run face analysis on a sample of images, compare with the manifest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from arc2face_engine.audit.identities import Identities
from arc2face_engine.audit.report import AuditError, ReverifyMismatch, ReverifySection
from arc2face_engine.dataset.codec import decode_image
from arc2face_engine.dataset.reader import DatasetReader


def reverify_models(
    models_dir: str | Path | None, recorded: dict | None, dataset_root: str | None
) -> tuple[Path, str]:
    """(the models folder for re-verification, where it came from): `--models` when given,
    else the models.dir that dataset.json's spec records. A relative recorded path is tried
    against the working folder, then against the folder the dataset was generated from
    (inferred from the recorded relative output.uri and where the dataset is now).

    The recorded path comes from an untrusted file: it is only used when it names a local
    folder, which the report and the console then name, and the face models in it are
    opened as ONNX graphs (no code runs from them)."""
    if models_dir is not None:
        return Path(models_dir), "--models"
    spec = recorded if isinstance(recorded, dict) else {}
    models = spec.get("models")
    folder = models.get("dir") if isinstance(models, dict) else None
    if not isinstance(folder, str) or not folder or "://" in folder:
        raise AuditError(
            "--reverify needs the models directory (dataset.json records no local models.dir): "
            "pass --models DIR"
        )
    tried = _candidates(Path(folder), spec, dataset_root)
    for candidate in tried:
        if candidate.is_dir():
            # absolute, but links kept: the folder named is the one the user knows
            return Path(os.path.abspath(candidate)), f"dataset.json models.dir {folder}"
    raise AuditError(
        f"--reverify needs the models directory: dataset.json's models.dir {folder} is not a "
        f"folder here (tried {', '.join(str(path) for path in tried)}): pass --models DIR"
    )


def _candidates(folder: Path, spec: dict, dataset_root: str | None) -> list[Path]:
    if folder.is_absolute():
        return [folder]
    found = [Path.cwd() / folder]
    generated_in = _generation_folder(spec, dataset_root)
    if generated_in is not None and generated_in != Path.cwd():
        found.append(generated_in / folder)
    return found


def _generation_folder(spec: dict, dataset_root: str | None) -> Path | None:
    """The working folder of the run that wrote the dataset, when its spec gave a relative
    output.uri that the dataset's local path ends with ('./ds' at /proj/ds: /proj)."""
    output = spec.get("output")
    uri = output.get("uri") if isinstance(output, dict) else None
    if dataset_root is None or not isinstance(uri, str) or "://" in uri:
        return None
    relative = Path(os.path.normpath(uri))
    if relative.is_absolute() or ".." in relative.parts:
        return None
    root, size = Path(dataset_root).parts, len(relative.parts)
    if len(root) <= size or root[-size:] != relative.parts:
        return None
    return Path(*root[:-size])


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
