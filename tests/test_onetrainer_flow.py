"""OneTrainer's files for the flow-matching families (Flux.1, Chroma, SD 3), written by its own
code (tests/fixtures/onetrainer: its presets '#flux LoRA', '#chroma LoRA 8GB/16GB/24GB', '#sd 3
LoRA', '#sd 3' loaded and saved by its UI, a saved Flux LoRA whose user set the quantized
weights to BFLOAT_16, and one whose user read the transformer from a GGUF file): each imports
as its author meant, field by field, quantized weights (FLOAT_8, NFLOAT_4, GGUF) and their layer
filter included. Then the import's rules for these families, on OneTrainer's own files with one
key changed as a user would change it."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from onetrainer_files import (FIXTURES, MANIFEST, TRAIN_DTYPES_ON_CPU, entry, raw,
                              tiny_overrides)
from trainer.config import check_supported, config_from_dict, load_config
from trainer.errors import ConfigError

CONCEPTS = [{"path": "images"}]


def imported(data: dict) -> tuple:
    """A OneTrainer file's dict through the import (concepts given, as --set would)."""
    notes: list[str] = []
    config = config_from_dict({**data, "concepts": CONCEPTS}, warn=notes.append,
                              onetrainer=True)
    return config, notes


def read(name: str) -> tuple:
    notes: list[str] = []
    config = load_config(FIXTURES / entry(name)["file"], [f"concepts={json.dumps(CONCEPTS)}"],
                         warn=notes.append)
    return config, notes


def value(config, dotted: str):
    node = config
    for key in dotted.split("."):
        node = getattr(node, key)
    return getattr(node, "value", node)


# What each file means, as OneTrainer trains it (its preset's values, its defaults for the rest:
# TrainConfig.default_values, the LoRA tab's 'full' for a preset naming no layers).
MEANT = {
    "flux_lora_bf16.saved": {
        "model_type": "FLUX_DEV_1", "training_method": "LORA", "learning_rate": 3e-4,
        "resolution": "768", "batch_size": 4, "train_dtype": "BFLOAT_16",
        "output_model_format": "DIFFUSERS_LORA", "lora_layer_preset": "full",
        "timestep_distribution": "LOGIT_NORMAL", "noising_weight": 0.0, "noising_bias": 0.0,
        "timestep_shift": 1.0, "dynamic_timestep_shifting": True, "loss_weight_fn": "CONSTANT",
        "transformer.train": True, "transformer.weight_dtype": "BFLOAT_16",
        "transformer.guidance_scale": 1.0, "transformer.attention_mask": False,
        "text_encoder.train": False, "text_encoder.weight_dtype": "BFLOAT_16",
        "text_encoder_2.train": False, "text_encoder_2.weight_dtype": "BFLOAT_16",
        "text_encoder_2_sequence_length": 77, "vae.weight_dtype": "FLOAT_32",
        "unet.train": False, "backup_after": 10},
    "preset.chroma_lora_24gb.saved": {
        "model_type": "CHROMA_1", "training_method": "LORA", "learning_rate": 3e-4,
        "resolution": "512", "batch_size": 2, "train_dtype": "BFLOAT_16",
        "output_dtype": "BFLOAT_16", "output_model_format": "DIFFUSERS_LORA",
        "lora_layer_preset": "attn-mlp", "timestep_distribution": "INVERTED_PARABOLA",
        "noising_weight": 7.7, "noising_bias": 0.0, "timestep_shift": 1.0,
        "dynamic_timestep_shifting": False, "transformer.train": True,
        "transformer.weight_dtype": "BFLOAT_16", "text_encoder.train": False,
        "text_encoder.weight_dtype": "BFLOAT_16",
        # OneTrainer reads no length for Chroma's T5: its tokenizer's maximum (empty here)
        "text_encoder_sequence_length": None, "text_encoder_2.train": False},
    "preset.sd3_lora.saved": {
        "model_type": "STABLE_DIFFUSION_3", "training_method": "LORA", "learning_rate": 3e-4,
        "resolution": "1024", "batch_size": 4, "train_dtype": "FLOAT_16",
        "output_model_format": "DIFFUSERS_LORA", "lora_layer_preset": "full",
        "timestep_distribution": "LOGIT_NORMAL", "timestep_shift": 1.0,
        "transformer.train": True, "transformer.weight_dtype": "FLOAT_16",
        "text_encoder.train": False, "text_encoder_2.train": False,
        "text_encoder_3.train": False, "text_encoder_3.weight_dtype": "FLOAT_16"},
    "preset.sd3_finetune.saved": {
        "model_type": "STABLE_DIFFUSION_3", "training_method": "FINE_TUNE",
        "learning_rate": 3e-6, "resolution": "1024", "output_dtype": "FLOAT_16",
        "output_model_format": "ORIGINAL_SINGLE_FILE", "timestep_distribution": "LOGIT_NORMAL",
        "transformer.train": True, "transformer.weight_dtype": "FLOAT_32",
        "text_encoder.train": False, "text_encoder_2.train": False,
        "text_encoder_3.train": False, "text_encoder_3.weight_dtype": "FLOAT_16"},
}
# OneTrainer's presets that store frozen weights quantized: the same files with those weights
# (the manifest's and the fixtures' only differences), and OneTrainer's quantization filter.
MEANT["preset.flux_lora.saved"] = {
    **MEANT["flux_lora_bf16.saved"], "transformer.weight_dtype": "NFLOAT_4",
    "text_encoder_2.weight_dtype": "NFLOAT_4", "quantization.layer_filter_preset": "full"}
