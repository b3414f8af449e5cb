"""Images, masks, captions and samples: every format becomes correct RGB, every bad file is named."""
from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.dataset import (
    ImageItem,
    TrainDataset,
    caption_from_filename,
    collate,
    collect_items,
    cover_size,
    epoch_indices,
    prepare_sample,
)
from trainer.data.images import load_image_rgb, load_mask
from trainer.demo import DEMO_DATASET_DIR
from trainer.errors import DatasetError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def concept(path, **overrides):
    values = dict(path=str(path), enabled=True, repeats=1, prompt_source="sample", prompt="", loss_weight=1.0)
    values.update(overrides)
    return SimpleNamespace(**values)


def collect(*concepts):
    """collect_items with the warnings captured: returns (items, warnings)."""
    warnings: list[str] = []
    return collect_items(list(concepts), warn=warnings.append), warnings


def save_rgb(path: Path, size=(40, 30), color=(10, 120, 240)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def halves(size, left, right, mode="RGB") -> Image.Image:
    """An image whose left half is `left` and right half `right`."""
    image = Image.new(mode, size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


# --------------------------------------------------------------------------------------------
# Image modes -> 8-bit RGB


def _rgba(path):
    halves((40, 30), (255, 0, 0, 255), (0, 0, 0, 0), "RGBA").save(path)


def _la(path):
    halves((40, 30), (50, 255), (0, 0), "LA").save(path)


def _palette(path):
    Image.new("RGB", (40, 30), RED).convert("P", palette=Image.Palette.ADAPTIVE).save(path)


def _palette_transparent(path):
    image = Image.new("P", (40, 30), 0)
    image.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)  # index 0 red, index 1 black
    image.paste(1, (20, 0, 40, 30))
    image.save(path, transparency=1)  # the black half is see-through


def _gray16(path):
    Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16)).save(path)


def _gray16_ramp(path):
    values = np.zeros((30, 40), dtype=np.uint16)
    values[:, 20:] = 65535
    Image.fromarray(values).save(path)


def _int32(path):
    Image.fromarray(np.full((30, 40), 32768, dtype=np.int32), "I").save(path)


def _cmyk(path):
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(path)


def _exif_rotated(path):
    # Stored 40x30 with red on the left; orientation 6 means "turn 90 degrees clockwise to
    # view", so the displayed image is 30x40 with red on top.
    image = halves((40, 30), RED, BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)


MODE_CASES = {
    # name: (file name, writer, displayed size, [(x, y), expected RGB], tolerance)
    "RGB png": ("a.png", lambda p: save_rgb(p, color=(10, 20, 30)), (40, 30), [((5, 5), (10, 20, 30))], 0),
    "RGB webp": ("a.webp", lambda p: Image.new("RGB", (40, 30), (200, 100, 50)).save(p, lossless=True), (40, 30), [((5, 5), (200, 100, 50))], 0),
    "RGB bmp": ("a.bmp", lambda p: save_rgb(p, color=(1, 2, 3)), (40, 30), [((5, 5), (1, 2, 3))], 0),
    "RGB jpg": ("a.JPG", lambda p: save_rgb(p, color=(200, 100, 50)), (40, 30), [((5, 5), (200, 100, 50))], 4),
    "RGBA transparent -> white": ("a.png", _rgba, (40, 30), [((5, 5), RED), ((35, 5), WHITE)], 0),
    "L": ("a.png", lambda p: Image.new("L", (40, 30), 100).save(p), (40, 30), [((5, 5), (100, 100, 100))], 0),
    "1 bit": ("a.png", lambda p: Image.new("1", (40, 30), 1).save(p), (40, 30), [((5, 5), WHITE)], 0),
    "LA transparent -> white": ("a.png", _la, (40, 30), [((5, 5), (50, 50, 50)), ((35, 5), WHITE)], 0),
    "P": ("a.png", _palette, (40, 30), [((5, 5), RED)], 0),
    "P with transparency": ("a.png", _palette_transparent, (40, 30), [((5, 5), RED), ((35, 5), WHITE)], 0),
    "I;16 mid grey": ("a.png", _gray16, (40, 30), [((5, 5), (128, 128, 128))], 1),
    "I;16 black and white": ("a.tif", _gray16_ramp, (40, 30), [((5, 5), (0, 0, 0)), ((35, 5), WHITE)], 0),
    "I 32-bit holding 16-bit": ("a.tif", _int32, (40, 30), [((5, 5), (128, 128, 128))], 1),
    "CMYK tiff": ("a.tiff", _cmyk, (40, 30), [((5, 5), RED)], 0),
    "CMYK jpeg": ("a.jpg", _cmyk, (40, 30), [((5, 5), RED)], 6),
    "EXIF rotated jpeg": ("a.jpg", _exif_rotated, (30, 40), [((15, 5), RED), ((15, 35), BLUE)], 12),
}


