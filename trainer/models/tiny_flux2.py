"""A tiny Flux.2 klein built offline: diffusers' Flux2Transformer2DModel, a Qwen3 causal language
model as its text encoder with Z-Image's tiny Qwen tokenizer (built in code, chat template
included), Flux.2's VAE (AutoencoderKLFlux2, with its latent batch norm) and the flow-match
scheduler, written as a diffusers folder that `Flux2KleinPipeline.from_pretrained` loads.

What the real model has and the tiny one keeps, so that the same code paths run:
- the encoder is `Qwen3ForCausalLM` (the pipeline's class) and deep enough for the layers the
  pipeline reads, 9, 18 and 27: their states side by side are the transformer's text input, so
  its `joint_attention_dim` is three times the encoder's width;
- the transformer has double and single blocks, rotary axes (four: time, row, column, token)
  summing to the head size, and no guidance embedding (klein has none);
- the VAE's batch-norm statistics are not the identity (random but fixed), so that latents are
  really normalised on the way in and out;
- the scheduler shifts dynamically, as Flux.2's does.
"""
from __future__ import annotations

import pathlib

import torch
from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                       Flux2Transformer2DModel)
from transformers import Qwen3Config, Qwen3ForCausalLM

from trainer.models.tiny import write_pipeline
from trainer.models.tiny_flow import cached_tiny_model, seeded_parts
from trainer.models.tiny_z_image import build_tiny_qwen_tokenizer

# The hidden-state layers Flux2KleinPipeline (and OneTrainer) read: the tiny encoder needs one
# layer more than the deepest.
ENCODER_LAYERS = 28

# Flux.2's scheduler: the resolution-dependent shift (FlowMatchEulerDiscreteScheduler's
# default constants), shift 3 where it is switched off.
FLUX2_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                       base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                       max_image_seq_len=4096)


def tiny_flux2_configs(vocab_size: int) -> dict[str, dict]:
    """Configs of the tiny model's parts, by pipeline component name."""
    qwen3 = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                 num_hidden_layers=ENCODER_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True)
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4,
        # four blocks, so images are 8x larger than latents, as Flux.2's
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64, mid_block_add_attention=False)
    transformer = dict(
        patch_size=1,
        in_channels=4 * vae["latent_channels"],       # 2x2 patches packed into channels
        num_layers=1, num_single_layers=1,             # one of each block kind
        attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * qwen3["hidden_size"],  # three layers' states side by side
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),                   # sums to the head size, 16
        guidance_embeds=False)
    return {"text_encoder": qwen3, "transformer": transformer, "vae": vae,
            "scheduler": FLUX2_SCHEDULER}


def _vae(config: dict) -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(**config)
    channels = vae.bn.num_features
    # statistics of a trained VAE's latents are far from (0, 1): fixed random values here
    vae.bn.running_mean.copy_(torch.randn(channels) * 0.5)
    vae.bn.running_var.copy_(torch.rand(channels) * 2 + 0.5)
    return vae


def build_tiny_flux2_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """The tiny model in memory, each part seeded on its own (`seeded_parts`)."""
    tokenizer = build_tiny_qwen_tokenizer()
    configs = tiny_flux2_configs(len(tokenizer))

    seeded = seeded_parts(seed)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
        vae=seeded(2, lambda: _vae(configs["vae"])),
        text_encoder=seeded(0, lambda: Qwen3ForCausalLM(Qwen3Config(**configs["text_encoder"]))),
        tokenizer=tokenizer,
        transformer=seeded(1, lambda: Flux2Transformer2DModel(**configs["transformer"])))


def build_tiny_flux2_model(folder, seed: int = 0) -> pathlib.Path:
    """Write the tiny Flux.2 klein as a diffusers folder and return its path."""
    return write_pipeline(build_tiny_flux2_pipeline(seed), folder)


def tiny_flux2_model(seed: int = 0) -> pathlib.Path:
    """The tiny Flux.2 klein (of `seed`), built once per process (tiny_flow.cached_tiny_model)."""
    return cached_tiny_model(f"tiny-flux2-{seed}",
                             lambda folder: build_tiny_flux2_model(folder, seed))
