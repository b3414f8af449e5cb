"""The dataset section of the page: browsing a concept folder, captions, painted masks and the
automatic-mask panel, called as handlers (no browser). Every test works on a copy of the demo
dataset; the shipped one is never written."""
from __future__ import annotations

import html
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

import inspect
from types import SimpleNamespace

from two_users import request, shared_world, snapshot

from trainer.data import browse
from trainer.data.datasets import set_dataset_owner
from trainer.data.imports import ImportLimits
from trainer.demo import DEMO_DATASET_DIR
from trainer.limits import ServerLimits
from trainer.masks import painted
from trainer.masks.store import existing_mask
from trainer.ownership import ANONYMOUS
from ui import auto_masks, dataset, state, tables

NAMES = ["astronaut.jpg", "cat.jpg", "coffee.jpg", "photographer.jpg", "rocket.jpg"]


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A copy of the demo dataset; cat.jpg has no mask, coffee.jpg no caption."""
    folder = tmp_path / "dataset"
    shutil.copytree(DEMO_DATASET_DIR, folder)
    (folder / "cat-masklabel.png").unlink()
    (folder / "coffee.txt").unlink()
    (folder / ".hidden.jpg").write_bytes(b"")          # a macOS resource fork: not an image
    (folder / "notes.md").write_text("not an image")
    monkeypatch.setattr(dataset, "THUMBNAIL_DIR", tmp_path / "thumbs")
    return folder


@pytest.fixture
def shared(monkeypatch, tmp_path):
    """A shared server whose workspace is tmp_path/workspace."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    monkeypatch.setenv("ATELIER_WORKSPACE", str(workspace))
    state.configure(shared=True)
    yield workspace
    state.configure(shared=False)
    state.SESSION.allow_custom_code = False


# --- trainer.data.browse ----------------------------------------------------------------------

def test_listing_shows_captions_and_mask_state(data):
    entries = browse.list_entries(data)
    assert [e.name for e in entries] == NAMES
    by_name = {e.name: e for e in entries}
    assert by_name["astronaut.jpg"].caption == "a photo of an astronaut"
    assert by_name["astronaut.jpg"].has_mask and not by_name["cat.jpg"].has_mask
    assert by_name["coffee.jpg"].caption is None
    assert by_name["cat.jpg"].label() == "✗ no mask · cat.jpg · a photo of a cat"
    assert by_name["coffee.jpg"].label().endswith("(no caption)")
    assert by_name["rocket.jpg"].label().startswith("✓ mask")


def test_the_no_mask_filter(data):
    assert [e.name for e in browse.list_entries(data, only_unmasked=True)] == ["cat.jpg"]


def test_listing_a_missing_folder_or_a_file_names_it(data):
    with pytest.raises(browse.DatasetError, match="does not exist"):
        browse.list_entries(data / "nope")
    with pytest.raises(browse.DatasetError, match="is a file"):
        browse.list_entries(data / "cat.jpg")


def test_caption_is_saved_atomically_beside_the_image(data, monkeypatch):
    path = browse.save_caption(data / "cat.jpg", "  a tabby cat\r\nsecond line  \n")
    assert path == data / "cat.txt"
    assert path.read_text(encoding="utf-8") == "a tabby cat\nsecond line\n"
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]
    # A failed write (full disk) leaves the old caption whole.
    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(browse.DatasetError, match="No space left"):
        browse.save_caption(data / "cat.jpg", "lost")
    assert path.read_text(encoding="utf-8") == "a tabby cat\nsecond line\n"
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]


def test_thumbnails_are_cached_and_a_broken_image_gets_a_placeholder(data, tmp_path):
    cache = tmp_path / "cache"
    first = browse.thumbnail(data / "rocket.jpg", cache)
    assert browse.thumbnail(data / "rocket.jpg", cache) == first
    with Image.open(first) as thumb:
        assert max(thumb.size) <= browse.THUMBNAIL_SIZE
    painted_mask = painted.filled((192, 128))
    painted_mask.save(data / "rocket-masklabel.png")
    os.utime(data / "rocket-masklabel.png", ns=(1, 10**18))  # a newer mask: a new thumbnail
    second = browse.thumbnail(data / "rocket.jpg", cache)
    assert second != first
    assert not first.exists()  # the older version is deleted: one thumbnail per image
    assert sorted(cache.iterdir()) == [second]
    (data / "broken.jpg").write_bytes((data / "cat.jpg").read_bytes()[:300])
    with Image.open(browse.thumbnail(data / "broken.jpg", cache)) as placeholder:
        assert placeholder.getpixel((5, 5)) == (128, 128, 128)


