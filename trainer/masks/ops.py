"""From a method's map to the mask that is written: threshold, grow, smooth, then combine
with the image's old mask. Pure array and Pillow work, no file access."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

OVERLAY_TINT = (255, 0, 0)
OVERLAY_OPACITY = 0.5


def shape_mask(focus: np.ndarray, threshold: float, grow: int, smooth: int) -> Image.Image:
    """`focus` (H x W floats in [0, 1]) -> an "L" mask of the same size.

    The order matters: binarise first (`> threshold`), then grow the hard shape by `grow`
    pixels, so that "grow by N px" is exact; then blur by `smooth` px last, so the edges end
    soft (blurring before the threshold would be undone by it).
    """
    binary = np.asarray(focus) > threshold
    binary = grow_binary(binary, grow)
    mask = Image.fromarray(binary.astype(np.uint8) * 255, "L")
    if smooth > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=smooth))
    return mask


def grow_binary(binary: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean H x W array by a disk of `radius` pixels: a pixel turns on when some
    "on" pixel lies within Euclidean distance `radius`.

    The disk is a stack of horizontal runs (half-width isqrt(r² - dy²) at row offset dy); a
    horizontal run dilation is a difference of cumulative sums, so the cost is about 2r + 1
    array passes whatever the radius, not (2r + 1)² shifts.
    """
    radius = int(radius)
    if radius <= 0 or not binary.any():
        return binary
    height, width = binary.shape
    sums = np.zeros((height, width + 1), dtype=np.int64)
    np.cumsum(binary, axis=1, out=sums[:, 1:])
    columns = np.arange(width)
    grown = np.zeros_like(binary, dtype=bool)
    for dy in range(min(radius, height - 1) + 1):
        k = math.isqrt(radius * radius - dy * dy)
        lo = np.clip(columns - k, 0, width)
        hi = np.clip(columns + k + 1, 0, width)
        runs = (sums[:, hi] - sums[:, lo]) > 0  # on where a pixel within k in the same row is
        # A pixel at row y spreads to rows y + dy and y - dy.
        grown[dy:] |= runs[:height - dy]
        if dy:
            grown[:height - dy] |= runs[dy:]
    return grown


def combine(mode: str, old: Image.Image | None, new: Image.Image) -> Image.Image:
    """The mask to write for `mode` ("replace", "fill", "add", "subtract"), all "L" images of
    one size. Callers skip "fill" with an old mask and "subtract" without one beforehand."""
    if mode in ("replace", "fill") or old is None:
        return new
    old_pixels = np.asarray(old, dtype=np.uint8)
    new_pixels = np.asarray(new, dtype=np.uint8)
    if mode == "add":
        pixels = np.maximum(old_pixels, new_pixels)
    elif mode == "subtract":
        pixels = np.minimum(old_pixels, 255 - new_pixels)
    else:
        raise ValueError(f"unknown mask mode {mode!r}")
    return Image.fromarray(pixels, "L")


def overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`image` (RGB) with the mask's focus area tinted; soft edges give a soft tint."""
    tinted = Image.blend(image, Image.new("RGB", image.size, OVERLAY_TINT), OVERLAY_OPACITY)
    return Image.composite(tinted, image, mask)
