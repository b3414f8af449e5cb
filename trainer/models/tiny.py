"""Tiny Stable Diffusion 1.5 and SDXL models (plain and inpainting) built offline: same
architectures, random weights, ~2 MB each.

The tests and the built-in demo train this model end to end on a laptop CPU. It has every part
of the real SD 1.5 (CLIP BPE tokenizer, CLIP text encoder, a UNet with cross-attention down/up
blocks named like SD's, an 8x-downsampling VAE, SD's noise schedule), only narrower and
shallower, so every code path (LoRA target names, single-file export, sampling) is exercised
as it is on the real model.
"""
from __future__ import annotations

import pathlib

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from trainer.io import atomic_folder

# Letter pairs merged into single tokens, so that the tiny tokenizer is a real BPE (words
# become several tokens, some of them merged) rather than one token per character.
_COMMON_PAIRS = (
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io "
    "le ve co me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur ca el ta la ns di fo ho "
    "pe ec pr no ct us ac ot il tr ly nc et ut ss so rs un lo wa ge ie wh ee wi em ad ol rt "
    "po we na ul ni ts mo ow pa im mi ai sh ir su id os iv ia am fi ci vi pl ig tu ev ld ry"
).split()

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable-character table: the base alphabet of byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP-style BPE vocabulary laid out like CLIP's own.

    Ids: 256 byte characters, the same with "</w>" (end of word), the merged pairs, then the
    two special tokens last — so, as in CLIP, the end-of-text token has the highest id.
    Every byte is in the alphabet, so any prompt tokenizes without unknown tokens.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for pair in _COMMON_PAIRS:
        a, b = pair
        merges += [(a, b), (a, b + "</w>")]
        tokens += [pair, pair + "</w>"]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tiny_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """SD 1.5 and SDXL's first tokenizer pad with end-of-text; SDXL's second with "!"."""
    vocab, merges = tiny_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def tiny_sd15_configs(vocab_size: int, bos_id: int, eos_id: int) -> dict[str, dict]:
    """Configs of the tiny model's parts: SD 1.5's layout, narrower and shallower."""
    text_encoder = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,  # three, so "CLIP skip 2" (penultimate layer) means something
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    unet = dict(
        sample_size=8,  # 8x8 latents: 64 px images by default
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 48),  # 48, not 64: a third less weight, same step time
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder["hidden_size"],
        attention_head_dim=8,  # SD 1.5's value (diffusers reads it as the number of heads)
        norm_num_groups=8,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        # Four blocks like SD's VAE, so images are 8x larger than latents.
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )
    # SD 1.5's own scheduler config (PNDM, as it ships); training builds DDPM from it.
    scheduler = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        clip_sample=False,
    )
    return {"text_encoder": text_encoder, "unet": unet, "vae": vae, "scheduler": scheduler}