def test_thumbnails_not_listed_for_a_month_are_pruned(data, tmp_path):
    cache = tmp_path / "cache"
    kept = browse.thumbnail(data / "cat.jpg", cache)
    listed_again = browse.thumbnail(data / "rocket.jpg", cache)
    stale = browse.thumbnail(data / "astronaut.jpg", cache)
    month_ago = time.time() - 31 * 86400
    for file in (listed_again, stale):
        os.utime(file, (month_ago, month_ago))
    assert browse.thumbnail(data / "rocket.jpg", cache) == listed_again  # a listing renews it
    assert browse.prune_thumbnails(cache) == 1
    assert sorted(cache.iterdir()) == sorted([kept, listed_again])
    assert browse.prune_thumbnails(tmp_path / "never-made") == 0


# --- the page's handlers ------------------------------------------------------------------------

def test_browse_handler_lists_thumbnails_with_labels(data):
    result = dataset.browse_folder(str(data))
    gallery = result["gallery"]["value"]
    assert [label for _, label in gallery][1] == "✗ no mask · cat.jpg · a photo of a cat"
    assert all(os.path.isfile(path) for path, _ in gallery)
    assert result["entries"] == [str(data / name) for name in NAMES]
    assert "**5** images" in result["info"] and "**4** with a mask" in result["info"]
    only = dataset.browse_folder(str(data), only_unmasked=True, selected=str(data / "cat.jpg"))
    assert only["entries"] == [str(data / "cat.jpg")]
    assert only["gallery"]["selected_index"] == 0


def test_browse_handler_explains_a_missing_folder_and_no_concept(data):
    missing = dataset.browse_folder(str(data / "gone"))
    assert missing["gallery"] == [] and "does not exist" in missing["info"]
    assert "No enabled concept" in dataset.browse_folder(None)["info"]


def test_concept_chooser_lists_the_enabled_folders(data, tmp_path):
    frame = tables.concepts_frame([{"path": str(data)},
                                   {"path": str(tmp_path / "off"), "enabled": False},
                                   {"path": str(tmp_path / "b")}])
    update = dataset.concept_choices(frame, None)["concept"]
    assert [c[1] if isinstance(c, tuple) else c for c in update["choices"]] == \
        [str(data), str(tmp_path / "b")]
    assert update["value"] == str(data) and update["visible"] is True
    single = dataset.concept_choices(tables.concepts_frame([{"path": str(data)}]),
                                     str(tmp_path / "b"))["concept"]
    assert single["value"] == str(data) and single["visible"] is False
    note = dataset.browse_folder(str(data), frame=tables.concepts_frame(
        [{"path": str(data), "prompt_source": "filename"}]))["info"]
    assert "caption source is **filename**" in note


def test_opening_an_image_shows_its_mask_caption_and_size(data):
    opened = dataset.open_image(str(data / "astronaut.jpg"))
    assert opened["caption"] == "a photo of an astronaut"
    assert "128×128" in opened["title"] and "has a mask" in opened["title"]
    saved = existing_mask(data / "astronaut.jpg")
    assert np.array_equal(np.asarray(opened["baseline"]), np.asarray(saved))
    layer = opened["editor"]["layers"][0]
    assert layer.size == (128, 128) and opened["editor"]["background"].size == (128, 128)
    assert opened["preview"] is not None
    fresh = dataset.open_image(str(data / "cat.jpg"))
    assert fresh["baseline"] is None and "no mask yet" in fresh["title"]
    assert fresh["preview"] is None
    assert np.asarray(fresh["editor"]["layers"][0].getchannel("A")).max() == 0
    assert dataset.select_image([str(data / "cat.jpg")], 0)["selected"] == str(data / "cat.jpg")


def test_save_mask_writes_the_painted_layer_at_the_images_size(data):
    opened = dataset.open_image(str(data / "cat.jpg"))
    layer = opened["editor"]["layers"][0].copy()
    layer.paste((255, 255, 255, 168), (0, 40, 192, 80))  # a band across the middle
    editor = {**opened["editor"], "layers": [layer]}
    result = dataset.save_mask(opened["selected"], editor, opened["baseline"])
    assert "Saved cat-masklabel.png (192×128" in result["message"]
    with Image.open(data / "cat-masklabel.png") as mask:
        assert mask.mode == "L" and mask.size == (192, 128)
        values = np.asarray(mask)
    assert (values[40:80] == 255).all() and values[:40].max() == 0 and values[80:].max() == 0
    assert result["preview"] is not None and "has a mask" in result["title"]
    # The gallery now marks the cat as masked.
    labels = [label for _, label in dataset.browse_folder(str(data))["gallery"]["value"]]
    assert labels[1].startswith("✓ mask")


