"""Which layers a LoRA adapts (OneTrainer's layer filter, matched as OneTrainer matches it) and
each model part stored in its own weight type (`<part>.weight_dtype`)."""
import pytest
import torch
from safetensors.torch import load_file

from helpers import LAST_STEP_SAMPLE, tiny_config
from trainer.config import config_from_dict
from trainer.control import Control
from trainer.errors import ConfigError, TrainingError
from trainer.lora import denoiser_targets as unet_targets, text_encoder_targets
from trainer.loop import train


@pytest.fixture(scope="module")
def tiny_unet(tiny_sd15_dir):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")


def layers(unet):
    return {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def targets(unet, **settings):
    return set(unet_targets(unet, config_from_dict(settings)))


def test_the_presets_pick_the_layers_onetrainer_picks(tiny_unet):
    every = layers(tiny_unet)
    attn_only = targets(tiny_unet, lora_layer_preset="attn-only")
    assert attn_only == {n for n in every if "attn" in n}
    assert {n.rsplit(".", 1)[-1] for n in attn_only} == {"to_q", "to_k", "to_v", "0"}
    attn_mlp = targets(tiny_unet, lora_layer_preset="attn-mlp")
    assert attn_mlp == {n for n in every if "attentions" in n}
    assert attn_only < attn_mlp  # + proj_in/proj_out and the feed-forward
    assert {"proj_in", "proj_out", "2"} <= {n.rsplit(".", 1)[-1] for n in attn_mlp}
    full = targets(tiny_unet, lora_layer_preset="full")
    assert full == every and {"conv_in", "conv_out", "time_embedding.linear_1"} <= full


def test_a_custom_filter_matches_parts_of_names_or_regular_expressions(tiny_unet):
    every = layers(tiny_unet)
    picked = targets(tiny_unet, lora_layer_preset="custom", layer_filter="attn2, conv_out")
    assert picked == {n for n in every if "attn2" in n} | {"conv_out"}
    picked = targets(tiny_unet, lora_layer_preset="custom", layer_filter=r"^up_blocks\.\d+\.resnets",
                     layer_filter_regex=True)
    assert picked and all(n.startswith("up_blocks.") and ".resnets." in n for n in picked)
    assert picked == {n for n in every if n.startswith("up_blocks.") and ".resnets." in n}
    assert targets(tiny_unet, lora_layer_preset="custom", layer_filter="") == every


@pytest.mark.parametrize("settings, message", [
    ({"layer_filter": "attn2,atn1"}, "layer_filter: 'atn1' matched no UNet layer"),
    ({"layer_filter": "to_q(", "layer_filter_regex": True},
     r"layer_filter: 'to_q\(' is not a valid regular expression"),
])
def test_a_filter_that_cannot_match_is_refused_by_name(tiny_unet, settings, message):
    with pytest.raises(ConfigError, match=message):
        targets(tiny_unet, lora_layer_preset="custom", **settings)


def test_the_text_encoders_adapters_cover_every_linear_layer(tiny_sd15_dir):
    from transformers import CLIPTextModel
    encoder = CLIPTextModel.from_pretrained(tiny_sd15_dir, subfolder="text_encoder")
    names = text_encoder_targets(encoder)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "out_proj",
                                                    "fc1", "fc2"}
    assert len(names) == 6 * encoder.config.num_hidden_layers


def test_a_custom_filter_decides_the_layers_in_the_saved_lora(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=1, lora_layer_preset="custom",
                         layer_filter=r"mid_block\..*attn1\.to_(q|v)$", layer_filter_regex=True)
    result = train(config)
    unet_keys = {k.removesuffix(".lora_down.weight") for k in load_file(result.output_path)
                 if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")}
    assert unet_keys == {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
                         "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v"}


def test_each_part_is_stored_and_sampled_in_its_own_type(tiny_sd15_dir, tmp_path, monkeypatch):
    """UNet in bfloat16, text encoder in float32, VAE in bfloat16: the step and the sampler
    (whose latents come in the text encoder's type) run, and each part keeps its type."""
    import trainer.loop as loop_module
    families = []
    real = loop_module.load_family
    monkeypatch.setattr(loop_module, "load_family",
                        lambda config: families.append(real(config)) or families[-1])
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=1, samples=[LAST_STEP_SAMPLE],
                         sample_after=1, sample_after_unit="EPOCH",
                         unet={"weight_dtype": "BFLOAT_16"}, vae={"weight_dtype": "BFLOAT_16"},
                         text_encoder={"train": False, "weight_dtype": "FLOAT_32"})
    events = []
    result = train(config, Control(on_event=events.append))
    assert result.global_step > 0
    family = families[0]
    base = [p for n, p in family.parts["unet"].named_parameters() if "lora_" not in n]
    adapters = [p for n, p in family.parts["unet"].named_parameters() if "lora_" in n]
    assert {p.dtype for p in base} == {torch.bfloat16}
    assert {p.dtype for p in adapters} == {torch.float32}  # trained in float32
    assert {p.dtype for p in family.parts["text_encoder"].parameters()} == {torch.float32}
    assert {p.dtype for p in family.vae.parameters()} == {torch.bfloat16}
    samples = [e for e in events if e.get("type") == "sample"]
    assert samples and all(e.get("path") for e in samples), events[-3:]
    # the sampler's hooks are gone once it is done
    assert not family.parts["unet"]._forward_pre_hooks


def test_float16_weights_on_the_cpu_are_refused_by_part(tiny_sd15_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("FLOAT_16 weights are refused only without a CUDA GPU")
    config = tiny_config(tiny_sd15_dir, tmp_path, text_encoder={"weight_dtype": "FLOAT_16"})
    with pytest.raises(TrainingError, match="text_encoder.weight_dtype FLOAT_16 needs a CUDA GPU"):
        train(config)