# The Flux preset with a GGUF file in "Override Transformer / GGUF" and the transformer's type
# GGUF (its tooltip's rule), T5 in BFLOAT_16: the transformer read pre-quantized from that file.
MEANT["flux_lora_gguf.saved"] = {
    **MEANT["flux_lora_bf16.saved"], "transformer.weight_dtype": "GGUF",
    "transformer.model_name": "/data/models/flux1-dev-Q8_0.gguf"}
MEANT["preset.chroma_lora_16gb.saved"] = {
    **MEANT["preset.chroma_lora_24gb.saved"], "transformer.weight_dtype": "FLOAT_8",
    "quantization.layer_filter_preset": "blocks"}


@pytest.mark.parametrize("name", MEANT)
def test_the_file_imports_as_its_author_meant_field_by_field(name):
    config, notes = read(name)
    differ = {key: (value(config, key), meant) for key, meant in MEANT[name].items()
              if value(config, key) != meant}
    assert not differ, differ
    assert not [n for n in notes if n.startswith("Unknown")], notes
    check_supported(config)  # and the run may start


def test_the_8gb_chroma_preset_imports_its_float8_weights_and_offloading():
    """'#chroma LoRA 8GB' is the 16 GB one with T5 in FLOAT_8 and 60 % of the transformer
    streamed from the CPU: both import as meant (OneTrainer's 'blocks' filter too)."""
    config, notes = imported(copy.deepcopy(raw("preset.chroma_lora_8gb.saved")))
    meant = {**MEANT["preset.chroma_lora_16gb.saved"], "text_encoder.weight_dtype": "FLOAT_8",
             "transformer.offload_fraction": 0.6, "text_encoder.offload_fraction": 0.0}
    differ = {key: (value(config, key), want) for key, want in meant.items()
              if value(config, key) != want}
    assert not differ, differ
    check_supported(config)


def test_the_bfloat16_variant_differs_from_the_preset_only_where_its_user_changed_it():
    """The saved Flux LoRA is OneTrainer's preset with the transformer's and T5's weights set
    to BFLOAT_16 (the manifest records the steps): it imports and validates, and with those
    two values put back it is the preset."""
    preset, saved = raw("preset.flux_lora.saved"), raw("flux_lora_bf16.saved")
    assert entry("flux_lora_bf16.saved")["how"][1].startswith(
        "TopBarController.load_config_from_file('training_presets/Flux Dev.1/#flux LoRA.json')")
    for part in ("transformer", "text_encoder_2"):
        assert (preset[part]["weight_dtype"], saved[part]["weight_dtype"]) == ("NFLOAT_4",
                                                                              "BFLOAT_16")
        saved[part]["weight_dtype"] = "NFLOAT_4"
    assert saved == preset
    check_supported(read("flux_lora_bf16.saved")[0])


def test_the_quantization_filter_with_nothing_quantized_is_said_not_refused():
    """#chroma LoRA 24GB keeps OneTrainer's 'blocks' quantization filter with every part in
    BFLOAT_16: OneTrainer quantizes nothing with it, and the import says so."""
    _, notes = read("preset.chroma_lora_24gb.saved")
    assert any(n.startswith("quantization.layer_filter 'transformer_block', quantization."
                            "layer_filter_preset 'blocks'") and "change nothing" in n
               for n in notes)


# --- The import's rules for these families ----------------------------------------------------

def flux(**changes) -> dict:
    """OneTrainer's saved Flux LoRA (BFLOAT_16) with a user's changes (dotted keys)."""
    data = copy.deepcopy(raw("flux_lora_bf16.saved"))
    for dotted, new in changes.items():
        node = data
        *sections, key = dotted.split("__")
        for section in sections:
            node = node[section]
        node[key] = new
    return data


def test_flux_keys_mean_what_they_meant():
    config, _ = imported(flux(transformer__guidance_scale=3.5, transformer__attention_mask=True,
                              text_encoder_2_sequence_length=512, timestep_shift=3.0,
                              dynamic_timestep_shifting=False, loss_weight_fn="SIGMA",
                              noising_weight=0.5, noising_bias=-0.2,
                              transformer__learning_rate=1e-4,
                              transformer__model_name="flux1-dev.safetensors",
                              text_encoder__train=True, text_encoder_layer_skip=1))
    assert (config.transformer.guidance_scale, config.transformer.attention_mask) == (3.5, True)
    assert config.text_encoder_2_sequence_length == 512 and config.timestep_shift == 3.0
    assert not config.dynamic_timestep_shifting and config.loss_weight_fn.value == "SIGMA"
    assert (config.noising_weight, config.noising_bias) == (0.5, -0.2)
    assert config.transformer.learning_rate == 1e-4
    assert config.transformer.model_name == "flux1-dev.safetensors"
    assert config.text_encoder.train and config.text_encoder.clip_skip == 1  # CLIP-L
    check_supported(config)


