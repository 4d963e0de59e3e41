"""Expression banks: the FLAME vectors that condition Arc2Face's Expression Adapter.

Each :class:`Expression` holds 55 float32 values, in the order the adapter was trained on
(SMIRK's encoder outputs): 50 FLAME expression coefficients, 2 eyelid closures (left,
right; 0 open, 1 closed) and 3 jaw values (opening >= 0, then two side rotations in
[-0.2, 0.2], axis-angle radians). Values outside these ranges are clamped; expression
coefficients are unbounded in principle but clamped to [-3, 3], since FLAME's expression
basis is scaled to unit variance and |x| > 3 is far outside anything the adapter saw.

Banks come from a file (Parquet / NPY / YAML), a seeded Gaussian prior, the neutral face,
or SMIRK run on reference photos.
"""

from __future__ import annotations

import io
import logging
import posixpath
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from schemas.errors import BankError, CheckpointMismatch, ModelFileMissing, UserError
from schemas.tables import EXPRESSION_DIM, EXPRESSION_TABLE_SCHEMA

logger = logging.getLogger(__name__)

EXPRESSION_KINDS = ("none", "neutral", "file", "random")
N_EXPRESSION = 50
EYELIDS = slice(50, 52)
JAW_OPEN = 52
JAW_SIDE = slice(53, 55)
EXPRESSION_LIMIT = 3.0
JAW_SIDE_LIMIT = 0.2

# Random prior, per component (times `spread`):
# - expression coefficients: N(0, s_k), s_k = 1 / sqrt(1 + k / 5), decaying with the PCA
#   index k like the variance that reconstructions (SMIRK, EMOCA) put on later components
#   (1.0 for k=0, 0.45 for k=20, 0.30 for k=49);
# - eyelids: a shared half-normal closure |N(0, 0.2)| (mean ~0.16; blinks are mostly
#   symmetric) plus N(0, 0.05) per eye, clipped to [0, 1];
# - jaw: opening half-normal |N(0, 0.1)| rad, side rotations N(0, 0.03) rad clipped to ±0.2.
EXPRESSION_STD = 1.0 / np.sqrt(1.0 + np.arange(N_EXPRESSION) / 5.0)
EYELID_SHARED_STD = 0.2
EYELID_PER_EYE_STD = 0.05
JAW_OPEN_STD = 0.1
JAW_SIDE_STD = 0.03

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SAVE_SUFFIXES = (".parquet", ".yaml", ".yml")


@dataclass(frozen=True)
class Expression:
    name: str
    values: np.ndarray  # float32 (55,)


