"""Tiny flow-matching models built offline: Flux.1 dev and schnell, Chroma, SD 3 and SD 3.5.

Like the tiny SD models (trainer/models/tiny.py), each is the real architecture from diffusers'
own classes with random weights, narrower and shallower, written as a diffusers folder that the
family's pipeline (`FluxPipeline`, `ChromaPipeline`, `StableDiffusion3Pipeline`) loads with
`from_pretrained(folder)`. Every part the real model has is here — CLIP tokenizers and encoders
(tiny.py's), a T5 encoder with a T5 tokenizer built in code (no sentencepiece file, nothing
downloaded), the family's VAE scaling/shift factors and its scheduler config — so LoRA target
names, text encoding, latent packing and sampling run the same code paths as on the real model.

Sizes follow the rules the transformers impose (DESIGN.md, "Facts for the third round"):
Flux/Chroma read 2x2-packed latents (`in_channels == 4 * latent_channels`), their rotary axes sum
to the head size, `joint_attention_dim` is T5's width and Flux's `pooled_projection_dim` is
CLIP-L's width; SD 3 pools both CLIPs' projections (`pooled_projection_dim` = their sum).
"""
from __future__ import annotations

import atexit
import functools
import pathlib
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from trainer.models.tiny import (
    build_tiny_tokenizer,
    tiny_sd15_configs,
    tiny_sdxl_configs,
    write_pipeline,
)

TINY_FLOW_KINDS = ("flux", "flux-schnell", "chroma", "sd3", "sd35")
TINY_FLOW_LABELS = {"flux": "Flux.1-dev", "flux-schnell": "Flux.1-schnell", "chroma": "Chroma",
                    "sd3": "SD 3", "sd35": "SD 3.5"}

# --- T5 tokenizer -------------------------------------------------------------------------------

# T5's special tokens and their ids, as every T5 checkpoint has them: padding is 0, the
# end-of-sequence token the tokenizer appends is 1, unknown is 2.
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_MAX_LENGTH = 512  # model_max_length of the real T5 tokenizers (Flux's T5 length)

# Whole-word pieces: the demo captions' words (trainer/demo/dataset/*.txt; a test checks that
# they stay covered) and common prompt words. A fixed list rather than one read from the demo
# folder, so the tokenizer (and the ids a text cache keys on) never changes with the dataset.
_T5_WORDS = (
    "a an the of and with at in on to for by from is"
    " photo photograph picture portrait painting drawing illustration image render art style"
    " astronaut cat cup coffee black white photographer camera rocket launch night"
    " dog man woman person people face girl boy child sks ohwx token"
    " red green blue yellow orange purple pink brown gray grey gold silver dark light bright"
    " sky sun moon star stars cloud clouds city street forest tree trees flower flowers"
    " house car mountain mountains water sea ocean beach river lake snow rain"
    " close up background foreground standing sitting walking smiling wearing holding"
    " high quality detailed sharp blurry beautiful old young small large big"
    " space spaceship suit helmet table mug morning day outdoor indoor studio"
).split()
# Single characters, so a word outside the list splits into characters (T5's SentencePiece
# falls back to pieces the same way) instead of becoming one unknown token.
_T5_CHARACTERS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/&%+=*#@"
)
# Unigram log-probabilities: a whole word (one piece) always beats spelling it out.
_WORD_SCORE, _SPACE_SCORE, _CHARACTER_SCORE = -5.0, -8.0, -10.0


def t5_vocabulary() -> list[tuple[str, float]]:
    """The tiny T5 vocabulary as (piece, score) pairs in id order: the three special tokens
    first (ids 0, 1, 2, as in T5), then "▁" (a word start), the words, the characters."""
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", _SPACE_SCORE)]
    pieces += [("▁" + word, _WORD_SCORE) for word in dict.fromkeys(_T5_WORDS)]
    pieces += [(character, _CHARACTER_SCORE) for character in _T5_CHARACTERS]
    return pieces