@pytest.mark.parametrize("case", list(MODE_CASES), ids=list(MODE_CASES))
def test_every_image_mode_loads_as_8bit_rgb(tmp_path, case):
    name, write, size, expected, tolerance = MODE_CASES[case]
    path = tmp_path / name
    write(path)
    image = load_image_rgb(path)
    assert image.mode == "RGB"
    assert image.size == size
    for (x, y), rgb in expected:
        got = image.getpixel((x, y))
        assert max(abs(a - b) for a, b in zip(got, rgb)) <= tolerance, (case, (x, y), got, rgb)


# --------------------------------------------------------------------------------------------
# Bad files


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _truncated_png(path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


BAD_FILES = {
    "corrupt bytes": ("broken.jpg", lambda p: p.write_bytes(bytes(range(256)) * 8)),
    "truncated jpeg": ("cut.jpg", _truncated_jpeg),
    "truncated png": ("cut.png", _truncated_png),
    "zero bytes": ("empty.png", lambda p: p.write_bytes(b"")),
    "text renamed png": ("notes.png", lambda p: p.write_text("just some words, not pixels\n")),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_file_raises_dataset_error_naming_it(tmp_path, case):
    name, write = BAD_FILES[case]
    write(tmp_path / name)
    with pytest.raises(DatasetError, match=name):
        load_image_rgb(tmp_path / name)


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_file_is_skipped_with_a_warning_and_good_ones_kept(tmp_path, case):
    name, write = BAD_FILES[case]
    write(tmp_path / name)
    save_rgb(tmp_path / "good.png")
    items, warnings = collect(concept(tmp_path, prompt_source="filename"))
    assert [item.image_path.name for item in items] == ["good.png"]
    assert any(w.startswith("Skipping") and name in w for w in warnings), warnings


def test_folder_of_only_bad_images_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "all_bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"")
    (folder / "y.jpg").write_text("nope")
    with pytest.raises(DatasetError, match="no usable image.*all_bad"):
        collect(concept(folder))


def test_empty_folder_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "empty_one"
    folder.mkdir()
    (folder / "readme.txt").write_text("captions without images")
    with pytest.raises(DatasetError, match="empty_one.*holds no images"):
        collect(concept(folder))


def test_missing_folder_is_an_error_naming_folder_and_field(tmp_path):
    with pytest.raises(DatasetError) as caught:
        collect(concept(tmp_path / "nowhere"))
    message = str(caught.value)
    assert message.startswith("Concept 1: folder '")
    assert "nowhere' does not exist" in message and "concepts[0].path" in message


def test_second_concept_is_numbered_in_the_error(tmp_path):
    save_rgb(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"Concept 2: .*concepts\[1\]\.path"):
        collect(concept(tmp_path), concept(tmp_path / "gone"))


def test_unreadable_mask_is_ignored_with_a_warning(tmp_path):
    save_rgb(tmp_path / "a.png")
    (tmp_path / "a-masklabel.png").write_text("not a png")
    items, warnings = collect(concept(tmp_path, prompt_source="filename"))
    assert items[0].mask_path is None
    assert any("a-masklabel.png" in w and "unmasked" in w for w in warnings)


# --------------------------------------------------------------------------------------------
# Listing and captions


def test_masks_hidden_files_and_captions_are_not_training_images(tmp_path):
    save_rgb(tmp_path / "b.png")
    save_rgb(tmp_path / "a.jpg")
    Image.new("L", (40, 30), 255).save(tmp_path / "a-masklabel.png")
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / "a.txt").write_text("cap")
    items, warnings = collect(concept(tmp_path, prompt_source="filename"))
    assert [item.image_path.name for item in items] == ["a.jpg", "b.png"]  # sorted
    assert items[0].mask_path == tmp_path / "a-masklabel.png"
    assert items[1].mask_path is None
    assert warnings == []


def test_subfolders_only_when_asked(tmp_path):
    save_rgb(tmp_path / "top.png")
    (tmp_path / "sub").mkdir()
    save_rgb(tmp_path / "sub" / "deep.png")
    flat, _ = collect(concept(tmp_path, prompt_source="filename"))
    deep, _ = collect(concept(tmp_path, prompt_source="filename", include_subdirectories=True))
    assert [i.image_path.name for i in flat] == ["top.png"]
    assert [i.image_path.name for i in deep] == ["deep.png", "top.png"]


CAPTION_FILES = {
    "utf-8": ("ünïcode caption, ok".encode("utf-8"), "ünïcode caption, ok"),
    "utf-8 with BOM": ("\ufeffa cat".encode("utf-8"), "a cat"),
    "utf-16 (Notepad)": ("ein Hund, größer".encode("utf-16"), "ein Hund, größer"),
    "utf-16 big endian": (b"\xfe\xff" + "caf\u00e9".encode("utf-16-be"), "caf\u00e9"),
    "latin-1 / cp1252": ("façade".encode("cp1252"), "façade"),
    "whitespace stripped": (b"  a dog \r\n\n", "a dog"),
}


@pytest.mark.parametrize("case", list(CAPTION_FILES), ids=list(CAPTION_FILES))
def test_caption_txt_is_read_whatever_its_encoding(tmp_path, case):
    data, expected = CAPTION_FILES[case]
    save_rgb(tmp_path / "img.png")
    (tmp_path / "img.txt").write_bytes(data)
    items, _ = collect(concept(tmp_path))
    assert items[0].caption == expected


def test_caption_beside_non_ascii_file_name_with_spaces(tmp_path):
    save_rgb(tmp_path / "café au lait 1.jpg")
    (tmp_path / "café au lait 1.txt").write_text("a cup of café au lait", encoding="utf-8")
    items, warnings = collect(concept(tmp_path))
    assert items[0].caption == "a cup of café au lait" and warnings == []


def test_missing_caption_file_gives_empty_caption_and_a_warning(tmp_path):
    save_rgb(tmp_path / "lonely.png")
    items, warnings = collect(concept(tmp_path))
    assert items[0].caption == ""
    assert any("lonely.png" in w for w in warnings)


def test_many_missing_captions_give_one_warning(tmp_path):
    for i in range(5):
        save_rgb(tmp_path / f"p{i}.png")
    items, warnings = collect(concept(tmp_path))
    assert len(items) == 5 and len(warnings) == 1 and "5 images" in warnings[0]


def test_caption_from_filename_and_from_concept(tmp_path):
    save_rgb(tmp_path / "a_red-car__2.png")
    by_name, _ = collect(concept(tmp_path, prompt_source="filename"))
    by_concept, _ = collect(concept(tmp_path, prompt_source="concept", prompt=" photo of sks dog "))
    assert by_name[0].caption == "a red car 2" == caption_from_filename(Path("a_red-car__2.png"))
    assert by_concept[0].caption == "photo of sks dog"


def test_prompt_source_may_be_an_enum(tmp_path):
    import enum

    class Source(str, enum.Enum):  # like trainer.config.PromptSource
        FILENAME = "filename"

    save_rgb(tmp_path / "a_b.png")
    items, _ = collect(concept(tmp_path, prompt_source=Source.FILENAME))
    assert items[0].caption == "a b"


def test_unknown_prompt_source_is_an_error_naming_the_field(tmp_path):
    save_rgb(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"concepts\[0\]\.prompt_source"):
        collect(concept(tmp_path, prompt_source="telepathy"))


def test_multi_line_caption_gives_one_line_per_sample(tmp_path):
    save_rgb(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first way\nsecond way\n")
    items, _ = collect(concept(tmp_path))
    dataset = TrainDataset(items, (16, 16))
    seen = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        seen.add(dataset[0]["caption"])
    assert seen == {"first way", "second way"}


# --------------------------------------------------------------------------------------------
# Concepts: enabled, repeats, loss weight


def _folder_of(tmp_path, name, count):
    folder = tmp_path / name
    folder.mkdir()
    for i in range(count):
        save_rgb(folder / f"{name}{i}.png", color=(i * 20, 0, 0))
    return folder


def test_disabled_concept_and_zero_repeats_are_skipped(tmp_path):
    a = _folder_of(tmp_path, "a", 2)
    items, _ = collect(
        concept(a, prompt_source="filename", loss_weight=2.5),
        concept(tmp_path / "missing_but_disabled", enabled=False),
        concept(tmp_path / "missing_but_unused", repeats=0),
    )
    assert len(items) == 2 and {i.loss_weight for i in items} == {2.5} and {i.concept_index for i in items} == {0}
    with pytest.raises(DatasetError, match="disabled"):
        collect(concept(a, enabled=False))


def test_negative_repeats_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match=r"concepts\[0\]\.repeats"):
        collect(concept(_folder_of(tmp_path, "a", 1), repeats=-1))


def test_repeats_2_visits_every_image_twice(tmp_path):
    items, _ = collect(
        concept(_folder_of(tmp_path, "a", 3), repeats=2, prompt_source="filename"),
        concept(_folder_of(tmp_path, "b", 2), repeats=1, prompt_source="filename"),
    )
    assert len(items) == 5  # listed once; the dataset expands
    dataset = TrainDataset(items, (16, 16))
    assert len(dataset) == 3 * 2 + 2
    counts = np.bincount(epoch_indices(items, seed=0, epoch=0), minlength=5)
    assert counts.tolist() == [2, 2, 2, 1, 1]


def test_fractional_repeats_take_a_different_share_each_epoch(tmp_path):
    items, _ = collect(concept(_folder_of(tmp_path, "a", 4), repeats=0.5, prompt_source="filename"))
    dataset = TrainDataset(items, (16, 16), seed=3)
    per_epoch = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        assert len(dataset) == 2
        per_epoch.append({dataset.item_at(i).image_path.name for i in range(len(dataset))})
    assert per_epoch[0] | per_epoch[1] == {f"a{i}.png" for i in range(4)}  # all seen in 2 epochs
    assert epoch_indices(items, 3, 1) == epoch_indices(items, 3, 1)  # reproducible
    tiny = [ImageItem(Path("x.png"), "", None, 1.0, 0, repeats=0.01)]
    assert len(epoch_indices(tiny, 0, 0)) == 1  # repeats > 0 never drops a concept entirely


# --------------------------------------------------------------------------------------------
# Samples: resize, crop, flip, mask


def test_cover_size_keeps_aspect_and_covers_target():
    assert cover_size(400, 200, 64, 64) == (128, 64)
    assert cover_size(100, 300, 64, 32) == (64, 192)
    assert cover_size(50, 50, 100, 60) == (100, 100)


def test_sample_tensors_have_the_target_shape_and_range(tmp_path):
    Image.effect_noise((90, 60), 80).convert("RGB").save(tmp_path / "n.png")
    items, _ = collect(concept(tmp_path, prompt_source="concept", prompt="noise", loss_weight=0.5))
    sample = TrainDataset(items, (48, 32))[0]  # (width, height)
    assert sample["pixel_values"].shape == (3, 32, 48) and sample["pixel_values"].dtype == torch.float32
    assert -1.0 <= sample["pixel_values"].min() < 0 < sample["pixel_values"].max() <= 1.0
    assert sample["mask"].shape == (1, 32, 48) and torch.all(sample["mask"] == 1)
    assert sample["has_mask"] is False
    assert sample["caption"] == "noise" and sample["loss_weight"] == 0.5
    assert sample["original_size"] == (60, 90)
    assert sample["crop_top_left"] == (0, 0)  # 90x60 -> 48x32 exactly, nothing cropped
    assert sample["image_path"] == str(tmp_path / "n.png")


def _half_masked(tmp_path, size=(60, 40)):
    """Image red left / blue right; mask white left / black right."""
    halves(size, RED, BLUE).save(tmp_path / "h.png")
    halves(size, 255, 0, "L").save(tmp_path / "h-masklabel.png")
    items, _ = collect(concept(tmp_path, prompt_source="filename"))
    return items[0]


def test_mask_follows_the_flip(tmp_path):
    item = _half_masked(tmp_path)
    plain = prepare_sample(item, (32, 32), flip=False)
    flipped = prepare_sample(item, (32, 32), flip=True)
    assert plain["has_mask"] is True
    assert plain["mask"][0, :, :12].min() > 0.99 and plain["mask"][0, :, 20:].max() < 0.01
    assert flipped["mask"][0, :, 20:].min() > 0.99 and flipped["mask"][0, :, :12].max() < 0.01
    assert flipped["pixel_values"][0, 5, 28] > 0.9 and flipped["pixel_values"][2, 5, 28] < -0.9  # red on the right
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    # 60x40 -> 48x32, center crop leaves 8 px: left 8; mirrored, the crop's left edge is 8 too
    assert plain["crop_top_left"] == (0, 8) and flipped["crop_top_left"] == (0, 8)


def test_mask_and_image_share_random_crops_and_flips(tmp_path):
    item = _half_masked(tmp_path, size=(90, 40))
    dataset = TrainDataset([item] * 8, (24, 24), random_flip=True, crop="random", seed=1)
    flips, lefts = set(), set()
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            sample = dataset[i]
            r, b = sample["pixel_values"][0], sample["pixel_values"][2]
            mask = sample["mask"][0]
            # Lanczos (image) and bilinear (mask) blur the edge differently: compare the
            # clearly red and clearly blue pixels only.
            assert torch.all(mask[(r > 0.9) & (b < -0.9)] > 0.5)
            assert torch.all(mask[(b > 0.9) & (r < -0.9)] < 0.5)
            flips.add(bool(mask[:, -1].mean() > 0.5) and bool(mask[:, 0].mean() < 0.5))
            lefts.add(sample["crop_top_left"][1])
    assert flips == {True, False} and len(lefts) > 2  # both flips and several crops happened


def test_samples_are_deterministic_per_seed_epoch_and_index(tmp_path):
    Image.effect_noise((80, 40), 80).convert("RGB").save(tmp_path / "n.png")
    items, _ = collect(concept(tmp_path, prompt_source="filename"))
    make = lambda seed: TrainDataset(items * 4, (24, 24), random_flip=True, crop="random", seed=seed)
    a, b = make(7), make(7)
    for i in range(4):
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"])
    epoch0 = [a[i]["crop_top_left"] for i in range(4)]
    a.set_epoch(1)
    assert [a[i]["crop_top_left"] for i in range(4)] != epoch0


def test_mask_of_other_size_is_resized_with_a_warning(tmp_path):
    save_rgb(tmp_path / "a.png", size=(40, 30))
    Image.new("L", (20, 15), 255).save(tmp_path / "a-masklabel.png")
    items, warnings = collect(concept(tmp_path, prompt_source="filename"))
    assert any("a-masklabel.png" in w and "20x15" in w and "40x30" in w for w in warnings)
    told: list[str] = []
    mask = load_mask(tmp_path / "a-masklabel.png", (40, 30), warn=told.append)
    assert mask.mode == "L" and mask.size == (40, 30) and len(told) == 1
    sample = TrainDataset(items, (16, 16))[0]
    assert sample["mask"].shape == (1, 16, 16) and sample["has_mask"] is True


def test_rgb_and_16bit_masks_become_single_channel(tmp_path):
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "rgb.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    halves((8, 8), (255, 255, 255, 255), (255, 255, 255, 0), "RGBA").save(tmp_path / "alpha.png")
    assert load_mask(tmp_path / "rgb.png", (8, 8)).getpixel((0, 0)) == 255
    assert load_mask(tmp_path / "deep.png", (8, 8)).getpixel((0, 0)) == 255
    alpha = load_mask(tmp_path / "alpha.png", (8, 8))
    assert alpha.mode == "L" and alpha.getpixel((0, 0)) == 255 and alpha.getpixel((7, 0)) == 0


def test_collate_stacks_tensors_and_lists_the_rest(tmp_path):
    _half_masked(tmp_path)
    save_rgb(tmp_path / "plain.png")
    items, _ = collect(concept(tmp_path, prompt_source="filename"))
    dataset = TrainDataset(items, (16, 16))
    batch = collate([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["mask"].shape == (2, 1, 16, 16)
    assert batch["has_mask"].tolist() == [True, False]
    assert batch["loss_weight"].dtype == torch.float32 and batch["caption"] == ["h", "plain"]
    assert len(batch["original_size"]) == len(batch["crop_top_left"]) == 2


# --------------------------------------------------------------------------------------------
# The bundled demo dataset


def test_demo_dataset_has_five_captioned_masked_photos():
    items, warnings = collect(concept(DEMO_DATASET_DIR))
    assert warnings == []
    assert len(items) == 5
    assert all(item.mask_path is not None and item.caption for item in items)
    sample = TrainDataset(items, (64, 64))[0]
    assert sample["pixel_values"].shape == (3, 64, 64) and sample["has_mask"]
    assert 0.05 < sample["mask"].mean() < 0.95  # marks a subject, not the whole frame
    total = sum(p.stat().st_size for p in DEMO_DATASET_DIR.iterdir())
    assert total < 300_000


def test_a_mask_that_is_not_png_is_ignored_with_a_warning_and_never_trained(tmp_path):
    Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / "leaf.png")
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "leaf-masklabel.jpg")
    warnings = []
    items = collect_items([SimpleNamespace(path=str(tmp_path), enabled=True, repeats=1,
                                           prompt_source="filename", prompt="",
                                           loss_weight=1.0)], warn=warnings.append)
    assert [i.image_path.name for i in items] == ["leaf.png"]
    assert items[0].mask_path is None
    assert any("leaf-masklabel.jpg" in w and "must be PNG" in w for w in warnings)


def test_a_huge_image_is_skipped_naming_it(tmp_path, monkeypatch):
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    Image.new("RGB", (400, 400)).save(tmp_path / "huge.png")
    # Pillow's decompression-bomb guard: past twice MAX_IMAGE_PIXELS it refuses to decode
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)
    warnings = []
    items = collect_items([SimpleNamespace(path=str(tmp_path), enabled=True, repeats=1,
                                           prompt_source="filename", prompt="",
                                           loss_weight=1.0)], warn=warnings.append)
    assert [i.image_path.name for i in items] == ["ok.png"]
    assert any("huge.png" in w and "too large" in w for w in warnings)
