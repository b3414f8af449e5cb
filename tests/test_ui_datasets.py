"""The page's workspace-datasets panel: uploads land in <workspace>/datasets/<name>/ with a
report, a dataset becomes a concept in one click, images are removed, a dataset deleted only
after its confirmation. The handlers are called as the page calls them. On a shared server
with two users each lists, changes and uses only their own datasets (and reads the CLI's);
the admin reaches all."""
import html
import shutil
import zipfile

import pytest
from PIL import Image
from two_users import request, shared_world, snapshot

from trainer.data.datasets import dataset_owner
from trainer.data.imports import ImportLimits
from trainer.demo import DEMO_DATASET_DIR
from trainer.ownership import ANONYMOUS
from ui import datasets_panel as panel
from ui import state, tables


def text(message: str) -> str:
    return html.unescape(message)


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "ws"))
    return tmp_path / "ws"


@pytest.fixture()
def demo_zip(tmp_path):
    """The demo images, captions and masks in a zip, under a folder 'photos/'."""
    path = tmp_path / "upload" / "demo.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(DEMO_DATASET_DIR.iterdir()):
            archive.write(file, f"photos/{file.name}")
    return path


def test_an_upload_creates_the_dataset_and_reports_what_was_refused(workspace, demo_zip,
                                                                    tmp_path):
    fake = tmp_path / "upload" / "notes.png"
    fake.write_text("not an image")
    out = panel.upload("my cats", [str(demo_zip), str(fake)], replace=False)
    folder = workspace / "datasets" / "my cats"
    assert sorted(p.name for p in (folder / "photos").iterdir()) == sorted(
        p.name for p in DEMO_DATASET_DIR.iterdir())
    assert "Added 15 file(s) to 'my cats'" in text(out["message"])
    assert "notes.png" in out["message"] and "atelier-ok" in out["message"]  # partly added
    assert "| `my cats` | 5 | 5 | 5 |" in out["table"]
    assert out["dataset"]["value"] == "my cats" and out["dataset"]["choices"] == ["my cats"]
    assert "photos/cat.jpg" in out["images"]["choices"]
    # Again: everything is there already, so nothing is added and each file says why.
    again = panel.upload("my cats", [str(demo_zip)], replace=False)
    assert "Added 0 file(s)" in again["message"] and "atelier-error" in again["message"]


def test_an_upload_needs_a_name_and_files_and_respects_the_servers_limits(workspace, demo_zip,
                                                                          monkeypatch):
    assert "Name the dataset" in panel.upload(" ", [str(demo_zip)], False)["message"]
    assert "Drop images" in panel.upload("x", [], False)["message"]
    assert "atelier-error" in panel.upload("../x", [str(demo_zip)], False)["message"]
    assert not (workspace / "x").exists() and not (workspace.parent / "x").exists()
    monkeypatch.setattr(state, "IMPORT_LIMITS", ImportLimits(max_files=3))
    out = text(panel.upload("small", [str(demo_zip)], False)["message"])
    assert "Added 0 file(s)" in out and "too many files: 15 entries (limit 3" in out
    assert "| `small` |" not in panel.refresh(None)["table"]


def test_a_dataset_becomes_a_concept_once_with_its_subfolders(workspace, demo_zip):
    panel.upload("cats", [str(demo_zip)], False)
    frame = tables.concepts_frame([{"path": str(DEMO_DATASET_DIR)}])
    out = panel.use_as_concept("cats", frame)
    concepts = tables.concepts_from_frame(out["concepts"])
    assert concepts[0]["path"] == str(DEMO_DATASET_DIR)
    assert concepts[1]["path"] == str(workspace / "datasets" / "cats")
    assert concepts[1]["include_subdirectories"] is True  # its images are in photos/
    assert "already" in panel.use_as_concept("cats", out["concepts"])["message"]
    assert "no dataset" in panel.use_as_concept("dogs", frame)["message"]


def test_the_concept_trains_on_the_uploaded_images(workspace, demo_zip):
    from trainer.config import config_from_dict
    from trainer.data.dataset import collect_items
    panel.upload("cats", [str(demo_zip)], False)
    out = panel.use_as_concept("cats", tables.concepts_frame([]))
    config = config_from_dict({"concepts": tables.concepts_from_frame(out["concepts"])})
    items = collect_items(config.concepts)
    assert len(items) == 5 and all(item.mask_path is not None for item in items)


def test_removing_images_and_deleting_after_confirmation(workspace, demo_zip):
    panel.upload("cats", [str(demo_zip)], False)
    folder = workspace / "datasets" / "cats" / "photos"
    out = panel.remove("cats", ["photos/cat.jpg"])
    assert "Removed 3 file(s)" in out["message"]
    assert not any(p.name.startswith("cat") for p in folder.iterdir())
    assert "photos/cat.jpg" not in out["images"]["choices"]
    asked = panel.ask_delete("cats")
    assert asked["confirm_row"]["visible"] is True and "cats" in asked["confirm_text"]
    assert (workspace / "datasets" / "cats").is_dir()  # asking deletes nothing
    done = panel.confirm_delete("cats")
    assert not (workspace / "datasets" / "cats").exists()
    assert done["confirm_row"]["visible"] is False and "No datasets" in done["table"]
    assert "atelier-error" in panel.confirm_delete("cats")["message"]


