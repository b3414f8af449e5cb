"""A tiny Z-Image built offline: diffusers' ZImageTransformer2DModel, a Qwen3 text encoder with a
Qwen2-style byte-level BPE tokenizer built in code (and a chat template), the Flux-style VAE and
the flow-match scheduler, written as a diffusers folder that `ZImagePipeline.from_pretrained`
loads.

What the real model has and the tiny one keeps, so that the same code paths run:
- the tokenizer is the byte-level BPE of Qwen (every byte is a token, so nothing is ever unknown;
  pieces of the demo captions' words are merged), with Qwen's special tokens <|endoftext|> (also the
  padding), <|im_start|> and <|im_end|>, and a chat template that writes a user turn and opens
  the assistant's as ZImagePipeline asks (`add_generation_prompt=True, enable_thinking=True`):
  "<|im_start|>user\\n{caption}<|im_end|>\\n<|im_start|>assistant\\n";
- the encoder is `Qwen3Model` (the real checkpoint's class), with several layers, since the
  pipeline reads the states of the layer before the last;
- the transformer's caption width (`cap_feat_dim`) is the encoder's width, its rotary axes sum
  to the head size, and the first axis is long enough for 512 caption tokens;
- the VAE has Flux's latent scale and shift (Z-Image uses Flux.1's VAE), 4 latent channels here.
"""
from __future__ import annotations

import pathlib

from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline,
                       ZImageTransformer2DModel)
from tokenizers import pre_tokenizers
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from trainer.models.tiny import tiny_sd15_configs, write_pipeline
from trainer.models.tiny_flow import (FLUX_VAE_SCALING, FLUX_VAE_SHIFT, _T5_WORDS,
                                      _vae_config, cached_tiny_model, seeded_parts)

# Qwen's special tokens (the ids of the tiny vocabulary are its own).
END_OF_TEXT, TURN_START, TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen3's tokenizers accept far longer inputs; ZImagePipeline cuts prompts at 512 tokens.
MODEL_MAX_LENGTH = 32768

# A chat template of Qwen3's shape, for the case the pipeline uses: each message as a turn, then
# the assistant's turn opened; with thinking switched off Qwen3 writes an empty thought block.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

# Z-Image's scheduler: a constant shift of 3 (ComfyUI's ZImage sampling settings say the same).
Z_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def bpe_vocabulary(words=_T5_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE: the 256 byte symbols, then the pieces of each word
    (with its leading space, "Ġcat", and without) built up one symbol at a time. Any text
    tokenises (at worst into single bytes), the common words into a few pieces; BPE applies
    merges by rank, so a word is not always one token, which nothing here needs."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        for text in ("Ġ" + word, word):  # after a space, and at the start of a text
            add_pieces(vocab, merges, text)
    return vocab, merges


def add_merge(vocab: dict[str, int], merges: list[tuple[str, str]], left: str, right: str):
    """The merge left + right, ranked last, its piece a new token (unless it is one already)."""
    if left + right not in vocab:
        merges.append((left, right))
        vocab[left + right] = len(vocab)


def add_pieces(vocab: dict[str, int], merges: list[tuple[str, str]], text: str):
    """The merges that build `text` up from its first symbol, one symbol at a time."""
    piece = text[0]
    for symbol in text[1:]:
        add_merge(vocab, merges, piece, symbol)
        piece += symbol


def build_tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2Tokenizer (transformers' tokenizers-backed BPE with Qwen's pre-tokenizer) over the
    tiny vocabulary, its special tokens added after it, and the chat template."""
    vocab, merges = bpe_vocabulary()
    for token in (END_OF_TEXT, TURN_START, TURN_END):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,
                               eos_token=TURN_END, pad_token=END_OF_TEXT,
                               additional_special_tokens=[TURN_START],
                               model_max_length=MODEL_MAX_LENGTH)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_z_image_configs(vocab_size: int) -> dict[str, dict]:
    """Configs of the tiny model's parts, by pipeline component name."""
    qwen3 = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 max_position_embeddings=1024, tie_word_embeddings=True)
    vae = _vae_config(tiny_sd15_configs(vocab_size, 0, 0)["vae"], FLUX_VAE_SCALING,
                      FLUX_VAE_SHIFT)
    transformer = dict(
        all_patch_size=(2,), all_f_patch_size=(1,),   # Z-Image's own 2x2 patches
        in_channels=vae["latent_channels"],
        dim=32, n_heads=2, n_kv_heads=2,
        n_layers=2, n_refiner_layers=1,               # main blocks and one of each refiner
        cap_feat_dim=qwen3["hidden_size"],
        axes_dims=[4, 4, 8],                           # sums to the head size, 16
        # caption positions (up to 512 + padding) run along the first axis; image rows and
        # columns of up to 1024 px along the others
        axes_lens=[1024, 64, 64],
    )
    return {"text_encoder": qwen3, "transformer": transformer, "vae": vae,
            "scheduler": Z_IMAGE_SCHEDULER}


def build_tiny_z_image_pipeline(seed: int = 0) -> ZImagePipeline:
    """The tiny model in memory, each part seeded on its own (`seeded_parts`)."""
    tokenizer = build_tiny_qwen_tokenizer()
    configs = tiny_z_image_configs(len(tokenizer))

    seeded = seeded_parts(seed)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
        vae=seeded(2, lambda: AutoencoderKL(**configs["vae"])),
        text_encoder=seeded(0, lambda: Qwen3Model(Qwen3Config(**configs["text_encoder"]))),
        tokenizer=tokenizer,
        transformer=seeded(1, lambda: ZImageTransformer2DModel(**configs["transformer"])))


def build_tiny_z_image_model(folder, seed: int = 0) -> pathlib.Path:
    """Write the tiny Z-Image as a diffusers folder and return its path."""
    return write_pipeline(build_tiny_z_image_pipeline(seed), folder)


def tiny_z_image_model(seed: int = 0) -> pathlib.Path:
    """The tiny Z-Image (of `seed`), built once per process (tiny_flow.cached_tiny_model)."""
    return cached_tiny_model(f"tiny-z-image-{seed}",
                             lambda folder: build_tiny_z_image_model(folder, seed))
