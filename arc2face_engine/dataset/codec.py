"""Image bytes <-> RGB pixels, the one place the dataset's image codec lives."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """Encode an RGB uint8 image; deterministic bytes for the same pixels and settings."""
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format in ("jpeg", "webp") else {}
    Image.fromarray(pixels).save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 pixels of encoded image bytes, as any reader of the dataset sees them."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
