"""Presets, export, import (Atelier and OneTrainer JSON), and the optimizer edits they carry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import TrainConfig, check_supported, config_from_dict, load_config
from trainer.demo import DEMO_DATASET_DIR
from trainer.errors import ConfigError
from ui import optimizers, presets


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "ws"))
    return tmp_path / "ws"


def test_built_in_presets_load_cleanly(workspace):
    values = [value for _, value in presets.choices()]
    assert values[0] == presets.DEFAULT_PRESET
    for name in ("sd15_lora", "sd15_masked_lora", "sdxl_lora", "sdxl_finetune",
                 "prodigy_lora", "demo"):
        assert presets.BUILTIN + name in values
    for value in values:
        config, memory, messages = presets.merge_preset(presets.read_preset(value), None)
        assert messages == [], (value, messages)
        check_supported(config)  # the engine accepts every built-in preset


def test_demo_preset_paths_point_into_the_workspace(workspace):
    config, _, _ = presets.merge_preset(presets.read_preset("builtin:demo"), None)
    assert config.base_model_name == str(workspace / "tiny-sd15")
    assert config.workspace_dir == str(workspace / "demo")
    assert Path(config.concepts[0].path).resolve() == DEMO_DATASET_DIR.resolve()


def test_preset_without_data_keeps_the_pages_concepts_and_samples(workspace):
    page_lists = {"concepts": [{"path": "/my/photos"}], "samples": [{"prompt": "me"}]}
    config, _, _ = presets.merge_preset(presets.read_preset("builtin:sd15_lora"),
                                        {"concepts": page_lists["concepts"]})
    assert [c.path for c in config.concepts] == ["/my/photos"]
    assert config.learning_rate == 3e-4 and config.resolution == "512"
    assert config.workspace_dir == str(workspace / "sd15-lora")


def test_masked_and_prodigy_presets_say_what_they_are(workspace):
    masked, _, _ = presets.merge_preset(presets.read_preset("builtin:sd15_masked_lora"), None)
    assert masked.masked_training and masked.unmasked_weight == 0.1
    prodigy, _, _ = presets.merge_preset(presets.read_preset("builtin:prodigy_lora"), None)
    assert prodigy.optimizer.optimizer.value == "PRODIGY" and prodigy.learning_rate == 1
    assert "learning rate" in optimizers.hint("PRODIGY")


def test_saved_preset_round_trips_with_optimizer_edits(workspace):
    config = config_from_dict({"learning_rate": 5e-4, "lora_rank": 32,
                               "optimizer": {"optimizer": "LION", "beta2": 0.95}},
                              warn=lambda m: None)
    memory = {"LION": {"beta2": 0.95}, "ADAMW": {"weight_decay": 0.05}}
    value, path = presets.save_user_preset("My run / v2", config, memory)
    assert path.parent == workspace / "presets" and value == "user:My run  v2"
    assert ("My run  v2 (saved)", value) in presets.choices()
    loaded, loaded_memory, messages = presets.merge_preset(presets.read_preset(value), None)
    assert messages == []
    assert loaded.lora_rank == 32 and loaded.optimizer.beta2 == 0.95
    assert loaded_memory == memory


def test_preset_names_are_checked(workspace):
    with pytest.raises(ConfigError, match="name"):
        presets.save_user_preset("  /// ", TrainConfig(), {})


def test_export_is_a_config_the_cli_accepts(workspace, tmp_path):
    config = config_from_dict({"learning_rate": 1e-3, "epochs": 3, "resolution": "768x512",
                               "optimizer": {"optimizer": "PRODIGY", "growth_rate": "inf"},
                               "concepts": [{"path": "/data/cats", "repeats": 3}]},
                              warn=lambda m: None)
    memory = {"PRODIGY": {"growth_rate": float("inf")}, "ADAMW": {"weight_decay": 0.05}}
    path = presets.write_export(config, memory)
    data = json.loads(path.read_text())
    assert data["optimizer_defaults"]["ADAMW"]["weight_decay"] == 0.05
    warnings = []
    again = load_config(path, warn=warnings.append)  # what `python -m trainer train` does
    assert warnings == []
    assert again.model_dump(exclude={"optimizer_defaults"}) == config.model_dump(
        exclude={"optimizer_defaults"})
    assert again.optimizer_defaults["ADAMW"] == {"weight_decay": 0.05}


def test_import_of_an_atelier_export(workspace):
    config = config_from_dict({"lora_rank": 8, "epochs": 12}, warn=lambda m: None)
    raw = presets.export_dict(config, {"LION": {"beta2": 0.9}})
    imported, memory, messages, kind = presets.import_config(raw)
    assert kind == "Atelier" and messages == []
    assert imported.lora_rank == 8 and memory == {"LION": {"beta2": 0.9}}


ONETRAINER = {
    "__version": 6,
    "training_method": "LORA",
    "model_type": "STABLE_DIFFUSION_15",
    "debug_mode": False,
    "workspace_dir": "workspace/run",
    "cache_dir": "workspace-cache/run",
    "tensorboard": True,
    "base_model_name": "runwayml/stable-diffusion-v1-5",
    "output_model_destination": "models/model.safetensors",
    "output_dtype": "FLOAT_32",
    "output_model_format": "SAFETENSORS",
    "concept_file_name": "training_concepts/concepts.json",
    "concepts": [{"name": "cat", "path": "/data/cat", "enabled": True, "repeats": 2.0,
                  "image": {"enable_crop_jitter": True},
                  "text": {"prompt_source": "filename", "prompt_path": ""},
                  "include_subdirectories": False}],
    "samples": [{"enabled": True, "prompt": "a cat", "seed": 7, "width": 512, "height": 512,
                 "diffusion_steps": 20, "cfg_scale": 7.0, "noise_scheduler": "DDIM"},
                {"enabled": False, "prompt": "unused"}],
    "learning_rate_scheduler": "COSINE",
    "learning_rate": 0.0003,
    "learning_rate_warmup_steps": 200.0,
    "epochs": 100,
    "batch_size": 2,
    "train_dtype": "FLOAT_8",
    "optimizer": {"__version": 0, "optimizer": "ADAMW", "beta1": 0.9, "beta2": 0.99,
                  "eps": None, "weight_decay": 0.01, "fused": True},
    "optimizer_defaults": {"ADAMW": {"optimizer": "ADAMW", "beta1": 0.85, "eps": None}},
    "text_encoder": {"train": True, "learning_rate": None, "stop_training_after": 30,
                     "stop_training_after_unit": "EPOCH", "model_name": "", "weight_dtype":
                     "FLOAT_32"},
    "unet": {"train": True, "stop_training_after_unit": "NEVER"},
    "lora_rank": 16,
    "lora_alpha": 1.0,
    "masked_training": True,
}


def test_onetrainer_import_reports_unknown_keys_and_keeps_the_rest(workspace):
    config, memory, messages, kind = presets.import_config(ONETRAINER)
    assert kind == "OneTrainer"
    text = "\n".join(messages)
    for unknown in ("debug_mode", "cache_dir", "tensorboard", "concept_file_name",
                    "optimizer.fused", "text_encoder.model_name", "samples[0].noise_scheduler"):
        assert f"'{unknown}'" in text, unknown
    assert "train_dtype" in text and "FLOAT_8" in text  # a value Atelier has not: default kept
    assert config.train_dtype == TrainConfig().train_dtype
    # The rest came through.
    assert config.learning_rate_scheduler.value == "COSINE" and config.batch_size == 2
    assert config.optimizer.beta2 == 0.99 and config.optimizer.eps is None
    assert config.masked_training
    assert [(c.path, c.repeats, c.prompt_source.value) for c in config.concepts] == [
        ("/data/cat", 2.0, "filename")]
    assert [s.prompt for s in config.samples] == ["a cat"]  # the disabled one is dropped
    assert memory == {"ADAMW": {"beta1": 0.85}}
    # A long list of unknown keys is folded into one line for the page.
    assert len(presets.summarize(messages + [f"Unknown key 'k{i}' ignored." for i in
                                             range(20)])) < len(messages) + 20


def test_import_refuses_what_is_not_a_config(workspace, tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        presets.import_config(["not", "a", "dict"])
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        presets.read_json_file(bad)


def test_optimizer_edits_are_remembered_per_optimizer():
    memory, lion = optimizers.switch({}, "ADAMW", {"weight_decay": 0.05, "beta1": 0.9}, "LION")
    assert lion["beta2"] == 0.99 and lion["weight_decay"] == 0.0  # Lion's own defaults
    memory, adamw = optimizers.switch(memory, "LION", {**lion, "beta2": 0.95}, "ADAMW")
    assert adamw["weight_decay"] == 0.05 and adamw["beta2"] == 0.999
    memory, lion = optimizers.switch(memory, "ADAMW", adamw, "LION")
    assert lion["beta2"] == 0.95
    assert set(memory) == {"ADAMW", "LION"}
    # Switching keeps only the optimizer's own parameters.
    assert "momentum" not in memory["ADAMW"]


def test_optimizer_dialog_text_values():
    growth = next(p for p in optimizers.schema("PRODIGY") if p.name == "growth_rate")
    assert optimizers.display(float("inf")) == "inf"
    assert optimizers.parse(growth, "inf") == float("inf")
    beta3 = next(p for p in optimizers.schema("PRODIGY") if p.name == "beta3")
    assert optimizers.display(None) == "" and optimizers.parse(beta3, " ") is None
    assert optimizers.display(1e-8) == "1e-08" and optimizers.parse(beta3, "0.5") == 0.5
    assert "Default 0.01" in optimizers.tooltip(next(
        p for p in optimizers.schema("ADAMW") if p.name == "weight_decay"))
