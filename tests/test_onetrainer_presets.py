"""Atelier's "OneTrainer: ..." presets are OneTrainer's own training presets (SD 1.5 and SDXL:
LoRA, fine-tune, masked, inpainting), and each of them trains: the presets as OneTrainer ships
them (partial configs, its current names; docs/notes/onetrainer-configs.md) give the same
config as Atelier's, and a few steps on the tiny model of its type write what the preset
asks for (the layers, the file layout)."""
import json

import pytest
from safetensors import safe_open

from trainer.config import config_from_dict
from trainer.demo import DEMO_DATASET_DIR
from trainer.loop import train
from ui.paths import PRESETS_DIR

SD15, SD15_INPAINT = ("stable-diffusion-v1-5/stable-diffusion-v1-5",
                      "stable-diffusion-v1-5/stable-diffusion-inpainting")
SDXL, SDXL_INPAINT = ("stabilityai/stable-diffusion-xl-base-1.0",
                      "diffusers/stable-diffusion-xl-1.0-inpainting-0.1")
HALF_LORA = {"vae": {"weight_dtype": "FLOAT_32"}, "unet": {"weight_dtype": "FLOAT_16"},
             "text_encoder": {"weight_dtype": "FLOAT_16"}}
XL_LORA = {"backup_after": 10, "batch_size": 4, "layer_filter_preset": "attn-mlp",
           "learning_rate": 0.0003, "output_model_destination": "models/lora.safetensors",
           "output_model_format": "KOHYA_LORA", "resolution": "1024", "training_method": "LORA",
           "unet": {"weight_dtype": "FLOAT_16"},
           "text_encoder": {"train": False, "weight_dtype": "FLOAT_16"},
           "text_encoder_2": {"train": False, "weight_dtype": "FLOAT_16"},
           "vae": {"weight_dtype": "FLOAT_32"}}
SD15_FINE_TUNE = {"base_model_name": SD15, "batch_size": 4, "model_type": "STABLE_DIFFUSION_15",
                  "output_model_destination": "models/model.safetensors",
                  "output_model_format": "ORIGINAL_SINGLE_FILE", "resolution": "512",
                  "training_method": "FINE_TUNE", "vae": {"weight_dtype": "FLOAT_32"}}
INPAINT = {**SD15_FINE_TUNE, "base_model_name": SD15_INPAINT,
           "model_type": "STABLE_DIFFUSION_15_INPAINTING"}
# Atelier preset file -> OneTrainer's preset (the older generation's for the SDXL fine-tune,
# which its current release no longer lists).
ONETRAINER = {
    "onetrainer_sd15_lora": {
        "backup_after": 10, "base_model_name": SD15, "batch_size": 4,
        "layer_filter_preset": "attn-mlp", "learning_rate": 0.0003,
        "model_type": "STABLE_DIFFUSION_15", "output_model_destination": "models/lora.safetensors",
        "output_model_format": "KOHYA_LORA", "resolution": "512", "training_method": "LORA",
        **HALF_LORA},
    "onetrainer_sd15_finetune": {**SD15_FINE_TUNE, "unet": {"train": True}},
    "onetrainer_sd15_masked": {**SD15_FINE_TUNE, "masked_training": True,
                               "max_noising_strength": 0.8, "normalize_masked_area_loss": True},
    "onetrainer_sd15_inpaint": INPAINT,
    "onetrainer_sd15_inpaint_masked": {**INPAINT, "masked_training": True,
                                       "normalize_masked_area_loss": True},
    "onetrainer_sdxl_lora": {**XL_LORA, "base_model_name": SDXL,
                             "model_type": "STABLE_DIFFUSION_XL_10_BASE"},
    "onetrainer_sdxl_inpaint_lora": {**XL_LORA, "base_model_name": SDXL_INPAINT,
                                     "model_type": "STABLE_DIFFUSION_XL_10_BASE_INPAINTING"},
    "onetrainer_sd15_embedding": {
        "backup_after": 10, "base_model_name": SD15, "latent_caching": False,
        "learning_rate": 0.0003, "learning_rate_warmup_steps": 20,
        "model_type": "STABLE_DIFFUSION_15",
        "output_model_destination": "models/embedding.safetensors",
        "output_model_format": "SAFETENSORS", "resolution": "512", "sample_after": 1,
        "training_method": "EMBEDDING", **HALF_LORA},
    "onetrainer_sdxl_finetune": {
        "base_model_name": SDXL, "model_type": "STABLE_DIFFUSION_XL_10_BASE",
        "output_model_destination": "models/model.safetensors", "output_model_format": "SAFETENSORS",
        "resolution": "1024", "training_method": "FINE_TUNE", "weight_dtype": "BFLOAT_16",
        "text_encoder": {"train": False}, "text_encoder_2": {"train": False},
        "vae": {"weight_dtype": "FLOAT_32"}},
}
# Where each preset's output goes is the user's: Atelier's write into their workspace.
PLACES = {"workspace_dir", "output_model_destination"}