def build_tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer (transformers' `T5TokenizerFast`, a `tokenizers` Unigram model with T5's
    Metaspace pre-tokenizer and its "append </s>" post-processor) over the tiny vocabulary.
    No sentinel (<extra_id_N>) tokens: they serve T5's span-corruption pre-training only."""
    return T5Tokenizer(vocab=t5_vocabulary(), eos_token=T5_EOS, unk_token=T5_UNK,
                       pad_token=T5_PAD, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def tiny_t5_config(vocab_size: int, d_model: int) -> dict:
    """T5 v1.1's layout (gated GELU, untied embeddings, as Flux's and SD 3's T5-XXL), tiny."""
    return dict(vocab_size=vocab_size, d_model=d_model, d_kv=4, d_ff=16, num_layers=2,
                num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


# --- Configs ------------------------------------------------------------------------------------

# The real models' VAE latent normalisation (latents = (encoded - shift) * scale), from their
# VAE configs; the tiny VAE keeps 4 latent channels (the real ones have 16).
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609

# The real models' scheduler configs (FlowMatchEulerDiscreteScheduler).
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                          base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                          max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = dict(FLUX_DEV_SCHEDULER, shift=1.0, use_dynamic_shifting=False)
# Chroma (a Flux.1-schnell derivative) ships dev's config, resolution-dependent shift (as
# recalled from its diffusers repo; not checkable offline here).
CHROMA_SCHEDULER = FLUX_DEV_SCHEDULER
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def _check_kind(kind: str) -> str:
    if kind not in TINY_FLOW_KINDS:
        raise ValueError(f"tiny model kind {kind!r}: choose one of {', '.join(TINY_FLOW_KINDS)}")
    return kind


def _vae_config(tiny_vae: dict, scaling: float, shift: float) -> dict:
    """tiny.py's 8x VAE with the flow models' VAE options: no quant convs, a shift factor."""
    return dict(tiny_vae, scaling_factor=scaling, shift_factor=shift, use_quant_conv=False,
                use_post_quant_conv=False, force_upcast=True)


def tiny_flow_configs(kind: str, vocab_size: int, bos_id: int, eos_id: int,
                      t5_vocab_size: int) -> dict[str, dict]:
    """Configs of the tiny model's parts, by pipeline component name (`tokenizer*` aside).
    `vocab_size`/`bos_id`/`eos_id` are the CLIP tokenizer's, `t5_vocab_size` the T5 one's."""
    _check_kind(kind)
    if kind in ("flux", "flux-schnell", "chroma"):
        sd15 = tiny_sd15_configs(vocab_size, bos_id, eos_id)
        clip_l = sd15["text_encoder"]
        t5 = tiny_t5_config(t5_vocab_size, d_model=32)
        vae = _vae_config(sd15["vae"], FLUX_VAE_SCALING, FLUX_VAE_SHIFT)
        transformer = dict(
            patch_size=1,
            in_channels=4 * vae["latent_channels"],  # 2x2 patches packed into channels
            num_layers=2,          # two of each block kind, so block indices are really mapped
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5["d_model"],
            axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
        )
        if kind == "chroma":
            # Chroma's "distilled guidance" approximator replaces Flux's time/guidance/pooled
            # text embedders; in_dim = num_channels (time/4 + guidance/4 + modulation index/2).
            transformer.update(approximator_num_channels=16, approximator_hidden_dim=32,
                               approximator_layers=1)
            return {"text_encoder": t5, "transformer": transformer, "vae": vae,
                    "scheduler": CHROMA_SCHEDULER}
        transformer.update(pooled_projection_dim=clip_l["hidden_size"],
                           guidance_embeds=kind == "flux")  # dev is guidance-distilled
        scheduler = FLUX_DEV_SCHEDULER if kind == "flux" else FLUX_SCHNELL_SCHEDULER
        return {"text_encoder": clip_l, "text_encoder_2": t5, "transformer": transformer,
                "vae": vae, "scheduler": scheduler}

    # SD 3 / 3.5: CLIP-L and CLIP-G with projections, as tiny SDXL has them (CLIP-G wider).
    sdxl = tiny_sdxl_configs(vocab_size, bos_id, eos_id)
    clip_l, clip_g = sdxl["text_encoder"], sdxl["text_encoder_2"]
    # The CLIPs' hidden states, concatenated, are zero-padded to T5's width and joined with
    # T5's tokens; T5 wider than both CLIPs together, as in the real model (768 + 1280 < 4096),
    # so the padding is real and no CLIP feature is cut off.
    t5 = tiny_t5_config(t5_vocab_size, d_model=128)
    assert clip_l["hidden_size"] + clip_g["hidden_size"] <= t5["d_model"]
    transformer = dict(
        sample_size=8,          # 8x8 latents: 64 px images by default, as the tiny SD models
        patch_size=2,           # SD 3's own
        in_channels=4,
        out_channels=4,
        num_layers=2,           # the last block is context-pre-only: two make both kinds
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5["d_model"],
        caption_projection_dim=32,
        pooled_projection_dim=clip_l["projection_dim"] + clip_g["projection_dim"],
        pos_embed_max_size=32,  # position table for latents up to 64x64 (512 px)
    )
    if kind == "sd35":
        # SD 3.5: RMS-normed q/k; Medium's MMDiT-X second attention in its first blocks.
        transformer.update(qk_norm="rms_norm", dual_attention_layers=(0,))
    vae = _vae_config(sdxl["vae"], SD3_VAE_SCALING, SD3_VAE_SHIFT)
    return {"text_encoder": clip_l, "text_encoder_2": clip_g, "text_encoder_3": t5,
            "transformer": transformer, "vae": vae, "scheduler": SD3_SCHEDULER}


# --- Pipelines ----------------------------------------------------------------------------------

# diffusers 0.42.1's Chroma transformer builds its rotary embedding through the alias it has
# itself deprecated (a FutureWarning, which the test suite turns into an error); the message
# says nothing a caller can act on, so it is silenced here, for this one message only.
CHROMA_POS_EMBED_WARNING = "`FluxPosEmbed` is deprecated"


def _chroma_transformer(config: dict) -> ChromaTransformer2DModel:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CHROMA_POS_EMBED_WARNING, category=FutureWarning)
        return ChromaTransformer2DModel(**config)


def seeded_parts(seed: int) -> Callable:
    """`seeded(index, make)`: a tiny model's part, `make()` in eval mode with torch's generator
    seeded at seed + index, so its weights never depend on random draws made elsewhere (every
    tiny pipeline builder seeds its parts this way)."""
    def seeded(index: int, make):
        torch.manual_seed(seed + index)
        return make().eval()
    return seeded


def build_tiny_flow_pipeline(kind: str, seed: int = 0):
    """The tiny model of `kind` in memory, each part seeded on its own (`seeded_parts`)."""
    _check_kind(kind)
    clip_tokenizer = build_tiny_tokenizer()
    t5_tokenizer = build_tiny_t5_tokenizer()
    configs = tiny_flow_configs(kind, len(clip_tokenizer), clip_tokenizer.bos_token_id,
                                clip_tokenizer.eos_token_id, len(t5_tokenizer))

    seeded = seeded_parts(seed)
    vae = seeded(2, lambda: AutoencoderKL(**configs["vae"]))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"])
    if kind == "chroma":
        return ChromaPipeline(
            scheduler=scheduler, vae=vae, tokenizer=t5_tokenizer,
            text_encoder=seeded(0, lambda: T5EncoderModel(T5Config(**configs["text_encoder"]))),
            transformer=seeded(1, lambda: _chroma_transformer(configs["transformer"])))
    if kind in ("flux", "flux-schnell"):
        return FluxPipeline(
            scheduler=scheduler, vae=vae,
            text_encoder=seeded(
                0, lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))),
            tokenizer=clip_tokenizer,
            text_encoder_2=seeded(3, lambda: T5EncoderModel(T5Config(**configs["text_encoder_2"]))),
            tokenizer_2=t5_tokenizer,
            transformer=seeded(1, lambda: FluxTransformer2DModel(**configs["transformer"])))
    return StableDiffusion3Pipeline(
        transformer=seeded(1, lambda: SD3Transformer2DModel(**configs["transformer"])),
        scheduler=scheduler, vae=vae,
        text_encoder=seeded(
            0, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder"]))),
        tokenizer=clip_tokenizer,
        text_encoder_2=seeded(
            3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))),
        # SD 3's CLIP-G tokenizer pads with "!", as SDXL's second one does.
        tokenizer_2=build_tiny_tokenizer(pad_token="!"),
        text_encoder_3=seeded(4, lambda: T5EncoderModel(T5Config(**configs["text_encoder_3"]))),
        tokenizer_3=t5_tokenizer)


