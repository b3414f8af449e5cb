"""Masks painted in the page's canvas: the editor's layers <-> `<stem>-masklabel.png`."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainer.masks import painted
from trainer.masks.store import existing_mask, write_mask

SIZE = (40, 30)  # (width, height): not square, so a transposed size would show


def layer_with(alpha: np.ndarray) -> Image.Image:
    """An RGBA layer as the browser returns it: white paint, the given alpha."""
    layer = Image.new("RGBA", (alpha.shape[1], alpha.shape[0]), (255, 255, 255, 0))
    layer.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
    return layer


def soft_mask() -> Image.Image:
    """A mask with every grey value, like the demo's generated masks."""
    values = (np.arange(SIZE[0] * SIZE[1]) % 256).reshape(SIZE[1], SIZE[0])
    return Image.fromarray(values.astype(np.uint8), "L")


def test_painted_pixels_become_white_and_the_rest_black():
    alpha = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    alpha[10:20, 5:35] = 168   # a stroke of the semi-opaque brush
    alpha[25, 2] = 1           # the faintest anti-aliased edge still counts
    mask = painted.mask_from_editor({"layers": [layer_with(alpha)]}, SIZE)
    assert mask.mode == "L" and mask.size == SIZE
    expected = np.where(alpha > 0, 255, 0)
    assert np.array_equal(np.asarray(mask), expected)


def test_a_layer_of_another_size_is_read_at_the_images_size():
    big = np.zeros((SIZE[1] * 2, SIZE[0] * 2), dtype=np.uint8)
    big[:, : SIZE[0]] = 200  # the left half, at twice the resolution (a HiDPI canvas)
    mask = painted.mask_from_editor({"layers": [layer_with(big)]}, SIZE)
    assert mask.size == SIZE
    values = np.asarray(mask)
    assert (values[:, : SIZE[0] // 2] == 255).all() and (values[:, SIZE[0] // 2:] == 0).all()


def test_an_existing_mask_round_trips_through_the_editor_exactly():
    mask = soft_mask()
    image = Image.new("RGB", SIZE, (10, 120, 200))
    value = painted.editor_value(image, mask)
    assert value["background"].size == SIZE
    (layer,) = value["layers"]
    assert layer.mode == "RGBA" and layer.size == SIZE
    alpha = np.asarray(layer.getchannel("A"))
    # Translucent (the image shows through), and every non-zero weight visible.
    assert alpha.max() == painted.LAYER_ALPHA
    assert ((alpha > 0) == (np.asarray(mask) > 0)).all()
    again = painted.mask_from_editor(value, SIZE, baseline=mask)
    assert np.array_equal(np.asarray(again), np.asarray(mask))


def test_canvas_rounding_of_the_sent_alpha_keeps_the_saved_values():
    mask = soft_mask()
    alpha = np.asarray(painted.mask_to_layer(mask, SIZE).getchannel("A")).astype(np.int16)
    jitter = np.where(alpha > 0, np.clip(alpha + np.sign(np.arange(alpha.size) % 3 - 1)
                                         .reshape(alpha.shape), 1, 255), 0)
    again = painted.mask_from_editor({"layers": [layer_with(jitter)]}, SIZE, baseline=mask)
    assert np.array_equal(np.asarray(again), np.asarray(mask))


def test_painting_over_and_erasing_a_loaded_mask_change_only_those_pixels():
    mask = soft_mask()
    alpha = np.asarray(painted.mask_to_layer(mask, SIZE).getchannel("A")).copy()
    brush = round(painted.BRUSH_OPACITY * 255)
    alpha[0:5, :] = brush       # painted over (also over the loaded full-white pixels)
    alpha[25:30, :] = 0         # erased
    result = np.asarray(painted.mask_from_editor({"layers": [layer_with(alpha)]}, SIZE,
                                                 baseline=mask))
    assert (result[0:5] == 255).all()
    assert (result[25:30] == 0).all()
    assert np.array_equal(result[5:25], np.asarray(mask)[5:25])


def test_no_layer_means_nothing_was_edited():
    mask = soft_mask()
    kept = painted.mask_from_editor({"background": None, "layers": []}, SIZE, baseline=mask)
    assert np.array_equal(np.asarray(kept), np.asarray(mask))
    empty = painted.mask_from_editor({"layers": []}, SIZE)
    assert empty.size == SIZE and np.asarray(empty).max() == 0


def test_fill_clear_and_invert():
    assert np.asarray(painted.filled(SIZE)).min() == 255
    assert np.asarray(painted.cleared(SIZE)).max() == 0
    assert painted.filled(SIZE).size == SIZE == painted.cleared(SIZE).size
    mask = soft_mask()
    inverted = painted.inverted(mask)
    assert inverted.mode == "L"
    assert np.array_equal(np.asarray(inverted), 255 - np.asarray(mask))
    # A filled mask loaded into the editor and saved unchanged stays filled.
    full = painted.filled(SIZE)
    value = painted.editor_value(Image.new("RGB", SIZE), full)
    assert np.asarray(painted.mask_from_editor(value, SIZE, baseline=full)).min() == 255


def test_overlay_keeps_the_focus_and_dims_the_rest():
    image = Image.new("RGB", SIZE, (200, 180, 160))
    mask = painted.cleared(SIZE)
    mask.paste(255, (0, 0, 20, 30))
    shown = np.asarray(painted.overlay(image, mask)).astype(int)
    assert (shown[:, :20] == [200, 180, 160]).all()
    assert (shown[:, 20:].sum(axis=2) < 200 + 180 + 160 - 150).all()
    assert painted.overlay(image, None) is image
    small = painted.preview(Image.new("RGB", (400, 100)), None, 64)
    assert small.size == (64, 16)


def test_a_painted_mask_is_saved_single_channel_at_the_images_size(tmp_path):
    image_path = tmp_path / "photo.png"
    Image.new("RGB", SIZE, (90, 90, 90)).save(image_path)
    alpha = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    alpha[:, :10] = 168
    mask = painted.mask_from_editor({"layers": [layer_with(alpha)]}, SIZE)
    path = write_mask(image_path, mask)
    assert path.name == "photo-masklabel.png"
    with Image.open(path) as saved:
        assert saved.mode == "L" and saved.size == SIZE
        assert np.array_equal(np.asarray(saved), np.asarray(mask))
    assert np.array_equal(np.asarray(existing_mask(image_path)), np.asarray(mask))
    assert painted.coverage(mask) == pytest.approx(10 / SIZE[0])


def test_same_picture_tells_the_open_image_from_another():
    gradient = np.tile(np.arange(0, 200, 5, dtype=np.uint8), (30, 1))
    image = Image.fromarray(np.stack([gradient] * 3, axis=2), "RGB")
    recoded = image.convert("RGBA")  # the canvas returns RGBA
    assert painted.same_picture(recoded, image)
    assert not painted.same_picture(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image)
    assert not painted.same_picture(None, image)
