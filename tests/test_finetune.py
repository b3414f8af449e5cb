"""Full fine-tuning of the tiny SD 1.5 and SDXL models, exported as a single-file checkpoint
(original LDM/SGM layout) and as a diffusers folder: real trainings, real reloads."""
import json
import os
import pathlib

import pytest
import torch
from safetensors import safe_open

from trainer import finetune
from trainer.config import config_from_dict
from trainer.demo import DEMO_DATASET_DIR
from trainer.loop import train

from helpers import same_trained

FAMILIES = {
    "sd15": {"model_type": "STABLE_DIFFUSION_15",
             "text_encoder": {"train": True, "stop_training_after_unit": "NEVER"}},
    # SDXL: TE1 left frozen, TE2 and the UNet trained
    "sdxl": {"model_type": "STABLE_DIFFUSION_XL_10_BASE",
             "text_encoder": {"train": False},
             "text_encoder_2": {"train": True, "stop_training_after_unit": "NEVER"}},
}


def ft_config(model_dir, tmp_path, family="sd15", **overrides):
    data = {
        "training_method": "FINE_TUNE",
        "base_model_name": str(model_dir),
        "workspace_dir": str(tmp_path / "ws"),
        "concepts": [{"path": str(DEMO_DATASET_DIR)}],
        "resolution": "64", "train_dtype": "FLOAT_32", "gradient_checkpointing": False,
        "learning_rate": 1e-4, "learning_rate_warmup_steps": 0, "batch_size": 2, "epochs": 1,
        **FAMILIES[family],
    }
    data.update(overrides)
    return config_from_dict(data)


def pipeline_class(family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def weights(pipe, family):
    parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ())
    return {part: getattr(pipe, part).state_dict() for part in parts}


def assert_same(a: dict, b: dict, part: str):
    a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
    b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
    assert a.keys() == b.keys(), part
    assert all(same_trained(a[k], b[k]) for k in a), part


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def fine_tuned(request, tiny_sd15_dir, tiny_sdxl_dir, tmp_path_factory):
    """The same fine-tune (same seed) run twice: once to a single file, once to a diffusers
    folder."""
    family = request.param
    model_dir = tiny_sdxl_dir if family == "sdxl" else tiny_sd15_dir
    tmp_path = tmp_path_factory.mktemp(f"ft-{family}")
    single = ft_config(model_dir, tmp_path / "single", family)
    folder = ft_config(model_dir, tmp_path / "folder", family, output_model_format="DIFFUSERS")
    return family, model_dir, single, train(single), folder, train(folder)


def test_single_file_and_diffusers_folder_hold_the_same_trained_model(fine_tuned):
    family, model_dir, single, single_run, folder, folder_run = fine_tuned
    cls = pipeline_class(family)
    path = pathlib.Path(single_run.output_path)
    assert path.name == "model.safetensors" and path.is_file()
    assert pathlib.Path(folder_run.output_path).is_dir()

    extra = {"add_watermarker": False} if family == "sdxl" else {"safety_checker": None}
    from_file = cls.from_single_file(str(path), config=str(model_dir), local_files_only=True, **extra)
    from_folder = cls.from_pretrained(folder_run.output_path, **extra)
    base = cls.from_pretrained(model_dir, **extra)
    got_file, got_folder, got_base = (weights(p, family) for p in (from_file, from_folder, base))
    for part in got_file:
        assert_same(got_file[part], got_folder[part], part)  # the same in both formats
    # trained parts moved, frozen parts did not
    trained = {"unet", "text_encoder"} if family == "sd15" else {"unet", "text_encoder_2"}
    for part in got_file:
        same = all(torch.equal(got_file[part][k], got_base[part][k]) for k in got_base[part]
                   if not k.endswith("position_ids"))
        assert same == (part not in trained), part
    # the folder loads as the family's usual pipeline, with its usual sampler
    assert type(from_folder.scheduler).__name__ == ("EulerDiscreteScheduler" if family == "sdxl"
                                                    else "PNDMScheduler")


