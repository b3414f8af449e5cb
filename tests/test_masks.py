"""Automatic masks (trainer.masks.generate): each method's exact pixels on crafted images,
every mode against an existing mask, threshold/grow/smooth, CLIPSeg end to end on a tiny
random model, clear messages for bad input, and no mask ever lost to a failed write."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data.images import mask_path_for
from trainer.errors import MaskError
from trainer.masks import clipseg, ops
from trainer.masks.generate import (
    DEFAULT_CLIPSEG_MODEL,
    MaskMethod,
    MaskMode,
    MaskPreview,
    MaskSettings,
    MaskSummary,
    generate_masks,
    list_images,
    parse_color,
    preview_mask,
)

GREEN = (0, 255, 0)
RED = (255, 0, 0)


@pytest.fixture(scope="session")
def tiny_clipseg_dir(tmp_path_factory):
    """A tiny random CLIPSeg folder (~200 KB), built once per session."""
    from trainer.masks.tiny_clipseg import build_tiny_clipseg

    return build_tiny_clipseg(tmp_path_factory.mktemp("models") / "tiny-clipseg")


def pixels(image_or_path) -> np.ndarray:
    image = image_or_path if isinstance(image_or_path, Image.Image) else Image.open(image_or_path)
    return np.asarray(image)


def mask_of(image_path: Path) -> np.ndarray:
    mask = Image.open(mask_path_for(image_path))
    assert mask.mode == "L"
    return np.asarray(mask)


def keyed_image(path: Path, size=(12, 8), box=(0, 0, 12, 4)) -> Path:
    """A red box (focus) on a green background (#00ff00); `box` is (left, top, right, bottom)."""
    image = Image.new("RGB", size, GREEN)
    image.paste(RED, box)
    image.save(path)
    return path


def box_mask(size, box) -> np.ndarray:
    width, height = size
    left, top, right, bottom = box
    expected = np.zeros((height, width), np.uint8)
    expected[top:bottom, left:right] = 255
    return expected


COLOR_KEY = MaskSettings(method="color", color="#00ff00", tolerance=30)


def settings(base: MaskSettings = COLOR_KEY, **changes) -> MaskSettings:
    return MaskSettings(**{**base.__dict__, **changes})


# --------------------------------------------------------------------------------------------
# Methods


def test_alpha_method_is_the_images_own_transparency(tmp_path):
    alpha = np.zeros((6, 10), np.uint8)
    alpha[:, 5:] = 255   # opaque right half: focus
    alpha[:, 3] = 100    # 100/255 = 0.39 > 0.3: in
    alpha[:, 4] = 70     # 70/255 = 0.27: out
    rgba = np.dstack([np.full((6, 10, 3), 90, np.uint8), alpha])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")

    summary = generate_masks(tmp_path, MaskSettings(method="alpha", threshold=0.3))

    assert summary.written == ["cut.png"] and not summary.failed
    expected = np.zeros((6, 10), np.uint8)
    expected[:, 5:] = 255
    expected[:, 3] = 255
    assert np.array_equal(mask_of(tmp_path / "cut.png"), expected)


def test_alpha_method_reads_palette_transparency_too(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "icon.png", transparency=0)  # index 0 is transparent

    generate_masks(tmp_path, MaskSettings(method="alpha"))

    expected = np.zeros((2, 4), np.uint8)
    expected[1, 1] = 255
    assert np.array_equal(mask_of(tmp_path / "icon.png"), expected)


def test_alpha_method_skips_images_without_alpha(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "photo.jpg")
    Image.new("RGBA", (8, 8), (0, 0, 0, 255)).save(tmp_path / "cut.png")

    summary = generate_masks(tmp_path, MaskSettings(method="alpha"))

    assert summary.written == ["cut.png"]
    assert summary.skipped == [("photo.jpg", "has no alpha channel")]
    assert not mask_path_for(tmp_path / "photo.jpg").exists()
    with pytest.raises(MaskError, match=r"photo\.jpg.*has no alpha channel"):
        preview_mask(tmp_path / "photo.jpg", MaskSettings(method="alpha"))


def test_color_key_whites_everything_but_the_background_within_tolerance(tmp_path):
    image = Image.new("RGB", (6, 2), GREEN)
    image.putpixel((0, 0), (20, 230, 25))   # off-green by at most 25: background
    image.putpixel((1, 0), (0, 215, 0))     # off by 40: focus at tolerance 30
    image.putpixel((2, 0), RED)
    image.putpixel((3, 1), (0, 255, 31))    # off by 31: focus
    image.putpixel((4, 1), (0, 255, 30))    # off by exactly 30: background
    image.save(tmp_path / "key.png")

    generate_masks(tmp_path, COLOR_KEY)
    expected = np.zeros((2, 6), np.uint8)
    expected[0, 1] = expected[0, 2] = expected[1, 3] = 255
    assert np.array_equal(mask_of(tmp_path / "key.png"), expected)

    generate_masks(tmp_path, settings(tolerance=45))  # now only pure red is far enough
    expected[0, 1] = expected[1, 3] = 0
    assert np.array_equal(mask_of(tmp_path / "key.png"), expected)


def test_color_strings(tmp_path):
    assert parse_color("#00FF00") == parse_color("00ff00") == parse_color("#0f0") == GREEN
    assert parse_color("rgba(0, 255, 0, 1)") == parse_color("rgb(0,255,0)") == GREEN
    for bad in ("green", "#12345", "#gg0000", "rgb(300, 0, 0)", ""):
        with pytest.raises(MaskError, match="color"):
            parse_color(bad)
    keyed_image(tmp_path / "a.png")
    with pytest.raises(MaskError, match=r"color: 'green'.*#RRGGBB"):
        generate_masks(tmp_path, settings(color="green"))
    assert not mask_path_for(tmp_path / "a.png").exists()


def test_mask_has_the_upright_size_of_an_exif_rotated_photo(tmp_path):
    image = Image.new("RGB", (40, 20), GREEN)
    image.paste(RED, (0, 0, 10, 20))  # stored: red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: red on top
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)

    generate_masks(tmp_path, settings(tolerance=60))

    mask = mask_of(tmp_path / "phone.jpg")
    assert mask.shape == (40, 20)  # (height, width) as displayed
    assert mask[:8].min() == 255 and mask[12:].max() == 0


