"""Automatic captions (tiny random Florence-2 and BLIP, built offline) and bulk caption edits:
what is written, what is kept, what is reported, and the command line's exit statuses."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from trainer.captions import edit
from trainer.captions.generate import (
    EMPTY_CAPTION,
    CaptionSettings,
    caption_folder,
    join_caption,
    preview_caption,
)
from trainer.captions.models import (
    BLIP,
    FLORENCE2,
    HOW_TO_PROVIDE,
    detect_family,
    downloads_allowed,
    forget_loaded_models,
    generation_options,
    load_captioner,
)
from trainer.captions.tiny import WORDS
from trainer.cli import main
from trainer.errors import CaptionError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "trainer" / "demo" / "dataset"
NAMES = ["astronaut.jpg", "cat.jpg", "coffee.jpg", "photographer.jpg", "rocket.jpg"]
ORIGINAL = {name: (DEMO / name).with_suffix(".txt").read_text() for name in NAMES}


@pytest.fixture(scope="session")
def florence_dir(tmp_path_factory):
    """The tiny Florence-2, written by the command line once per session."""
    out = tmp_path_factory.mktemp("models") / "tiny-florence2"
    assert main(["make-tiny-model", "captioner", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def blip_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny-blip"
    assert main(["make-tiny-model", "captioner-blip", str(out)]) == 0
    return out


@pytest.fixture(params=["florence2", "blip"])
def model_dir(request, florence_dir, blip_dir):
    return florence_dir if request.param == "florence2" else blip_dir


@pytest.fixture
def dataset(tmp_path):
    """The demo dataset (5 photos, captions, masks) in a folder of the test's own."""
    return Path(shutil.copytree(DEMO, tmp_path / "data"))


def caption_of(folder: Path, name: str) -> str:
    return (folder / name).with_suffix(".txt").read_text()


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def is_tiny_words(text: str) -> bool:
    return bool(text) and all(word in WORDS for word in text.split())


# --------------------------------------------------------------------------------------------
# The tiny models


def test_tiny_captioners_are_real_architectures_detected_from_their_config(florence_dir,
                                                                           blip_dir):
    for folder, family in ((florence_dir, FLORENCE2), (blip_dir, BLIP)):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == family
        assert sum(f.stat().st_size for f in folder.iterdir()) < 400_000
        assert detect_family(str(folder)) == family
        assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no staging

    florence, blip = load_captioner(str(florence_dir)), load_captioner(str(blip_dir))
    assert type(florence.model).__name__ == "Florence2ForConditionalGeneration"
    assert type(blip.model).__name__ == "BlipForConditionalGeneration"
    # The style picks Florence-2's own captioning tasks, which its processor knows.
    assert florence.prompt("short") == "<CAPTION>"
    assert florence.prompt("detailed") == "<DETAILED_CAPTION>"
    for task in ("<CAPTION>", "<DETAILED_CAPTION>"):
        assert task in florence.processor.task_prompts_without_inputs
    # BLIP is not prompted; its detailed style asks for a longer, non-looping caption.
    assert blip.prompt("detailed") is None
    assert generation_options(BLIP, "detailed", 60)["min_new_tokens"] == 20
    assert generation_options(BLIP, "detailed", 8)["min_new_tokens"] == 8
    assert "min_new_tokens" not in generation_options(FLORENCE2, "detailed", 60)


