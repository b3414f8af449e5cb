"""OneTrainer's files, as its own code wrote them (tests/fixtures/onetrainer; manifest.json says
the commit and how), mean in Atelier what they meant in OneTrainer, key by key.

`MEANING` below is the table: for each Atelier setting, what OneTrainer did with its file
(read from OneTrainer's code at the fixtures' commits: its config migrations, its trainer's
step counting, its LoRA setup's layer filter). Every full file (Save config, Export, a preset
loaded and saved) goes through the CLI's path (`load_config` on the file, with the files
beside it) and must give exactly that. A partial file (a preset as OneTrainer ships it) must
give the same config as OneTrainer's own full save of it. What Atelier cannot honour is
refused with the key and its value."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from onetrainer_files import (ACCEPTED, ALL, MANIFEST, REFUSED, copy_with_concept_file, entry,
                              few_images, path, raw, tiny_overrides)
from trainer import lora
from trainer.config import check_supported, config_from_dict, load_config
from trainer.errors import ConfigError
from trainer.models import registry
from trainer.onetrainer_keys import NEUTRAL
from trainer.optim.registry import optimizer_schema
from trainer.optim.schedules import lr_multiplier

# OneTrainer's current defaults, as its code wrote them (for keys older versions lacked)
DEFAULTS = raw("sd15_lora.saved")
FULL = [n for n in ACCEPTED if "version" in entry(n) and entry(n)["version"] is not None]
PARTIAL = [n for n in ACCEPTED if n not in FULL]


def load(name: str, tmp_path: Path, extra: list[str] = ()) -> tuple:
    """The fixture as `python -m trainer train --config` reads it (a Save config whose concept
    file is not among the fixtures gets concepts by --set, as a user would give them)."""
    images = few_images(tmp_path / "images")
    config_file = copy_with_concept_file(name, tmp_path / "config", images)
    sets = []
    data = raw(name)
    if data.get("concepts") is None and not entry(name).get("concept_file"):
        sets = [f"concepts={json.dumps([{'path': str(images)}])}"]
    notes: list[str] = []
    return load_config(config_file, [*sets, *extra], warn=notes.append), notes, config_file


# --- OneTrainer's meaning of its file ---------------------------------------------------------

def get(data: dict, dotted: str, default=None):
    node = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def version(d: dict) -> int:
    return d["__version"]


def accumulation(d: dict) -> int:
    return int(d.get("gradient_accumulation_steps", 1))


def output_format(d: dict) -> str:
    """OneTrainer's migration 10: SAFETENSORS of a LoRA / fine-tune before __version 11."""
    value, method = d["output_model_format"], d["training_method"]
    if value == "SAFETENSORS" and version(d) <= 10:
        return {"LORA": "LEGACY_LORA", "FINE_TUNE": "LEGACY_SAFETENSORS"}.get(method, value)
    if value == "ORIGINAL_TRANSFORMER" and method == "FINE_TUNE":
        return "ORIGINAL_SINGLE_FILE"  # a flow family's transformer alone, in its own layout
    return value


def warmup(d: dict) -> float:
    """OneTrainer's create_lr_scheduler: a count > 1 is in batches, int(count / accumulation)
    updates (Atelier has no '1 update': a value of 1 means the whole run there)."""
    value = d["learning_rate_warmup_steps"]
    if value > 1 and accumulation(d) > 1:
        updates = int(value / accumulation(d))
        return 0 if updates == 1 else updates
    return value


def every(key: str):
    """Sampling, backups and saves every N STEP: batches in OneTrainer (its TrainProgress
    counts each batch), updates here."""
    def meaning(d: dict):
        value = d[key]
        if d[f"{key}_unit"] == "STEP" and accumulation(d) > 1:
            return max(1, round(value / accumulation(d)))
        return value
    return meaning


def trained_part(d: dict, part: str) -> bool:
    """Whether the model type has the part (OneTrainer writes every part for every type)."""
    return part in registry.facts(d["model_type"]).parts


