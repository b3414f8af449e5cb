"""The page's fields come from the config model's metadata, keyed by config key."""
from __future__ import annotations

import gradio as gr
import pandas as pd
import pytest
from pydantic import BaseModel

from trainer.config import ConceptConfig, TrainConfig, config_from_dict
from trainer.errors import ConfigError
from trainer.models import registry
from ui import fields as F
from ui import optimizers, tables
from ui.components import ConfigNumber, page_value


def scalar_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every scalar field of the config model, nested sections as dotted keys."""
    keys = set()
    for name, info in model.model_fields.items():
        annotation, _ = F._unwrap_optional(info.annotation)
        if F._is_model(annotation):
            keys |= scalar_keys(annotation, f"{prefix}{name}.")
        elif F._kind(annotation) is not None:
            keys.add(f"{prefix}{name}")
    return keys


@pytest.fixture(scope="module")
def page():
    from ui.page import build_page
    return build_page().page


def test_every_config_field_has_a_spec_with_label_and_tooltip():
    assert set(F.SPECS) == scalar_keys(TrainConfig)
    for key, spec in F.SPECS.items():
        assert spec.label and spec.info, key
        assert spec.section, key
    # Lists of sub-models are tables; dicts (optimizer_defaults) live in the page's state.
    assert {"concepts", "samples"} <= set(F.LISTS)


def test_every_field_is_a_component_keyed_by_its_name(page):
    from ui.page import DIALOG_KEYS
    assert set(page.fields) | {f"optimizer.{n}" for n in page.params} == set(F.SPECS)
    assert {f"optimizer.{n}" for n in page.params} == DIALOG_KEYS
    assert set(page.tables) == set(F.LISTS)
    for key, component in page.fields.items():
        spec = F.SPECS[key]
        assert component.label == spec.label, key
        assert component.info.startswith(spec.info), key
        assert component.elem_id == "field-" + key.replace(".", "-").replace("_", "-")


def test_ranges_and_choices_reach_the_components(page):
    rank = page.fields["lora_rank"]
    assert isinstance(rank, ConfigNumber)
    assert (rank.minimum, rank.maximum, rank.precision) == (1, 1024, 0)
    assert page.fields["unmasked_weight"].maximum == 1
    scheduler = page.fields["learning_rate_scheduler"]
    assert [value for _, value in scheduler.choices] == F.SPECS[
        "learning_rate_scheduler"].choices
    assert "Range: ≥ 1, ≤ 1024." in rank.info
    # Optional numbers are text boxes: empty means "not set".
    assert isinstance(page.fields["text_encoder.learning_rate"], gr.Textbox)
    assert isinstance(page.fields["clip_grad_norm"], gr.Textbox)


def test_a_range_error_names_the_field(page):
    with pytest.raises(gr.Error, match=r"Rank \(lora_rank\): 0 is below the minimum 1"):
        page.fields["lora_rank"].preprocess(0)
    assert page.fields["lora_rank"].preprocess(8) == 8
    # An event's gr.update makes Gradio rebuild the component for that browser session from
    # its constructor arguments: the rebuilt one still names the field.
    rank = page.fields["lora_rank"]
    rebuilt = rank.__class__(**{**rank.constructor_args, "render": False})
    with pytest.raises(gr.Error, match=r"Rank \(lora_rank\): 0 is below the minimum 1"):
        rebuilt.preprocess(0)


def test_sections_in_the_documented_order():
    order = F.sections()
    documented = [s for s in F.TRAINING_SECTIONS if s in order]
    assert order[:len(documented)] == documented
    assert order.index("Optimizer") < order.index("Main settings") < order.index("LoRA")


def test_lora_fields_apply_only_to_lora():
    lora = {"model_type": "STABLE_DIFFUSION_15", "training_method": "LORA"}
    fine_tune = {**lora, "training_method": "FINE_TUNE"}
    for key in F.keys_in_section("LoRA"):
        assert F.applies(key, lora) and not F.applies(key, fine_tune)
    assert F.section_applies("LoRA", lora) and not F.section_applies("LoRA", fine_tune)
    assert F.applies("learning_rate", fine_tune)


def test_an_output_format_that_stops_fitting_the_method_becomes_its_default():
    spec = F.SPECS["output_model_format"]
    assert "training_method" in F.controlling_keys()
    fine_tune = {"model_type": "STABLE_DIFFUSION_15", "training_method": "FINE_TUNE"}
    lora = {**fine_tune, "training_method": "LORA"}
    assert F.fitting_choice(spec, "COMFY_LORA", fine_tune) == "ORIGINAL_SINGLE_FILE"
    assert F.fitting_choice(spec, "DIFFUSERS", lora) == "KOHYA_LORA"
    assert F.fitting_choice(spec, "DIFFUSERS", fine_tune) == "DIFFUSERS"  # kept when it fits
    assert F.fitting_choice(spec, "DIFFUSERS_LORA", lora) == "DIFFUSERS_LORA"


def test_an_output_format_that_cannot_hold_the_adapter_type_becomes_a_kohya_one():
    """DIFFUSERS_LORA has no LoHa/LoKr layout: choosing LOHA or LOKR on the page switches it
    to KOHYA_LORA at once (not a refusal at Start); peft_type limits nothing under Fine-tune,
    where it does not apply."""
    spec = F.SPECS["output_model_format"]
    assert "peft_type" in F.controlling_keys()  # the page re-fits the format when it changes
    lora = {"model_type": "STABLE_DIFFUSION_15", "training_method": "LORA", "peft_type": "LORA"}
    for peft_type in ("LOHA", "LOKR"):
        chosen = {**lora, "peft_type": peft_type}
        assert F.fitting_choice(spec, "DIFFUSERS_LORA", chosen) == "KOHYA_LORA"
        assert F.fitting_choice(spec, "COMFY_LORA", chosen) == "COMFY_LORA"
        assert "DIFFUSERS_LORA" not in F.fitting_choices(spec, chosen)
    assert F.fitting_choice(spec, "DIFFUSERS_LORA", lora) == "DIFFUSERS_LORA"
    fine_tune = {**lora, "training_method": "FINE_TUNE", "peft_type": "LOHA"}
    assert F.fitting_choice(spec, "DIFFUSERS", fine_tune) == "DIFFUSERS"
    assert F.fitting_choice(spec, "KOHYA_LORA", fine_tune) == "ORIGINAL_SINGLE_FILE"


def test_every_fitted_output_format_passes_the_config_check():
    """The page's choice and Start's check come from the same config model: whatever the
    method, adapter type and previous format, the fitted format is one the engine accepts."""
    from trainer.config import (ModelFormat, PeftType, TrainingMethod, check_adapter_type,
                                check_output_format, config_from_dict)
    spec = F.SPECS["output_model_format"]
    for model_type in registry.FAMILIES:
        for method in TrainingMethod:
            if method == TrainingMethod.EMBEDDING and registry.facts(model_type).flow_matching:
                continue  # no embeddings for these families yet: check_family refuses them
            offered = F.fitting_choices(F.SPECS["peft_type"], {"model_type": model_type})
            for peft_type in PeftType:
                if peft_type.value not in offered:
                    continue  # the page does not offer it for this family
                chosen = {"model_type": model_type, "training_method": method.value,
                          "peft_type": peft_type.value}
                for previous in ModelFormat:
                    fitted = F.fitting_choice(spec, previous.value, chosen)
                    config = config_from_dict({**chosen, "output_model_format": fitted})
                    check_output_format(config)
                    check_adapter_type(config)


def test_a_flow_family_offers_lora_as_its_only_adapter_type():
    assert F.fitting_choices(F.SPECS["peft_type"], {"model_type": "FLUX_DEV_1"}) == ["LORA"]
    assert "LOHA" in F.fitting_choices(F.SPECS["peft_type"], {"model_type": "STABLE_DIFFUSION_15"})
    assert F.fitting_choice(F.SPECS["peft_type"], "LOKR", {"model_type": "CHROMA_1"}) == "LORA"


def test_only_the_transformer_offers_gguf_storage():
    """GGUF is read from a transformer file: the transformer's weight type offers it, every
    other part's (and the train and output types) does not."""
    chosen = {"model_type": "FLUX_DEV_1"}
    assert "GGUF" in F.SPECS["transformer.weight_dtype"].choices
    assert F.fitting_choices(F.SPECS["transformer.weight_dtype"], chosen) is None  # all
    for key in ("text_encoder.weight_dtype", "text_encoder_2.weight_dtype", "vae.weight_dtype",
                "unet.weight_dtype", "train_dtype", "output_dtype"):
        offered = F.fitting_choices(F.SPECS[key], chosen)
        assert offered and "GGUF" not in offered and "FLOAT_32" in offered, key
    assert F.fitting_choice(F.SPECS["text_encoder_2.weight_dtype"], "GGUF", chosen) != "GGUF"