def test_a_canvas_showing_another_image_is_never_saved_over_this_ones_mask(data):
    before = (data / "rocket-masklabel.png").read_bytes()
    astronaut = dataset.open_image(str(data / "astronaut.jpg"))
    result = dataset.save_mask(str(data / "rocket.jpg"), astronaut["editor"],
                               astronaut["baseline"])
    assert "does not show 'rocket.jpg'" in html.unescape(result["message"])
    assert (data / "rocket-masklabel.png").read_bytes() == before


def test_saving_an_opened_mask_unchanged_keeps_it(data):
    before = np.asarray(existing_mask(data / "rocket.jpg"))
    opened = dataset.open_image(str(data / "rocket.jpg"))
    dataset.save_mask(opened["selected"], opened["editor"], opened["baseline"])
    assert np.array_equal(np.asarray(existing_mask(data / "rocket.jpg")), before)


def test_clear_fill_and_invert_redraw_the_canvas(data):
    opened = dataset.open_image(str(data / "rocket.jpg"))
    args = (opened["selected"], opened["editor"], opened["baseline"])
    filled = dataset.reset_mask(*args, "fill")
    assert np.asarray(filled["baseline"]).min() == 255 and "press Save" in filled["message"]
    cleared = dataset.reset_mask(*args, "clear")
    assert np.asarray(cleared["baseline"]).max() == 0
    assert np.asarray(cleared["editor"]["layers"][0].getchannel("A")).max() == 0
    inverted = dataset.reset_mask(*args, "invert")
    assert np.array_equal(np.asarray(inverted["baseline"]),
                          255 - np.asarray(opened["baseline"]))
    # Nothing is written until Save.
    assert np.array_equal(np.asarray(existing_mask(data / "rocket.jpg")),
                          np.asarray(opened["baseline"]))
    saved = dataset.save_mask(opened["selected"], inverted["editor"], inverted["baseline"])
    assert "Saved" in saved["message"]
    assert np.array_equal(np.asarray(existing_mask(data / "rocket.jpg")),
                          255 - np.asarray(opened["baseline"]))


def test_caption_handler_saves_and_reports(data):
    result = dataset.save_caption(str(data / "coffee.jpg"), "a cup of coffee\n")
    assert "Saved the caption to coffee.txt" in result["message"]
    assert "no caption file" not in result["title"]
    assert (data / "coffee.txt").read_text(encoding="utf-8") == "a cup of coffee\n"
    assert browse.list_entries(data)[2].caption == "a cup of coffee"


def test_a_caption_box_still_holding_another_images_caption_is_not_saved(data):
    """Save clicked before a newly opened image's caption arrived: the box (and its hidden
    owner name) still belong to the previous image, so nothing is written."""
    before = (data / "cat.txt").read_bytes()
    opened = dataset.open_image(str(data / "coffee.jpg"))
    assert opened["caption_for"] == str(data / "coffee.jpg")
    result = dataset.save_caption(str(data / "cat.jpg"), "coffee's caption",
                                  caption_for=opened["caption_for"])
    assert "still holds the caption of &#x27;coffee.jpg&#x27;" in result["message"]
    assert (data / "cat.txt").read_bytes() == before


def test_a_stale_concept_chooser_acts_on_the_data_tables_folder(data, tmp_path):
    """The Data table changed and the chooser has not caught up: browsing lists the table's
    folder, not the old one."""
    other = tmp_path / "other"
    other.mkdir()
    table = tables.concepts_frame([{"path": str(data)}])
    assert dataset.current_folder(str(other), table) == str(data)
    assert dataset.current_folder(str(data), table) == str(data)
    listed = dataset.refresh_gallery(str(other), False, table, None)
    assert str(data) in listed["info"]


def test_clear_messages_for_no_image_a_vanished_image_and_a_missing_folder(data, tmp_path):
    assert "Select an image" in dataset.save_mask(None, None, None)["message"]
    assert "Select an image" in dataset.save_caption(None, "x")["message"]
    assert "Select an image" in dataset.reset_mask(None, None, None, "fill")["message"]
    assert "Select an image" in dataset.select_image([], 3)["message"]
    opened = dataset.open_image(str(data / "cat.jpg"))
    (data / "cat.jpg").unlink()
    gone = dataset.save_mask(opened["selected"], opened["editor"], None)
    assert "'cat.jpg' no longer exists" in html.unescape(gone["message"])
    assert "atelier-error" in gone["message"]
    assert not (data / "cat-masklabel.png").exists()
    assert "no longer exists" in dataset.open_image(str(data / "cat.jpg"))["message"]
    moved = tmp_path / "moved"
    data.rename(moved)
    folder_gone = dataset.save_caption(str(data / "rocket.jpg"), "x")
    assert "folder" in folder_gone["message"] and "no longer exists" in folder_gone["message"]
    empty = dataset.save_mask(str(moved / "rocket.jpg"), {"background": None, "layers": []},
                              None)
    assert "canvas is empty" in empty["message"]