# --------------------------------------------------------------------------------------------
# Modes, against an existing mask

SIZE = (12, 8)
OLD_BOX = (0, 0, 6, 8)    # existing mask: the left half
NEW_BOX = (0, 0, 12, 4)   # the colour key finds the top half


@pytest.fixture
def masked_folder(tmp_path):
    """cat.png with a mask (left half) and dog.png without one; both have a red top half."""
    for name in ("cat.png", "dog.png"):
        keyed_image(tmp_path / name, SIZE, NEW_BOX)
    Image.fromarray(box_mask(SIZE, OLD_BOX), "L").save(mask_path_for(tmp_path / "cat.png"))
    return tmp_path


@pytest.mark.parametrize("mode, expected_cat", [
    ("replace", lambda old, new: new),
    ("add", np.maximum),
    ("subtract", lambda old, new: np.minimum(old, 255 - new)),
])
def test_modes_combine_the_new_area_with_the_old_mask(masked_folder, mode, expected_cat):
    old, new = box_mask(SIZE, OLD_BOX), box_mask(SIZE, NEW_BOX)

    summary = generate_masks(masked_folder, settings(mode=mode))

    assert np.array_equal(mask_of(masked_folder / "cat.png"), expected_cat(old, new))
    if mode == "subtract":
        assert summary.written == ["cat.png"]
        assert summary.skipped == [("dog.png", "has no mask to subtract from")]
        assert not mask_path_for(masked_folder / "dog.png").exists()
    else:  # add with no old mask is the new mask
        assert summary.written == ["cat.png", "dog.png"]
        assert np.array_equal(mask_of(masked_folder / "dog.png"), new)


def test_subtract_leaves_the_bottom_left_quarter(masked_folder):
    generate_masks(masked_folder, settings(mode=MaskMode.SUBTRACT))
    assert np.array_equal(mask_of(masked_folder / "cat.png"), box_mask(SIZE, (0, 4, 6, 8)))


