"""A tiny Stable Diffusion 1.5 built offline: same architecture, random weights, ~2 MB.

The tests and the built-in demo train this model end to end on a laptop CPU. It has every part
of the real SD 1.5 (CLIP BPE tokenizer, CLIP text encoder, a UNet with cross-attention down/up
blocks named like SD's, an 8x-downsampling VAE, SD's noise schedule), only narrower and
shallower, so every code path (LoRA target names, single-file export, sampling) is exercised
as it is on the real model.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


def build_tiny_tokenizer() -> CLIPTokenizer:
    vocab, merges = tiny_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


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
    """Write the tiny model as a diffusers folder (safetensors weights) and return its path.

    The folder is written next to its destination and renamed into place, so a crash never
    leaves a half-written model that would later be loaded as if it were whole.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_sd15_pipeline(seed)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