@dataclass
class ExpressionBank:
    expressions: list[Expression] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.expressions)

    def __getitem__(self, index: int) -> Expression:
        return self.expressions[index]

    def __iter__(self) -> Iterator[Expression]:
        return iter(self.expressions)

    @property
    def names(self) -> list[str]:
        return [expression.name for expression in self.expressions]

    def values(self) -> np.ndarray:
        """All vectors as one float32 (N, 55) array."""
        return np.stack([e.values for e in self.expressions]).astype(np.float32)

    @classmethod
    def from_arrays(cls, names: Sequence[str], values: np.ndarray, source: str) -> ExpressionBank:
        """Validate (length, finiteness), clamp to the FLAME ranges with a warning, wrap."""
        rows = [np.asarray(row, dtype=np.float64).ravel() for row in values]
        if not rows:
            raise BankError(f"expression source {source} is empty; give at least one expression")
        for index, (name, row) in enumerate(zip(names, rows, strict=True)):
            if row.size != EXPRESSION_DIM:
                raise BankError(
                    f"expression source {source} row {index} ({name}) has {row.size} values; "
                    f"each needs {EXPRESSION_DIM} (50 expression + 2 eyelid + 3 jaw)"
                )
            if not np.isfinite(row).all():
                raise BankError(
                    f"expression source {source} row {index} ({name}) has NaN or infinite "
                    "values; replace them with finite numbers"
                )
        matrix = np.stack(rows)
        clamped = clamp_to_ranges(matrix)
        changed = int((clamped != matrix).sum())
        if changed:
            message = (
                f"expression source {source}: clamped {changed} value(s) to the FLAME ranges "
                "(expression [-3, 3], eyelids [0, 1], jaw opening >= 0, jaw sides [-0.2, 0.2])"
            )
            logger.warning(message)
            warnings.warn(message, stacklevel=3)
        expressions = [
            Expression(str(name), row.astype(np.float32))
            for name, row in zip(names, clamped, strict=True)
        ]
        return cls(expressions)

    @classmethod
    def from_file(cls, uri: str, storage_options: dict | None = None) -> ExpressionBank:
        """Parquet (name + values list, or name + e0..e54), NPY (N x 55) or YAML (name: [55])."""
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if not fs.isfile(path):
            raise BankError(f"expression file {uri} does not exist; pass a .parquet/.npy/.yaml")
        data = fs.cat_file(path)
        suffix = posixpath.splitext(path)[1].lower()
        readers = {
            ".parquet": _read_parquet,
            ".npy": _read_npy,
            ".yaml": _read_yaml,
            ".yml": _read_yaml,
        }
        if suffix not in readers:
            raise BankError(
                f"expression file {uri} has an unknown type {suffix!r}; use .parquet, .npy or .yaml"
            )
        names, values = readers[suffix](data, uri)
        return cls.from_arrays(names, values, uri)

    @classmethod
    def random(cls, count: int, seed: int, spread: float = 1.0) -> ExpressionBank:
        """``count`` draws from the per-component Gaussian prior above, seeded, clamped."""
        if count < 1:
            raise BankError(f"expression count {count} must be at least 1; set expressions.count")
        if not (np.isfinite(spread) and spread >= 0):
            raise BankError(f"expression spread {spread} must be >= 0; 1.0 is the prior itself")
        rng = np.random.default_rng(seed)
        values = np.zeros((count, EXPRESSION_DIM))
        values[:, :N_EXPRESSION] = rng.normal(size=(count, N_EXPRESSION)) * EXPRESSION_STD
        shared = np.abs(rng.normal(size=(count, 1))) * EYELID_SHARED_STD
        values[:, EYELIDS] = shared + rng.normal(size=(count, 2)) * EYELID_PER_EYE_STD
        values[:, JAW_OPEN] = np.abs(rng.normal(size=count)) * JAW_OPEN_STD
        values[:, JAW_SIDE] = rng.normal(size=(count, 2)) * JAW_SIDE_STD
        values = clamp_to_ranges(values * spread)
        names = [f"rand-{index:03d}" for index in range(count)]
        return cls(
            [Expression(n, v.astype(np.float32)) for n, v in zip(names, values, strict=True)]
        )

    @classmethod
    def neutral(cls) -> ExpressionBank:
        return cls([Expression("neutral", np.zeros(EXPRESSION_DIM, dtype=np.float32))])

    def save(self, uri: str, storage_options: dict | None = None) -> None:
        """Write the bank in the format its suffix names, one that from_file reads back with
        the names: .parquet (name, values list<float32, 55>) or .yaml / .yml (name: [55])."""
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        suffix = posixpath.splitext(path)[1].lower()
        if suffix not in SAVE_SUFFIXES:
            hint = " (.npy would lose the names)" if suffix == ".npy" else ""
            raise BankError(
                f"cannot save expression bank to {uri}: suffix {suffix or '(none)'!r} is not "
                f"supported{hint}; use {', '.join(SAVE_SUFFIXES)}"
            )
        if suffix == ".parquet":
            table = pa.table(
                {"name": self.names, "values": [e.values.tolist() for e in self.expressions]},
                schema=EXPRESSION_TABLE_SCHEMA,
            )
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            data = buffer.getvalue()
        else:
            duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
            if duplicates:
                raise BankError(
                    f"cannot save expression bank to {uri}: YAML keys must be unique and "
                    f"{duplicates[0]!r} repeats; rename it or save to .parquet"
                )
            content = {e.name: [float(v) for v in e.values] for e in self.expressions}
            data = yaml.safe_dump(content, sort_keys=False).encode()
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as handle:
            handle.write(data)


def clamp_to_ranges(values: np.ndarray) -> np.ndarray:
    """Clamp (..., 55) vectors to the ranges the Expression Adapter was trained on."""
    out = np.array(values, dtype=np.float64, copy=True)
    out[..., :N_EXPRESSION] = out[..., :N_EXPRESSION].clip(-EXPRESSION_LIMIT, EXPRESSION_LIMIT)
    out[..., EYELIDS] = out[..., EYELIDS].clip(0.0, 1.0)
    out[..., JAW_OPEN] = np.maximum(out[..., JAW_OPEN], 0.0)
    out[..., JAW_SIDE] = out[..., JAW_SIDE].clip(-JAW_SIDE_LIMIT, JAW_SIDE_LIMIT)
    return out