@pytest.mark.parametrize("changes, refused", [
    ({"text_encoder_2_layer_skip": 2}, "text_encoder_2_layer_skip: 2 cannot be trained here: "
                                       "Flux.1's text_encoder_2 is T5"),
    ({"text_encoder__include": False}, "text_encoder.include: False cannot be trained here"),
    ({"loss_weight_fn": "MIN_SNR_GAMMA"}, "loss_weight_fn: 'MIN_SNR_GAMMA' cannot be trained "
                                          "here: Flux.1 is a flow-matching model"),
    ({"loss_weight_fn": "DEBIASED_ESTIMATION"}, "loss_weight_fn: 'DEBIASED_ESTIMATION'"),
    ({"training_method": "FINE_TUNE", "output_model_format": "LEGACY_SAFETENSORS"}, None),
    ({"output_model_format": "ORIGINAL_LORA"},
     "output_model_format: ORIGINAL_LORA (OneTrainer's original-namespace LoRA with fused qkv) "
     "is not a format Atelier writes; for Flux.1 and training_method LORA it writes "
     "DIFFUSERS_LORA, KOHYA_LORA, COMFY_LORA"),
    ({"quantization__svd_dtype": "BFLOAT_16", "transformer__weight_dtype": "INT_8"},
     "quantization.svd_dtype: 'BFLOAT_16' cannot be trained here: SVDQuant"),
    ({"transformer__weight_dtype": "GGUF_A8_FLOAT"},
     "transformer.weight_dtype: GGUF_A8_FLOAT (weights from a GGUF file with float8 "
     "activations) is not built in Atelier"),
])
def test_what_flux_would_do_differently_is_refused_naming_the_key(changes, refused):
    data = flux(**changes)
    if refused is None:  # accepted by the import, refused at the start
        config, _ = imported(data)
        with pytest.raises(ConfigError, match="writes no LEGACY_SAFETENSORS for Flux.1"):
            check_supported(config)
        return
    with pytest.raises(ConfigError) as error:
        imported(data)
    assert str(error.value).startswith(refused), str(error.value)


def test_the_gguf_file_differs_from_the_bfloat16_one_only_in_its_transformer():
    """Both are OneTrainer's #flux LoRA with T5 set to BFLOAT_16 (the manifest records the
    steps); the GGUF one names a .gguf file in "Override Transformer / GGUF" and sets the
    transformer's type to GGUF, as that field's tooltip asks. Everything else is the same."""
    gguf, plain = raw("flux_lora_gguf.saved"), raw("flux_lora_bf16.saved")
    assert entry("flux_lora_gguf.saved")["how"][1] == entry("flux_lora_bf16.saved")["how"][1]
    assert (gguf["transformer"]["model_name"], gguf["transformer"]["weight_dtype"]) == (
        "/data/models/flux1-dev-Q8_0.gguf", "GGUF")
    gguf["transformer"] = {**gguf["transformer"], "model_name": "", "weight_dtype": "BFLOAT_16"}
    assert gguf == plain


def test_gguf_needs_its_file_and_a_gguf_file_needs_gguf():
    """OneTrainer reads a GGUF transformer only with both set (the tooltip's rule): each alone,
    in OneTrainer's own file, is refused when the run starts, naming the key to set."""
    config, _ = imported(flux(transformer__weight_dtype="GGUF"))  # and no file
    assert config.transformer.weight_dtype.value == "GGUF"
    with pytest.raises(ConfigError, match=r"^transformer\.weight_dtype = GGUF reads the "
                                          r"transformer pre-quantized from a \.gguf file: set "
                                          r"transformer\.model_name"):
        check_supported(config)
    gguf = raw("flux_lora_gguf.saved")
    gguf["transformer"]["weight_dtype"] = "BFLOAT_16"
    config, _ = imported(gguf)
    with pytest.raises(ConfigError, match=r"^transformer\.model_name: '/data/models/flux1-dev-"
                                          r"Q8_0\.gguf' is a GGUF file.*set transformer\."
                                          r"weight_dtype to GGUF"):
        check_supported(config)


def test_under_gguf_the_quantization_filter_and_svdquant_change_nothing():
    """OneTrainer applies neither its layer filter nor SVDQuant to a plain GGUF transformer
    (the file says which layers are packed): the import says the filter changes nothing and
    sets SVDQuant aside, where a quantized transformer's SVDQuant is refused."""
    data = raw("chroma_lora_gguf_a8_int.saved")
    data["transformer"]["weight_dtype"] = "GGUF"
    data["quantization"]["svd_dtype"] = "BFLOAT_16"
    assert data["quantization"]["layer_filter_preset"] != "full"
    config, notes = imported(copy.deepcopy(data))
    check_supported(config)
    assert any("the transformer's weights are read packed as its GGUF file stores them, so "
               "they change nothing" in note for note in notes), notes
    data["transformer"]["weight_dtype"] = "FLOAT_8"
    with pytest.raises(ConfigError, match=r"^quantization\.svd_dtype: 'BFLOAT_16' cannot"):
        imported(data)


