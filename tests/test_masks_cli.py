"""`python -m trainer masks` and `make-tiny-model clipseg`: exit 0 when every image got its
mask, 1 when some failed (the rest are done), 2 with one clear line for bad input."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.cli import main
from trainer.data.images import mask_path_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_clipseg_dir(tmp_path_factory):
    """A tiny random CLIPSeg folder, written by the command line once per session."""
    out = tmp_path_factory.mktemp("models") / "tiny-clipseg"
    assert main(["make-tiny-model", "clipseg", str(out)]) == 0
    return out


def cutouts(folder: Path, *names: str) -> Path:
    """RGBA images, transparent but for their top-left 2x2 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = Image.new("RGBA", (6, 4), (10, 20, 30, 0))
        image.paste((10, 20, 30, 255), (0, 0, 2, 2))
        image.save(folder / name)
    return folder


def test_alpha_masks_for_a_folder_exit_0_with_the_summary(tmp_path, capsys):
    folder = cutouts(tmp_path / "data", "a.png", "b.png")

    assert main(["masks", "--folder", str(folder), "--method", "alpha"]) == 0

    out, err = capsys.readouterr()
    assert out.strip() == "Wrote 2 masks."
    assert "2/2" in err  # the tqdm bar
    mask = np.asarray(Image.open(mask_path_for(folder / "a.png")))
    assert mask.shape == (4, 6) and mask[:2, :2].min() == 255 and mask.sum() == 4 * 255


def test_fill_skips_existing_masks_and_a_corrupt_image_exits_1(tmp_path, capsys):
    folder = cutouts(tmp_path / "data", "a.png", "b.png")
    existing = mask_path_for(folder / "a.png")
    Image.new("L", (6, 4), 77).save(existing)
    before = existing.read_bytes()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")

    assert main(["masks", "--folder", str(folder), "--method", "alpha", "--mode", "fill"]) == 1

    out, _ = capsys.readouterr()
    assert out.startswith("Wrote 1 mask, skipped 1 (a.png: has a mask), failed 1 (broken.jpg: "
                          "cannot read the image")
    assert existing.read_bytes() == before
    assert mask_path_for(folder / "b.png").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--folder", "{tmp}/nope", "--method", "alpha"], "nope' does not exist"),
    (["--folder", "{tmp}", "--method", "alpha"], "holds no images"),
    (["--folder", "{tmp}", "--method", "color", "--color", "bright"], "color: 'bright'"),
    (["--folder", "{tmp}", "--method", "alpha", "--grow", "-3"], "grow: must be a whole number"),
    (["--folder", "{tmp}", "--method", "clipseg"], "prompt: empty"),
    (["--folder", "{tmp}/data", "--prompt", "cat", "--model", "{tmp}/no-model"],
     "hf download CIDAS/clipseg-rd64-refined --local-dir DIR"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, expected):
    cutouts(tmp_path / "data", "a.png")
    argv = ["masks"] + [arg.replace("{tmp}", str(tmp_path)) for arg in args]

    assert main(argv) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert not mask_path_for(tmp_path / "data" / "a.png").exists()


def test_clipseg_from_the_command_line(tmp_path, capsys, tiny_clipseg_dir):
    assert (tiny_clipseg_dir / "config.json").is_file()
    size = sum(f.stat().st_size for f in tiny_clipseg_dir.iterdir())
    assert size < 400_000, size
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (33, 21), (200, 40, 40)).save(folder / "cat.jpg")

    argv = ["masks", "--folder", str(folder), "--prompt", "a cat", "--model",
            str(tiny_clipseg_dir), "--threshold", "0.5", "--grow", "1", "--smooth", "1"]
    assert main(argv) == 0

    assert capsys.readouterr().out.strip() == "Wrote 1 mask."
    mask = Image.open(mask_path_for(folder / "cat.jpg"))
    assert mask.mode == "L" and mask.size == (33, 21)


def test_masks_in_a_subprocess(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    image = Image.new("RGB", (8, 6), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 4, 6))
    image.save(folder / "key.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}

    done = subprocess.run(
        [sys.executable, "-m", "trainer", "masks", "--folder", str(folder), "--method", "color",
         "--color", "#00ff00", "--mode", "add"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Wrote 1 mask."
    mask = np.asarray(Image.open(mask_path_for(folder / "key.png")))
    assert (mask[:, :4] == 255).all() and (mask[:, 4:] == 0).all()

    bad = subprocess.run(
        [sys.executable, "-m", "trainer", "masks", "--folder", str(tmp_path / "missing"),
         "--method", "alpha"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2
    assert "missing' does not exist" in bad.stderr and "Traceback" not in bad.stderr