def load_expression_bank(
    section: Any,
    seed: int = 0,
    models_dir: str | Path | None = None,
    storage_options: dict | None = None,
) -> ExpressionBank | None:
    """Build the bank a job spec's ``variations.expressions`` section asks for.

    ``section`` is a dict or any object with ``kind``, ``path``, ``count``, ``spread``. For
    kind ``file``, a path that is a folder of photos (or one photo) runs SMIRK on them.
    """
    kind = _field(section, "kind", "none")
    if kind == "none":
        return None
    if kind == "neutral":
        return ExpressionBank.neutral()
    if kind == "random":
        count = _field(section, "count", 8)
        spread = _field(section, "spread", 1.0)
        return ExpressionBank.random(int(count), seed=seed, spread=float(spread))
    if kind == "file":
        path = _field(section, "path", None)
        if not path:
            raise BankError("expressions kind 'file' needs a path; set variations.expressions.path")
        if _is_photo_source(str(path), storage_options):
            if models_dir is None:
                raise BankError(f"expression photos {path} need SMIRK; pass models_dir")
            return extract_with_smirk(str(path), models_dir, storage_options)
        return ExpressionBank.from_file(str(path), storage_options)
    raise BankError(f"unknown expressions kind {kind!r}; use one of {', '.join(EXPRESSION_KINDS)}")


def _field(section: Any, name: str, default: Any) -> Any:
    value = section.get(name) if isinstance(section, dict) else getattr(section, name, None)
    return default if value is None else value


def _is_photo_source(uri: str, storage_options: dict | None) -> bool:
    if uri.lower().endswith(IMAGE_SUFFIXES):
        return True
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs.isdir(path)


# ---------------------------------------------------------------------------------------------
# File readers: each returns (names, rows) and raises BankError naming the file.


def _default_names(count: int) -> list[str]:
    return [f"exp-{index:03d}" for index in range(count)]


def _read_parquet(data: bytes, uri: str) -> tuple[list[str], list[np.ndarray]]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except pa.ArrowException as error:
        detail = str(error).splitlines()[0]
        raise BankError(
            f"expression file {uri} is not valid Parquet ({detail}); re-export it"
        ) from None
    names = (
        [str(n) for n in table.column("name").to_pylist()]
        if "name" in table.column_names
        else _default_names(table.num_rows)
    )
    if "values" in table.column_names:
        _require_numeric(table, "values", uri)
        rows = [
            np.asarray(v if v is not None else [], dtype=np.float64)
            for v in table.column("values").to_pylist()
        ]
        return names, rows
    scalar_columns = [f"e{index}" for index in range(EXPRESSION_DIM)]
    present = [c for c in scalar_columns if c in table.column_names]
    if not present:
        raise BankError(
            f"expression file {uri} has neither a 'values' column nor e0..e54 columns; "
            "write name + values (list of 55 floats)"
        )
    if len(present) != EXPRESSION_DIM:
        raise BankError(
            f"expression file {uri} has {len(present)} of the columns e0..e54; "
            f"write all {EXPRESSION_DIM} or use one 'values' list column"
        )
    for column in scalar_columns:
        _require_numeric(table, column, uri)
    matrix = np.stack(
        [np.asarray(table.column(c).to_pylist(), dtype=np.float64) for c in scalar_columns],
        axis=1,
    )
    return names, list(matrix)


def _require_numeric(table: pa.Table, column: str, uri: str) -> None:
    """Raise BankError unless `column` holds numbers (or lists of numbers)."""
    kind = table.schema.field(column).type
    nested = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    values = kind.value_type if nested or pa.types.is_fixed_size_list(kind) else kind
    if not (pa.types.is_integer(values) or pa.types.is_floating(values)):
        raise BankError(
            f"expression file {uri} column {column!r} holds {kind}, not numbers; "
            f"write {EXPRESSION_DIM} floats per expression"
        )