def denoiser(d: dict) -> str:
    return registry.facts(d["model_type"]).denoiser


def encoder_kind(d: dict, part: str) -> str:
    return registry.text_encoder_kinds(d["model_type"]).get(part, "")


def part_train(part: str):
    def meaning(d: dict):
        return d[part]["train"] if trained_part(d, part) else False
    return meaning


def part_dtype(part: str):
    """Each part's weight type; NONE (__version <= 8) is the top-level one (migration 9)."""
    def meaning(d: dict):
        value = d[part]["weight_dtype"]
        return d["weight_dtype"] if value == "NONE" else value
    return meaning


def stop_after(part: str):
    """A part stops after its count of its unit; STEP counts batches (converted: the part
    trains in every update that holds one of its batches)."""
    def meaning(d: dict):
        value, unit = d[part]["stop_training_after"], d[part]["stop_training_after_unit"]
        if value is None:
            return None  # checked through the unit: never stops
        if unit == "STEP" and accumulation(d) > 1:
            return math.ceil(value / accumulation(d))
        return value
    return meaning


def stop_unit(part: str):
    def meaning(d: dict):
        section = d[part]
        if section["stop_training_after"] is None:
            return "NEVER"
        return section["stop_training_after_unit"]
    return meaning


def checkpointing(part: str):
    """__version 11: each part's own switch; before, one enum for all (OFF = none)."""
    def meaning(d: dict):
        if version(d) >= 11:
            return d[part]["gradient_checkpointing"]
        return d.get("gradient_checkpointing", "ON") != "OFF"
    return meaning


def offload_fraction(d: dict) -> float:
    """Before __version 11 one fraction, used only with CPU_OFFLOADED (migration 10); since,
    each part's own (part_offload)."""
    if version(d) >= 11:
        return 0.0
    return d["layer_offload_fraction"] if d["gradient_checkpointing"] == "CPU_OFFLOADED" else 0.0


def compile_meaning(d: dict) -> str:
    """OneTrainer's compile (speed only): off where blocks stream from the CPU, which Atelier's
    compiled blocks cannot follow."""
    parts = [p for p in registry.facts(d.get("model_type", "STABLE_DIFFUSION_15")).parts
             if isinstance(d.get(p), dict)]
    streams = offload_fraction(d) > 0 or any(part_offload(p)(d) > 0 for p in parts)
    return "ON" if d.get("compile") and not streams else "OFF"


def activation_offloading(part: str):
    """The denoiser's: its own since __version 11; before, CPU_OFFLOADED checkpointing with
    enable_activation_offloading (migration 10)."""
    def meaning(d: dict) -> bool:
        if version(d) >= 11:
            return d[part].get("activation_offloading", False)
        return (d.get("gradient_checkpointing") == "CPU_OFFLOADED"
                and d.get("enable_activation_offloading", True))
    return meaning


def part_offload(part: str):
    def meaning(d: dict) -> float:
        return d[part]["offload_fraction"] if version(d) >= 11 else 0.0
    return meaning


def layer_patterns(d: dict):
    """What OneTrainer's LoRA setup filters the UNet's layers by: layer_filter (lora_layers
    before __version 7) split at commas; an empty entry is every layer."""
    if d["training_method"] != "LORA":
        return None
    text = d.get("layer_filter", d.get("lora_layers")) or ""
    regex = d.get("layer_filter_regex", d.get("lora_layers_regex", False))
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    return patterns, bool(regex and patterns)


def fused(d: dict) -> bool:
    """OneTrainer runs its fused back pass only for optimizers that support it."""
    return bool(d["optimizer"].get("fused_back_pass")) and d["optimizer"]["optimizer"] in (
        "ADAMW", "ADAFACTOR")


def embeddings(d: dict):
    """additional_embeddings; with EMBEDDING also its main `embedding` (all_embedding_configs)."""
    listed = list(d["additional_embeddings"])
    if d["training_method"] == "EMBEDDING":
        listed = [d["embedding"], *listed]
    return [(e["placeholder"], e["token_count"], e["initial_embedding_text"], e["train"])
            for e in listed]