def test_an_unsupported_model_folder_is_named(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "blip-2"}')
    with pytest.raises(CaptionError,
                       match="'blip-2' model .*BLIP-2 is a different.*Florence-2 or BLIP"):
        detect_family(str(folder))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "florence2", "auto_map": {"AutoConfig": "configuration_florence2.X"},
        "text_config": {"model_type": "florence2_language"}}))
    with pytest.raises(CaptionError, match="original remote-code layout.*florence-community/"
                                           "Florence-2-base"):
        detect_family(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionError, match="holds no config.json"):
        detect_family(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------
# A folder


def test_fill_keeps_existing_captions_and_writes_the_missing_ones(dataset, model_dir):
    (dataset / "cat.txt").unlink()
    (dataset / "coffee.txt").unlink()
    (dataset / "rocket.txt").write_text("  \n")  # an empty caption counts as none
    calls = []

    summary = caption_folder(dataset, CaptionSettings(model=str(model_dir), mode="fill"),
                             progress=lambda *args: calls.append(args))

    assert summary.captioned == ["cat.jpg", "coffee.jpg", "rocket.jpg"]
    assert summary.skipped == [("astronaut.jpg", "has a caption"),
                               ("photographer.jpg", "has a caption")]
    assert summary.failed == [] and not summary.stopped
    assert calls == [(i, 5, name) for i, name in enumerate(NAMES, start=1)]
    assert caption_of(dataset, "astronaut.jpg") == ORIGINAL["astronaut.jpg"]
    assert caption_of(dataset, "photographer.jpg") == ORIGINAL["photographer.jpg"]
    for name in summary.captioned:
        text = caption_of(dataset, name)
        assert text.endswith("\n") and text.count("\n") == 1
        assert is_tiny_words(text.strip()), text
    assert summary.text().startswith("Captioned 3 images, skipped 2 (astronaut.jpg: has a "
                                     "caption; photographer.jpg: has a caption).")


def test_replace_rewrites_every_caption_as_the_preview_said(dataset, model_dir):
    previews = {name: preview_caption(dataset / name, CaptionSettings(model=str(model_dir),
                                                                      mode="replace"))
                for name in NAMES}

    summary = caption_folder(dataset, CaptionSettings(model=str(model_dir), mode="replace"))

    assert summary.captioned == NAMES and summary.skipped == [] and summary.failed == []
    for name in NAMES:
        written = caption_of(dataset, name).strip()
        assert written != ORIGINAL[name].strip() and is_tiny_words(written)
        assert written == previews[name].caption  # the same model, the same caption
        assert previews[name].old == ORIGINAL[name].strip()
        assert previews[name].note == "would replace its caption"


def test_prefix_and_suffix_join_each_new_caption(dataset, florence_dir):
    (dataset / "cat.txt").unlink()
    settings = CaptionSettings(model=str(florence_dir), mode="fill", prefix=" ohwx cat, ",
                               suffix=",  film grain ")

    summary = caption_folder(dataset, settings)

    assert summary.captioned == ["cat.jpg"]
    text = caption_of(dataset, "cat.jpg").strip()
    assert text.startswith("ohwx cat, ") and text.endswith(", film grain")
    assert is_tiny_words(text[len("ohwx cat, "):-len(", film grain")])
    assert caption_of(dataset, "astronaut.jpg") == ORIGINAL["astronaut.jpg"]  # no prefix added


@pytest.mark.parametrize("parts, expected", [
    (("ohwx", "a cat on a sofa", ""), "ohwx, a cat on a sofa"),
    (("ohwx,", "a cat", "style of x"), "ohwx, a cat, style of x"),
    (("", "A cat sleeps on a sofa.", "ohwx style"), "A cat sleeps on a sofa. ohwx style"),
    (("  ", "a cat", " "), "a cat"),
    (("ohwx", "a\ncat", ""), "ohwx, a cat"),
])
def test_join_caption(parts, expected):
    assert join_caption(*parts) == expected


def test_max_length_caps_the_tokens_generated(dataset, model_dir):
    image = dataset / "cat.jpg"
    long = preview_caption(image, CaptionSettings(model=str(model_dir), max_length=12))
    short = preview_caption(image, CaptionSettings(model=str(model_dir), max_length=3))

    # Each token of the tiny vocabulary is a word: at most 3 words; the 12-token caption is
    # longer, so the cap is what cut it.
    assert 1 <= len(short.caption.split()) <= 3
    assert len(long.caption.split()) > 3

    summary = caption_folder(dataset, CaptionSettings(model=str(model_dir), mode="replace",
                                                      max_length=3, style="detailed"))
    assert summary.captioned == NAMES
    assert all(1 <= len(caption_of(dataset, n).split()) <= 3 for n in NAMES)


@pytest.mark.parametrize("value", [0, -1, 2.5, "many", True, 5000])
def test_bad_max_length_is_refused_before_anything_is_written(dataset, florence_dir, value):
    before = snapshot(dataset)
    with pytest.raises(CaptionError, match="max length: must be a whole number"):
        caption_folder(dataset, CaptionSettings(model=str(florence_dir), mode="replace",
                                                max_length=value))
    assert snapshot(dataset) == before


def test_preview_writes_nothing(dataset, florence_dir):
    before = snapshot(dataset)

    preview = preview_caption(dataset / "cat.jpg",
                              CaptionSettings(model=str(florence_dir), prefix="ohwx"))

    assert snapshot(dataset) == before
    assert preview.old == ORIGINAL["cat.jpg"].strip()
    assert preview.note == "would be skipped: has a caption"  # fill is the default mode
    assert preview.caption == f"ohwx, {preview.generated}" and is_tiny_words(preview.generated)
    with pytest.raises(CaptionError, match="is not a training image"):
        preview_caption(dataset / "cat-masklabel.png", CaptionSettings(model=str(florence_dir)))


def test_stop_after_the_first_image(dataset, florence_dir):
    done = []

    summary = caption_folder(dataset, CaptionSettings(model=str(florence_dir), mode="replace"),
                             progress=lambda *args: done.append(args),
                             should_stop=lambda: bool(done))

    assert summary.stopped and summary.captioned == ["astronaut.jpg"] and summary.total == 5
    assert summary.text().startswith("Stopped after 1 of 5 images. Captioned 1 image.")
    assert caption_of(dataset, "astronaut.jpg") != ORIGINAL["astronaut.jpg"]
    for name in NAMES[1:]:
        assert caption_of(dataset, name) == ORIGINAL[name]


def test_a_truncated_image_keeps_its_caption_and_is_reported(dataset, florence_dir):
    data = (dataset / "cat.jpg").read_bytes()
    (dataset / "broken.jpg").write_bytes(data[: len(data) // 2])
    (dataset / "broken.txt").write_text("my own careful words\n")

    summary = caption_folder(dataset, CaptionSettings(model=str(florence_dir), mode="replace"))

    assert [name for name, _ in summary.failed] == ["broken.jpg"]
    assert summary.failed[0][1].startswith("cannot read the image: the file is truncated")
    assert caption_of(dataset, "broken.txt") == "my own careful words\n"
    assert sorted(summary.captioned) == NAMES
    assert "failed 1 (broken.jpg: cannot read the image" in summary.text()


def test_an_empty_or_failing_model_output_keeps_the_caption(dataset, florence_dir, monkeypatch):
    real = load_captioner(str(florence_dir))

    def flaky(image, style, max_length):
        if image.size == (5, 3):  # rocket.jpg: the model says nothing
            return ""
        if image.size == (4, 4):  # black.png: the model fails
            raise RuntimeError("CUDA out of memory\nmore details")
        return real(image, style, max_length)

    from trainer.captions import generate
    monkeypatch.setattr(generate, "load_captioner", lambda model, online=False: flaky)
    Image.new("RGB", (4, 4)).save(dataset / "black.png")
    (dataset / "black.txt").write_text("typed by hand\n")
    Image.new("RGB", (5, 3), (9, 9, 9)).save(dataset / "rocket.jpg")

    summary = caption_folder(dataset, CaptionSettings(model="unused", mode="replace"))

    assert dict(summary.failed) == {"black.png": "the model failed: CUDA out of memory",
                                    "rocket.jpg": EMPTY_CAPTION}
    assert caption_of(dataset, "black.png") == "typed by hand\n"
    assert caption_of(dataset, "rocket.jpg") == ORIGINAL["rocket.jpg"]
    assert len(summary.captioned) == 4


def test_captions_are_written_atomically(dataset, florence_dir, monkeypatch):
    caption_folder(dataset, CaptionSettings(model=str(florence_dir), mode="replace"))
    assert not [p.name for p in dataset.iterdir() if p.name.startswith(".")]  # no temp files

    # A write that fails at the rename (full disk, a crash) leaves the old caption whole.
    real_replace = os.replace

    def failing(src, dst):
        if str(dst).endswith("coffee.txt"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    (dataset / "coffee.txt").write_text("kept\n")
    summary = caption_folder(dataset, CaptionSettings(model=str(florence_dir), mode="replace"))

    assert summary.failed == [("coffee.jpg", "cannot read or write its caption (coffee.txt): "
                                             "No space left on device")]
    assert caption_of(dataset, "coffee.jpg") == "kept\n"
    assert not [p.name for p in dataset.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------
# Where the model comes from


def test_offline_without_the_model_says_how_to_provide_one(dataset):
    forget_loaded_models()
    before = snapshot(dataset)
    with pytest.raises(CaptionError) as caught:
        caption_folder(dataset, CaptionSettings(model="nobody/no-such-captioner"))
    message = str(caught.value)
    assert "not in the local Hugging Face cache" in message and "--online" in message
    assert "hf download florence-community/Florence-2-base --local-dir DIR" in message
    with pytest.raises(CaptionError, match="folder '/no/such/model' does not exist"):
        caption_folder(dataset, CaptionSettings(model="/no/such/model"))
    assert snapshot(dataset) == before
    assert HOW_TO_PROVIDE in message


def test_downloads_only_on_a_space_or_when_asked(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    assert not downloads_allowed()
    assert downloads_allowed(online=True)
    monkeypatch.setenv("SPACE_ID", "someone/atelier")
    assert downloads_allowed()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is off: nothing can be downloaded
    assert not downloads_allowed(online=True)


# --------------------------------------------------------------------------------------------
# Bulk edits


def test_add_trigger_twice_is_once(dataset):
    (dataset / "cat.txt").write_text("a cat\na tabby cat on a sofa\n")  # two alternatives
    (dataset / "coffee.txt").unlink()
    (dataset / "rocket.txt").write_text("OHWX, a rocket\n")  # already there, another case

    first = edit.add_trigger(dataset, "ohwx")
    second = edit.add_trigger(dataset, "ohwx")

    assert first.changed == ["astronaut.jpg", "cat.jpg", "photographer.jpg"]
    assert first.unchanged == ["rocket.jpg"] and first.skipped == [("coffee.jpg", "has no caption")]
    assert second.changed == [] and sorted(second.unchanged) == ["astronaut.jpg", "cat.jpg",
                                                                 "photographer.jpg", "rocket.jpg"]
    assert caption_of(dataset, "astronaut.jpg") == "ohwx, a photo of an astronaut\n"
    assert caption_of(dataset, "cat.jpg") == "ohwx, a cat\nohwx, a tabby cat on a sofa\n"
    assert not (dataset / "coffee.txt").exists()  # an edit never invents a caption
    assert first.text() == ("Changed 3 captions, 1 unchanged, skipped 1 (coffee.jpg: has no "
                            "caption).")


def test_remove_trigger_takes_it_off_the_start_only(dataset):
    (dataset / "cat.txt").write_text("ohwx, a cat\n")
    (dataset / "coffee.txt").write_text("ohwx coffee in a cup\n")
    (dataset / "rocket.txt").write_text("ohwxyz, a rocket that launches ohwx\n")
    (dataset / "astronaut.txt").write_text("ohwx\n")

    summary = edit.remove_trigger(dataset, "ohwx")

    assert summary.changed == ["astronaut.jpg", "cat.jpg", "coffee.jpg"]
    assert caption_of(dataset, "cat.jpg") == "a cat\n"
    assert caption_of(dataset, "coffee.jpg") == "coffee in a cup\n"
    assert caption_of(dataset, "rocket.jpg") == "ohwxyz, a rocket that launches ohwx\n"
    assert caption_of(dataset, "astronaut.jpg") == ""
    edit.add_trigger(dataset, "ohwx")
    edit.remove_trigger(dataset, "ohwx")
    assert caption_of(dataset, "cat.jpg") == "a cat\n"


def test_find_and_replace_plain_text_across_the_dataset(dataset):
    summary = edit.find_replace(dataset, "a photo of", "a picture of")

    assert summary.changed == ["astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg"]
    assert summary.unchanged == ["photographer.jpg"] and summary.replacements == 4
    assert caption_of(dataset, "cat.jpg") == "a picture of a cat\n"
    assert summary.text().startswith("Changed 4 captions (4 replacements), 1 unchanged")

    # Plain text, not a pattern, and case-sensitive; an empty replacement deletes.
    (dataset / "cat.txt").write_text("a cat (tabby). A CAT.\n")
    assert edit.find_replace(dataset, "(tabby).", "").changed == ["cat.jpg"]
    assert caption_of(dataset, "cat.jpg") == "a cat  A CAT.\n"
    with pytest.raises(CaptionError, match="find: empty"):
        edit.find_replace(dataset, " ", "x")
    with pytest.raises(CaptionError, match="trigger word: empty"):
        edit.add_trigger(dataset, "  ")


# --------------------------------------------------------------------------------------------
# The command line


def test_caption_edit_from_the_command_line(dataset, capsys):
    assert main(["caption-edit", "--folder", str(dataset), "--add-trigger", "ohwx"]) == 0
    assert capsys.readouterr().out.strip() == "Changed 5 captions."
    assert main(["caption-edit", "--folder", str(dataset), "--find", "ohwx, ",
                 "--replace-with", ""]) == 0
    assert caption_of(dataset, "cat.jpg") == ORIGINAL["cat.jpg"]

    assert main(["caption-edit", "--folder", str(dataset), "--find", "cat"]) == 2
    assert "--find needs --replace-with" in capsys.readouterr().err
    assert main(["caption-edit", "--folder", str(dataset / "nope"), "--add-trigger", "x"]) == 2
    assert "nope' does not exist" in capsys.readouterr().err


def run_cli(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_caption_command_exit_statuses(dataset, tmp_path, blip_dir):
    (dataset / "cat.txt").unlink()

    done = run_cli("caption", "--folder", str(dataset), "--model", str(blip_dir),
                   "--mode", "fill", "--prefix", "ohwx", "--max-length", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("Captioned 1 image, skipped 4 (")
    assert caption_of(dataset, "cat.jpg").startswith("ohwx, ")
    assert len(caption_of(dataset, "cat.jpg").split()) <= 5

    data = (dataset / "coffee.jpg").read_bytes()
    (dataset / "coffee.jpg").write_bytes(data[:200])
    failed = run_cli("caption", "--folder", str(dataset), "--model", str(blip_dir),
                     "--mode", "replace")
    assert failed.returncode == 1, failed.stderr
    assert "failed 1 (coffee.jpg: cannot read the image" in failed.stdout
    assert caption_of(dataset, "coffee.jpg") == ORIGINAL["coffee.jpg"]

    # Offline, the default hub model is not in this (empty) cache: one clear line, exit 2.
    missing = run_cli("caption", "--folder", str(dataset),
                      env={"HF_HOME": str(tmp_path / "empty-hf-home")})
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: Cannot load the captioning model "
                                      "'florence-community/Florence-2-base'")
    assert "hf download" in missing.stderr and "Traceback" not in missing.stderr
    assert main(["caption", "--folder", str(tmp_path / "nope"), "--model", str(blip_dir)]) == 2