def test_gguf_with_int8_activations_is_refused_and_without_them_accepted():
    """OneTrainer's 'GGUF A8 int' (the file's weights, activations quantized to int8 for its own
    matmuls) is not built: refused naming the key and value. The same Chroma file with plain
    GGUF (weights from the file, activations left unquantized) is accepted."""
    data = raw("chroma_lora_gguf_a8_int.saved")
    assert data["transformer"]["weight_dtype"] == "GGUF_A8_INT"
    with pytest.raises(ConfigError, match=r"^transformer\.weight_dtype: GGUF_A8_INT \(weights "
                                          r"from a GGUF file with int8 activations\) is not "
                                          r"built in Atelier"):
        imported(copy.deepcopy(data))
    data["transformer"]["weight_dtype"] = "GGUF"
    config, _ = imported(data)
    assert (config.transformer.weight_dtype.value, config.transformer.model_name) == (
        "GGUF", "/data/models/Chroma1-HD-Q8_0.gguf")
    check_supported(config)


def test_t5_training_is_refused_when_the_run_starts():
    """OneTrainer writes text_encoder_2.train for Flux (its T5); its presets switch it off.
    Switched on, the import keeps it and the run is refused with the reason."""
    config, _ = imported(flux(text_encoder_2__train=True))
    with pytest.raises(ConfigError, match="text_encoder_2.train: T5 training is not supported"):
        check_supported(config)


def test_a_flow_single_file_is_the_transformer_in_its_original_layout():
    """OneTrainer's ORIGINAL_TRANSFORMER (Flux.1, Chroma) is Atelier's ORIGINAL_SINGLE_FILE
    for these families; SD 3's ORIGINAL_SINGLE_FILE is kept, said to hold the transformer only."""
    chroma = raw("preset.chroma_lora_24gb.saved")
    config, notes = imported({**chroma, "training_method": "FINE_TUNE",
                              "output_model_format": "ORIGINAL_TRANSFORMER"})
    assert config.output_model_format.value == "ORIGINAL_SINGLE_FILE"
    assert any(n.startswith("output_model_format ORIGINAL_TRANSFORMER: Chroma's transformer")
               for n in notes)
    config, notes = read("preset.sd3_finetune.saved")
    assert any("also packs the text encoders and VAE" in n for n in notes)
    sd15 = {**raw("sd15_finetune_ema.saved"), "output_model_format": "ORIGINAL_TRANSFORMER"}
    with pytest.raises(ConfigError, match="ORIGINAL_TRANSFORMER .* is not a format Atelier "
                                          "writes; for Stable Diffusion 1.5"):
        imported(sd15)


def test_settings_a_family_does_not_read_are_set_aside_as_onetrainer_ignores_them():
    """SD 3 reads no guidance input, no dynamic shift and no T5 length key (OneTrainer: 77
    tokens fixed); Chroma no attention-mask switch (it always masks): their values change
    nothing there, in OneTrainer as here."""
    sd3 = {**raw("preset.sd3_lora.saved"), "dynamic_timestep_shifting": True,
           "text_encoder_2_sequence_length": 256}
    sd3["transformer"] = {**sd3["transformer"], "guidance_scale": 4.0, "attention_mask": True}
    config, notes = imported(sd3)
    assert not config.dynamic_timestep_shifting and config.transformer.guidance_scale == 1.0
    assert config.transformer.attention_mask  # SD 3 reads it (T5's mask)
    assert config.text_encoder_2_sequence_length == 77  # Atelier's default, not read by SD 3
    line = next(n for n in notes if "set aside" in n)
    assert "for other model families ('transformer.guidance_scale'" in line
    check_supported(config)
    chroma = copy.deepcopy(raw("preset.chroma_lora_24gb.saved"))
    chroma["transformer"]["attention_mask"] = True
    chroma["text_encoder_sequence_length"] = 256
    config, notes = imported(chroma)
    assert not config.transformer.attention_mask and config.text_encoder_sequence_length is None
    assert any(n.startswith("text_encoder_sequence_length 256: OneTrainer reads no sequence "
                            "length for Chroma's T5") for n in notes)


def test_the_distributions_apply_to_sd_files_too():
    """OneTrainer draws SD 1.5 / SDXL timesteps by the same settings: no longer refused."""
    sd15 = {**raw("sd15_lora.saved"), "timestep_distribution": "LOGIT_NORMAL",
            "noising_weight": 0.3, "noising_bias": 0.1, "timestep_shift": 2.0}
    config, _ = imported(sd15)
    assert (config.timestep_distribution.value, config.noising_weight, config.noising_bias,
            config.timestep_shift) == ("LOGIT_NORMAL", 0.3, 0.1, 2.0)
    check_supported(config)
    with pytest.raises(ConfigError, match="loss_weight_fn: 'SIGMA' cannot be trained here: "
                                          "Atelier weights Stable Diffusion 1.5's loss"):
        imported({**raw("sd15_lora.saved"), "loss_weight_fn": "SIGMA"})
    config, notes = imported({**raw("sd15_lora.saved"), "dynamic_timestep_shifting": True})
    assert not config.dynamic_timestep_shifting  # OneTrainer reads it for Flux.1 only