def clip_skip(part: str):
    """OneTrainer's `<part>_layer_skip` of a CLIP encoder the model has (on a T5 a skip is
    refused; the fixtures have none)."""
    def meaning(d: dict):
        return d.get(f"{part}_layer_skip", 0) if encoder_kind(d, part).startswith("CLIP") else 0
    return meaning


def family_switch(key: str, default):
    """A setting only some families read (Flux.1's guidance input, dynamic shifting; Flux.1's
    and SD 3's T5 mask): the file's value there, Atelier's default elsewhere (set aside)."""
    def meaning(d: dict):
        if not registry.reads_switch(d["model_type"], key):
            return default
        return get(d, key, get(DEFAULTS, key))
    return meaning


def sequence_length(key: str, part: str, default: int):
    """OneTrainer reads text_encoder_2_sequence_length for Flux.1's T5; Chroma's T5 takes its
    tokenizer's maximum (Atelier: empty = that); elsewhere the key is set aside."""
    def meaning(d: dict):
        if encoder_kind(d, part) != "T5":
            return default
        return d.get(key, DEFAULTS[key]) if key == "text_encoder_2_sequence_length" else None
    return meaning


def loss_weight_fn(d: dict) -> str:
    """CONSTANT or SIGMA as they are; MIN_SNR_GAMMA is Atelier's min_snr_gamma."""
    weight = d.get("loss_weight_fn", "CONSTANT")
    return "CONSTANT" if weight == "MIN_SNR_GAMMA" else weight


def bundle(d: dict) -> bool:
    """OneTrainer bundles into a DIFFUSERS_LORA file too; Atelier writes the embeddings beside
    it there (diffusers' loader refuses the bundle keys). Elsewhere: as set."""
    if d["output_model_format"] == "DIFFUSERS_LORA" and d["additional_embeddings"]:
        return False
    return d["bundle_additional_embeddings"]