def test_a_flow_family_offers_its_own_formats_diffusers_lora_first():
    """Flux.1, Chroma, SD 3: DIFFUSERS_LORA (their default, OneTrainer's), KOHYA_LORA,
    COMFY_LORA; a fine-tune DIFFUSERS or ORIGINAL_SINGLE_FILE. Switching from SD keeps a
    format that fits and turns LEGACY_LORA (no such layout there) into the default."""
    spec = F.SPECS["output_model_format"]
    for model_type in ("FLUX_DEV_1", "CHROMA_1", "STABLE_DIFFUSION_3", "STABLE_DIFFUSION_35"):
        lora = {"model_type": model_type, "training_method": "LORA", "peft_type": "LORA"}
        assert F.fitting_choices(spec, lora) == ["DIFFUSERS_LORA", "KOHYA_LORA", "COMFY_LORA"]
        assert F.fitting_choice(spec, "LEGACY_LORA", lora) == "DIFFUSERS_LORA"
        assert F.fitting_choice(spec, "KOHYA_LORA", lora) == "KOHYA_LORA"
        assert F.fitting_choices(spec, {**lora, "peft_type": "LOHA"}) == ["KOHYA_LORA",
                                                                          "COMFY_LORA"]
        fine_tune = {**lora, "training_method": "FINE_TUNE"}
        assert F.fitting_choices(spec, fine_tune) == ["DIFFUSERS", "ORIGINAL_SINGLE_FILE"]
        assert F.fitting_choice(spec, "LEGACY_SAFETENSORS", fine_tune) == "DIFFUSERS"
    sd15 = {"model_type": "STABLE_DIFFUSION_15", "training_method": "LORA", "peft_type": "LORA"}
    assert F.fitting_choices(spec, sd15) == ["KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA",
                                             "DIFFUSERS_LORA"]  # SD unchanged