@pytest.mark.parametrize("version, weight, bias, meant", [
    (3, 4.0, 0.7, ("SIGMOID", 4.0, 0.2)),    # migration 3: the bias counted from 0.5
    (3, 4.0, None, ("SIGMOID", 4.0, 0.0)),   # its default bias was 0.5
    (3, 0.0, 0.7, ("UNIFORM", 0.0, 0.0)),    # no weight: uniform, both reset
    (None, 4.0, 0.6, ("SIGMOID", 4.0, 0.1)),  # no version, no distribution: that old
    (4, 4.0, 0.7, ("UNIFORM", 4.0, 0.7)),    # from __version 4 on the values are as written
])
def test_noising_weights_of_older_files_mean_a_sigmoid(version, weight, bias, meant):
    """OneTrainer's migration 3 (modules/util/config/TrainConfig.py, __version 3 -> 4)."""
    data = {"model_type": "STABLE_DIFFUSION_15", "training_method": "LORA",
            "noising_weight": weight, "weight_dtype": "FLOAT_32"}
    if bias is not None:
        data["noising_bias"] = bias
    if version is not None:
        data["__version"] = version
    config, _ = imported(data)
    assert (config.timestep_distribution.value, config.noising_weight,
            config.noising_bias) == (meant[0], meant[1], pytest.approx(meant[2]))


def test_an_older_flux_files_prior_is_its_transformer():
    """OneTrainer's migration 8 (__version 8 -> 9): the transformer families' denoiser was
    `prior`."""
    data = {"__version": 8, "model_type": "FLUX_DEV_1", "training_method": "LORA",
            "weight_dtype": "BFLOAT_16", "prior": {"train": True, "learning_rate": 2e-4},
            "text_encoder": {"train": False}, "text_encoder_2": {"train": False}}
    config, _ = imported(data)
    assert config.transformer.train and config.transformer.learning_rate == 2e-4
    assert config.transformer.weight_dtype.value == "BFLOAT_16"  # migration 9's one type


# --- Trained on the tiny models, as their authors meant ---------------------------------------
# Each accepted file runs through the path a user's file takes (load_config with --set, then
# train) on the tiny model of its type, with only paths, sizes (64 px, one epoch) and CPU types
# changed (tests/onetrainer_files.py); the rest is the file's. Spies on the step check that what
# the file meant reached the run.

TINY_FLOW_DIRS = {"FLUX_DEV_1": "tiny_flux_dir", "CHROMA_1": "tiny_chroma_dir",
                  "STABLE_DIFFUSION_3": "tiny_sd3_dir", "Z_IMAGE": "tiny_z_image_dir",
                  "QWEN": "tiny_qwen_image_dir", "FLUX_2": "tiny_flux2_dir"}


def flow_overrides(name: str, model_dir: Path, tmp_path: Path, images: Path) -> list[str]:
    """tiny_overrides, and the flow parts' float16 as float32 (float16 needs a CUDA GPU):
    OneTrainer's SD 3 presets keep the transformer and T5 in FLOAT_16."""
    sets = tiny_overrides(name, model_dir, tmp_path, images)
    for part in ("transformer", "text_encoder_3"):
        if (raw(name).get(part) or {}).get("weight_dtype") in TRAIN_DTYPES_ON_CPU:
            sets.append(f'{part}.weight_dtype="{TRAIN_DTYPES_ON_CPU["FLOAT_16"]}"')
    return sets


class Spy:
    """What the run's steps did: the timestep draws' arguments (the objective's draw, not the
    check at the start), each transformer call (its inputs; at the first, which parameters
    train, and its modules), and each text encoder call (with gradients to its weights or
    not)."""

    def __init__(self, monkeypatch):
        import diffusers
        import transformers

        import trainer.models.objectives as objectives
        self.draws: list[dict] = []
        self.calls: list[dict] = []
        self.trainable: list[str] | None = None  # at the first call
        self.parameters: list[str] = []
        self.modules: dict[str, torch.nn.Module] = {}  # the transformer's, at the first call
        self.encoders: list[tuple[str, bool]] = []
        real_draw = objectives.draw_timesteps

        def draw(n, **kwargs):
            self.draws.append({"n": n, **kwargs})
            return real_draw(n, **kwargs)
        monkeypatch.setattr(objectives, "draw_timesteps", draw)
        for name in ("FluxTransformer2DModel", "ChromaTransformer2DModel",
                     "SD3Transformer2DModel", "ZImageTransformer2DModel",
                     "QwenImageTransformer2DModel", "Flux2Transformer2DModel"):
            cls = getattr(diffusers, name)
            monkeypatch.setattr(cls, "forward", self._transformer(cls.forward))
        for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel",
                     "Qwen3Model", "Qwen2_5_VLModel"):
            cls = getattr(transformers, name)
            monkeypatch.setattr(cls, "forward", self._encoder(name, cls.forward))

    def _transformer(self, forward):
        def spied(model, *args, **kwargs):
            if self.trainable is None:
                self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
                self.parameters = [n for n, _ in model.named_parameters()]
                self.modules = dict(model.named_modules())
            self.calls.append(kwargs)
            return forward(model, *args, **kwargs)
        return spied

    def _encoder(self, name, forward):
        def spied(model, *args, **kwargs):
            learns = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
            self.encoders.append((name, learns))
            return forward(model, *args, **kwargs)
        return spied