def test_a_failed_mask_write_keeps_the_old_mask_and_says_why(data, monkeypatch):
    before = (data / "rocket-masklabel.png").read_bytes()
    opened = dataset.open_image(str(data / "rocket.jpg"))
    filled = dataset.reset_mask(opened["selected"], opened["editor"], opened["baseline"], "fill")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "replace", refuse)
    result = dataset.save_mask(opened["selected"], filled["editor"], filled["baseline"])
    assert "Cannot write the mask of 'rocket.jpg': Permission denied" in \
        html.unescape(result["message"])
    assert (data / "rocket-masklabel.png").read_bytes() == before
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]


def test_a_shared_server_without_a_login_confines_browsing_and_writing(data, shared):
    outside = dataset.browse_folder(str(data))
    assert outside["gallery"] == [] and "cannot be read by you" in outside["info"]
    assert outside["info"].startswith("⚠ Concept folder: ")
    assert "Image: " in dataset.open_image(str(data / "cat.jpg"))["message"]
    refused = html.unescape(dataset.save_caption(str(data / "cat.jpg"), "x")["message"])
    assert "Image: " in refused and "cannot be written by you" in refused
    assert (data / "cat.txt").read_text(encoding="utf-8") == "a photo of a cat\n"
    # The demo dataset may be browsed (training reads it too) but not written.
    demo = dataset.browse_folder(str(DEMO_DATASET_DIR))
    assert len(demo["entries"]) == 5
    opened = dataset.open_image(str(DEMO_DATASET_DIR / "cat.jpg"))
    assert opened["caption"] == "a photo of a cat"
    refused = dataset.save_mask(opened["selected"], opened["editor"], opened["baseline"])
    assert "cannot be written by you" in refused["message"]
    assert "cannot be written" in dataset.save_caption(opened["selected"], "x")["message"]
    # The workspace's own files are the server's; a dataset the visitor made is theirs.
    loose = shared / "cats"
    shutil.copytree(data, loose)
    assert "cannot be written" in dataset.save_caption(str(loose / "cat.jpg"), "a")["message"]
    mine = shared / "datasets" / "cats"
    shutil.copytree(data, mine)
    set_dataset_owner(mine, ANONYMOUS)
    assert "Saved" in dataset.save_caption(str(mine / "cat.jpg"), "a cat")["message"]


# --- a shared server with two users (issue 23) ------------------------------------------------

@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "THUMBNAIL_DIR", tmp_path / "thumbs")
    return shared_world(tmp_path, monkeypatch)


def test_another_users_dataset_is_neither_shown_nor_written(world):
    cats = world.dataset("cats")
    before = snapshot(cats)
    mine = dataset.open_image(str(cats / "rocket.jpg"), world.alice)  # alice opens her image
    assert mine["caption"] and mine["editor"] is not None
    # bob names alice's folder and image in every tool of the section
    listed = dataset.browse_folder(str(cats), access=world.bob)
    assert listed["gallery"] == [] and listed["entries"] == []
    assert listed["info"].startswith("⚠ Concept folder: ") and "cats" in listed["info"]
    image = str(cats / "rocket.jpg")
    for result in (dataset.open_image(image, world.bob),
                   dataset.select_image([image], 0, world.bob),
                   dataset.save_caption(image, "pwned", access=world.bob),
                   dataset.save_mask(image, mine["editor"], mine["baseline"], world.bob),
                   dataset.reset_mask(image, mine["editor"], mine["baseline"], "fill",
                                      world.bob)):
        message = html.unescape(result["message"])
        assert message.startswith("<div class='atelier-error'>Image: ")
        assert "cannot be" in message and "pwned" not in message
        assert set(result) == {"message"}  # no pixels, caption or title of alice's image
    assert not dataset.has_unsaved_paint(image, mine["editor"], None, world.bob)
    for result in (auto_masks.preview_selected(image, world.bob, **color_settings()),
                   auto_masks.apply_to_folder(str(cats), access=world.bob,
                                              **color_settings(mode="replace"))):
        assert "cannot be" in result["auto_message"] and result.get("auto_image") is None
    assert snapshot(cats) == before  # byte for byte, nothing added or removed