# Atelier's setting -> OneTrainer's meaning of its file. A string is the same key in both.
MEANING: dict[str, object] = {
    **{key: key for key in (
        "model_type", "training_method", "base_model_name", "output_dtype", "train_dtype",
        "resolution", "learning_rate", "epochs", "batch_size", "gradient_accumulation_steps",
        "clip_grad_norm", "learning_rate_scheduler", "learning_rate_cycles",
        "learning_rate_min_factor", "ema", "ema_decay", "ema_update_step_interval",
        "aspect_ratio_bucketing", "latent_caching", "masked_training", "unmasked_probability",
        "unmasked_weight", "normalize_masked_area_loss", "offset_noise_weight",
        "min_noising_strength", "max_noising_strength", "mse_strength", "mae_strength",
        "huber_strength", "huber_delta", "rolling_backup", "rolling_backup_count",
        "backup_before_save", "continue_last_backup", "embedding_learning_rate",
        "preserve_embedding_norm", "lora_alpha", "lora_decompose", "peft_type",
        "sample_after_unit", "backup_after_unit", "save_every_unit",
        # timestep distributions (all families, as in OneTrainer; migration 3 for older files:
        # none here is older than __version 6)
        "timestep_distribution", "noising_weight", "noising_bias", "timestep_shift")},
    "loss_weight_fn": loss_weight_fn,
    "dynamic_timestep_shifting": family_switch("dynamic_timestep_shifting", False),
    "transformer.guidance_scale": family_switch("transformer.guidance_scale", 1.0),
    "transformer.attention_mask": family_switch("transformer.attention_mask", False),
    "transformer.model_name": lambda d: (get(d, "transformer.model_name", "")
                                         if trained_part(d, "transformer") else ""),
    "text_encoder_sequence_length": sequence_length("text_encoder_sequence_length",
                                                    "text_encoder", 512),
    "text_encoder_2_sequence_length": sequence_length("text_encoder_2_sequence_length",
                                                      "text_encoder_2", 77),
    "output_model_format": output_format,
    "learning_rate_warmup_steps": warmup,
    "sample_after": every("sample_after"),
    "backup_after": every("backup_after"),
    "save_every": every("save_every"),
    "lora_rank": lambda d: d["lokr_dim"] if d["peft_type"] == "LOKR" else d["lora_rank"],
    "lokr_decompose_factor": lambda d: d.get("lokr_decompose_factor", -1),
    "lora_dropout": lambda d: d["dropout_probability"],  # OneTrainer's LoRA dropout
    "min_snr_gamma": lambda d: (d["loss_weight_strength"]
                                if d.get("loss_weight_fn") == "MIN_SNR_GAMMA" else 0.0),
    "lora_model_name": lambda d: d["lora_model_name"] if d["training_method"] == "LORA" else "",
    "vae_model_name": lambda d: d["vae"]["model_name"],
    "vae.weight_dtype": part_dtype("vae"),
    "compile": compile_meaning,
    "layer_offload_fraction": offload_fraction,
    "fused_backward_pass": fused,
    "bundle_additional_embeddings": bundle,
    **{f"{part}.clip_skip": clip_skip(part)
       for part in ("text_encoder", "text_encoder_2", "text_encoder_3")},
    "optimizer.optimizer": lambda d: d["optimizer"]["optimizer"],
    **{f"{part}.{key}": meaning(part)
       for part in registry.ALL_PARTS
       for key, meaning in (("train", part_train), ("weight_dtype", part_dtype),
                            ("stop_training_after_unit", stop_unit),
                            ("gradient_checkpointing", checkpointing))},
    **{f"{part}.stop_training_after": stop_after(part) for part in registry.ALL_PARTS},
    **{f"{part}.offload_fraction": part_offload(part) for part in registry.ALL_PARTS},
    **{f"{part}.activation_offloading": activation_offloading(part)
       for part in ("unet", "transformer")},
    **{f"{part}.learning_rate": (lambda p: lambda d: d[p]["learning_rate"])(part)
       for part in registry.ALL_PARTS},
    **{f"{part}.caption_dropout_probability":
       (lambda p: lambda d: d[p]["dropout_probability"])(part)
       for part in ("text_encoder", "text_encoder_2", "text_encoder_3")},
}
# The settings of a part (beyond its train switch, read as off) that a model without the part
# does not have: not compared there.
PART_KEYS = tuple(registry.ALL_PARTS)


def atelier_value(config, dotted: str):
    node = config
    for key in dotted.split("."):
        node = getattr(node, key)
    return getattr(node, "value", node)


@pytest.mark.parametrize("name", FULL)
def test_each_setting_means_what_it_meant_in_onetrainer(name, tmp_path):
    config, notes, _ = load(name, tmp_path)
    d = raw(name)
    differ = {}
    for key, meaning in MEANING.items():
        part = key.split(".")[0]
        if part in PART_KEYS and not trained_part(d, part) and not key.endswith(".train"):
            continue  # a part the model lacks: OneTrainer ignores its section
        # a key an older version did not write: OneTrainer's loader keeps its default
        expected = (d.get(meaning, DEFAULTS[meaning]) if isinstance(meaning, str)
                    else meaning(d))
        if key.endswith(".stop_training_after") and expected is None:
            continue  # no count: the unit says NEVER (checked)
        got = atelier_value(config, key)
        if got != expected:
            differ[key] = (got, expected)
    assert not differ, differ
    # the optimizer's own parameters: Atelier's for it, as OneTrainer's file set them
    for param in optimizer_schema(config.optimizer.optimizer):
        expected = d["optimizer"].get(param.name)
        if param.name == "stochastic_rounding" and d["optimizer"]["optimizer"] not in (
                "ADAMW", "ADAFACTOR"):
            expected = None  # OneTrainer rounds stochastically with those two only
        assert getattr(config.optimizer, param.name) == expected, param.name
    if d["training_method"] == "LORA":
        patterns, regex = lora.layer_patterns(config)
        assert ([p for p in patterns if p], regex) == layer_patterns(d)
    assert [(e.placeholder, e.token_count, e.initial_embedding_text, e.train)
            for e in config.additional_embeddings] == embeddings(d)
    # every key was understood: renamed, honoured, or set aside in the one summary line
    assert not [n for n in notes if n.startswith("Unknown")], notes
    assert len([n for n in notes if "set aside" in n]) == 1