def train_flow_file(name: str, request, tmp_path: Path, monkeypatch, extra=()):
    """(result, spy, model folder) of OneTrainer's file trained on its tiny model (`extra`:
    further overrides, each one a test says why it needs)."""
    from onetrainer_files import copy_with_concept_file, few_images
    from trainer.loop import train
    model_dir = request.getfixturevalue(TINY_FLOW_DIRS[raw(name)["model_type"]])
    images = few_images(tmp_path / "images")
    notes: list[str] = []
    config = load_config(copy_with_concept_file(name, tmp_path / "config", images),
                         [*flow_overrides(name, model_dir, tmp_path, images), *extra],
                         warn=notes.append)
    assert not [n for n in notes if n.startswith("Unknown")], notes
    spy = Spy(monkeypatch)
    result = train(config)
    assert result.global_step >= 1 and not result.stopped_early
    # one draw and one transformer call per step (no samples: the file's are not beside it)
    assert len(spy.draws) == len(spy.calls) == result.global_step and spy.encoders
    return result, spy, model_dir


def tensors(path: str) -> dict[str, tuple[list[int], str]]:
    with safe_open(path, "pt") as f:
        return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                for k in f.keys()}


def onetrainers_layers(kind: str, preset: str) -> list[str]:
    """The transformer layers OneTrainer's LoRAModuleWrapper picked with the preset on the tiny
    model (the manifest; tests/test_onetrainer_training.py checks the picks themselves)."""
    return MANIFEST["layer_presets"]["tiny_models"][kind]["presets"][preset]


def drawn_as(spy: Spy, name: str, shift: float) -> None:
    """Every step drew its timesteps by the file's distribution and weights, over the whole
    range, with `shift`."""
    data = raw(name)
    for draw in spy.draws:
        assert getattr(draw["distribution"], "value", draw["distribution"]) == \
            data["timestep_distribution"]
        assert (draw["noising_weight"], draw["noising_bias"]) == (data["noising_weight"],
                                                                  data["noising_bias"])
        assert (draw["min_strength"], draw["max_strength"]) == (
            data["min_noising_strength"], data["max_noising_strength"])
        assert draw["shift"] == pytest.approx(shift, rel=1e-9)


def lora_layers(keys, prefix: str = "transformer.") -> list[str]:
    return sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in keys})


def test_the_flux_lora_trains_as_its_author_meant(request, tmp_path, monkeypatch):
    """OneTrainer's #flux LoRA (weights in BFLOAT_16): logit-normal timesteps with Flux's
    dynamic shift for the image's size (the file's timestep_shift 1.0 unused, as OneTrainer's
    tooltip says), guidance 1.0 into the dev model's guidance embedding, T5 read at 77 tokens,
    the transformer in bfloat16 with LoRA rank 16 on every layer ('full'), CLIP-L and T5
    frozen; a DIFFUSERS_LORA in float32 holding the transformer's layers only."""
    name = "flux_lora_bf16.saved"
    result, spy, model_dir = train_flow_file(name, request, tmp_path, monkeypatch)
    # OneTrainer's FluxModel.calculate_timestep_shift on the tiny model's scheduler config:
    # e^μ, μ linear in the image's token count (the packed latent's, as the step has it)
    scheduler = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    tokens = spy.calls[0]["hidden_states"].shape[1]
    slope = (scheduler["max_shift"] - scheduler["base_shift"]) / (
        scheduler["max_image_seq_len"] - scheduler["base_image_seq_len"])
    mu = scheduler["base_shift"] + slope * (tokens - scheduler["base_image_seq_len"])
    assert raw(name)["dynamic_timestep_shifting"] and math.exp(mu) != pytest.approx(1.0)
    drawn_as(spy, name, math.exp(mu))
    for call in spy.calls:
        assert torch.equal(call["guidance"], torch.full_like(call["guidance"], 1.0))
        assert call["encoder_hidden_states"].shape[1] == 77  # text_encoder_2_sequence_length
        assert call["hidden_states"].dtype == torch.bfloat16
    assert spy.trainable and all(".lora_" in n for n in spy.trainable)
    assert not [learns for _, learns in spy.encoders if learns]  # CLIP-L and T5 frozen
    assert {n for n, _ in spy.encoders} == {"CLIPTextModel", "T5EncoderModel"}
    written = tensors(result.output_path)
    assert lora_layers(written) == onetrainers_layers("flux", "full")
    assert all(k.startswith("transformer.") and dtype == "F32"
               for k, (_, dtype) in written.items())
    assert {shape[0] for k, (shape, _) in written.items() if ".lora_A." in k} == {16}