def test_each_user_edits_their_own_and_the_admin_edits_all(world):
    cats, dogs = world.dataset("cats"), world.dataset("dogs")
    assert len(dataset.browse_folder(str(cats), access=world.alice)["entries"]) == 5
    assert "Saved" in dataset.save_caption(str(cats / "cat.jpg"), "alice's cat",
                                           access=world.alice)["message"]
    assert (cats / "cat.txt").read_text() == "alice's cat\n"
    assert "cannot be" in dataset.save_caption(str(dogs / "cat.jpg"), "x",
                                               access=world.alice)["message"]
    # the admin browses and writes anyone's
    assert len(dataset.browse_folder(str(dogs), access=world.root)["entries"]) == 5
    assert "Saved" in dataset.save_caption(str(dogs / "cat.jpg"), "checked",
                                           access=world.root)["message"]
    result = auto_masks.apply_to_folder(str(dogs), access=world.root,
                                        **color_settings(mode="replace"))
    assert "Wrote 5 masks" in result["auto_message"]


def test_a_cli_dataset_and_the_demo_are_read_by_all_and_written_by_admins(world):
    cli = world.dataset("cli")
    before = snapshot(cli)
    for folder in (cli, DEMO_DATASET_DIR):
        assert len(dataset.browse_folder(str(folder), access=world.bob)["entries"]) == 5
        opened = dataset.open_image(str(folder / "rocket.jpg"), world.bob)
        assert opened["caption"]
        refused = dataset.save_mask(opened["selected"], opened["editor"], opened["baseline"],
                                    world.bob)
        assert "cannot be written by you" in refused["message"]
        assert "cannot be written" in dataset.save_caption(str(folder / "rocket.jpg"), "x",
                                                           access=world.bob)["message"]
        assert "cannot be written" in auto_masks.apply_to_folder(
            str(folder), access=world.bob, **color_settings(mode="replace"))["auto_message"]
    assert snapshot(cli) == before
    assert "Saved" in dataset.save_caption(str(cli / "rocket.jpg"), "fixed",
                                           access=world.root)["message"]


def test_job_folders_and_the_servers_files_are_their_owners(world):
    job = world.workspace / "jobs" / "1"
    shutil.copytree(DEMO_DATASET_DIR, job / "data")
    (job / "job.json").write_text('{"owner": "alice"}')
    assert len(dataset.browse_folder(str(job / "data"), access=world.alice)["entries"]) == 5
    for folder in (job / "data", world.workspace, world.workspace / "jobs"):
        assert "cannot be read" in dataset.browse_folder(str(folder),
                                                         access=world.bob)["info"]


def test_a_link_out_of_a_dataset_shows_nothing_of_the_other_users(world):
    """A link inside alice's folder to bob's image (no page tool makes one; a server admin
    might): not listed, not opened, its caption and mask not read through a link either."""
    cats, dogs = world.dataset("cats"), world.dataset("dogs")
    (cats / "stolen.jpg").symlink_to(dogs / "rocket.jpg")
    listed = dataset.browse_folder(str(cats), access=world.alice)
    assert len(listed["entries"]) == 5 and not any("stolen" in e for e in listed["entries"])
    assert "cannot be read" in dataset.open_image(str(cats / "stolen.jpg"),
                                                  world.alice)["message"]
    (cats / "cat.txt").unlink()
    (cats / "cat.txt").symlink_to(dogs / "cat.txt")
    refused = html.unescape(dataset.open_image(str(cats / "cat.jpg"), world.alice)["message"])
    assert refused.startswith("<div class='atelier-error'>Caption file: ")
    # the admin's listing is the same: the link is followed only where its target is read
    assert len(dataset.browse_folder(str(cats), access=world.root)["entries"]) == 6


def test_refusals_are_one_sentence_naming_the_field(world):
    for value in ("a\x00b", "/" + "x/" * 3000, "../../../etc"):
        listed = dataset.browse_folder(value, access=world.bob)["info"]
        opened = html.unescape(dataset.open_image(value + "/a.jpg", world.bob)["message"])
        assert listed.startswith("⚠ Concept folder: ") and "Image: " in opened
        for text in (listed, opened):
            assert "null byte" not in text and "Errno" not in text and "Traceback" not in text
            assert len(text) < 600