@pytest.mark.parametrize("name", [n for n in FULL
                                  if raw(n).get("concepts") or entry(n).get("concept_file")])
def test_concepts_keep_onetrainers_settings(name, tmp_path):
    """Concepts packed in (Export) or read from the concept file beside the config: repeats
    (balancing; SAMPLES = that many images per epoch), flip, crop jitter, resolution override,
    caption source, loss weight, as OneTrainer's ConceptConfig set them."""
    config, _, config_file = load(name, tmp_path)
    listed = raw(name).get("concepts")
    if listed is None:
        listed = json.loads((path(name).parent / entry(name)["concept_file"]).read_text())
    assert len(config.concepts) == len(listed)
    for concept, theirs in zip(config.concepts, listed):
        images = len(list(Path(concept.path).glob("*.jpg")))
        image = theirs["image"]
        repeats = (theirs["balancing"] if theirs["balancing_strategy"] == "REPEATS"
                   else theirs["balancing"] / images)
        assert concept.repeats == pytest.approx(repeats)
        assert (concept.random_flip, concept.crop_jitter) == (image["enable_random_flip"],
                                                              image["enable_crop_jitter"])
        assert concept.resolution == (image["resolution_override"]
                                      if image["enable_resolution_override"] else "")
        assert (concept.prompt_source.value, concept.loss_weight, concept.enabled,
                concept.include_subdirectories) == (
            theirs["text"]["prompt_source"], theirs["loss_weight"], theirs["enabled"],
            theirs["include_subdirectories"])


def same_run(config) -> dict:
    """What a config trains, for comparing two readings of one job: the optimizer by its
    effective parameters, without the places it writes to, the LoRA settings only for a LoRA,
    an embedding without OneTrainer's random id."""
    from trainer.optim.registry import resolve_parameters
    data = config.model_dump(mode="json", exclude={"workspace_dir", "output_model_destination",
                                                   "optimizer_defaults"})
    data["optimizer"] = resolve_parameters(config.optimizer.optimizer,
                                           config.optimizer.model_dump(exclude={"optimizer"}))
    if config.training_method.value != "LORA":
        for key in [k for k in data if k.startswith(("lora_", "layer_", "lokr_", "peft_"))]:
            data.pop(key)
    else:  # the layers by what they select (a preset, or the same filter written out)
        for key in ("lora_layer_preset", "layer_filter", "layer_filter_regex"):
            data.pop(key)
        data["layers"] = lora.layer_patterns(config)
    for embedding in data["additional_embeddings"]:
        embedding.pop("uuid")
    return data


@pytest.mark.parametrize("name", PARTIAL)
def test_a_preset_means_what_onetrainers_own_save_of_it_means(name, tmp_path):
    """A preset as OneTrainer shipped it before 2025-12 (partial, no layer key: the rest is
    OneTrainer's defaults) gives the config of its full save by that commit's own UI, which
    picked the attn-mlp layers for it."""
    ours, notes, _ = load(name, tmp_path / "a")
    theirs, _, _ = load(f"{name}.v6.saved", tmp_path / "a")
    assert same_run(ours) == same_run(theirs)
    assert ours.lora_layer_preset.value == "attn-mlp"
    assert any("hard-coded layers" in n for n in notes)


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith("preset.") and n not in REFUSED])
def test_a_current_preset_file_means_what_onetrainers_save_of_it_means(name, tmp_path):
    """OneTrainer's preset file itself (its values are in the manifest), read as OneTrainer's,
    and OneTrainer's own save of it after its UI loaded it give the same run."""
    theirs, _, _ = load(name, tmp_path)
    preset = {**entry(name)["preset_values"], "concepts": theirs.model_dump()["concepts"]}
    ours = config_from_dict(preset, warn=lambda m: None, onetrainer=True)
    assert same_run(ours) == same_run(theirs)