def test_the_chroma_lora_trains_as_its_author_meant(request, tmp_path, monkeypatch):
    """OneTrainer's #chroma LoRA 24GB: inverted-parabola timesteps (weight 7.7, no shift),
    the transformer in bfloat16 with LoRA rank 16 on OneTrainer's attn-mlp layers, T5
    frozen; a DIFFUSERS_LORA in bfloat16 (its output_dtype)."""
    name = "preset.chroma_lora_24gb.saved"
    result, spy, _ = train_flow_file(name, request, tmp_path, monkeypatch)
    drawn_as(spy, name, 1.0)
    assert raw(name)["noising_weight"] == 7.7
    assert all(call["hidden_states"].dtype == torch.bfloat16 for call in spy.calls)
    assert spy.trainable and all(".lora_" in n for n in spy.trainable)
    assert spy.encoders and not [learns for _, learns in spy.encoders if learns]
    written = tensors(result.output_path)
    assert lora_layers(written) == onetrainers_layers("chroma", "attn-mlp")
    assert all(k.startswith("transformer.") and dtype == "BF16"
               for k, (_, dtype) in written.items())
    assert {shape[0] for k, (shape, _) in written.items() if ".lora_A." in k} == {16}


def test_the_sd3_lora_trains_as_its_author_meant(request, tmp_path, monkeypatch):
    """OneTrainer's #sd 3 LoRA: logit-normal timesteps without shift, no guidance input, the
    CLIPs' and T5's 77 tokens each, LoRA rank 16 on every layer of the transformer (its
    patch-embedding conv too), the three text encoders frozen; a float32 DIFFUSERS_LORA."""
    name = "preset.sd3_lora.saved"
    result, spy, _ = train_flow_file(name, request, tmp_path, monkeypatch)
    drawn_as(spy, name, 1.0)
    for call in spy.calls:
        assert "guidance" not in call and call["encoder_hidden_states"].shape[1] == 77 + 77
    assert spy.trainable and all(".lora_" in n for n in spy.trainable)
    assert "T5EncoderModel" in {n for n, _ in spy.encoders}
    assert not [learns for _, learns in spy.encoders if learns]
    written = tensors(result.output_path)
    assert lora_layers(written) == onetrainers_layers("sd3", "full")
    assert "pos_embed.proj" in lora_layers(written)
    assert all(k.startswith("transformer.") and dtype == "F32"
               for k, (_, dtype) in written.items())


def test_the_sd3_finetune_trains_as_its_author_meant(request, tmp_path, monkeypatch):
    """OneTrainer's #sd 3 (fine-tune): logit-normal timesteps, every transformer weight trained
    and the text encoders frozen; the transformer written as one float16 file in SAI's layout
    (ORIGINAL_SINGLE_FILE; OneTrainer's also packs the encoders and VAE, as the import says)."""
    name = "preset.sd3_finetune.saved"
    result, spy, _ = train_flow_file(name, request, tmp_path, monkeypatch)
    drawn_as(spy, name, 1.0)
    assert spy.trainable == spy.parameters  # the whole transformer
    assert not [learns for _, learns in spy.encoders if learns]
    written = tensors(result.output_path)
    assert "joint_blocks.0.x_block.attn.qkv.weight" in written
    assert not [k for k in written if k.startswith(("text_encoders.", "first_stage_model.",
                                                    "transformer."))]
    assert {dtype for _, dtype in written.values()} == {"F16"}


def test_the_z_image_lora_trains_as_its_author_meant(request, tmp_path, monkeypatch):
    """OneTrainer's #z-image LoRA 16GB: its timestep distribution and weights (with Z-Image's
    dynamic shift), the transformer stored in FLOAT_8 under a LoRA on OneTrainer's attn-mlp
    layers (regular expressions, as its LoRA tab wrote them), Qwen3 frozen; a
    DIFFUSERS_LORA."""
    name = "preset.z_image_lora_16gb.saved"
    data = raw(name)
    assert data["transformer"]["weight_dtype"] == "FLOAT_8" and data["layer_filter_regex"]
    result, spy, _ = train_flow_file(name, request, tmp_path, monkeypatch)
    for draw in spy.draws:
        assert getattr(draw["distribution"], "value", draw["distribution"]) == \
            data["timestep_distribution"]
        assert (draw["noising_weight"], draw["noising_bias"]) == (data["noising_weight"],
                                                                  data["noising_bias"])
    assert spy.trainable and all(".lora_" in n for n in spy.trainable)
    assert spy.encoders and not [learns for _, learns in spy.encoders if learns]
    written = tensors(result.output_path)
    assert lora_layers(written) == onetrainers_layers("z-image", "attn-mlp")


