"""A pickle checkpoint is refused when loading; converted explicitly, it loads as a single file."""
import pytest
import torch
from safetensors.torch import load_file

from trainer.cli import main
from trainer.errors import ModelLoadError
from trainer.models.sd15 import load_sd15
from trainer.models.single_file import save_sd15_single_file


def test_ckpt_is_refused_then_converted_explicitly_and_loaded(tiny_sd15_dir, tmp_path, capsys):
    single = save_sd15_single_file(load_sd15(str(tiny_sd15_dir)), tmp_path / "tiny.safetensors")
    weights = load_file(str(single))
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": weights, "global_step": 7}, checkpoint)

    with pytest.raises(ModelLoadError, match="convert-checkpoint"):
        load_sd15(str(checkpoint), single_file_config=tiny_sd15_dir)

    converted = tmp_path / "converted.safetensors"
    assert main(["convert-checkpoint", str(checkpoint), str(converted)]) == 0
    again = load_file(str(converted))
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    model = load_sd15(str(converted), single_file_config=tiny_sd15_dir)
    assert model.unet is not None


def test_converting_something_that_is_not_a_checkpoint_says_so(tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("hello")
    assert main(["convert-checkpoint", str(bad), str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