def test_text_encoders_follow_the_model_type():
    sd15 = {"model_type": "STABLE_DIFFUSION_15", "training_method": "LORA"}
    sdxl = {**sd15, "model_type": "STABLE_DIFFUSION_XL_10_BASE"}
    assert not F.section_applies("Text encoder 2", sd15)
    assert F.section_applies("Text encoder 2", sdxl)
    assert F.section_label("Text encoder", "STABLE_DIFFUSION_15") == "Text encoder (CLIP)"
    assert F.section_label("Text encoder", "STABLE_DIFFUSION_XL_10_BASE") == \
        "Text encoder 1 (CLIP-L)"
    assert F.section_label("Text encoder 2", "STABLE_DIFFUSION_XL_10_BASE") == \
        "Text encoder 2 (CLIP-G)"


@pytest.mark.parametrize("model_type", list(registry.FAMILIES))
def test_each_family_shows_the_sections_of_its_own_parts(model_type):
    """UNet for SD 1.5 / SDXL, Transformer for Flux.1, Chroma, SD 3; each text encoder where
    the family has it (the registry's parts); the others hidden, their fields too."""
    chosen = {"model_type": model_type, "training_method": "LORA"}
    parts = registry.facts(model_type).parts
    for section, part in F.PART_SECTIONS.items():
        assert F.section_applies(section, chosen) == (part in parts), section
        for key in F.keys_in_section(section):
            if key.startswith(f"{part}.") and part not in parts:
                assert not F.applies(key, chosen), key
    # a part's weight type (drawn with the other data types) follows its part
    for part in registry.ALL_PARTS:
        assert F.applies(f"{part}.weight_dtype", chosen) == (part in parts)


def test_section_labels_say_what_each_text_encoder_is():
    label = F.section_label
    assert label("Text encoder", "FLUX_DEV_1") == "Text encoder 1 (CLIP-L)"
    assert label("Text encoder 2", "FLUX_DEV_1") == "Text encoder 2 (T5)"
    assert label("Text encoder", "CHROMA_1") == "Text encoder (T5)"
    assert label("Text encoder 3", "STABLE_DIFFUSION_35") == "Text encoder 3 (T5)"
    assert label("Text encoder", "QWEN") == "Text encoder (Qwen2.5-VL)"
    assert label("Transformer", "FLUX_DEV_1") == "Transformer"
    assert label("Text encoder 2", "STABLE_DIFFUSION_15") == "Text encoder 2"  # hidden there


