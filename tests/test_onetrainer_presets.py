"""Atelier's "OneTrainer: ..." presets are OneTrainer's own training presets (SD 1.5 and SDXL:
LoRA, fine-tune, masked, inpainting, embedding; Flux.1 LoRA, Chroma LoRA, SD 3 LoRA and
fine-tune): for every key OneTrainer's preset sets, the same value as OneTrainer's file gives
(its values as git holds them at the fixtures' commit, in tests/fixtures/onetrainer/
manifest.json), apart from quantized weights (issue 26), which a mirror trains in BFLOAT_16 and
says so; and the SD ones train: a few steps on the tiny model of its type write what the
preset asks for (the layers, the file layout). OneTrainer's
presets themselves, loaded and saved by its code, train in tests/test_onetrainer_training.py."""
import json

import pytest
from safetensors import safe_open

from onetrainer_files import ATTENTION_BLOCK, MANIFEST, entry
from trainer.config import check_supported, config_from_dict
from trainer.demo import DEMO_DATASET_DIR
from trainer.loop import train
from ui.paths import PRESETS_DIR

# Atelier's preset file -> OneTrainer's preset (the fixture of it loaded and saved by its UI)
ONETRAINER = {
    "onetrainer_sd15_lora": "preset.sd15_lora.saved",
    "onetrainer_sd15_finetune": "preset.sd15_finetune.saved",
    "onetrainer_sd15_masked": "preset.sd15_masked.saved",
    "onetrainer_sd15_inpaint": "preset.sd15_inpaint.saved",
    "onetrainer_sd15_inpaint_masked": "preset.sd15_inpaint_masked.saved",
    "onetrainer_sdxl_lora": "preset.sdxl_lora.saved",
    "onetrainer_sdxl_inpaint_lora": "preset.sdxl_inpaint_lora.saved",
    "onetrainer_sd15_embedding": "preset.sd15_embedding.saved",
    "onetrainer_sdxl_finetune": "preset.sdxl_finetune.saved",
    "onetrainer_flux_lora": "preset.flux_lora.saved",
    "onetrainer_chroma_lora": "preset.chroma_lora_24gb.saved",
    "onetrainer_sd3_lora": "preset.sd3_lora.saved",
    "onetrainer_sd3_finetune": "preset.sd3_finetune.saved",
}
# Where each preset's output goes is the user's: Atelier's write into their workspace.
PLACES = {"workspace_dir", "output_model_destination"}
# OneTrainer's keys with no Atelier setting of their own: its one weight type for every part
# (each part's own is compared), and the quantization filter, which with no part quantized
# changes nothing.
NOT_SETTINGS = ("weight_dtype",)
NOT_SETTING_SECTIONS = ("quantization.",)


def preset(name):
    return json.loads((PRESETS_DIR / f"{name}.json").read_text(encoding="utf-8"))


def load(data, **kwargs):
    notes = []
    config = config_from_dict({k: v for k, v in data.items() if not k.startswith("__")},
                              warn=notes.append, **kwargs)
    return config, notes


def keys_set_by(values: dict) -> list[str]:
    """The Atelier settings a OneTrainer preset sets, as dotted paths."""
    renamed = {"layer_filter_preset": "lora_layer_preset"}
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += [f"{key}.{inner}" for inner in value]
        elif key not in PLACES:
            out.append(renamed.get(key, key))
    return [key for key in out
            if key not in NOT_SETTINGS and not key.startswith(NOT_SETTING_SECTIONS)]


def value(config, dotted):
    node = config
    for key in dotted.split("."):
        node = getattr(node, key)
    return getattr(node, "value", node)


def test_every_mirror_is_a_onetrainer_preset_of_the_fixtures():
    assert {p.stem for p in PRESETS_DIR.glob("onetrainer_*.json")} == set(ONETRAINER)
    assert set(ONETRAINER.values()) <= set(MANIFEST["fixtures"])


@pytest.mark.parametrize("name", ONETRAINER)
def test_the_preset_is_onetrainers_key_by_key(name):
    ours, our_notes = load(preset(name))
    values = entry(ONETRAINER[name])["preset_values"]
    theirs, _ = load(values, onetrainer=True)
    assert not our_notes, our_notes
    check_supported(ours)
    differ = {k: (value(ours, k), value(theirs, k)) for k in keys_set_by(values)
              if value(ours, k) != value(theirs, k)}
    assert not differ, differ
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
    assert unet and all(ATTENTION_BLOCK.search(m) for m in unet)  # either layout's names
    ends = {m.rsplit("_", 2)[-2] + "_" + m.rsplit("_", 1)[-1] for m in unet}
    assert ends >= {"proj_in", "proj_out"}
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
