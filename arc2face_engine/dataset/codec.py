"""Image bytes <-> RGB pixels, the one place the dataset's image codec lives."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pyarrow as pa
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
        image.load()
        # convert() of an RGB image is a copy; asarray makes one more (tobytes).
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def decode_image_into(data: bytes, out: np.ndarray) -> np.ndarray:
    """The pixels of `decode_image`, bit for bit, written into `out` (H, W, 3) uint8 with
    one vectorised copy from the decoder's own buffer: Pillow keeps RGB as 4 bytes a
    pixel and exports it to Arrow without a copy, and OpenCV drops the 4th byte while
    copying (a strided numpy copy of 3 bytes out of 4 would be slower than the decode)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if out.shape != (rgb.height, rgb.width, 3) or out.dtype != np.uint8:
            raise ValueError(
                f"decoded image is {rgb.width}x{rgb.height} RGB but the output is "
                f"{out.dtype} {out.shape}: pass an (H, W, 3) uint8 array of its size"
            )
        flat = pa.array(rgb).flatten().to_numpy(zero_copy_only=True)
        cv2.cvtColor(flat.reshape(rgb.height, rgb.width, 4), cv2.COLOR_RGBA2RGB, dst=out)
    return out