def test_fill_creates_missing_masks_and_never_touches_existing_ones(masked_folder):
    existing = mask_path_for(masked_folder / "cat.png")
    os.utime(existing, ns=(1_000_000_000, 1_000_000_000))  # an old mtime any rewrite would change
    before = (existing.read_bytes(), existing.stat().st_mtime_ns)

    summary = generate_masks(masked_folder, settings(mode="fill"))

    assert (existing.read_bytes(), existing.stat().st_mtime_ns) == before
    assert summary.written == ["dog.png"]
    assert summary.skipped == [("cat.png", "has a mask")]
    assert np.array_equal(mask_of(masked_folder / "dog.png"), box_mask(SIZE, NEW_BOX))
    assert summary.text() == "Wrote 1 mask, skipped 1 (cat.png: has a mask)."


def test_add_with_a_soft_old_mask_keeps_the_larger_value(tmp_path):
    keyed_image(tmp_path / "a.png", SIZE, NEW_BOX)
    Image.new("L", SIZE, 100).save(mask_path_for(tmp_path / "a.png"))

    generate_masks(tmp_path, settings(mode="add"))

    expected = np.full((8, 12), 100, np.uint8)
    expected[:4] = 255
    assert np.array_equal(mask_of(tmp_path / "a.png"), expected)


def test_add_with_an_unreadable_old_mask_fails_that_image_and_keeps_the_file(tmp_path):
    keyed_image(tmp_path / "a.png")
    keyed_image(tmp_path / "b.png")
    broken = mask_path_for(tmp_path / "a.png")
    broken.write_bytes(b"not a png")

    summary = generate_masks(tmp_path, settings(mode="add"))

    assert [name for name, _ in summary.failed] == ["a.png"]
    assert "cannot read its mask" in summary.failed[0][1]
    assert broken.read_bytes() == b"not a png"
    assert summary.written == ["b.png"]


# --------------------------------------------------------------------------------------------
# Threshold, grow, smooth


def test_threshold_keeps_what_scores_above_it(tmp_path):
    alpha = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (2, 1))  # 0, 16, ... 240
    rgba = np.dstack([np.zeros((2, 16, 3), np.uint8), alpha])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ramp.png")

    for threshold in (0.0, 0.5, 0.9):
        generate_masks(tmp_path, MaskSettings(method="alpha", threshold=threshold))
        expected = np.where(alpha / 255 > threshold, 255, 0)
        assert np.array_equal(mask_of(tmp_path / "ramp.png"), expected), threshold


def test_grow_dilates_by_a_disk_of_the_given_radius(tmp_path):
    dot = np.zeros((11, 11), bool)
    dot[5, 5] = True
    grown = ops.grow_binary(dot, 3)
    ys, xs = np.nonzero(grown)
    assert set(zip(ys - 5, xs - 5)) == {(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                                        if dy * dy + dx * dx <= 9}

    # A box grows by exactly N on each side (end to end, through the settings).
    keyed_image(tmp_path / "a.png", (20, 20), (8, 8, 12, 12))
    generate_masks(tmp_path, settings(grow=2))
    rows, cols = np.nonzero(mask_of(tmp_path / "a.png"))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 13, 6, 13)


def test_grow_matches_a_brute_force_disk_dilation():
    rng = np.random.default_rng(0)
    binary = rng.random((17, 23)) > 0.95
    ys, xs = np.mgrid[0:17, 0:23]
    for radius in (1, 2, 5, 30):
        brute = np.zeros_like(binary)
        for y, x in zip(*np.nonzero(binary)):
            brute |= (ys - y) ** 2 + (xs - x) ** 2 <= radius * radius
        assert np.array_equal(ops.grow_binary(binary, radius), brute), radius


def test_smooth_softens_the_edges_only(tmp_path):
    keyed_image(tmp_path / "a.png", (40, 40), (10, 10, 30, 30))

    generate_masks(tmp_path, settings())
    hard = mask_of(tmp_path / "a.png")
    assert set(np.unique(hard)) == {0, 255}

    generate_masks(tmp_path, settings(smooth=2))
    soft = mask_of(tmp_path / "a.png").astype(int)
    assert 0 < soft[20, 9] < 255 and 0 < soft[20, 10] < 255        # across the edge
    assert soft[20, 10] > soft[20, 9]                               # inside brighter
    assert soft[20, 20] == 255 and soft[0, 0] == 0 and soft[20, 0] == 0   # far from it: as before
    assert abs(soft.sum() - hard.astype(int).sum()) < 0.02 * hard.sum()  # a blur keeps the mass