def _read_npy(data: bytes, uri: str) -> tuple[list[str], list[np.ndarray]]:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        detail = str(error).splitlines()[0]
        raise BankError(
            f"expression file {uri} is not a numeric .npy ({detail}); save N x 55 floats"
        ) from None
    if not np.issubdtype(array.dtype, np.number):
        raise BankError(
            f"expression file {uri} holds {array.dtype}, not numbers; save N x 55 floats"
        )
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise BankError(
            f"expression file {uri} has shape {array.shape}; save an N x {EXPRESSION_DIM} array"
        )
    return _default_names(len(array)), list(array.astype(np.float64))


def _read_yaml(data: bytes, uri: str) -> tuple[list[str], list[np.ndarray]]:
    try:
        content = yaml.safe_load(data)
    except yaml.YAMLError as error:
        detail = str(error).splitlines()[0]
        raise BankError(
            f"expression file {uri} is not valid YAML ({detail}); fix the syntax"
        ) from None
    if not isinstance(content, dict):
        raise BankError(
            f"expression file {uri} is not a mapping; write 'name: [55 numbers]' per expression"
        )
    names, rows = [], []
    for index, (name, values) in enumerate(content.items()):
        if not isinstance(values, list):
            raise BankError(
                f"expression file {uri} row {index} ({name}) is not a list; "
                f"write {EXPRESSION_DIM} numbers in brackets"
            )
        try:
            rows.append(np.asarray(values, dtype=np.float64))
        except (TypeError, ValueError):
            raise BankError(
                f"expression file {uri} row {index} ({name}) has non-numeric values; use numbers"
            ) from None
        names.append(str(name))
    return names, rows


# ---------------------------------------------------------------------------------------------
# SMIRK extraction (optional: needs mediapipe + timm and the SMIRK files in models/smirk/)

SMIRK_CHECKPOINT = "smirk/SMIRK_em1.pt"
SMIRK_LANDMARKER = "smirk/face_landmarker.task"
SMIRK_PREFIX = "smirk_encoder.expression_encoder."
SMIRK_BACKBONE = "tf_mobilenetv3_large_minimal_100"
SMIRK_INPUT = 224
SMIRK_CROP_SCALE = 1.4  # crop side = 1.4 x the mean side of the landmarks' box (SMIRK's demo)


def extract_with_smirk(
    image_uris: str | Sequence[str],
    models_dir: str | Path,
    storage_options: dict | None = None,
) -> ExpressionBank:
    """FLAME expression vectors of reference photos with SMIRK (one per photo with a face).

    ``image_uris`` is a folder (its image files, sorted) or a list of image URIs.
    """
    _require_smirk_files(Path(models_dir))
    try:
        import mediapipe  # noqa: F401
        import timm  # noqa: F401
    except ImportError:
        raise UserError(
            "SMIRK extraction needs mediapipe and timm; run `pip install mediapipe timm`"
        ) from None
    uris = _list_images(image_uris, storage_options)
    landmarker = _smirk_landmarker(Path(models_dir) / SMIRK_LANDMARKER)
    encoder = _smirk_encoder(Path(models_dir) / SMIRK_CHECKPOINT)
    names, rows = [], []
    for uri in uris:
        image = _read_photo(uri, storage_options)
        landmarks = _detect_landmarks(landmarker, image)
        if landmarks is None:
            logger.warning("SMIRK: no face in %s; skipped", uri)
            continue
        rows.append(_encode_expression(encoder, _crop_face(image, landmarks)))
        names.append(posixpath.splitext(posixpath.basename(uri))[0])
    if not rows:
        raise BankError(f"SMIRK found no face in {len(uris)} photo(s); pass clear frontal photos")
    return ExpressionBank.from_arrays(names, np.stack(rows), f"SMIRK({len(uris)} photos)")


def _require_smirk_files(models_dir: Path) -> None:
    from arc2face_engine.models_dir import fetch_hint

    missing = [
        relative
        for relative in (SMIRK_CHECKPOINT, SMIRK_LANDMARKER)
        if not (models_dir / relative).is_file()
    ]
    if missing:
        raise ModelFileMissing(
            f"SMIRK files missing: {', '.join(str(models_dir / m) for m in missing)}; "
            f"{fetch_hint(models_dir, 'smirk')}"
        )