def build_tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny model in memory. Each part is seeded on its own, so weights never depend on
    the order or number of random draws made elsewhere."""
    tokenizer = build_tiny_tokenizer()
    configs = tiny_sd15_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**configs["vae"])
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        # from_config (not the constructor) keeps clip_sample=False in the saved config, as
        # SD 1.5's does, so DDIM/DDPM built from it later do not clip latents to [-1, 1].
        scheduler=PNDMScheduler.from_config(configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd15(out_dir, seed: int = 0) -> pathlib.Path:
    """Write the tiny model as a diffusers folder (safetensors weights) and return its path."""
    return write_pipeline(build_tiny_sd15_pipeline(seed), out_dir)


def write_pipeline(pipe, out_dir) -> pathlib.Path:
    """The folder is written next to its destination and renamed into place, so a crash never
    leaves a half-written model that would later be loaded as if it were whole."""
    out_dir = pathlib.Path(out_dir)
    with atomic_folder(out_dir) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
    return out_dir


# --- Tiny SDXL ------------------------------------------------------------------------------

def tiny_sdxl_configs(vocab_size: int, bos_id: int, eos_id: int) -> dict[str, dict]:
    """SDXL's layout, narrower and shallower: two text encoders (TE2 wider than TE1, as
    OpenCLIP bigG is wider than CLIP ViT-L — diffusers' single-file reader tells them apart
    by width), the size/crop "time ids" addition embedding, several transformer layers per
    attention block, linear attention projections, the first block without attention."""
    base = tiny_sd15_configs(vocab_size, bos_id, eos_id)
    text_encoder = dict(base["text_encoder"], hidden_size=32, projection_dim=32)
    # TE2 projects to a size different from its width, so that the single-file export's
    # transposed text_projection is really checked.
    text_encoder_2 = dict(base["text_encoder"], hidden_size=64, intermediate_size=128,
                          projection_dim=32, hidden_act="gelu")
    addition_time_embed_dim = 8
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),  # SDXL's [5, 10, 20]: read by diffusers as head counts
        use_linear_projection=True,
        cross_attention_dim=text_encoder["hidden_size"] + text_encoder_2["hidden_size"],
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        # six time ids (original size, crop top-left, target size) + TE2's pooled projection
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim
        + text_encoder_2["projection_dim"],
        norm_num_groups=8,
    )
    vae = dict(base["vae"], scaling_factor=0.13025, force_upcast=True)
    # SDXL's own scheduler config (Euler, "leading" spacing); training builds DDPM from it.
    scheduler = dict(base["scheduler"], interpolation_type="linear", timestep_spacing="leading",
                     use_karras_sigmas=False, sample_max_value=1.0)
    return {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "unet": unet,
            "vae": vae, "scheduler": scheduler}


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """The tiny SDXL in memory; each part seeded on its own, as for SD 1.5."""
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer(pad_token="!")
    configs = tiny_sdxl_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**configs["vae"])
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_sdxl(out_dir, seed: int = 0) -> pathlib.Path:
    """Write the tiny SDXL as a diffusers folder (safetensors weights) and return its path."""
    return write_pipeline(build_tiny_sdxl_pipeline(seed), out_dir)


# --- Tiny inpainting models -----------------------------------------------------------------

# An inpainting UNet reads the noisy latents (4), the mask (1) and the masked image's latents
# (4), as SD 1.5 inpainting and SDXL inpainting do.
INPAINTING_IN_CHANNELS = 9


def _inpainting_unet(config: dict) -> UNet2DConditionModel:
    return UNet2DConditionModel(**dict(config, in_channels=INPAINTING_IN_CHANNELS))


def build_tiny_sd15_inpaint_pipeline(seed: int = 0) -> StableDiffusionInpaintPipeline:
    """The tiny SD 1.5 with a 9-channel UNet (same sizes and seeds otherwise)."""
    plain = build_tiny_sd15_pipeline(seed)
    tokenizer = plain.tokenizer
    configs = tiny_sd15_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed + 1)
    return StableDiffusionInpaintPipeline(
        vae=plain.vae, text_encoder=plain.text_encoder, tokenizer=tokenizer,
        unet=_inpainting_unet(configs["unet"]).eval(), scheduler=plain.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_sd15_inpaint(out_dir, seed: int = 0) -> pathlib.Path:
    """Write the tiny SD 1.5 inpainting model as a diffusers folder."""
    return write_pipeline(build_tiny_sd15_inpaint_pipeline(seed), out_dir)


def build_tiny_sdxl_inpaint_pipeline(seed: int = 0) -> StableDiffusionXLInpaintPipeline:
    """The tiny SDXL with a 9-channel UNet. No aesthetic score: the base model's six time ids,
    as SDXL 1.0 inpainting uses them."""
    plain = build_tiny_sdxl_pipeline(seed)
    tokenizer = plain.tokenizer
    configs = tiny_sdxl_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed + 1)
    return StableDiffusionXLInpaintPipeline(
        vae=plain.vae, text_encoder=plain.text_encoder, text_encoder_2=plain.text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=plain.tokenizer_2,
        unet=_inpainting_unet(configs["unet"]).eval(), scheduler=plain.scheduler,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
        add_watermarker=False)


def build_tiny_sdxl_inpaint(out_dir, seed: int = 0) -> pathlib.Path:
    """Write the tiny SDXL inpainting model as a diffusers folder."""
    return write_pipeline(build_tiny_sdxl_inpaint_pipeline(seed), out_dir)