def test_the_panel_lists_datasets_made_by_the_cli(workspace):
    shutil.copytree(DEMO_DATASET_DIR, workspace / "datasets" / "demo")
    out = panel.refresh(None)
    assert "| `demo` | 5 | 5 | 5 |" in out["table"]
    assert out["dataset"]["value"] == "demo"


# --- a shared server with two users (issue 23) ------------------------------------------------

@pytest.fixture()
def world(tmp_path, monkeypatch):
    return shared_world(tmp_path, monkeypatch)


def test_a_new_dataset_records_its_maker_and_only_they_see_it(world, demo_zip):
    out = panel.upload("holiday", [str(demo_zip)], False, access=world.alice)
    assert "Added 15 file(s)" in text(out["message"])
    assert dataset_owner(world.dataset("holiday")) == "alice"
    assert out["dataset"]["choices"] == ["cats", "cli", "holiday"]  # hers and the CLI's
    bob = panel.refresh(None, world.bob)
    assert bob["dataset"]["choices"] == ["cli", "dogs"]
    assert "holiday" not in bob["table"] and "`cats`" not in bob["table"]
    assert panel.image_names("holiday", world.bob) == []
    assert "photos/cat.jpg" in panel.image_names("holiday", world.alice)
    admin = panel.refresh(None, world.root)["dataset"]["choices"]
    assert admin == ["cats", "cli", "dogs", "holiday"]


def test_another_users_dataset_cannot_be_changed_or_used(world, demo_zip, tmp_path):
    cats = world.dataset("cats")
    before = snapshot(cats)
    extra = tmp_path / "upload" / "extra.png"
    Image.new("RGB", (8, 8)).save(extra)
    frame = tables.concepts_frame([])
    for result in (panel.upload("cats", [str(extra)], True, access=world.bob),
                   panel.remove("cats", ["cat.jpg"], access=world.bob),
                   panel.ask_delete("cats", access=world.bob),
                   panel.confirm_delete("cats", access=world.bob)):
        message = text(result["message"])
        assert message.startswith("<div class='atelier-error'>Dataset: ")
        assert "cannot be written by you" in message
        assert result.get("confirm_row", {}).get("visible") is not True  # never asked
    used = panel.use_as_concept("cats", frame, access=world.bob)
    assert "no dataset 'cats'" in text(used["message"]) and "concepts" not in used
    assert snapshot(cats) == before  # byte for byte
    # alice may; the admin may delete it
    assert "Removed 3 file(s)" in panel.remove("cats", ["cat.jpg"],
                                               access=world.alice)["message"]
    assert "Deleted dataset 'cats'" in text(panel.confirm_delete("cats",
                                                                 access=world.root)["message"])
    assert not cats.exists()


def test_a_cli_dataset_is_used_by_all_and_changed_by_admins_only(world):
    cli = world.dataset("cli")
    before = snapshot(cli)
    out = panel.use_as_concept("cli", tables.concepts_frame([]), access=world.bob)
    assert tables.concepts_from_frame(out["concepts"])[0]["path"] == str(cli)
    for result in (panel.remove("cli", ["cat.jpg"], access=world.bob),
                   panel.confirm_delete("cli", access=world.alice)):
        assert "Dataset: " in result["message"] and "cannot be written" in result["message"]
    assert snapshot(cli) == before
    assert "Removed 3 file(s)" in panel.remove("cli", ["cat.jpg"], access=world.root)["message"]


def test_the_anonymous_visitor_of_a_shared_server_owns_what_they_upload(tmp_path, monkeypatch,
                                                                        demo_zip):
    world = shared_world(tmp_path, monkeypatch, login=False)
    out = panel.upload("mine", [str(demo_zip)], False)  # no request: the anonymous visitor
    assert "Added 15 file(s)" in text(out["message"])
    assert dataset_owner(world.dataset("mine")) == ANONYMOUS
    assert "Removed 3 file(s)" in panel.remove("mine", ["photos/cat.jpg"])["message"]
    # the datasets made with a login are not the anonymous visitor's
    assert panel.refresh(None)["dataset"]["choices"] == ["cli", "mine"]


def test_the_listing_never_walks_another_users_dataset(world, monkeypatch):
    walked = []
    real = panel.datasets.summarize
    monkeypatch.setattr(panel.datasets, "summarize",
                        lambda folder: walked.append(folder.name) or real(folder))
    panel.refresh(None, world.bob)
    assert walked == ["cli", "dogs"]


def test_a_local_server_records_no_owner(workspace, demo_zip):
    panel.upload("cats", [str(demo_zip)], False)
    assert dataset_owner(workspace / "datasets" / "cats") is None


def test_the_page_lists_a_users_datasets_when_it_opens(world, monkeypatch):
    """With a login the page's load event lists the visitor's datasets (it failed on every
    load: the panel's outputs were passed as the event's inputs)."""
    from ui.page import build_page

    load = next(fn for fn in build_page().fns.values() if fn.api_name == "datasets_attach")
    assert load.inputs == [] and len(load.outputs) == 3  # only the request goes in
    table, choices, _ = load.fn(request("alice"))
    assert choices["choices"] == ["cats", "cli"] and "`dogs`" not in table
    assert load.fn(request("bob"))[1]["choices"] == ["cli", "dogs"]
