"""OneTrainer configs of both generations enter through the same translation wherever they
come in (CLI, page Import, API): its current names import as their authors meant, and what
Atelier cannot honour is refused with the key and value, never replaced by a default.

The presets below are written as OneTrainer ships them (training_presets/SD1.5 and SDXL of
its current release, partial configs; see docs/notes/onetrainer-configs.md)."""
import json

import pytest

from trainer.config import (CompileMode, DataType, LoraLayerPreset, ModelFormat, ModelType, PeftType,
                            TrainingMethod, check_adapter_type, config_from_dict)
from trainer.errors import ConfigError

SD15_LORA = {
    "backup_after": 10, "base_model_name": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "batch_size": 4, "layer_filter_preset": "attn-mlp", "learning_rate": 0.0003,
    "model_type": "STABLE_DIFFUSION_15", "output_model_destination": "models/lora.safetensors",
    "output_model_format": "KOHYA_LORA", "resolution": "512", "training_method": "LORA",
    "vae": {"weight_dtype": "FLOAT_32"}, "unet": {"weight_dtype": "FLOAT_16"},
    "text_encoder": {"weight_dtype": "FLOAT_16"}}
SD15_FINE_TUNE = {
    "base_model_name": "stable-diffusion-v1-5/stable-diffusion-v1-5", "batch_size": 4,
    "model_type": "STABLE_DIFFUSION_15", "output_model_destination": "models/model.safetensors",
    "output_model_format": "ORIGINAL_SINGLE_FILE", "resolution": "512",
    "training_method": "FINE_TUNE", "unet": {"train": True}, "vae": {"weight_dtype": "FLOAT_32"}}
SDXL_LORA = {
    "backup_after": 10, "base_model_name": "stabilityai/stable-diffusion-xl-base-1.0",
    "batch_size": 4, "layer_filter_preset": "attn-mlp", "learning_rate": 0.0003,
    "model_type": "STABLE_DIFFUSION_XL_10_BASE", "output_model_format": "KOHYA_LORA",
    "output_model_destination": "models/lora.safetensors", "resolution": "1024",
    "training_method": "LORA", "unet": {"weight_dtype": "FLOAT_16"},
    "text_encoder": {"train": False, "weight_dtype": "FLOAT_16"},
    "text_encoder_2": {"train": False, "weight_dtype": "FLOAT_16"},
    "vae": {"weight_dtype": "FLOAT_32"}}
# The older generation: SAFETENSORS, a top-level weight_dtype, no layer filter key.
OLD_SD15_LORA = {"base_model_name": "runwayml/stable-diffusion-v1-5", "batch_size": 4,
                 "output_model_format": "SAFETENSORS", "weight_dtype": "FLOAT_16",
                 "vae": {"weight_dtype": "FLOAT_32"}, "learning_rate": 0.0003,
                 "resolution": "512", "training_method": "LORA", "backup_after": 10}


def load(data):
    notes = []
    return config_from_dict(data, warn=notes.append), notes


def test_the_current_sd15_lora_preset_imports_as_meant():
    config, notes = load(SD15_LORA)
    assert config.model_type == ModelType.STABLE_DIFFUSION_15
    assert config.training_method == TrainingMethod.LORA
    assert config.output_model_format == ModelFormat.KOHYA_LORA
    assert config.lora_layer_preset == LoraLayerPreset.ATTN_MLP   # not attn-only, the default
    assert (config.unet.weight_dtype, config.text_encoder.weight_dtype,
            config.vae.weight_dtype) == (DataType.FLOAT_16, DataType.FLOAT_16, DataType.FLOAT_32)
    assert (config.batch_size, config.learning_rate, config.resolution) == (4, 0.0003, "512")
    assert not notes, notes                                       # every key understood


def test_the_current_fine_tune_and_sdxl_presets_import_as_meant():
    config, notes = load(SD15_FINE_TUNE)
    assert config.training_method == TrainingMethod.FINE_TUNE
    assert config.output_model_format == ModelFormat.ORIGINAL_SINGLE_FILE
    assert not notes
    config, notes = load(SDXL_LORA)
    assert config.model_type == ModelType.STABLE_DIFFUSION_XL_10_BASE
    assert config.lora_layer_preset == LoraLayerPreset.ATTN_MLP
    assert config.text_encoder_2.weight_dtype == DataType.FLOAT_16
    assert config.resolution == "1024"
    assert not config.text_encoder.train and not config.text_encoder_2.train
    assert not notes, notes