# --- Refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, key", REFUSED.items())
def test_what_atelier_cannot_honour_is_refused_with_key_and_value(name, key, tmp_path):
    with pytest.raises(ConfigError) as error:
        load(name, tmp_path)
    message = str(error.value)
    assert message.startswith(key) or f"{key}:" in message, message
    value = {"model_type": raw(name)["model_type"], "peft_type": "OFT_2",
             "optimizer.optimizer": "CAME", "concepts[1].type": "VALIDATION",
             "transformer.weight_dtype": str(get(raw(name), key))}[key]
    assert value in message


@pytest.mark.parametrize("key", sorted(NEUTRAL))
def test_a_key_that_would_change_the_run_is_never_set_aside_silently(key, tmp_path):
    """Each key Atelier has no setting for is set aside only at the value that means what
    Atelier does; any other value of it (here: a saved config with it changed) is refused."""
    data = raw("sd15_lora.saved")
    neutral = NEUTRAL[key][0]
    data[key] = ({"NONE": "BATCH", "UNIFORM": "SIGMOID", "FLOAT_32": "BFLOAT_16"}.get(neutral)
                 if isinstance(neutral, str) else (not neutral if isinstance(neutral, bool)
                                                   else 0.5))
    data["concepts"] = [{"path": str(few_images(tmp_path / "images"))}]
    with pytest.raises(ConfigError, match=key):
        config_from_dict(data, warn=lambda m: None)


def test_a_save_configs_concept_file_is_read_beside_it_and_named_when_missing(tmp_path):
    name = "sd15_lora_embedding_masked.saved"
    config, notes, _ = load(name, tmp_path / "beside")
    assert len(config.concepts) == 1 and any("read from 'training_concepts/mychar.json'" in n
                                             for n in notes)
    alone = tmp_path / "alone" / path(name).name
    alone.parent.mkdir()
    alone.write_text(path(name).read_text())
    with pytest.raises(ConfigError, match="concept_file_name.*training_concepts/mychar.json"):
        load_config(alone, warn=lambda m: None)
    with pytest.raises(ConfigError, match="concept_file_name"):  # no file at all: the API
        config_from_dict(raw(name), warn=lambda m: None)


# --- Counting as OneTrainer counts --------------------------------------------------------------

def test_warm_up_with_accumulation_matches_onetrainers_count(tmp_path):
    """Warm-up 40 with accumulation 4: OneTrainer ramps over int(40 / 4) = 10 updates. The
    learning rate of every update, over a 100-batch epoch x 2, equals what OneTrainer's own
    create_lr_scheduler gave (run by the fixture script, in the manifest)."""
    name = "sd15_lora_accumulation.saved"
    config, notes, _ = load(name, tmp_path)
    assert (raw(name)["learning_rate_warmup_steps"], config.learning_rate_warmup_steps) == (40, 10)
    theirs = entry(name)["expected_lr_schedule"]
    updates = theirs["updates"]
    ours = [lr_multiplier(step, updates, config.learning_rate_scheduler,
                          warmup=config.learning_rate_warmup_steps,
                          min_factor=config.learning_rate_min_factor,
                          cycles=config.learning_rate_cycles) for step in range(updates)]
    assert ours == pytest.approx(theirs["multipliers"], abs=1e-12)
    assert theirs["multipliers"][9] < 1 == theirs["multipliers"][10]  # 10 updates of warm-up
    # the other STEP counts: sampling every 8 batches = 2 updates, the text encoder's 6
    # batches = the 2 updates that hold them; said in one note
    assert (config.sample_after, config.text_encoder.stop_training_after) == (2, 2)
    assert any(n.startswith("STEP counts") and "40 -> 10" in n for n in notes)