def test_fine_tune_outputs_carry_their_config_and_model_spec(fine_tuned):
    family, _, single, single_run, folder, folder_run = fine_tuned
    with safe_open(single_run.output_path, "pt") as f:
        metadata = f.metadata()
        keys = list(f.keys())
    assert json.loads(metadata["atelier_config"]) == json.loads(single.to_json())
    assert metadata["modelspec.architecture"] == ("stable-diffusion-xl-v1-base" if family == "sdxl"
                                                  else "stable-diffusion-v1")
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    prefix = "conditioner.embedders." if family == "sdxl" else "cond_stage_model.transformer."
    assert any(k.startswith(prefix) for k in keys)
    beside = pathlib.Path(single_run.output_path).with_suffix(".json")
    assert json.loads(beside.read_text()) == json.loads(single.to_json())
    folder_json = pathlib.Path(folder_run.output_path + ".json")
    assert json.loads(folder_json.read_text()) == json.loads(folder.to_json())
    with safe_open(os.path.join(folder_run.output_path, "unet",
                                "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["atelier_config"]) == json.loads(folder.to_json())


def test_fine_tune_reloads_through_atelier_own_loader(fine_tuned):
    """The exported single file is a valid base model for the next training."""
    from trainer.models.sd15 import load_sd15
    from trainer.models.sdxl import load_sdxl
    family, model_dir, _, single_run, _, _ = fine_tuned
    load = load_sdxl if family == "sdxl" else load_sd15
    loaded = load(single_run.output_path, single_file_config=model_dir)
    assert loaded.unet.dtype == torch.float32


@pytest.mark.parametrize("dtype, tag", [("FLOAT_16", "F16"), ("BFLOAT_16", "BF16")])
def test_output_dtype_is_what_is_written(tiny_sd15_dir, tmp_path, dtype, tag):
    result = train(ft_config(tiny_sd15_dir, tmp_path, output_dtype=dtype,
                             text_encoder={"train": False}))
    with safe_open(result.output_path, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {tag}


def test_diffusers_folder_in_float16_loads_in_float16(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    result = train(ft_config(tiny_sdxl_dir, tmp_path, "sdxl", output_model_format="DIFFUSERS",
                             output_dtype="FLOAT_16", unet={"train": False}))
    pipe = StableDiffusionXLPipeline.from_pretrained(result.output_path, dtype=torch.float16,
                                                     add_watermarker=False)
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder_2.dtype == torch.float16
    with safe_open(os.path.join(result.output_path, "text_encoder_2", "model.safetensors"),
                   "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    config = json.loads(pathlib.Path(result.output_path, "text_encoder_2", "config.json").read_text())
    assert config["dtype"] == "float16"


def test_fine_tune_trains_float32_master_weights_of_bfloat16_models(tiny_sd15_dir, tmp_path):
    from trainer.models.sd15 import load_sd15
    unet = load_sd15(str(tiny_sd15_dir)).unet.to(torch.bfloat16).requires_grad_(False)
    params = finetune.trainable_parameters(unet, ft_config(tiny_sd15_dir, tmp_path), "unet")
    assert len(params) == len(list(unet.parameters()))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)


def test_stop_training_after_freezes_a_fine_tuned_part(tiny_sd15_dir, tmp_path):
    """TE 'stop after 2 STEP' in a fine-tune: the TE of a 2-epoch run equals a 1-epoch run's
    (3 steps an epoch), the UNet does not."""
    te = {"train": True, "stop_training_after": 2, "stop_training_after_unit": "STEP"}
    long_run = train(ft_config(tiny_sd15_dir, tmp_path / "l", epochs=2, text_encoder=te))
    short_run = train(ft_config(tiny_sd15_dir, tmp_path / "s", epochs=1, text_encoder=te))
    with safe_open(long_run.output_path, "pt") as fl, safe_open(short_run.output_path, "pt") as fs:
        te_keys = [k for k in fl.keys() if k.startswith("cond_stage_model.")]
        unet_keys = [k for k in fl.keys() if k.startswith("model.diffusion_model.")]
        assert te_keys and all(same_trained(fl.get_tensor(k), fs.get_tensor(k))
                               for k in te_keys)
        assert any(not same_trained(fl.get_tensor(k), fs.get_tensor(k)) for k in unet_keys)


# --- Output names and atomic writes ------------------------------------------------------------

@pytest.mark.parametrize("method, fmt, destination, expected", [
    ("LORA", "SAFETENSORS", "", "ws/output/lora.safetensors"),
    ("FINE_TUNE", "SAFETENSORS", "", "ws/output/model.safetensors"),
    ("FINE_TUNE", "DIFFUSERS", "", "ws/output/model"),
    ("FINE_TUNE", "DIFFUSERS", "out/my.model.safetensors", "out/my.model"),
    ("FINE_TUNE", "SAFETENSORS", "out/my-model", "out/my-model.safetensors"),
])
def test_output_paths(method, fmt, destination, expected):
    config = config_from_dict({"training_method": method, "output_model_format": fmt,
                               "output_model_destination": destination, "workspace_dir": "ws"})
    assert finetune.output_path(config) == pathlib.Path(expected)


def test_config_json_sits_beside_files_and_folders():
    assert finetune.config_path(pathlib.Path("a/x.safetensors")) == pathlib.Path("a/x.json")
    assert finetune.config_path(pathlib.Path("a/v1.5-model")) == pathlib.Path("a/v1.5-model.json")


def test_failed_diffusers_export_keeps_the_previous_output(tiny_sd15_dir, tmp_path, monkeypatch):
    from trainer.models.family import load_family
    config = ft_config(tiny_sd15_dir, tmp_path)
    family = load_family(config)
    out = tmp_path / "out" / "model"
    finetune.save_diffusers_folder(family, out, torch.float32, {})
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(finetune, "save_file", disk_full)
    with pytest.raises(OSError):
        finetune.save_diffusers_folder(family, out, torch.float32, {})
    assert os.listdir(out.parent) == ["model"]  # no staging folder left behind
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