def test_grow_happens_before_smooth():
    focus = np.zeros((21, 21), np.float32)
    focus[10, 10] = 1.0
    mask = np.asarray(ops.shape_mask(focus, 0.5, grow=4, smooth=1))
    assert (mask[10, 9:12] == 255).all()      # the grown core stays solid after the blur
    assert 0 < mask[10, 15] < mask[10, 14] < 255   # and its edge, 4 px out, is soft


# --------------------------------------------------------------------------------------------
# Preview


def test_preview_shows_image_old_new_and_overlay_and_writes_nothing(masked_folder):
    before = sorted(p.name for p in masked_folder.iterdir())

    preview = preview_mask(masked_folder / "cat.png", settings(mode="add"))

    assert isinstance(preview, MaskPreview)
    assert sorted(p.name for p in masked_folder.iterdir()) == before
    assert preview.image.mode == "RGB" and preview.overlay.mode == "RGB"
    assert preview.old_mask.mode == preview.new_mask.mode == "L"
    assert preview.image.size == preview.new_mask.size == preview.overlay.size == SIZE
    assert np.array_equal(pixels(preview.old_mask), box_mask(SIZE, OLD_BOX))
    assert np.array_equal(pixels(preview.new_mask),
                          np.maximum(box_mask(SIZE, OLD_BOX), box_mask(SIZE, NEW_BOX)))
    assert preview.note == "would add to its mask"
    overlay = pixels(preview.overlay)
    assert tuple(overlay[7, 11]) == GREEN                # outside the mask: the image as is
    assert tuple(overlay[0, 0]) == RED                   # red tinted red stays red
    assert np.abs(overlay[7, 0] - np.array([127.5, 127.5, 0])).max() <= 1  # green, half red

    # the preview is exactly what a run writes
    generate_masks(masked_folder, settings(mode="add"))
    assert np.array_equal(mask_of(masked_folder / "cat.png"), pixels(preview.new_mask))


def test_preview_says_when_a_run_would_skip_the_image(masked_folder):
    preview = preview_mask(masked_folder / "cat.png", settings(mode="fill"))
    assert preview.note == "would be skipped: has a mask"
    assert np.array_equal(pixels(preview.new_mask), box_mask(SIZE, OLD_BOX))  # kept as is

    preview = preview_mask(masked_folder / "dog.png", settings(mode="subtract"))
    assert preview.note == "would be skipped: has no mask to subtract from"
    assert preview.old_mask is None

    assert preview_mask(masked_folder / "dog.png", settings()).note == "would write a new mask"
    assert preview_mask(masked_folder / "cat.png", settings()).note == "would replace its mask"