def test_the_qwen_lora_trains_as_its_author_meant(request, tmp_path, monkeypatch):
    """OneTrainer's #qwen LoRA 16GB: its timestep distribution, the transformer and Qwen2.5-VL
    stored in FLOAT_8 (the transformer's blocks: its quantization filter) under a LoRA on
    OneTrainer's attn-mlp layers, Qwen2.5-VL frozen; a DIFFUSERS_LORA."""
    name = "preset.qwen_lora_16gb.saved"
    data = raw(name)
    assert data["transformer"]["weight_dtype"] == data["text_encoder"]["weight_dtype"] == \
        "FLOAT_8"
    result, spy, _ = train_flow_file(name, request, tmp_path, monkeypatch)
    for draw in spy.draws:
        assert getattr(draw["distribution"], "value", draw["distribution"]) == \
            data["timestep_distribution"]
    assert spy.trainable and all(".lora_" in n for n in spy.trainable)
    assert spy.encoders and not [learns for _, learns in spy.encoders if learns]
    written = tensors(result.output_path)
    assert lora_layers(written) == onetrainers_layers("qwen", "attn-mlp")


def test_the_flux2_finetune_trains_as_its_author_meant(request, tmp_path, monkeypatch):
    """OneTrainer's #flux2 Finetune 24GB: logit-normal timesteps with Flux.2's dynamic shift,
    every transformer weight trained (bfloat16, Adafactor), Qwen3 frozen in bfloat16; the
    transformer written as one bfloat16 file in BFL's layout (its ORIGINAL_TRANSFORMER)."""
    name = "preset.flux2_finetune_24gb.saved"
    data = raw(name)
    assert data["optimizer"]["optimizer"] == "ADAFACTOR" and data["dynamic_timestep_shifting"]
    # its fused back pass with OneTrainer's clip_grad_norm 1.0 is refused at the start (the
    # total norm is known only after the fused pass has updated every weight): cleared here
    assert data["clip_grad_norm"] == 1.0
    result, spy, _ = train_flow_file(name, request, tmp_path, monkeypatch,
                                     extra=["clip_grad_norm=null"])
    for draw in spy.draws:
        assert getattr(draw["distribution"], "value", draw["distribution"]) == \
            data["timestep_distribution"]
    assert spy.trainable == spy.parameters  # the whole transformer
    assert spy.encoders and not [learns for _, learns in spy.encoders if learns]
    written = tensors(result.output_path)
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
            "double_stream_modulation_img.lin.weight"} <= set(written)
    assert {dtype for _, dtype in written.values()} == {"BF16"}


def test_the_flux_gguf_lora_trains_on_the_files_packed_weights(request, tmp_path, monkeypatch):
    """OneTrainer's #flux LoRA with its transformer read from a GGUF file: the file's path is
    pointed at the tiny Flux's transformer written as a Q8_0 GGUF (tests/gguf_files.py, city96's
    rules: layers of at most 1024 weights kept in F32), nothing else changed but paths and sizes.
    The run trains the LoRA on OneTrainer's 'full' layers over diffusers' GGUFLinear layers that
    hold the file's packed weights, in bfloat16, the base and the encoders frozen."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
    from gguf_files import SMALL, write_gguf
    from helpers import tiny_config
    from trainer.models.family import load_family

    name = "flux_lora_gguf.saved"
    model_dir = request.getfixturevalue("tiny_flux_dir")
    plain = load_family(tiny_config(model_dir, tmp_path / "plain", model_type="FLUX_DEV_1",
                                    text_encoder={"train": False}))
    gguf = tmp_path / "flux1-dev-Q8_0.gguf"
    written = write_gguf(plain.original_state_dict(), gguf, "Q8_0")
    assert {"Q8_0", "F32"} == set(written.values())
    del plain
    result, spy, _ = train_flow_file(name, request, tmp_path, monkeypatch, extra=[
        f"transformer.model_name={json.dumps(str(gguf))}"])  # the file's only path
    linears = {n.removesuffix(".base_layer"): m for n, m in spy.modules.items()
               if isinstance(m, torch.nn.Linear) and ".lora_" not in n}
    packed = {n for n, m in linears.items() if isinstance(m, GGUFLinear)}
    assert packed and all(isinstance(linears[n].weight, GGUFParameter) for n in packed)
    # every layer too large for city96's F32 rule is read packed; the small ones are plain
    assert {n for n, m in linears.items() if m.in_features * m.out_features > SMALL} <= packed
    assert {type(linears[n]) for n in set(linears) - packed} == {torch.nn.Linear}
    for call in spy.calls:
        assert call["hidden_states"].dtype == torch.bfloat16
    assert spy.trainable and all(".lora_" in n for n in spy.trainable)
    assert not [learns for _, learns in spy.encoders if learns]
    written_lora = tensors(result.output_path)
    assert lora_layers(written_lora) == onetrainers_layers("flux", "full")
    assert packed <= set(lora_layers(written_lora))  # the LoRA sits on the packed layers too
    assert {shape[0] for k, (shape, _) in written_lora.items() if ".lora_A." in k} == {16}
