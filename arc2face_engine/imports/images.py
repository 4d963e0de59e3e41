"""An item's bytes as an image: which format, how large, its pixels, or why not.

Only what the dataset's readers decode everywhere is kept: JPEG, PNG, WebP and BMP. The
size is read from the header before anything is decoded, so an image over the side bound
costs nothing; Pillow's own decompression-bomb bound stops the rest.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from arc2face_engine.dataset.codec import decode_image
from arc2face_engine.imports.base import MAX_IMAGE_SIDE, image_too_large
from schemas.tables import TOO_LARGE, UNREADABLE

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


@dataclass(frozen=True)
class InspectedImage:
    """A decoded item, or the reason it is refused (`pixels` None)."""

    extension: str | None = None
    width: int | None = None
    height: int | None = None
    pixels: np.ndarray | None = None
    refusal: str | None = None


def inspect_image(data: bytes) -> InspectedImage:
    """Format, size and RGB pixels of `data` (as codec.decode_image gives every reader)."""
    if image_too_large(len(data)):
        return InspectedImage(refusal=TOO_LARGE)
    try:
        with warnings.catch_warnings():
            # Pillow warns above ~89 MP and refuses above ~179 MP (DecompressionBombError);
            # the side bound is checked here first, from the header.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                extension = EXTENSIONS.get(image.format or "")
                width, height = image.size
            if extension is None:
                return InspectedImage(refusal=UNREADABLE)
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
                return InspectedImage(extension, width, height, refusal=TOO_LARGE)
            pixels = decode_image(data)
    except Image.DecompressionBombError:
        return InspectedImage(refusal=TOO_LARGE)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return InspectedImage(refusal=UNREADABLE)  # not an image, truncated, corrupt
    return InspectedImage(extension, width, height, pixels)
