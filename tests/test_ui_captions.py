"""The page's caption panel: captions a concept folder with a (tiny, local) captioning model,
previews the open image without writing, edits every caption at once, and refuses by name
while training runs, on a demo folder a shared server does not let it write, or with a model
outside the workspace."""
import html
import shutil

import pytest

from trainer.captions.tiny import build_tiny_blip
from trainer.demo import DEMO_DATASET_DIR
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


def test_refused_while_training_runs_and_where_a_shared_server_forbids(folder, captioner,
                                                                      monkeypatch, tmp_path):
    monkeypatch.setattr(type(state.SESSION), "running", property(lambda self: True))
    assert "training job is running" in text(
        panel.caption_concept(str(folder), **settings(captioner)))
    assert "training job is running" in text(
        panel.edit_concept(str(folder), "add_trigger", caption_trigger="x"))
    monkeypatch.setattr(type(state.SESSION), "running", property(lambda self: False))
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setattr(state.OPTIONS, "confine_paths", True)
    assert "read-only on a shared server" in text(
        panel.caption_concept(str(DEMO_DATASET_DIR), **settings(captioner)))
    inside = tmp_path / "ws" / "cats"
    shutil.copytree(folder, inside)
    assert "Captioning model: " in text(panel.caption_concept(str(inside),
                                                              **settings(captioner)))
    assert not (inside / "cat.txt").exists()
