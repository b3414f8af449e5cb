"""Masks painted in the page's canvas (gr.ImageEditor) <-> `<stem>-masklabel.png` masks.

The editor holds the image as its background and the mask as one transparent layer drawn
white over it. The layer's alpha is kept below full opacity so the photo stays visible under
the paint: that translucent white *is* the overlay a person paints on.

Reading a painted layer back: where a pixel's alpha is > 0 the mask is white (255), where it
is 0 the mask is black. A saved mask may be soft, though (grey edges from a generator, or
hand-made grey weights), and the layer cannot show grey values faithfully and stay
translucent at once. So the layer that was *sent* is remembered as a `baseline` mask, and a
pixel whose alpha is still what was sent keeps the baseline's value: saving without painting
rewrites the same mask, and only the pixels a person painted (white) or erased (black) change.
The brush is a little more opaque than any loaded pixel (BRUSH_ALPHA > LAYER_ALPHA), so a
stroke over a loaded area is always told apart from it.

Pure PIL/numpy: no gradio here. The page passes the editor's dict in and gets images out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# The highest alpha a loaded mask pixel gets in the editor layer (white at 59%: the photo
# shows through). A mask value m > 0 is drawn with alpha ceil(m * LAYER_ALPHA / 255) >= 1,
# so every non-zero mask pixel stays visible and alpha 0 means exactly "mask 0".
LAYER_ALPHA = 150
# The brush's opacity (0-1): its alpha, 0.66 * 255 = 168, is above LAYER_ALPHA plus
# ALPHA_TOLERANCE, so painting over a loaded area counts as a change.
BRUSH_OPACITY = 0.66
BRUSH_COLOR = "#ffffff"
# Alphas within this distance of the sent ones count as untouched: the browser's canvas
# premultiplies alpha and may round it by a step or two.
ALPHA_TOLERANCE = 2

# How the overlay shows the area outside the mask: the image is dimmed towards this colour.
_OUTSIDE_TINT = np.array([40, 20, 60], dtype=np.float32)
_OUTSIDE_KEEP = 0.35  # the share of the image still seen outside the mask


def _as_image(value: Any) -> Image.Image | None:
    """A PIL image from what gradio hands over (PIL, numpy array, or a file path)."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, (str, Path)):
        with Image.open(value) as image:
            image.load()
            return image.copy()
    raise TypeError(f"not an image: {type(value).__name__}")