# --- Older files' layers, the second text encoder -------------------------------------------

@pytest.mark.parametrize("name, preset, patterns", [
    ("sd15_lora_null_preset.v6.saved", "full", []),      # null: OneTrainer's migration 6
    ("sd15_lora.v6.saved", "attn-mlp", ["attentions"]),  # its LoRA tab's choice
    ("sd15_lora.v10.saved", "attn-mlp", ["attentions"]),
    ("old_preset.sd15_lora", "attn-mlp", ["attentions"]),  # no key: the hard-coded set
    ("sd15_lora.saved", "full", []),                     # the current default
])
def test_older_files_train_the_layers_onetrainer_meant(name, preset, patterns, tmp_path):
    config, _, _ = load(name, tmp_path)
    assert config.lora_layer_preset.value == preset
    assert lora.layer_patterns(config)[0] == patterns


def test_a_second_text_encoder_switch_is_ignored_on_sd15(tmp_path):
    """OneTrainer saves text_encoder_2.train (on) for every model type; SD 1.5 has none."""
    name = "sd15_lora.saved"
    assert raw(name)["text_encoder_2"]["train"] is True
    config, _, _ = load(name, tmp_path)
    assert not config.text_encoder_2.train
    check_supported(config)


def test_set_aside_keys_are_counted_by_kind_in_one_line(tmp_path):
    _, notes, _ = load("sdxl_lora.saved", tmp_path)
    (line,) = [n for n in notes if "set aside" in n]
    for kind in ("for other model families", "cloud training", "of optimizers not chosen",
                 "OneTrainer's app, logging and machine settings"):
        assert kind in line
    assert "'unet.attention_mask'" in line and "'cloud'" in line  # a few names of each
    assert len(line) < 1500


# --- Continuing a LoRA (lora_model_name) ------------------------------------------------------

def test_lora_model_name_continues_that_lora(request, tmp_path):
    """OneTrainer's lora_model_name: training starts from that file's weights. Trained first
    without it, then again from its file with a learning rate too small to move anything: the
    second run's file holds the first's weights."""
    from safetensors.torch import load_file

    from trainer.loop import train
    name = "sd15_lora_continue.saved"
    model_dir = request.getfixturevalue("tiny_sd15_dir")
    images = few_images(tmp_path / "images")
    base = tiny_overrides(name, model_dir, tmp_path / "first", images)
    first = train(load_config(path(name), [*base, 'lora_model_name=""'], warn=lambda m: None))
    previous = load_file(first.output_path)
    config = load_config(path(name), [*tiny_overrides(name, model_dir, tmp_path / "second", images),
                                      f"lora_model_name={json.dumps(first.output_path)}",
                                      "learning_rate=1e-30"], warn=lambda m: None)
    assert config.lora_model_name == first.output_path
    continued = load_file(train(config).output_path)
    assert continued.keys() == previous.keys()
    assert any(v.abs().max() > 0 for k, v in previous.items() if "lora_up" in k)
    for key, value in previous.items():
        assert continued[key].float().allclose(value.float(), atol=1e-6), key
    # a file with the text encoder's layers, the text encoder not trained here: refused
    with_te = train(load_config(path(name), [
        *tiny_overrides(name, model_dir, tmp_path / "te", images), 'lora_model_name=""',
        "text_encoder.train=true"], warn=lambda m: None))
    config = load_config(path(name), [*tiny_overrides(name, model_dir, tmp_path / "third", images),
                                      f"lora_model_name={json.dumps(with_te.output_path)}"],
                         warn=lambda m: None)
    with pytest.raises(ConfigError, match="lora_model_name.*text_encoder"):
        train(config)


def test_the_manifest_records_how_each_file_was_made():
    for name in ALL:
        commits = {c["hash"] for c in MANIFEST["onetrainer"]["commits"].values()}
        assert entry(name)["commit"] in commits
        assert entry(name)["how"] and path(name).is_file()