def _list_images(image_uris: str | Sequence[str], storage_options: dict | None) -> list[str]:
    if not isinstance(image_uris, str):
        return list(image_uris)
    fs, path = fsspec.core.url_to_fs(image_uris, **(storage_options or {}))
    if not fs.isdir(path):
        return [image_uris]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    found = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise BankError(f"folder {image_uris} has no photos; add .jpg/.png images of faces")
    return [prefix + p for p in found]


def _read_photo(uri: str, storage_options: dict | None) -> np.ndarray:
    import cv2

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    decoded = cv2.imdecode(np.frombuffer(fs.cat_file(path), np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise BankError(f"photo {uri} does not decode; pass JPEG or PNG images")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _smirk_landmarker(task_file: Path) -> Any:
    from mediapipe.tasks import python as mp_tasks
    from mediapipe.tasks.python import vision

    options = vision.FaceLandmarkerOptions(
        base_options=mp_tasks.BaseOptions(model_asset_path=str(task_file)),
        num_faces=1,
        min_face_detection_confidence=0.1,
        min_face_presence_confidence=0.1,
    )
    return vision.FaceLandmarker.create_from_options(options)


def _detect_landmarks(landmarker: Any, image: np.ndarray) -> np.ndarray | None:
    """MediaPipe's 478 landmarks in pixels (x, y), or None when no face is found."""
    import mediapipe as mp

    result = landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
    if not result.face_landmarks:
        return None
    height, width = image.shape[:2]
    return np.array([[p.x * width, p.y * height] for p in result.face_landmarks[0]])


def _crop_face(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """A SMIRK_INPUT square crop around the landmarks' box, enlarged by SMIRK_CROP_SCALE."""
    import cv2

    low, high = landmarks.min(axis=0), landmarks.max(axis=0)
    centre = (low + high) / 2
    side = float((high - low).mean()) * SMIRK_CROP_SCALE
    scale = (SMIRK_INPUT - 1) / side
    # Similarity warp (no rotation): the crop's top-left corner maps to (0, 0).
    affine = np.array(
        [[scale, 0, -(centre[0] - side / 2) * scale], [0, scale, -(centre[1] - side / 2) * scale]]
    )
    return cv2.warpAffine(image, affine, (SMIRK_INPUT, SMIRK_INPUT), flags=cv2.INTER_LINEAR)


def _smirk_encoder(checkpoint: Path) -> Any:
    """SMIRK's expression encoder: a timm MobileNetV3 trunk + one linear layer to 55 values."""
    import timm
    import torch
    from torch import nn

    class ExpressionEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = timm.create_model(SMIRK_BACKBONE, pretrained=False, features_only=True)
            width = self.encoder.feature_info[-1]["num_chs"]
            self.expression_layers = nn.Sequential(nn.Linear(width, EXPRESSION_DIM))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            features = self.encoder(pixels)[-1].mean(dim=(2, 3))
            return self.expression_layers(features)

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {k[len(SMIRK_PREFIX) :]: v for k, v in state.items() if k.startswith(SMIRK_PREFIX)}
    model = ExpressionEncoder()
    report = model.load_state_dict(state, strict=False)
    if report.missing_keys or report.unexpected_keys:
        raise CheckpointMismatch(
            f"{checkpoint} does not fit SMIRK's expression encoder "
            f"(missing {report.missing_keys[:3]}, unexpected {report.unexpected_keys[:3]}); "
            "re-download SMIRK_em1.pt from github.com/georgeretsi/smirk"
        )
    return model.eval()


def _encode_expression(encoder: Any, crop: np.ndarray) -> np.ndarray:
    """Run the encoder on an RGB crop in [0, 1]; SMIRK's output activations become clamps."""
    import torch

    pixels = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        raw = encoder(pixels)[0].double().numpy()
    # Eyelids are clamped to [0, 1], jaw opening ReLU'd, jaw sides clamped to +-0.2:
    # exactly clamp_to_ranges on those slots. Expression coefficients stay raw here.
    out = raw.copy()
    out[EYELIDS] = raw[EYELIDS].clip(0, 1)
    out[JAW_OPEN] = max(raw[JAW_OPEN], 0.0)
    out[JAW_SIDE] = raw[JAW_SIDE].clip(-JAW_SIDE_LIMIT, JAW_SIDE_LIMIT)
    return out