def _alpha(layer: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The layer's alpha channel at `size` (nearest: resampling would invent new alphas)."""
    if layer.mode != "RGBA":
        layer = layer.convert("RGBA")
    alpha = layer.getchannel("A")
    if alpha.size != size:
        alpha = alpha.resize(size, Image.Resampling.NEAREST)
    return np.asarray(alpha, dtype=np.int16)


def layer_alpha(mask: np.ndarray) -> np.ndarray:
    """The alpha a mask's pixels get in the editor layer: 0 stays 0, every m > 0 is >= 1."""
    return np.ceil(mask.astype(np.float32) * (LAYER_ALPHA / 255.0)).astype(np.int16)


def mask_to_layer(mask: Image.Image | None, size: tuple[int, int]) -> Image.Image:
    """The editor layer showing `mask` (or an empty layer): white, translucent, image-sized."""
    if mask is None:
        return Image.new("RGBA", size, (255, 255, 255, 0))
    mask = _fit(mask, size)
    alpha = Image.fromarray(layer_alpha(np.asarray(mask)).astype(np.uint8), "L")
    layer = Image.new("RGBA", size, (255, 255, 255, 0))
    layer.putalpha(alpha)
    return layer


def _fit(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    mask = mask if mask.mode == "L" else mask.convert("L")
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def editor_value(image: Image.Image, mask: Image.Image | None) -> dict:
    """What the page sets the editor to: the image, the mask as its one layer, the overlay."""
    layer = mask_to_layer(mask, image.size)
    composite = image.convert("RGBA")
    composite.alpha_composite(layer)
    return {"background": image, "layers": [layer], "composite": composite.convert("RGB")}


def mask_from_editor(value: dict, size: tuple[int, int],
                     baseline: Image.Image | None = None) -> Image.Image:
    """The "L" mask of `size` (the image's) that the editor's layers describe.

    `baseline` is the mask the editor was opened with (None = it had none): pixels whose
    alpha is unchanged keep its values; painted pixels become 255, erased ones 0. Several
    layers are merged (the most opaque wins). No layer at all means nothing was edited.
    """
    layers = [_as_image(layer) for layer in (value or {}).get("layers") or []]
    layers = [layer for layer in layers if layer is not None]
    base = (np.asarray(_fit(baseline, size), dtype=np.int16) if baseline is not None
            else np.zeros((size[1], size[0]), dtype=np.int16))
    if not layers:
        return Image.fromarray(base.astype(np.uint8), "L")
    alpha = np.max(np.stack([_alpha(layer, size) for layer in layers]), axis=0)
    sent = layer_alpha(base)
    # Alpha 0 is always "erased" (a faint loaded pixel is within the tolerance of 0).
    untouched = np.where(sent == 0, alpha == 0,
                         (alpha > 0) & (np.abs(alpha - sent) <= ALPHA_TOLERANCE))
    edited = np.where(alpha > sent, 255, 0)
    mask = np.where(untouched, base, edited)
    return Image.fromarray(mask.astype(np.uint8), "L")


def filled(size: tuple[int, int]) -> Image.Image:
    """A mask that is white everywhere (train on the whole image)."""
    return Image.new("L", size, 255)


def cleared(size: tuple[int, int]) -> Image.Image:
    """A mask that is black everywhere (nothing painted yet)."""
    return Image.new("L", size, 0)


def inverted(mask: Image.Image) -> Image.Image:
    """White <-> black; grey weights w become 255 - w."""
    mask = mask if mask.mode == "L" else mask.convert("L")
    return Image.fromarray(255 - np.asarray(mask, dtype=np.uint8), "L")


def overlay(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """The image with the area outside the mask dimmed: what training focuses on stays
    bright. Grey mask values dim partly. No mask: the image as it is."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if mask is None:
        return image
    weight = np.asarray(_fit(mask, image.size), dtype=np.float32)[..., None] / 255.0
    pixels = np.asarray(image, dtype=np.float32)
    outside = pixels * _OUTSIDE_KEEP + _OUTSIDE_TINT * (1.0 - _OUTSIDE_KEEP)
    out = pixels * weight + outside * (1.0 - weight)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def preview(image: Image.Image, mask: Image.Image | None, size: int) -> Image.Image:
    """A small overlay (long side at most `size` px) for showing beside the canvas."""
    small = shrink(image, size)
    return overlay(small, _fit(mask, small.size) if mask is not None else None)


def coverage(mask: Image.Image) -> float:
    """The mask's mean weight, 0-1 (the share of the image training focuses on)."""
    return float(np.asarray(mask.convert("L"), dtype=np.float32).mean() / 255.0)


def shrink(image: Image.Image, size: int) -> Image.Image:
    """A copy at most `size` px on its long side (previews need no more)."""
    small = image.copy()
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    return small


def same_picture(a: Any, b: Image.Image, tolerance: float = 24.0) -> bool:
    """Whether two images show the same picture (compared at 16x16, mean difference per
    channel at most `tolerance`). The page checks that the canvas still shows the image a
    mask is saved for: a canvas still loading, or showing the previous image, must never
    write its paint over another image's mask."""
    a = _as_image(a)
    if a is None:
        return False
    small_a = np.asarray(a.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR),
                         dtype=np.float32)
    small_b = np.asarray(b.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR),
                         dtype=np.float32)
    return float(np.abs(small_a - small_b).mean()) <= tolerance


def canvas_mask(value: Any, image: Image.Image,
                baseline: Image.Image | None) -> Image.Image | None:
    """The mask the canvas holds now for `image` (painted strokes included), or None when the
    canvas does not show that image (empty, still loading, another image)."""
    if not isinstance(value, dict) or not same_picture(value.get("background"), image):
        return None
    return mask_from_editor(value, image.size, baseline)


def same_mask(a: Image.Image | None, b: Image.Image | None) -> bool:
    """Whether two masks are pixel for pixel the same (None = no mask, i.e. all black)."""
    if a is None and b is None:
        return True
    size = (a if a is not None else b).size
    a = np.asarray(a if a is not None else cleared(size))
    b = np.asarray(b if b is not None else cleared(size))
    return a.shape == b.shape and bool((a == b).all())