def test_the_handlers_get_the_requests_visitor(world):
    """`wire` gives a handler with an `access` parameter the Access of the request's login:
    the same browse, called for alice and for bob, answers each their own."""
    import gradio as gr

    with gr.Blocks():
        section = SimpleNamespace(**{name: gr.Textbox(render=False) for name in
                                     ("concept", "only_unmasked", "concepts", "selected",
                                      "gallery", "entries", "info")})
    section.component = lambda name: getattr(section, name)
    run, inputs, outputs = dataset.wire(section, dataset.refresh_gallery,
                                        dataset.BROWSE_INPUTS, dataset.BROWSED)
    table = tables.concepts_frame([{"path": str(world.dataset("cats"))}])
    data = {section.concept: str(world.dataset("cats")), section.only_unmasked: False,
            section.concepts: table, section.selected: None}
    for user, count in (("alice", 5), ("bob", 0), ("root", 5)):
        result = run(data, request(user))
        assert len(result[section.entries]) == count, user
    assert "request" in inspect.signature(run).parameters


def test_a_caption_longer_than_the_servers_limit_is_refused(world, monkeypatch):
    cats = world.dataset("cats")
    monkeypatch.setattr(state, "LIMITS", ServerLimits(max_caption_chars=20))
    before = (cats / "cat.txt").read_bytes()
    refused = html.unescape(dataset.save_caption(str(cats / "cat.jpg"), "x" * 21,
                                                 access=world.alice)["message"])
    assert "Caption: 21 characters is more than the 20 this server allows " \
           "(--max-caption-chars)" in refused
    assert (cats / "cat.txt").read_bytes() == before
    assert "Saved" in dataset.save_caption(str(cats / "cat.jpg"), "  " + "x" * 20 + "\n",
                                           access=world.alice)["message"]


def test_a_write_that_would_pass_the_dataset_quota_is_refused(world, monkeypatch):
    cats = world.dataset("cats")
    size = sum(len(data) for data in snapshot(cats).values())
    monkeypatch.setattr(state, "IMPORT_LIMITS", ImportLimits(max_dataset_bytes=size + 5))
    before = snapshot(cats)
    opened = dataset.open_image(str(cats / "cat.jpg"), world.alice)
    filled = dataset.reset_mask(opened["selected"], opened["editor"], opened["baseline"],
                                "invert", world.alice)
    for result in (dataset.save_mask(opened["selected"], filled["editor"], filled["baseline"],
                                     world.alice),
                   dataset.save_caption(str(cats / "cat.jpg"), "a much, much longer caption",
                                        access=world.alice)):
        assert "--max-dataset-gb" in html.unescape(result["message"])
    assert snapshot(cats) == before
    assert "Saved" in dataset.save_caption(str(cats / "cat.jpg"), "a cat",
                                           access=world.alice)["message"]  # smaller: fine
    # a full dataset takes no automatic masks either
    monkeypatch.setattr(state, "IMPORT_LIMITS", ImportLimits(max_dataset_bytes=size - 100))
    before = snapshot(cats)
    refused = auto_masks.apply_to_folder(str(cats), access=world.alice,
                                         **color_settings(mode="replace"))["auto_message"]
    assert "Concept folder: not written" in refused and "--max-dataset-gb" in refused
    assert snapshot(cats) == before


def test_the_concept_summary_and_lr_preview_count_only_readable_folders(world, monkeypatch):
    from trainer.config import config_from_dict
    from ui import lr_preview
    from ui.page import concepts_summary

    counted = []
    real = lr_preview.count_images
    monkeypatch.setattr(lr_preview, "count_images",
                        lambda folder, sub=False: counted.append(folder) or real(folder, sub))
    cats = str(world.dataset("cats"))
    for path in (cats, "/usr", "/"):
        config = config_from_dict({"concepts": [{"path": path, "include_subdirectories": True}]})
        summary = concepts_summary(config.concepts, world.bob)
        frame, caption = lr_preview.curve_frame(config, access=world.bob)
        assert summary.startswith("⚠ concepts[0].path: ") and "cannot be read" in summary
        assert caption.startswith("No preview: concepts[0].path: ") and frame.empty
        assert "images" not in summary and "images" not in caption  # no count, no oracle
    assert counted == []  # nothing was walked
    config = config_from_dict({"concepts": [{"path": cats}]})
    assert concepts_summary(config.concepts, world.alice) == "`cats`: 5 images"
    assert lr_preview.curve_frame(config, access=world.alice)[1].startswith("5 images per")


def test_no_caption_limit_locally(data):
    assert state.LIMITS.max_caption_chars is None
    assert "Saved" in dataset.save_caption(str(data / "cat.jpg"), "a cat " * 5000)["message"]
    assert len((data / "cat.txt").read_text()) > 20_000