def preset(name):
    return json.loads((PRESETS_DIR / f"{name}.json").read_text(encoding="utf-8"))


def load(data):
    notes = []
    config = config_from_dict({k: v for k, v in data.items() if not k.startswith("__")},
                              warn=notes.append)
    return config, notes


def test_every_onetrainer_preset_is_mirrored():
    assert {p.stem for p in PRESETS_DIR.glob("onetrainer_*.json")} == set(ONETRAINER)


@pytest.mark.parametrize("name", ONETRAINER)
def test_the_preset_is_onetrainers_field_by_field(name):
    ours, our_notes = load(preset(name))
    theirs, their_notes = load(ONETRAINER[name])
    assert not our_notes and not their_notes, (our_notes, their_notes)
    assert ours.model_dump(exclude=PLACES) == theirs.model_dump(exclude=PLACES)
    assert preset(name)["__name"].startswith("OneTrainer: ")


def tiny_run(name, model_dir, tmp_path):
    """The preset, on the tiny model of its type, on the CPU: float32 weights and steps,
    64 px, two epochs of the demo images (they have masks)."""
    data = {k: v for k, v in preset(name).items() if not k.startswith("__")}
    for part in ("text_encoder", "text_encoder_2", "unet"):
        data[part] = {**data.get(part, {}), "weight_dtype": "FLOAT_32"}
    data.update(base_model_name=str(model_dir), workspace_dir=str(tmp_path / "ws"),
                output_model_destination=str(tmp_path / "out.safetensors"),
                concepts=[{"path": str(DEMO_DATASET_DIR)}], resolution="64", epochs=2,
                train_dtype="FLOAT_32", gradient_checkpointing=False)
    config, notes = load(data)
    assert not notes, notes
    result = train(config)
    assert result.global_step >= 2
    with safe_open(result.output_path, "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("name, model", [
    ("onetrainer_sd15_lora", "tiny_sd15_dir"),
    ("onetrainer_sdxl_lora", "tiny_sdxl_dir"),
    ("onetrainer_sdxl_inpaint_lora", "tiny_sdxl_inpaint_dir"),
])
def test_the_lora_presets_train_onetrainers_layers_into_a_kohya_file(name, model, request,
                                                                     tmp_path):
    shapes, metadata = tiny_run(name, request.getfixturevalue(model), tmp_path)
    modules = {k.split(".")[0] for k in shapes}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    # attn-mlp = every linear/conv layer of the transformer blocks, as OneTrainer picks them
    assert unet and all("_attentions_" in m for m in unet)
    assert {m.rsplit("_", 2)[-2] + "_" + m.rsplit("_", 1)[-1] for m in unet} >= {"proj_in", "proj_out"}
    assert any(m.endswith("_ff_net_2") for m in unet)
    text_encoders = modules - unet
    if "sdxl" in name:
        assert not text_encoders  # the SDXL presets keep both text encoders frozen
    else:
        assert text_encoders and all(m.startswith("lora_te_") for m in text_encoders)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in shapes)
    assert metadata["ss_network_module"] == "networks.lora"


@pytest.mark.parametrize("name, model, channels", [
    ("onetrainer_sd15_finetune", "tiny_sd15_dir", 4),
    ("onetrainer_sd15_masked", "tiny_sd15_dir", 4),
    ("onetrainer_sd15_inpaint", "tiny_sd15_inpaint_dir", 9),
    ("onetrainer_sd15_inpaint_masked", "tiny_sd15_inpaint_dir", 9),
    ("onetrainer_sdxl_finetune", "tiny_sdxl_dir", 4),
])
def test_the_fine_tune_presets_write_an_original_single_file(name, model, channels, request,
                                                             tmp_path):
    shapes, metadata = tiny_run(name, request.getfixturevalue(model), tmp_path)
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"][1] == channels
    assert any(k.startswith("first_stage_model.") for k in shapes)
    text_encoder = ("conditioner.embedders.0." if "sdxl" in name else "cond_stage_model.")
    assert any(k.startswith(text_encoder) for k in shapes)
    assert json.loads(metadata["atelier_config"])["training_method"] == "FINE_TUNE"


def test_the_embedding_preset_trains_onetrainers_default_embedding(tiny_sd15_dir, tmp_path):
    """OneTrainer's EMBEDDING preset names no embedding: it trains its default `embedding`
    (<embedding>, one token from '*'), and so does Atelier's mirror, into one emb_params file."""
    shapes, metadata = tiny_run("onetrainer_sd15_embedding", tiny_sd15_dir, tmp_path)
    assert shapes == {"emb_params": [1, 32]}
    config = json.loads(metadata["atelier_config"])
    assert config["training_method"] == "EMBEDDING"
    assert [e["placeholder"] for e in config["additional_embeddings"]] == ["<embedding>"]