def test_the_older_generation_still_imports():
    config, notes = load(OLD_SD15_LORA)
    assert config.output_model_format == ModelFormat.KOHYA_LORA  # SAFETENSORS, its older name
    # the top-level weight_dtype is every part's (OneTrainer's migration 9); the VAE keeps its own
    assert (config.unet.weight_dtype, config.text_encoder.weight_dtype,
            config.text_encoder_2.weight_dtype, config.vae.weight_dtype) == (
        DataType.FLOAT_16, DataType.FLOAT_16, DataType.FLOAT_16, DataType.FLOAT_32)
    assert config.lora_layer_preset == LoraLayerPreset.ATTN_ONLY  # it named none
    assert not notes
    oldest = load({"unet_weight_dtype": "BFLOAT_16", "weight_dtype": "FLOAT_32",
                   "text_encoder": {"weight_dtype": "NONE"}, "vae_weight_dtype": "BFLOAT_16",
                   "lora_layers": "attn1", "lora_layer_preset": "custom"})[0]
    assert (oldest.unet.weight_dtype, oldest.text_encoder.weight_dtype,
            oldest.vae.weight_dtype) == (DataType.BFLOAT_16, DataType.FLOAT_32, DataType.BFLOAT_16)
    assert (oldest.lora_layer_preset, oldest.layer_filter) == (LoraLayerPreset.CUSTOM, "attn1")
    assert load({"lora_layer_preset": "full"})[0].lora_layer_preset == LoraLayerPreset.FULL
    assert load({"resolution": 512})[0].resolution == "512"  # the oldest wrote a number


def test_each_part_keeps_its_own_type_and_the_vae_its_model():
    config, notes = load({**SD15_LORA, "text_encoder": {"weight_dtype": "BFLOAT_16"},
                          "vae": {"weight_dtype": "BFLOAT_16", "model_name": "my/vae"}})
    assert (config.unet.weight_dtype, config.text_encoder.weight_dtype,
            config.vae.weight_dtype) == (DataType.FLOAT_16, DataType.BFLOAT_16, DataType.BFLOAT_16)
    assert config.vae_model_name == "my/vae" and not notes


def test_a_custom_layer_filter_imports_as_the_filter():
    config, notes = load({**SD15_LORA, "layer_filter_preset": "custom",
                          "layer_filter": "down_blocks.1, attn2", "layer_filter_regex": True})
    assert (config.lora_layer_preset, config.layer_filter, config.layer_filter_regex) == (
        LoraLayerPreset.CUSTOM, "down_blocks.1, attn2", True)
    # A saved config whose filter was edited after choosing a preset: OneTrainer trains the
    # filter, and so does Atelier, saying so.
    config, notes = load({**SD15_LORA, "layer_filter": "attn1"})
    assert (config.lora_layer_preset, config.layer_filter) == (LoraLayerPreset.CUSTOM, "attn1")
    assert notes and "custom" in notes[0]
    assert load({**SD15_LORA, "layer_filter": "attentions"})[0].lora_layer_preset == \
        LoraLayerPreset.ATTN_MLP  # the filter the preset stands for


@pytest.mark.parametrize("change, named", [
    ({"output_model_format": "ORIGINAL_LORA"}, "output_model_format: ORIGINAL_LORA"),
    ({"output_model_format": "CKPT"}, "output_model_format: CKPT"),
    ({"layer_filter_preset": "attn-conv"}, "layer_filter_preset: 'attn-conv'"),
    ({"model_type": "STABLE_DIFFUSION_3"}, "model_type"),
])
def test_what_atelier_cannot_honour_is_refused_with_its_name(change, named):
    data = {**SD15_LORA, **change}
    with pytest.raises(ConfigError, match=named):
        load(data)