def test_family_settings_show_where_the_family_reads_them():
    """The flow settings only for the flow-matching families where only they read them;
    the timestep distribution for every family (OneTrainer applies it to SD too)."""
    def shown(key, model_type):
        return F.applies(key, {"model_type": model_type, "training_method": "LORA"})
    flow = [t for t, f in registry.FAMILIES.items() if f.flow_matching]
    for model_type in registry.FAMILIES:
        is_flow = model_type in flow
        for key in ("timestep_distribution", "noising_weight", "noising_bias",
                    "timestep_shift"):
            assert shown(key, model_type), (key, model_type)
        assert shown("loss_weight_fn", model_type) == is_flow
        assert shown("min_snr_gamma", model_type) == (not is_flow)
        assert shown("dynamic_timestep_shifting", model_type) == registry.reads_switch(
            model_type, "dynamic_timestep_shifting")  # Flux.1, Z-Image
        assert registry.reads_switch("FLUX_DEV_1", "dynamic_timestep_shifting")
        assert shown("transformer.guidance_scale", model_type) == (model_type == "FLUX_DEV_1")
        assert shown("transformer.attention_mask", model_type) == (
            model_type in ("FLUX_DEV_1", "STABLE_DIFFUSION_3", "STABLE_DIFFUSION_35"))
        assert shown("transformer.model_name", model_type) == is_flow
        kinds = registry.text_encoder_kinds(model_type)
        assert shown("text_encoder_sequence_length", model_type) == (
            kinds.get("text_encoder") == "T5" or model_type == "FLUX_2")  # Flux.2's Qwen3
        assert shown("text_encoder_2_sequence_length", model_type) == (
            model_type == "FLUX_DEV_1")
        for part, kind in kinds.items():  # no clip skip on a T5
            assert shown(f"{part}.clip_skip", model_type) == kind.startswith("CLIP")
    spec = F.SPECS["loss_weight_fn"]
    assert F.fitting_choices(spec, {"model_type": "FLUX_DEV_1"}) == ["CONSTANT", "SIGMA"]
    assert F.fitting_choices(spec, {"model_type": "STABLE_DIFFUSION_15"}) == ["CONSTANT"]
    assert F.fitting_choice(spec, "SIGMA", {"model_type": "STABLE_DIFFUSION_XL_10_BASE"}) == \
        "CONSTANT"


def test_switching_the_model_type_keeps_what_applies():
    """A part the family lacks is read as off (the config), but the page keeps its switch at
    the part's own default: an SD config shown, then Flux.1 chosen, trains the transformer;
    the values the page holds for SD reach the SD config unchanged."""
    sd15 = config_from_dict({"learning_rate": 2e-4, "unet": {"learning_rate": 1e-4}})
    assert not sd15.transformer.train  # read as off: SD 1.5 has no transformer
    values = F.config_to_values(sd15)
    assert values["transformer.train"] is True and values["unet.train"] is True
    flux = F.round_trip({**page_values_of(sd15), "model_type": "FLUX_DEV_1",
                         "output_model_format": "DIFFUSERS_LORA"})
    assert flux.transformer.train and not flux.unet.train
    assert not flux.text_encoder_2.train  # T5 stays frozen by default
    assert F.config_to_values(flux)["unet.train"] is True
    again = F.round_trip(page_values_of(sd15))
    assert again == sd15


def test_custom_scheduler_fields_show_only_for_custom():
    assert "learning_rate_scheduler" in F.controlling_keys()
    assert not F.applies("custom_learning_rate_scheduler", {"learning_rate_scheduler": "COSINE"})
    assert F.applies("scheduler_params", {"learning_rate_scheduler": "CUSTOM"})


def page_values_of(config: TrainConfig) -> dict:
    """A config as the page's components hold it."""
    return {key: page_value(spec, value) for key, spec in F.SPECS.items()
            for value in [F.config_to_values(config)[key]]}


def test_values_round_trip_to_the_same_config():
    config = config_from_dict({
        "learning_rate": 2e-4, "resolution": "768x512", "epochs": 7, "lora_rank": 8,
        "text_encoder": {"learning_rate": 5e-5, "train": False, "clip_skip": 2},
        "clip_grad_norm": None, "unet": {"stop_training_after_unit": "STEP"},
        "learning_rate_scheduler": "COSINE", "masked_training": True,
        "optimizer": {"optimizer": "LION", "beta2": 0.98}}, warn=lambda m: None)
    again = F.round_trip(page_values_of(config))
    assert again == config