def test_preview_refuses_what_is_not_an_image(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    keyed_image(tmp_path / "a.png")
    Image.new("L", (12, 8)).save(mask_path_for(tmp_path / "a.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    with pytest.raises(MaskError, match=r"'notes\.txt' is not an image file"):
        preview_mask(tmp_path / "notes.txt", COLOR_KEY)
    with pytest.raises(MaskError, match=r"a-masklabel\.png' is a mask"):
        preview_mask(mask_path_for(tmp_path / "a.png"), COLOR_KEY)
    with pytest.raises(MaskError, match=r"missing\.png' does not exist"):
        preview_mask(tmp_path / "missing.png", COLOR_KEY)
    with pytest.raises(MaskError, match=r"broken\.png"):
        preview_mask(tmp_path / "broken.png", COLOR_KEY)


# --------------------------------------------------------------------------------------------
# A folder: bad input, progress, stop


def test_folder_problems_are_one_clear_error(tmp_path):
    with pytest.raises(MaskError, match=r"Folder '.*nope' does not exist"):
        generate_masks(tmp_path / "nope", COLOR_KEY)
    keyed_image(tmp_path / "a.png")
    with pytest.raises(MaskError, match=r"a\.png' is not a folder"):
        generate_masks(tmp_path / "a.png", COLOR_KEY)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    Image.new("L", (4, 4)).save(empty / "x-masklabel.png")  # a mask is not an image
    with pytest.raises(MaskError, match=r"holds no images"):
        generate_masks(empty, COLOR_KEY)
    with pytest.raises(MaskError, match="folder: empty"):
        generate_masks("  ", COLOR_KEY)


def test_a_corrupt_image_is_listed_as_failed_and_the_others_are_done(tmp_path):
    keyed_image(tmp_path / "a.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "empty.png").write_bytes(b"")
    keyed_image(tmp_path / "c.png")

    summary = generate_masks(tmp_path, COLOR_KEY)

    assert summary.written == ["a.png", "c.png"]
    assert [name for name, _ in summary.failed] == ["bad.jpg", "empty.png"]
    assert all(reason.startswith("cannot read the image") for _, reason in summary.failed)
    assert "empty (0 bytes)" in summary.failed[1][1]
    assert summary.text().startswith("Wrote 2 masks, failed 2 (bad.jpg: cannot read the image")


def test_list_images_skips_masks_hidden_files_and_other_files(tmp_path):
    for name in ("b.png", "a.jpg", "._a.jpg", "a-masklabel.png", "notes.txt", "sub/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.jpg", "b.png", "c.png"]


def test_progress_after_each_image_and_stop_between_images(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        keyed_image(tmp_path / name)
    calls = []
    generate_masks(tmp_path, COLOR_KEY, progress=lambda *args: calls.append(args))
    assert calls == [(1, 3, "a.png"), (2, 3, "b.png"), (3, 3, "c.png")]

    for name in ("a.png", "b.png", "c.png"):
        mask_path_for(tmp_path / name).unlink()
    summary = generate_masks(tmp_path, COLOR_KEY, should_stop=lambda: len(calls) >= 4,
                             progress=lambda *args: calls.append(args))
    assert summary.stopped and summary.written == ["a.png"]
    assert not mask_path_for(tmp_path / "b.png").exists()
    assert summary.text() == "Stopped after 1 of 3 images. Wrote 1 mask."


def test_summary_text_names_and_reasons():
    summary = MaskSummary(written=["a.png"] * 4, skipped=[("cat.jpg", "has a mask")],
                          failed=[("bad.jpg", "cannot read the image: truncated")])
    assert summary.text() == ("Wrote 4 masks, skipped 1 (cat.jpg: has a mask), "
                              "failed 1 (bad.jpg: cannot read the image: truncated).")
    many = MaskSummary(skipped=[(f"{i}.png", "has a mask") for i in range(8)])
    assert many.text(limit=2) == ("Wrote 0 masks, skipped 8 (0.png: has a mask; "
                                  "1.png: has a mask; and 6 more).")


@pytest.mark.parametrize("changes, field", [
    ({"method": "magic"}, "method"),
    ({"mode": "merge"}, "mode"),
    ({"method": "clipseg", "prompt": "  "}, "prompt"),
    ({"method": "clipseg", "prompt": "cat", "model": ""}, "model"),
    ({"color": "#12"}, "color"),
    ({"tolerance": 256}, "tolerance"),
    ({"tolerance": -1}, "tolerance"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"smooth": 2.5}, "smooth"),
    ({"grow": -1}, "grow"),
    ({"grow": 10_000}, "grow"),
])
def test_check_names_the_bad_field(changes, field):
    with pytest.raises(MaskError, match=rf"^{field}: "):
        settings(**changes).check()


def test_check_accepts_enums_strings_and_whole_floats():
    settings(method=MaskMethod.COLOR, mode=MaskMode.ADD, tolerance=10.0, grow="3").check()
    MaskSettings(method="ALPHA", mode=" Fill ").check()
    assert MaskSettings().model == DEFAULT_CLIPSEG_MODEL == "CIDAS/clipseg-rd64-refined"


# --------------------------------------------------------------------------------------------
# Atomic writes


def test_a_failed_write_keeps_the_old_mask_byte_for_byte_and_leaves_no_temp_file(
        masked_folder, monkeypatch):
    existing = mask_path_for(masked_folder / "cat.png")
    before = existing.read_bytes()
    real_save = Image.Image.save
    calls = []

    def failing_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 1:  # the first write (cat.png's) dies half way: a full disk
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    summary = generate_masks(masked_folder, settings(mode="replace"))

    assert summary.failed == [("cat.png", "cannot write its mask: No space left on device")]
    assert existing.read_bytes() == before
    assert summary.written == ["dog.png"]  # the run went on
    assert sorted(p.name for p in masked_folder.iterdir()) == [
        "cat-masklabel.png", "cat.png", "dog-masklabel.png", "dog.png"]


# --------------------------------------------------------------------------------------------
# CLIPSeg on a tiny random model


def test_clipseg_writes_a_mask_of_each_images_size(tmp_path, tiny_clipseg_dir, monkeypatch):
    from transformers import CLIPSegForImageSegmentation

    Image.new("RGB", (50, 30), (200, 40, 40)).save(tmp_path / "wide.png")
    Image.new("RGB", (17, 41), (40, 40, 200)).save(tmp_path / "tall.jpg")
    clipseg.forget_loaded_models()
    loads = []
    real = CLIPSegForImageSegmentation.from_pretrained.__func__
    monkeypatch.setattr(CLIPSegForImageSegmentation, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    chosen = MaskSettings(method="clipseg", prompt="a red square", model=str(tiny_clipseg_dir),
                          threshold=0.5)

    preview = preview_mask(tmp_path / "wide.png", chosen)
    summary = generate_masks(tmp_path, chosen)

    assert len(loads) == 1  # loaded once for the preview and the run
    assert summary.written == ["tall.jpg", "wide.png"] and not summary.failed
    for name, size in (("wide.png", (50, 30)), ("tall.jpg", (17, 41))):
        mask = Image.open(mask_path_for(tmp_path / name))
        assert mask.mode == "L" and mask.size == size
    assert np.array_equal(mask_of(tmp_path / "wide.png"), pixels(preview.new_mask))


def test_clipseg_map_is_a_probability_at_the_image_size(tmp_path, tiny_clipseg_dir):
    segmenter = clipseg.load_clipseg(str(tiny_clipseg_dir))
    focus = segmenter(Image.new("RGB", (23, 11), RED), "a cat")
    assert focus.shape == (11, 23) and focus.dtype == np.float32
    assert 0.0 <= focus.min() <= focus.max() <= 1.0
    again = segmenter(Image.new("RGB", (23, 11), RED), "a cat")
    assert np.array_equal(focus, again)  # no_grad, eval mode: deterministic


def test_clipseg_without_the_model_says_how_to_provide_it(tmp_path):
    keyed_image(tmp_path / "a.png")
    missing = MaskSettings(method="clipseg", prompt="a cat", model=str(tmp_path / "no-model"))
    for call in (lambda: generate_masks(tmp_path, missing),
                 lambda: preview_mask(tmp_path / "a.png", missing)):
        with pytest.raises(MaskError) as raised:
            call()
        message = str(raised.value)
        assert "no-model' does not exist" in message
        assert f"hf download {DEFAULT_CLIPSEG_MODEL} --local-dir DIR" in message
        assert "--model" in message and "Model field" in message
    assert not mask_path_for(tmp_path / "a.png").exists()

    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    with pytest.raises(MaskError, match=r"not a CLIPSeg model folder: it holds no config\.json"):
        generate_masks(tmp_path, settings(missing, model=str(not_a_model)))


def test_clipseg_hub_id_not_in_the_cache_is_refused_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    keyed_image(tmp_path / "a.png")
    with pytest.raises(MaskError, match=r"not in the local Hugging Face cache.*hf download"):
        generate_masks(tmp_path, MaskSettings(method="clipseg", prompt="a cat",
                                              model="someone/not-downloaded"))


def test_two_writes_of_one_mask_never_share_a_temporary_file(tmp_path, monkeypatch):
    """The page writes from several threads of one process: each write gets its own temporary
    name, so one write can never rename another's half-written file into place."""
    from trainer import io

    names = {io._temporary(tmp_path / "a-masklabel.png") for _ in range(50)}
    assert len(names) == 50 and all(n.name.endswith(".tmp") for n in names)


def test_a_model_build_never_replaces_a_folder_that_is_not_a_model(tmp_path):
    from trainer.errors import AtelierError
    from trainer.io import atomic_folder

    home = tmp_path / "models"
    home.mkdir()
    (home / "my-notes.txt").write_text("keep me")
    with pytest.raises(AtelierError, match="not replaced"):
        with atomic_folder(home) as staging:
            (staging / "config.json").write_text("{}")
    assert (home / "my-notes.txt").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["models"]  # no staging folder left
    model = tmp_path / "model"
    with atomic_folder(model) as staging:
        (staging / "config.json").write_text("{}")
    with atomic_folder(model) as staging:  # a model folder is rebuilt in place
        (staging / "config.json").write_text('{"v": 2}')
    assert (model / "config.json").read_text() == '{"v": 2}'
