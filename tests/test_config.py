"""The config model: JSON round trip, presets, overrides, unknown keys, clear errors."""
import json

import pytest
from pydantic import BaseModel

from trainer.config import (ConfigError, TrainConfig, apply_override, check_supported,
                            config_from_dict, load_config, parse_resolution)


def test_defaults_follow_the_spec():
    c = TrainConfig()
    assert c.learning_rate == 3e-6 and c.resolution == "512"
    assert c.optimizer.optimizer.value == "ADAMW" and c.learning_rate_scheduler.value == "CONSTANT"
    assert c.learning_rate_warmup_steps == 200 and c.epochs == 100 and c.batch_size == 1
    assert c.text_encoder.train and c.text_encoder.stop_training_after == 30
    assert c.text_encoder.stop_training_after_unit.value == "EPOCH"
    assert c.unet.train and c.unet.stop_training_after_unit.value == "NEVER"
    assert c.unmasked_probability == 0.1 and c.unmasked_weight == 0.1
    assert c.ema.value == "OFF" and c.ema_decay == 0.999 and c.ema_update_step_interval == 5
    assert c.lora_rank == 16 and c.lora_alpha == 1.0 and c.train_dtype.value == "FLOAT_16"


def test_every_field_has_label_tooltip_and_section():
    def check(model):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                check(field.annotation)  # nested section: its own fields carry the metadata
                continue
            assert field.title and field.description, name
            assert field.json_schema_extra["section"], name
    check(TrainConfig)


def test_json_round_trip_is_exact():
    c = config_from_dict({"learning_rate": 1e-4, "unet": {"learning_rate": 2e-4},
                          "concepts": [{"path": "x", "repeats": 2}], "resolution": "768x512"})
    again = TrainConfig.model_validate_json(c.to_json())
    assert again == c
    assert json.loads(c.to_json())["optimizer"]["optimizer"] == "ADAMW"


def test_preset_layers_over_defaults_and_file_over_preset(tmp_path):
    preset = {"learning_rate": 3e-4, "lora_rank": 8, "unet": {"learning_rate": 1e-4}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lora_rank": 32, "unet": {"train": True}}))
    c = load_config(path, ["text_encoder.learning_rate=5e-5", "epochs=3"], presets=[preset])
    assert c.learning_rate == 3e-4          # from the preset
    assert c.lora_rank == 32                # the file wins over the preset
    assert c.unet.learning_rate == 1e-4     # nested keys merge, not replace
    assert c.text_encoder.learning_rate == 5e-5 and c.epochs == 3  # --set wins over all
    assert c.batch_size == 1                # untouched default


def test_part_learning_rate_override_rule():
    c = config_from_dict({"learning_rate": 1e-3, "unet": {"learning_rate": 2e-4}})
    assert c.part_learning_rate("unet") == 2e-4
    assert c.part_learning_rate("text_encoder") == 1e-3  # empty = base LR


def test_unknown_keys_are_warned_and_ignored():
    warnings = []
    c = config_from_dict({"foo": 1, "optimizer": {"bar": 2}, "concepts": [{"path": "a", "zz": 0}],
                          "__comment": "notes are fine"}, warn=warnings.append)
    assert warnings == ["Unknown config key 'foo' ignored.",
                        "Unknown config key 'optimizer.bar' ignored.",
                        "Unknown config key 'concepts[0].zz' ignored."]
    assert c.concepts[0].path == "a"


@pytest.mark.parametrize("data, key", [
    ({"learning_rate": -1}, "learning_rate"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"batch_size": "abc"}, "batch_size"),
    ({"epochs": 0}, "epochs"),
    ({"optimizer": {"optimizer": "NOPE"}}, "optimizer.optimizer"),
    ({"unet": {"learning_rate": -2}}, "unet.learning_rate"),
    ({"concepts": [{"repeats": -1}]}, "concepts.0.repeats"),
    ({"unmasked_weight": 2}, "unmasked_weight"),
    ({"resolution": "512x"}, "resolution"),
])
def test_invalid_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as error:
        config_from_dict(data)
    assert f"{key}:" in str(error.value)


@pytest.mark.parametrize("text, bad", [
    ("512x", "'512x'"), ("abc", "'abc'"), ("0", "'0'"), ("-64", "'-64'"), ("500", "'500'"),
    ("512,abc", "'abc'"), ("512,,640", "item 2"), ("384, 512,-8", "'-8'"), ("512x512x8", "'512x512x8'"),
    ("64,x64", "'x64'"), ("16384", "'16384'"), (" ", "empty"), ("512,", "item 2"),
])
def test_malformed_resolution_names_the_bad_item(text, bad):
    with pytest.raises(ValueError) as error:
        parse_resolution(text)
    assert bad in str(error.value)


@pytest.mark.parametrize("text", ["512,abc", "0", "-64", "512x", "512,,640"])
def test_malformed_resolution_is_refused_by_the_config_naming_the_item(text):
    with pytest.raises(ConfigError) as error:
        config_from_dict({"resolution": text})
    assert "resolution:" in str(error.value)
    with pytest.raises(ConfigError) as error:
        config_from_dict({"concepts": [{"path": "x", "resolution": text}]})
    assert "concepts.0.resolution:" in str(error.value)


def test_resolution_forms():
    assert parse_resolution("512") == [(512, 512, False)]
    assert parse_resolution("768x512") == [(768, 512, True)]
    assert parse_resolution(" 384, 448,512 ") == [(384, 384, False), (448, 448, False),
                                                  (512, 512, False)]
    assert parse_resolution("512,768X512") == [(512, 512, False), (768, 512, True)]
    config = config_from_dict({"resolution": "384,448,512,576,640",
                               "concepts": [{"path": "x", "resolution": " 256 "}, {"path": "y"}]})
    assert config.resolution == "384,448,512,576,640"  # the field stays the user's string
    assert [c.resolution for c in config.concepts] == ["256", ""]


def test_set_override_parses_json_values():
    data = apply_override({}, "unet.train=false")
    data = apply_override(data, "resolution=768x512")
    data = apply_override(data, "clip_grad_norm=null")
    assert data == {"unet": {"train": False}, "resolution": "768x512", "clip_grad_norm": None}
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "epochs")


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


@pytest.mark.parametrize("data, key", [
    ({"output_model_format": "DIFFUSERS"}, "output_model_format"),  # a LoRA is one file
])
def test_settings_that_cannot_apply_are_refused_not_ignored(data, key):
    with pytest.raises(ConfigError) as error:
        check_supported(config_from_dict(data))
    assert key in str(error.value)


def test_a_second_text_encoder_switch_is_ignored_where_the_model_has_none():
    """OneTrainer writes text_encoder_2.train (on) for every model type and ignores it where
    there is no second encoder; so does Atelier (the page hides the switch for SD 1.5)."""
    config = config_from_dict({"text_encoder_2": {"train": True}})
    check_supported(config)
    assert not config.text_encoder_2.train
    sdxl = config_from_dict({"model_type": "STABLE_DIFFUSION_XL_10_BASE",
                             "text_encoder_2": {"train": True}})
    assert sdxl.text_encoder_2.train


@pytest.mark.parametrize("data", [
    {"model_type": "STABLE_DIFFUSION_XL_10_BASE", "text_encoder_2": {"train": True}},
    {"training_method": "FINE_TUNE", "output_model_format": "DIFFUSERS"},
])
def test_sdxl_and_fine_tuning_are_accepted(data):
    check_supported(config_from_dict(data))