# --- automatic masks ------------------------------------------------------------------------------

def color_settings(**overrides) -> dict:
    values = {"method": "color", "mode": "replace", "prompt": "", "model": "unused",
              "color": "#000000", "tolerance": 30, "threshold": 0.5, "smooth": 0, "grow": 0}
    values.update(overrides)
    return values


def test_auto_preview_shows_image_old_and_new_mask_and_overlay(data):
    result = auto_masks.preview_selected(str(data / "rocket.jpg"), **color_settings())
    assert result["auto_message"] == ""
    assert result["auto_image"].size == result["auto_new"].size == result["auto_overlay"].size
    assert result["auto_old"] is not None and result["auto_new"].mode == "L"
    assert "rocket.jpg" in result["auto_note"] and "would replace" in result["auto_note"]
    assert np.array_equal(np.asarray(existing_mask(data / "rocket.jpg")),
                          np.asarray(existing_mask(DEMO_DATASET_DIR / "rocket.jpg")))
    fresh = auto_masks.preview_selected(str(data / "cat.jpg"), **color_settings(mode="fill"))
    assert fresh["auto_old"] is None and "would write a new mask" in fresh["auto_note"]


def test_auto_preview_errors_name_the_problem(data):
    assert "Select an image" in auto_masks.preview_selected(None, **color_settings())[
        "auto_message"]
    bad = auto_masks.preview_selected(str(data / "cat.jpg"),
                                      **color_settings(method="clipseg", prompt=""))
    assert "prompt" in bad["auto_message"] and "atelier-error" in bad["auto_message"]
    colour = auto_masks.preview_selected(str(data / "cat.jpg"), **color_settings(color="blue"))
    assert "color" in colour["auto_message"]


def test_auto_apply_fills_missing_masks_and_summarises(data):
    seen = []
    result = auto_masks.apply_to_folder(str(data), lambda d, t, n: seen.append((d, t, n)),
                                        None, **color_settings(mode="fill"))
    text = result["auto_message"]
    assert "Wrote 1 mask" in text and "skipped 4" in text and "has a mask" in text
    assert (data / "cat-masklabel.png").is_file()
    assert seen[-1][:2] == (5, 5)
    stopped = auto_masks.apply_to_folder(str(data), None, lambda: True,
                                         **color_settings(mode="replace"))
    assert "Stopped after 0 of 5" in stopped["auto_message"]


def test_auto_apply_reloads_the_canvas_only_when_it_wrote_the_open_images_mask(data):
    # cat.jpg has no mask; the canvas holds paint not saved yet.
    cat = dataset.open_image(str(data / "cat.jpg"))
    image = Image.open(data / "cat.jpg").convert("RGB")
    painted_canvas = painted.editor_value(image, painted.filled(image.size))
    result = auto_masks.apply_to_folder(str(data), selected=cat["selected"],
                                        editor=painted_canvas, baseline=cat["baseline"],
                                        **color_settings(mode="fill"))
    assert "Wrote 1 mask" in result["auto_message"]
    assert "canvas now shows the new mask of cat.jpg" in result["auto_message"]
    assert "paint you had not saved" in result["auto_message"]
    written = existing_mask(data / "cat.jpg")
    assert painted.same_mask(result["baseline"], written)  # the canvas holds the new mask
    assert "has a mask" in result["title"] and "message" not in result

    # rocket.jpg keeps its mask (fill mode): the canvas and its unsaved paint stay as they are.
    rocket = dataset.open_image(str(data / "rocket.jpg"))
    kept = auto_masks.apply_to_folder(str(data), selected=rocket["selected"],
                                      editor=rocket["editor"], baseline=rocket["baseline"],
                                      **color_settings(mode="fill"))
    assert "skipped 5" in kept["auto_message"] and "canvas" not in kept["auto_message"]
    assert set(kept) == {"auto_message"}

    # Replaced with no paint pending: reloaded, without the warning about paint.
    again = auto_masks.apply_to_folder(str(data), selected=rocket["selected"],
                                       editor=rocket["editor"], baseline=rocket["baseline"],
                                       **color_settings(mode="replace"))
    assert "canvas now shows the new mask of rocket.jpg." in again["auto_message"]
    assert "editor" in again


