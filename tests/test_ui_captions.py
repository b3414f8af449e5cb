"""The page's caption panel: captions a concept folder with a (tiny, local) captioning model,
previews the open image without writing, edits every caption at once, and refuses by name
while training runs. On a shared server with two users each captions and edits only their own
datasets, with models they may read, and no edit passes the caption length limit or the
dataset quota; the admin edits all; a local server has neither limit."""
import html
import shutil

import pytest

from two_users import shared_world, snapshot

from trainer.captions.tiny import build_tiny_blip
from trainer.data.imports import ImportLimits
from trainer.demo import DEMO_DATASET_DIR
from trainer.limits import ServerLimits
from ui import auto_captions as panel
from ui import state


def text(result):
    """The message's words (the HTML tags and escapes taken off)."""
    message = html.unescape(result["caption_message"])
    return message[message.index(">") + 1:message.rindex("<")]


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return str(build_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip"))


@pytest.fixture()
def folder(tmp_path):
    target = tmp_path / "cats"
    shutil.copytree(DEMO_DATASET_DIR, target)
    (target / "cat.txt").unlink()
    return target


def settings(model, **values):
    return {"caption_model": model, "caption_mode": "fill", "caption_style": "short",
            "caption_prefix": "", "caption_suffix": "", "caption_max_length": None, **values}


def test_a_run_fills_the_missing_captions_with_the_prefix(folder, captioner):
    before = (folder / "rocket.txt").read_text()
    out = text(panel.caption_concept(str(folder), **settings(captioner,
                                                              caption_prefix="ohwx")))
    assert out.startswith("Captioned 1 image, skipped 4")
    assert (folder / "cat.txt").read_text().startswith("ohwx, ")
    assert (folder / "rocket.txt").read_text() == before  # fill keeps what the user wrote


def test_preview_writes_nothing_and_says_what_a_run_would_do(folder, captioner):
    out = text(panel.preview_selected(str(folder / "rocket.jpg"), **settings(captioner)))
    assert out.startswith("rocket.jpg: “") and "would be skipped: has a caption" in out
    assert not (folder / "cat.txt").exists()
    assert "Select an image" in text(panel.preview_selected(None, **settings(captioner)))


def test_bulk_edits_change_every_caption(folder):
    out = text(panel.edit_concept(str(folder), "add_trigger", caption_trigger="ohwx"))
    assert out.startswith("Changed 4 captions") and "skipped 1" in out  # cat has none
    assert all(p.read_text().startswith("ohwx") for p in folder.glob("*.txt"))
    panel.edit_concept(str(folder), "remove_trigger", caption_trigger="ohwx")
    assert not any(p.read_text().startswith("ohwx") for p in folder.glob("*.txt"))
    out = text(panel.edit_concept(str(folder), "replace", caption_find="a ",
                                  caption_replace_with="one "))
    assert "replacement" in out
    assert "Type the trigger word" in text(panel.edit_concept(str(folder), "add_trigger"))


def test_refused_while_training_runs(folder, captioner, monkeypatch):
    monkeypatch.setattr(type(state.SESSION), "running", property(lambda self: True))
    before = snapshot(folder)
    assert "training job is running" in text(
        panel.caption_concept(str(folder), **settings(captioner)))
    assert "training job is running" in text(
        panel.edit_concept(str(folder), "add_trigger", caption_trigger="x"))
    assert snapshot(folder) == before


# --- a shared server with two users (issue 23) ------------------------------------------------

@pytest.fixture()
def world(tmp_path, monkeypatch):
    return shared_world(tmp_path, monkeypatch)


@pytest.fixture()
def alices_captioner(world, captioner):
    """The captioning model in alice's own user folder (where a user keeps files)."""
    target = world.alice.user_folder() / "models" / "tiny-blip"
    shutil.copytree(captioner, target)
    return str(target)


def test_another_users_captions_are_neither_read_nor_changed(world, alices_captioner):
    cats = world.dataset("cats")
    (cats / "cat.txt").unlink()  # a run would caption it
    before = snapshot(cats)
    for result in (panel.preview_selected(str(cats / "rocket.jpg"), world.bob,
                                          **settings(alices_captioner)),
                   panel.caption_concept(str(cats), access=world.bob,
                                         **settings(alices_captioner)),
                   panel.edit_concept(str(cats), "add_trigger", caption_trigger="bob",
                                      access=world.bob),
                   panel.edit_concept(str(cats), "remove_trigger", caption_trigger="a",
                                      access=world.bob),
                   panel.edit_concept(str(cats), "replace", caption_find="a",
                                      caption_replace_with="b", access=world.bob)):
        message = text(result)
        assert message.startswith(("Image: ", "Concept folder: ")), message
        assert "cannot be" in message and "rocket" not in message.split("'")[-1]
    assert snapshot(cats) == before  # byte for byte
    # bob's own folder, but alice's model: refused by the model's name
    dogs = world.dataset("dogs")
    refused = text(panel.caption_concept(str(dogs), access=world.bob,
                                         **settings(alices_captioner)))
    assert refused.startswith("Captioning model: ") and "cannot be read" in refused


def test_each_user_captions_their_own_and_the_admin_edits_all(world, alices_captioner):
    cats, dogs = world.dataset("cats"), world.dataset("dogs")
    (cats / "cat.txt").unlink()
    out = text(panel.caption_concept(str(cats), access=world.alice,
                                     **settings(alices_captioner, caption_prefix="ohwx")))
    assert out.startswith("Captioned 1 image") and (cats / "cat.txt").read_text().startswith(
        "ohwx, ")
    preview = text(panel.preview_selected(str(cats / "rocket.jpg"), world.alice,
                                          **settings(alices_captioner)))
    assert preview.startswith("rocket.jpg: “")
    assert text(panel.edit_concept(str(dogs), "add_trigger", caption_trigger="checked",
                                   access=world.root)).startswith("Changed 5 captions")
    # the CLI's dataset and the demo are read by all, written by admins only
    for folder in (world.dataset("cli"), DEMO_DATASET_DIR):
        before = snapshot(folder)
        refused = text(panel.edit_concept(str(folder), "add_trigger", caption_trigger="x",
                                          access=world.alice))
        assert refused.startswith("Concept folder: ") and "cannot be written" in refused
        assert snapshot(folder) == before


def test_an_edit_never_makes_a_caption_longer_than_the_servers_limit(world, monkeypatch):
    cats = world.dataset("cats")
    monkeypatch.setattr(state, "LIMITS", ServerLimits(max_caption_chars=80))
    before = snapshot(cats)
    for _ in range(2):  # find and replace grew a caption x5 a call (issue 23)
        grown = text(panel.edit_concept(str(cats), "replace", caption_find="a",
                                        caption_replace_with="aaaaa", access=world.alice))
        assert "more than this server allows (80 characters, --max-caption-chars)" in grown
        assert "nothing was changed" in grown
    long_word = text(panel.edit_concept(str(cats), "add_trigger", caption_trigger="w" * 79,
                                        access=world.alice))
    assert "--max-caption-chars" in long_word
    assert snapshot(cats) == before
    assert text(panel.edit_concept(str(cats), "add_trigger", caption_trigger="ohwx",
                                   access=world.alice)).startswith("Changed 5 captions")
    # a run's prefix and suffix alone would pass the limit: refused before the model loads
    refused = text(panel.caption_concept(str(cats), access=world.alice,
                                         **settings("someone/captioner", caption_prefix="p" * 81)))
    assert refused.startswith("Prefix and suffix: 81 characters")


def test_an_edit_is_refused_when_the_dataset_would_pass_its_quota(world, monkeypatch):
    cats = world.dataset("cats")
    size = sum(len(data) for data in snapshot(cats).values())
    monkeypatch.setattr(state, "IMPORT_LIMITS", ImportLimits(max_dataset_bytes=size + 10))
    before = snapshot(cats)
    refused = text(panel.edit_concept(str(cats), "add_trigger", caption_trigger="ohwx",
                                      access=world.alice))
    assert "--max-dataset-gb" in refused and "cats" in refused
    monkeypatch.setattr(state, "IMPORT_LIMITS", ImportLimits(max_dataset_bytes=size - 100))
    run = text(panel.caption_concept(str(cats), access=world.alice,
                                     **settings("someone/captioner")))
    assert run.startswith("Concept folder: not written") and "--max-dataset-gb" in run
    assert snapshot(cats) == before


def test_a_local_server_has_neither_limit(folder, monkeypatch):
    assert state.LIMITS.max_caption_chars is None
    monkeypatch.setattr(state, "IMPORT_LIMITS", ImportLimits(max_dataset_bytes=1))
    for _ in range(3):
        out = text(panel.edit_concept(str(folder), "replace", caption_find="a",
                                      caption_replace_with="aaaaa"))
        assert out.startswith("Changed 4 captions")
    assert len((folder / "rocket.txt").read_text()) > 60