def test_empty_optional_number_is_none_and_empty_required_number_is_refused():
    values = page_values_of(TrainConfig())
    values["text_encoder.learning_rate"] = ""
    assert F.round_trip(values).text_encoder.learning_rate is None
    values["text_encoder.learning_rate"] = "1e-4"
    assert F.round_trip(values).text_encoder.learning_rate == pytest.approx(1e-4)
    values["epochs"] = None
    with pytest.raises(ConfigError, match=r"Epochs \(epochs\) is empty"):
        F.round_trip(values)


def test_bad_values_are_refused_naming_the_key():
    values = page_values_of(TrainConfig())
    values["resolution"] = "512x"
    with pytest.raises(ConfigError, match="resolution"):
        F.round_trip(values)
    values["resolution"] = "512"
    values["clip_grad_norm"] = "a lot"
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        F.round_trip(values)


def test_tables_round_trip_and_drop_blank_rows():
    concepts = [{"path": "/data/cats", "repeats": 2.5, "prompt_source": "concept",
                 "prompt": "a cat", "enabled": False, "loss_weight": 0.5}]
    frame = tables.concepts_frame(concepts)
    blank = tables.concepts_frame([{"path": ""}])  # the editor's empty last row
    items = tables.concepts_from_frame(pd.concat([frame, blank], ignore_index=True))
    assert [ConceptConfig.model_validate(i) for i in items] == [
        ConceptConfig.model_validate(c) for c in concepts]
    # The API form {"headers", "data"} reads the same.
    api_form = {"headers": list(frame.columns), "data": frame.values.tolist()}
    assert tables.concepts_from_frame(api_form) == items
    samples = tables.samples_from_frame(tables.samples_frame([{"prompt": "p", "seed": 3}]))
    assert samples[0]["seed"] == 3 and isinstance(samples[0]["width"], int)


def test_page_config_reads_every_component_by_key(page):
    """The Start handler's view: {component: value} -> the config, whatever the order."""
    from ui.page import shown_optimizer_values
    config = config_from_dict({"learning_rate": 1e-3, "epochs": 3, "lora_rank": 4,
                               "optimizer": {"optimizer": "SGD", "momentum": 0.5},
                               "concepts": [{"path": "/x", "repeats": 2}],
                               "samples": [{"prompt": "a dog", "width": 64, "height": 64}]},
                              warn=lambda m: None)
    values = page_values_of(config)
    data = {component: values[key] for key, component in page.fields.items()}
    shown = shown_optimizer_values(config, {})
    data.update({box: optimizers.display(shown.get(name)) if not isinstance(
        shown.get(name), bool) else shown.get(name) for name, box in page.params.items()})
    dump = config.model_dump(mode="json")
    data.update({table: tables.to_frame(F.LISTS[key].item, dump[key])
                 for key, table in page.tables.items()})
    data[page.opt_memory] = {"ADAMW": {"weight_decay": 0.05}}
    data[page.opt_current] = "SGD"
    # Shuffle the dict: nothing may depend on the order of components.
    data = dict(reversed(list(data.items())))
    result, memory = page.config(data)
    assert result.learning_rate == 1e-3 and result.epochs == 3 and result.lora_rank == 4
    assert result.optimizer.optimizer.value == "SGD" and result.optimizer.momentum == 0.5
    assert result.optimizer.beta1 is None  # AdamW's parameter is not SGD's
    assert result.concepts[0].repeats == 2 and result.samples[0].prompt == "a dog"
    assert memory["ADAMW"] == {"weight_decay": 0.05} and memory["SGD"]["momentum"] == 0.5
    assert result.optimizer_defaults["SGD"]["momentum"] == 0.5


def test_every_event_has_an_explicit_api_name():
    from ui.page import build_page
    functions = list(build_page().fns.values())
    assert len(functions) > 20
    names = [fn.api_name for fn in functions]
    assert all(names), names
    assert len(set(names)) == len(names)  # none renamed by Gradio to avoid a clash
    for name in ("start", "start_from_page", "stop", "state", "poll", "sample_now",
                 "save_now", "backup_now", "switch_optimizer", "load_preset"):
        assert name in names