def test_auto_apply_is_refused_while_a_training_job_runs(data, monkeypatch):
    monkeypatch.setattr(auto_masks, "training_running", lambda: True)
    before = sorted(p.name for p in data.iterdir())
    result = auto_masks.apply_to_folder(str(data), **color_settings(mode="replace"))
    assert "training job is running" in result["auto_message"]
    assert "atelier-error" in result["auto_message"]
    assert sorted(p.name for p in data.iterdir()) == before
    assert existing_mask(data / "cat.jpg") is None


def test_training_does_not_start_while_masks_are_generated(monkeypatch):
    started = []
    # (the viewer argument: Start queues a job of whoever pressed it, issue 15)
    monkeypatch.setattr(state.SESSION, "start", lambda config, viewer: started.append(config))
    monkeypatch.setattr(state, "MASK_RUNS", {"a-browser-session"})
    with pytest.raises(state.AtelierError, match="Masks or captions are being generated"):
        state.start_training("a config")
    assert started == []
    monkeypatch.setattr(state, "MASK_RUNS", set())
    state.start_training("a config")
    assert started == ["a config"]


def test_unsaved_paint_is_told_apart_from_a_saved_canvas(data):
    rocket = dataset.open_image(str(data / "rocket.jpg"))
    assert not dataset.has_unsaved_paint(rocket["selected"], rocket["editor"],
                                         rocket["baseline"])
    image = Image.open(data / "rocket.jpg").convert("RGB")
    cleared = painted.editor_value(image, painted.cleared(image.size))
    assert dataset.has_unsaved_paint(rocket["selected"], cleared, rocket["baseline"])
    # Saved: the canvas equals the file again.
    dataset.save_mask(rocket["selected"], cleared, rocket["baseline"])
    assert not dataset.has_unsaved_paint(rocket["selected"], cleared, rocket["baseline"])
    assert not dataset.has_unsaved_paint(None, cleared, None)


def test_auto_apply_errors(data, shared):
    assert "No concept folder" in auto_masks.apply_to_folder(None, **color_settings())[
        "auto_message"]
    assert "Concept folder: " in auto_masks.apply_to_folder(
        str(data), **color_settings())["auto_message"]
    assert "cannot be written" in auto_masks.apply_to_folder(
        str(DEMO_DATASET_DIR), **color_settings())["auto_message"]
    model = auto_masks.preview_selected(
        str(DEMO_DATASET_DIR / "cat.jpg"),
        **color_settings(method="clipseg", prompt="a cat", model="/etc/models/clipseg"))
    assert "CLIPSeg model: " in model["auto_message"] and "cannot be read" in model[
        "auto_message"]
    assert "No mask run" in auto_masks.request_stop("nobody")["auto_message"]


def test_auto_preview_with_a_tiny_clipseg(data, tmp_path):
    from trainer.masks.tiny_clipseg import build_tiny_clipseg

    model = build_tiny_clipseg(tmp_path / "tiny-clipseg")
    result = auto_masks.preview_selected(
        str(data / "cat.jpg"), **color_settings(method="clipseg", prompt="a cat",
                                                model=str(model), threshold=0.0))
    assert result["auto_message"] == "" and result["auto_new"].mode == "L"


def test_the_page_has_the_section_and_every_event_is_named():
    from ui.page import build_page

    demo = build_page()
    section = demo.dataset
    assert section.concept.value == "trainer/demo/dataset"
    names = {fn.api_name for fn in demo.fns.values()}
    for name in ("dataset_browse", "dataset_select", "dataset_save_caption", "mask_save",
                 "mask_clear", "mask_fill", "mask_invert", "auto_mask_preview",
                 "auto_mask_apply", "auto_mask_stop"):
        assert name in names, name
    unnamed = [fn.name for fn in demo.fns.values() if not fn.api_name]
    assert not unnamed


def test_the_chooser_accepts_the_folder_the_browser_still_shows():
    """The Data table changed (an import): the chooser's new choices are set in the browser
    session's copy on the server (rebuilt from its constructor arguments with the update)
    while the browser still sends the old folder. The event must reach current_folder(), not
    fail in gradio's choice check (which left "Error" in the info line: a CI flake)."""
    import gradio as gr

    from ui.page import build_page
    concept = build_page().dataset.concept
    updated = concept.__class__(**{**concept.constructor_args, "render": False,
                                   "choices": ["workspace/new-photos"],
                                   "value": "workspace/new-photos"})
    assert updated.preprocess("trainer/demo/dataset") == "trainer/demo/dataset"
    table = tables.concepts_frame([{"path": str(DEMO_DATASET_DIR)}])
    assert dataset.current_folder("trainer/demo/dataset-gone", table) == str(DEMO_DATASET_DIR)
    assert isinstance(updated, gr.Dropdown)