def build_tiny_flow_model(kind: str, folder, seed: int = 0) -> pathlib.Path:
    """Write the tiny model of `kind` as a diffusers folder (safetensors weights, written
    beside `folder` and renamed into place) and return its path."""
    return write_pipeline(build_tiny_flow_pipeline(kind, seed), folder)


# --- Built once per process (tests, the demo) ---------------------------------------------------

_cache_lock = threading.Lock()
_cache_root: pathlib.Path | None = None
_cached: dict[str, pathlib.Path] = {}


def cached_tiny_model(name: str, build: Callable[[pathlib.Path], pathlib.Path]) -> pathlib.Path:
    """The tiny model `name`, written by `build(folder)` on first use in this process under a
    temporary folder (one for every tiny flow-matching model, removed at exit). Shared by every
    caller: read it, never write into it."""
    global _cache_root
    with _cache_lock:
        path = _cached.get(name)
        if path is not None and (path / "model_index.json").is_file():
            return path
        if _cache_root is None:
            _cache_root = pathlib.Path(tempfile.mkdtemp(prefix="atelier-tiny-flow-"))
            atexit.register(shutil.rmtree, _cache_root, ignore_errors=True)
        path = build(_cache_root / name)
        _cached[name] = path
        return path


def tiny_flow_model(kind: str) -> pathlib.Path:
    """The tiny model of `kind` (seed 0), built once per process (`cached_tiny_model`)."""
    _check_kind(kind)
    return cached_tiny_model(f"tiny-{kind}", functools.partial(build_tiny_flow_model, kind))
