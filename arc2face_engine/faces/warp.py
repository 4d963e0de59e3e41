"""OpenCV's uint8 resize and affine warp, batched in torch, rounding included.

insightface resizes the detector input with `cv2.resize` (INTER_LINEAR) and crops faces
with `cv2.warpAffine` (INTER_LINEAR, constant black border). Resize works in fixed point
(11-bit coefficients); OpenCV 5's warp blends in float32 and rounds. These functions
reproduce that arithmetic on whole batches on any device, so the GPU path feeds the
networks the same pixels as the onnxruntime path (the tests compare them with OpenCV:
at most 1 grey level apart, on well under 1% of the pixels).
"""

from __future__ import annotations

import torch

RESIZE_COEF_BITS = 11  # OpenCV INTER_RESIZE_COEF_BITS
RESIZE_ONE = 1 << RESIZE_COEF_BITS


def _resize_taps(size_in: int, size_out: int, device: torch.device) -> tuple:
    """Per output index: the first source tap and its 11-bit weights (cv2 resize, linear)."""
    scale = 1.0 / (size_out / size_in)  # OpenCV: 1 / inv_scale, in double
    positions = torch.arange(size_out, dtype=torch.float64, device=device)
    fx = ((positions + 0.5) * scale - 0.5).to(torch.float32)
    first = torch.floor(fx)
    fx = fx - first
    first = first.to(torch.int64)
    below = first < 0
    fx = torch.where(below, torch.zeros_like(fx), fx)
    first = torch.where(below, torch.zeros_like(first), first)
    above = first >= size_in - 1
    fx = torch.where(above, torch.zeros_like(fx), fx)
    first = torch.where(above, torch.full_like(first, size_in - 1), first)
    weight0 = torch.round((1.0 - fx) * RESIZE_ONE).to(torch.int32)
    second = torch.clamp(first + 1, max=size_in - 1)
    return first, second, weight0, RESIZE_ONE - weight0


def resize_linear_u8(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """cv2.resize(image, (width, height)) with INTER_LINEAR for a (B, H, W, C) uint8 batch.

    Horizontal pass in int32, vertical pass with OpenCV's SIMD rounding
    ((((a >> 4) * b0) >> 16) + (((c >> 4) * b1) >> 16) + 2) >> 2."""
    size_h, size_w = images.shape[1:3]
    if (size_h, size_w) == (height, width):
        return images.clone()
    x0, x1, ax0, ax1 = _resize_taps(size_w, width, images.device)
    y0, y1, by0, by1 = _resize_taps(size_h, height, images.device)
    pixels = images.to(torch.int32)
    rows = pixels[:, :, x0] * ax0[None, None, :, None] + pixels[:, :, x1] * ax1[None, None, :, None]
    top = (rows[:, y0] >> 4) * by0[None, :, None, None]
    bottom = (rows[:, y1] >> 4) * by1[None, :, None, None]
    out = ((top >> 16) + (bottom >> 16) + 2) >> 2
    return out.clamp(0, 255).to(torch.uint8)


def invert_affine(matrices: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) float64 -> the inverse maps, as cv2.invertAffineTransform computes them."""
    a, b, c = matrices[:, 0, 0], matrices[:, 0, 1], matrices[:, 0, 2]
    d, e, f = matrices[:, 1, 0], matrices[:, 1, 1], matrices[:, 1, 2]
    det = a * e - b * d
    inv = torch.where(det != 0, 1.0 / torch.where(det != 0, det, torch.ones_like(det)), 0.0)
    m00, m01, m10, m11 = e * inv, -b * inv, -d * inv, a * inv
    m02 = -m00 * c - m01 * f
    m12 = -m10 * c - m11 * f
    return torch.stack([torch.stack([m00, m01, m02], -1), torch.stack([m10, m11, m12], -1)], dim=1)


def warp_affine_u8(
    images: torch.Tensor, matrices: torch.Tensor, size: int, image_index: torch.Tensor | None = None
) -> torch.Tensor:
    """cv2.warpAffine(images[k], matrices[n], (size, size)) for every n: INTER_LINEAR,
    border 0, on (B, H, W, C) uint8; image_index[n] picks the source image (default n).

    As OpenCV 5 does it: the map is inverted in double and used in float32; each output
    pixel's source position x*M0 + y*M1 + M2 is split into an integer pixel and a fraction,
    the four neighbours are blended in float32 (rows first, then columns) and the result
    rounded half to even; neighbours outside the image count as black."""
    count = matrices.shape[0]
    device = images.device
    if image_index is None:
        image_index = torch.arange(count, device=device)
    _, height, width, channels = images.shape
    inverse = invert_affine(matrices.to(device=device, dtype=torch.float64)).to(torch.float32)
    steps = torch.arange(size, dtype=torch.float32, device=device)
    xs, ys = steps[None, None, :], steps[None, :, None]

    def source(row: int) -> torch.Tensor:
        m0, m1, m2 = (inverse[:, row, k, None, None] for k in range(3))
        return (xs * m0 + ys * m1) + m2

    sx, sy = source(0), source(1)
    ix, iy = torch.floor(sx), torch.floor(sy)
    fx, fy = (sx - ix)[..., None], (sy - iy)[..., None]
    ix, iy = ix.to(torch.int64), iy.to(torch.int64)
    flat = images.reshape(images.shape[0], height * width, channels)

    def tap(dy: int, dx: int) -> torch.Tensor:
        x, y = ix + dx, iy + dy
        inside = ((x >= 0) & (x < width) & (y >= 0) & (y < height))[..., None]
        offsets = (y.clamp(0, height - 1) * width + x.clamp(0, width - 1)).reshape(count, -1)
        pixels = flat[image_index[:, None], offsets].reshape(count, size, size, channels)
        return torch.where(inside, pixels.to(torch.float32), 0.0)

    p00, p01, p10, p11 = tap(0, 0), tap(0, 1), tap(1, 0), tap(1, 1)
    top = p00 + fx * (p01 - p00)
    bottom = p10 + fx * (p11 - p10)
    blended = top + fy * (bottom - top)
    return torch.round(blended).clamp(0, 255).to(torch.uint8)
