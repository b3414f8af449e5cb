"""The config model: JSON round trip, presets, overrides, unknown keys, clear errors."""
import json

import pytest
from pydantic import BaseModel

from trainer.config import (ConfigError, TrainConfig, apply_override, check_supported,
                            config_from_dict, load_config, parse_resolution)
from trainer.models import registry


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


# --- The flow-matching families (issue 25) --------------------------------------------------

FLUX = {"model_type": "FLUX_DEV_1"}
CHROMA = {"model_type": "CHROMA_1"}
SD3 = {"model_type": "STABLE_DIFFUSION_3"}
SD35 = {"model_type": "STABLE_DIFFUSION_35"}


def test_a_model_type_reads_its_facts_from_the_registry():
    from trainer.config import ModelType
    from trainer.models import registry
    assert {m.value for m in ModelType} == set(registry.FAMILIES)  # one list, both ways
    for model in ModelType:
        assert model.facts is registry.facts(model)
        assert model.is_inpainting == model.facts.inpainting
        assert model.plain.value == model.facts.plain_type
    for value in ("FLUX_DEV_1", "CHROMA_1", "STABLE_DIFFUSION_3", "STABLE_DIFFUSION_35"):
        model = ModelType(value)
        assert not model.is_sdxl and not model.is_inpainting and model.plain is model
    assert ModelType.STABLE_DIFFUSION_XL_10_BASE_INPAINTING.plain.value == \
        "STABLE_DIFFUSION_XL_10_BASE"


def test_new_parts_and_flow_settings_have_onetrainers_defaults():
    c = TrainConfig()
    assert (c.transformer.learning_rate, c.transformer.stop_training_after,
            c.transformer.stop_training_after_unit.value) == (None, 0, "NEVER")
    assert c.transformer.guidance_scale == 1.0 and c.transformer.attention_mask is False
    assert c.transformer.model_name == "" and c.transformer.gradient_checkpointing
    assert c.text_encoder_3.stop_training_after == 30
    assert (c.text_encoder_sequence_length, c.text_encoder_2_sequence_length) == (512, 77)
    assert (c.timestep_distribution.value, c.noising_weight, c.noising_bias,
            c.timestep_shift, c.dynamic_timestep_shifting,
            c.loss_weight_fn.value) == ("UNIFORM", 0.0, 0.0, 1.0, False, "CONSTANT")
    flux = config_from_dict(FLUX)
    assert flux.transformer.train and not flux.text_encoder_2.train  # T5 frozen by default
    chroma = config_from_dict(CHROMA)  # its only text encoder is T5: off unless a config says
    assert not chroma.text_encoder.train and config_from_dict({}).text_encoder.train
    check_supported(chroma)
    with pytest.raises(ConfigError, match="timestep_shift:"):
        config_from_dict({"timestep_shift": 0})


@pytest.mark.parametrize("model, trained, absent", [
    ("STABLE_DIFFUSION_15", "unet", ("transformer", "text_encoder_2", "text_encoder_3")),
    ("FLUX_DEV_1", "transformer", ("unet", "text_encoder_3")),
    ("CHROMA_1", "transformer", ("unet", "text_encoder_2", "text_encoder_3")),
    ("STABLE_DIFFUSION_35", "transformer", ("unet",)),
])
def test_a_part_the_family_lacks_is_read_as_not_trained(model, trained, absent):
    """OneTrainer writes every part's switch, on, for every model type: where the family has
    no such part it is read as off, given or not; a dump reloads to the same config."""
    config = config_from_dict({"model_type": model, **{p: {"train": True} for p in absent}})
    assert getattr(config, trained).train
    assert not any(getattr(config, part).train for part in absent)
    assert TrainConfig.model_validate_json(config.to_json()) == config


def test_a_family_gets_its_own_default_output_format():
    assert config_from_dict(FLUX).output_model_format.value == "DIFFUSERS_LORA"
    assert config_from_dict({**SD3, "training_method": "FINE_TUNE"}).output_model_format.value \
        == "DIFFUSERS"
    assert config_from_dict({}).output_model_format.value == "KOHYA_LORA"  # SD unchanged
    assert config_from_dict({"training_method": "FINE_TUNE"}).output_model_format.value == \
        "ORIGINAL_SINGLE_FILE"