def test_the_page_import_never_replaces_what_the_job_is(tmp_path):
    """The page imports leniently (a bad tuning value keeps its default, with a note), but a
    model type or training method it cannot run stops the import with the value named."""
    from ui.presets import import_config, looks_like_onetrainer
    assert looks_like_onetrainer(SD15_LORA) and looks_like_onetrainer(SDXL_LORA)
    config, _, messages, kind = import_config(SD15_LORA)
    assert kind == "OneTrainer" and config.lora_layer_preset == LoraLayerPreset.ATTN_MLP
    inpaint = {**SDXL_LORA, "model_type": "STABLE_DIFFUSION_XL_10_BASE_INPAINTING",
               "base_model_name": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"}
    assert import_config(inpaint)[0].model_type.value == "STABLE_DIFFUSION_XL_10_BASE_INPAINTING"
    with pytest.raises(ConfigError, match="STABLE_DIFFUSION_3"):
        import_config({**SD15_LORA, "model_type": "STABLE_DIFFUSION_3"})
    config = import_config({**SD15_LORA, "training_method": "EMBEDDING",
                            "output_model_format": "SAFETENSORS"})[0]
    assert (config.training_method.value, config.output_model_format.value) == (
        "EMBEDDING", "SAFETENSORS")
    config, _, messages, _ = import_config({**SD15_LORA, "epochs": 0})  # a tuning key
    assert any(m.startswith("epochs:") and "default is kept" in m for m in messages)


def test_the_cli_trains_the_current_lora_preset(tiny_sd15_dir, tmp_path):
    """`python -m trainer train --config "#sd 1.5 LoRA.json"`, pointed at local files."""
    from safetensors import safe_open

    from test_cli import run
    from trainer.demo import DEMO_DATASET_DIR
    preset = tmp_path / "#sd 1.5 LoRA.json"
    preset.write_text(json.dumps(SD15_LORA))
    out = tmp_path / "lora.safetensors"
    done = run("train", "--config", str(preset), "--set", f"base_model_name={tiny_sd15_dir}",
               "--set", f"concepts=[{{\"path\": \"{DEMO_DATASET_DIR}\"}}]",
               "--set", "unet.weight_dtype=FLOAT_32", "--set", "text_encoder.weight_dtype=FLOAT_32",
               "--set", "resolution=64", "--set", "epochs=1", "--set", "batch_size=5",
               "--set", "train_dtype=FLOAT_32", "--set", f"workspace_dir={tmp_path / 'ws'}",
               "--set", f"output_model_destination={out}", "--set", "lora_rank=4")
    assert done.returncode == 0, done.stderr[-2000:]
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    # attn-mlp: the feed-forward layers are trained too, in kohya names
    assert any("_ff_net_2.lora_down.weight" in k for k in keys)
    assert any(k.startswith("lora_unet_") and "_attn1_to_q." in k for k in keys)


def part(**values):
    """A model part as OneTrainer's current version saves it."""
    return {"model_name": "", "include": True, "train": True, "stop_training_after": None,
            "stop_training_after_unit": "NEVER", "learning_rate": None,
            "weight_dtype": "FLOAT_32", "dropout_probability": 0.0, "train_embedding": True,
            "attention_mask": False, **values}


# A config as OneTrainer's current version saves it (__version 10, every key written; a subset
# of its many keys here, with its names and shapes).
SAVED_V10 = {
    "__version": 10, "training_method": "LORA", "model_type": "STABLE_DIFFUSION_15",
    "debug_mode": False, "workspace_dir": "workspace/run", "cache_dir": "workspace-cache/run",
    "base_model_name": SD15_LORA["base_model_name"], "output_dtype": "FLOAT_32",
    "output_model_format": "KOHYA_LORA", "output_model_destination": "models/lora.safetensors",
    "gradient_checkpointing": "ON", "layer_offload_fraction": 0.0, "compile": False,
    "concept_file_name": "training_concepts/concepts.json", "concepts": None, "samples": None,
    "learning_rate": 0.0003, "epochs": 100, "batch_size": 2, "resolution": "512",
    "train_dtype": "FLOAT_16", "clip_grad_norm": 1.0,
    "unet": part(stop_training_after=0, weight_dtype="FLOAT_16"),
    "text_encoder": part(stop_training_after=30, stop_training_after_unit="EPOCH",
                         weight_dtype="BFLOAT_16"),
    "text_encoder_2": part(), "vae": part(model_name="", weight_dtype="FLOAT_32"),
    "layer_filter": "attn1,ff.net", "layer_filter_preset": "custom", "layer_filter_regex": False,
    "embedding_learning_rate": None, "preserve_embedding_norm": False,
    "embedding": {"uuid": "e", "model_name": "", "placeholder": "<embedding>", "train": True},
    "additional_embeddings": [], "peft_type": "LORA", "lora_model_name": "", "lora_rank": 16,
    "lora_alpha": 1.0, "lora_decompose": False, "lora_dropout": 0.0,
}


def test_a_current_saved_config_imports_as_meant(tiny_sd15_dir, tmp_path):
    config, notes = load(SAVED_V10)
    assert (config.lora_layer_preset, config.layer_filter) == (LoraLayerPreset.CUSTOM,
                                                               "attn1,ff.net")
    assert (config.unet.weight_dtype, config.text_encoder.weight_dtype) == (
        DataType.FLOAT_16, DataType.BFLOAT_16)
    assert config.output_model_format == ModelFormat.KOHYA_LORA
    unknown = {n.split("'")[1] for n in notes if n.startswith("Unknown")}
    assert {"debug_mode", "cache_dir", "unet.include", "embedding"} <= unknown
    assert not unknown & {"layer_filter", "peft_type", "lora_decompose", "vae.model_name",
                          "additional_embeddings", "unet.weight_dtype", "compile",
                          "layer_offload_fraction"}
    assert config.compile == CompileMode.OFF and config.layer_offload_fraction == 0.0
    # and it trains those layers (on the tiny model, in float32 on the CPU)
    from safetensors.torch import load_file

    from helpers import tiny_config
    from trainer.loop import train
    tiny = tiny_config(tiny_sd15_dir, tmp_path, epochs=1, lora_layer_preset="custom",
                       layer_filter=config.layer_filter)
    modules = {k.split(".")[0] for k in load_file(train(tiny).output_path)
               if k.startswith("lora_unet_")}
    assert modules and all("_attn1_" in m or "_ff_net_" in m for m in modules)
    assert any("_attn1_" in m for m in modules) and any("_ff_net_" in m for m in modules)


ADDITIONAL = {"uuid": "9f1c", "model_name": "", "placeholder": "<mychar>", "train": True,
              "stop_training_after": None, "stop_training_after_unit": "NEVER",
              "token_count": 2, "initial_embedding_text": "woman", "is_output_embedding": False}


def test_additional_embeddings_import_with_their_keys():
    config, notes = load({**SAVED_V10, "additional_embeddings": [ADDITIONAL],
                          "embedding_learning_rate": 0.001, "preserve_embedding_norm": True})
    (embedding,) = config.additional_embeddings
    assert (embedding.placeholder, embedding.token_count, embedding.initial_embedding_text,
            embedding.uuid) == ("<mychar>", 2, "woman", "9f1c")
    assert (config.embedding_learning_rate, config.preserve_embedding_norm) == (0.001, True)
    assert config.text_encoder.train_embedding and config.bundle_additional_embeddings
    unknown = {n.split("'")[1] for n in notes if n.startswith("Unknown")}
    # (OneTrainer writes train_embedding for every part; only the text encoders have tokens)
    assert not unknown & {"text_encoder.train_embedding", "text_encoder_2.train_embedding",
                          "additional_embeddings", "embedding_learning_rate",
                          "preserve_embedding_norm"}, unknown
    assert not [k for k in unknown if k.startswith("additional_embeddings")], unknown


def test_an_embedding_config_trains_onetrainers_main_embedding_first():
    """EMBEDDING trains OneTrainer's `embedding` with the additional ones; it is the first of
    Atelier's list (the file at the output path)."""
    main = {**ADDITIONAL, "placeholder": "<main>", "token_count": 1}
    config, notes = load({**SAVED_V10, "training_method": "EMBEDDING",
                          "output_model_format": "SAFETENSORS", "embedding": main,
                          "additional_embeddings": [ADDITIONAL]})
    assert [e.placeholder for e in config.additional_embeddings] == ["<main>", "<mychar>"]
    assert not any("'embedding'" in n for n in notes)


def test_an_output_embedding_stops_the_import_with_its_key():
    from ui.presets import import_config
    change = {"additional_embeddings": [{**ADDITIONAL, "is_output_embedding": True}]}
    for importer in (lambda d: load(d), import_config):
        with pytest.raises(ConfigError, match="additional_embeddings.0.is_output_embedding"):
            importer({**SAVED_V10, **change})


@pytest.mark.parametrize("change, expected", [
    ({"peft_type": "LOHA"}, (PeftType.LOHA, False)),
    ({"peft_type": "LOKR"}, (PeftType.LOKR, False)),
    ({"lora_decompose": True}, (PeftType.LORA, True)),
])
def test_loha_lokr_and_dora_import_as_their_fields(change, expected):
    config, notes = load({**SAVED_V10, **change})
    assert (config.peft_type, config.lora_decompose) == expected
    check_adapter_type(config)  # and it has a file layout (KOHYA_LORA)
    # OneTrainer's DoRA defaults to the input axis; Atelier's (peft's) is the output axis
    assert any("per output channel" in n for n in notes) == expected[1]
