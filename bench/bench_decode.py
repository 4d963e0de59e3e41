"""Host-side cost of judging the stored bytes: JPEG decode of a shard batch, before and
after dropping the two extra copies (Pillow's RGB convert() and asarray's tobytes).

    .venv/bin/python bench/bench_decode.py            # 512x512 JPEG q95, batch of 16

Checks that every variant gives the same pixels, bit for bit, then prints ms per image
(median of repeats, one thread) for decoding a batch as the shard needs it: one
(B, H, W, 3) array for the face analyzer.
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from arc2face_engine.dataset.codec import decode_image, decode_image_into, encode_image


def decode_with_copies(data: bytes) -> np.ndarray:
    """The decode as it was: convert("RGB") copies, asarray copies again."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def face_like_images(count: int, size: int) -> list[np.ndarray]:
    """Smooth random images (JPEG sizes like a photo's, not like white noise's)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        images.append(np.ascontiguousarray(np.kron(coarse, np.ones((16, 16, 1), np.uint8))))
    return images


def per_image_ms(run: Callable[[], object], images: int, repeats: int) -> float:
    run()  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / images * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    encoded = [encode_image(pixels, "jpeg", 95) for pixels in face_like_images(args.batch, args.size)]
    variants = {
        "before: convert + asarray": decode_with_copies,
        "decode_image (no convert copy)": decode_image,
    }
    reference = [decode_with_copies(data) for data in encoded]
    for name, decode in variants.items():
        decoded = [decode(data) for data in encoded]
        gc.collect()  # the views must outlive their Pillow images
        assert all(np.array_equal(a, b) for a, b in zip(decoded, reference, strict=True)), name
    batch = np.empty((args.batch, args.size, args.size, 3), np.uint8)
    for data, out in zip(encoded, batch, strict=True):
        decode_image_into(data, out)
    gc.collect()
    assert np.array_equal(batch, np.stack(reference)), "decode_image_into"
    print(f"{args.batch} JPEG images {args.size}x{args.size} q95, pixels bit-identical")
    print(f"{'shard batch (decode + batch)':<44} {'ms/img':>8}")
    runs = {
        "before: convert + asarray, np.stack": lambda: np.stack(
            [decode_with_copies(x) for x in encoded]
        ),
        "decode_image, np.stack": lambda: np.stack([decode_image(x) for x in encoded]),
        "decode_image_into the batch (shard's path)": lambda: [
            decode_image_into(x, out) for x, out in zip(encoded, batch, strict=True)
        ],
    }
    for name, run in runs.items():
        print(f"{name:<44} {per_image_ms(run, args.batch, args.repeats):>8.2f}")


if __name__ == "__main__":
    main()