@pytest.mark.parametrize("data, message", [
    ({**FLUX, "min_snr_gamma": 5}, "min_snr_gamma = 5: min-SNR weighting is a DDPM"),
    ({**CHROMA, "loss_weight_fn": "P2"}, "loss_weight_fn = P2: Chroma is a flow-matching"),
    ({**SD3, "loss_weight_fn": "MIN_SNR_GAMMA"}, "loss_weight_fn = MIN_SNR_GAMMA: Stable "
                                                 "Diffusion 3 is a flow-matching"),
    ({"loss_weight_fn": "SIGMA"}, "loss_weight_fn = SIGMA is not supported for Stable "
                                  "Diffusion 1.5"),
    ({"loss_weight_fn": "MIN_SNR_GAMMA"}, "set min_snr_gamma"),
    ({**FLUX, "text_encoder_2": {"train": True}}, "text_encoder_2.train: T5 training is not "
                                                  "supported: Flux.1's text_encoder_2 is T5"),
    ({**SD35, "text_encoder_3": {"train": True}}, "text_encoder_3.train: T5 training"),
    ({**CHROMA, "text_encoder": {"train": True}}, "text_encoder.train: T5 training"),
    ({**FLUX, "text_encoder": {"train": False}, "text_encoder_2": {"clip_skip": 1}},
     "text_encoder_2.clip_skip = 1: Flux.1's text_encoder_2 is T5"),
    ({**FLUX, "training_method": "EMBEDDING"}, "training_method = EMBEDDING: additional_"
                                               "embeddings are not available for Flux.1 yet"),
    ({**SD3, "additional_embeddings": [{"placeholder": "<me>"}]},
     "additional_embeddings: not available for Stable Diffusion 3 yet"),
    ({**FLUX, "output_model_format": "LEGACY_LORA"}, "output_model_format = LEGACY_LORA: "
                                                     "Atelier writes no LEGACY_LORA for Flux.1"),
    ({**CHROMA, "training_method": "FINE_TUNE", "output_model_format": "LEGACY_SAFETENSORS"},
     "writes no LEGACY_SAFETENSORS for Chroma; for training_method FINE_TUNE it writes "
     "DIFFUSERS, ORIGINAL_SINGLE_FILE"),
    ({**FLUX, "peft_type": "LOHA", "output_model_format": "DIFFUSERS_LORA"},
     "peft_type LOHA is not available for Flux.1"),
    ({**SD3, "dynamic_timestep_shifting": True}, "dynamic_timestep_shifting: Stable Diffusion "
                                                 "3's scheduler has no resolution-dependent"),
    ({"dynamic_timestep_shifting": True}, "dynamic_timestep_shifting"),
    ({"timestep_distribution": "LOGIT_NORMAL", "noising_weight": -1.5},
     "noising_weight must be above -1 for LOGIT_NORMAL"),  # tried at Start, not at step 1
    ({"noising_bias": float("inf")}, "noising_bias must be a finite number"),
    ({"lora_layer_preset": "blocks"}, "lora_layer_preset = blocks is not a layer preset of "
                                      "Stable Diffusion 1.5; it has attn-only, attn-mlp, full"),
    ({**SD3, "lora_layer_preset": "attn-mlp"}, "attn-mlp is not a layer preset of Stable "
                                               "Diffusion 3"),
])
def test_what_a_family_cannot_do_is_refused_naming_the_key(data, message):
    with pytest.raises(ConfigError) as error:
        check_supported(config_from_dict({"text_encoder": {"train": False}, **data},
                                         warn=lambda m: None))
    assert message in str(error.value)


@pytest.mark.parametrize("data", [
    {**FLUX, "loss_weight_fn": "SIGMA", "timestep_distribution": "LOGIT_NORMAL",
     "dynamic_timestep_shifting": True, "transformer": {"guidance_scale": 3.5},
     "text_encoder": {"train": True}},                    # CLIP-L trains, as OneTrainer allows
    {**SD35, "text_encoder_2": {"train": True}, "timestep_shift": 3.0,
     "output_model_format": "COMFY_LORA"},                 # the CLIPs train
    {**CHROMA, "lora_layer_preset": "blocks"},
    {**CHROMA, "text_encoder": {"train": False}, "training_method": "FINE_TUNE",
     "output_model_format": "ORIGINAL_SINGLE_FILE"},
    # the distributions apply to SD too (OneTrainer's), min-SNR stays SD's weighting
    {"timestep_distribution": "SIGMOID", "noising_weight": 2.0, "noising_bias": -0.1,
     "timestep_shift": 2.0, "min_snr_gamma": 5.0},
])
def test_what_the_families_can_do_is_accepted(data):
    check_supported(config_from_dict(data, warn=lambda m: None))


@pytest.mark.parametrize("dtype", ["FLOAT_8", "NFLOAT_4", "INT_8"])
def test_quantized_weights_are_accepted(dtype):
    """Issue 26's weight types (trainer/quantization.py), in Atelier's own config too."""
    config = config_from_dict({**FLUX, "transformer": {"weight_dtype": dtype}})
    assert config.transformer.weight_dtype.value == dtype
    check_supported(config)


@pytest.mark.parametrize("dtype", ["GGUF_A8_INT", "FLOAT_W8A8", "INT_W8A8_COMPRESSED"])
def test_quantized_types_atelier_does_not_build_are_refused_naming_key_and_value(dtype):
    """OneTrainer's other quantized types, in Atelier's own config too: named, never replaced."""
    with pytest.raises(ConfigError) as error:
        config_from_dict({**FLUX, "transformer": {"weight_dtype": dtype}})
    assert str(error.value).startswith(f"transformer.weight_dtype: {dtype} (")
    instead = ("GGUF (the file's weights, activations in the train data type)"
               if dtype.startswith("GGUF") else "FLOAT_8 (8-bit weights) or NFLOAT_4 (4-bit)")
    assert str(error.value).endswith(") is not built in Atelier; set transformer.weight_dtype "
                                     f"to {instead}.")



@pytest.mark.parametrize("model_type", list(registry.FAMILIES))
def test_every_family_starts_from_the_defaults(model_type):
    """Choosing a model type and nothing else is a config the run accepts (the default layer
    preset, output format and frozen encoders fit every family)."""
    check_supported(config_from_dict({"model_type": model_type}))
