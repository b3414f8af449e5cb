"""A tiny Qwen-Image built offline: diffusers' QwenImageTransformer2DModel, its VAE
AutoencoderKLQwenImage, a Qwen2.5-VL text encoder (`Qwen2_5_VLForConditionalGeneration`, the real
checkpoint's class, with a vision tower of one small block that text never reaches) and a
Qwen2-style byte-level BPE tokenizer built in code, written as a diffusers folder that
`QwenImagePipeline.from_pretrained` loads.

What the real model has and the tiny one keeps, so that the same code paths run:
- the prompt template's system turn is 34 tokens, as with Qwen's real tokenizer: its words are
  whole tokens of the tiny vocabulary, so QwenImagePipeline's fixed `prompt_template_encode_
  start_idx = 34` (and OneTrainer's crop) cuts exactly the template off, leaving the caption;
- Qwen's special tokens <|endoftext|> (the padding), <|im_start|>, <|im_end|> and the vision
  tokens the Qwen2.5-VL config names;
- the text encoder's multimodal rotary sections sum to half its head size, as the class asks;
- the VAE compresses 8x (three downsampling stages) with per-channel latent mean and std, 4
  latent channels; the transformer reads 2x2 patches of them (in_channels = 16);
- the scheduler is Qwen-Image's: dynamic shifting with its own constants, a terminal shift.
"""
from __future__ import annotations

import pathlib

from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                       QwenImagePipeline, QwenImageTransformer2DModel)
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2Tokenizer)

from trainer.models.tiny import write_pipeline
from trainer.models.tiny_flow import _T5_WORDS, cached_tiny_model, seeded_parts
from trainer.models.tiny_z_image import (END_OF_TEXT, TURN_END, TURN_START, add_merge,
                                         add_pieces, bpe_vocabulary)

# The system turn QwenImagePipeline (and OneTrainer) put before every caption.
# How the system turn's words stand in it: after a space ("Ġ"), or at a line's start.
SYSTEM_WORDS = ["system", "user", "Describe"] + ["Ġ" + word for word in (
    "the image by detailing color shape size texture quantity text spatial relationships of "
    "objects and background").split()]
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
MODEL_MAX_LENGTH = 32768

# Qwen-Image's scheduler config (its model folder's scheduler/scheduler_config.json).
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
    max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
    time_shift_type="exponential")


def build_tiny_qwen25_tokenizer() -> Qwen2Tokenizer:
    """Qwen2Tokenizer over a byte-level BPE whose first words are the system turn's (each made
    one token, as Qwen's real vocabulary has them), then the demo captions' words; Qwen's
    special and vision tokens after it."""
    vocab, merges = bpe_vocabulary(words=())  # the 256 byte symbols
    # The system words' merges rank first, each built up from its first symbol: no pair inside
    # one of them is ever merged before its own chain (only these words start with "Ġ" or
    # their first letters), so each ends as one token.
    for text in SYSTEM_WORDS:
        add_pieces(vocab, merges, text)
    _, more = bpe_vocabulary(_T5_WORDS)
    for left, right in more:  # then the caption words' pieces
        add_merge(vocab, merges, left, right)
    for token in (END_OF_TEXT, TURN_START, TURN_END, *VISION_TOKENS):
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=TURN_END,
                          pad_token=END_OF_TEXT,
                          additional_special_tokens=[TURN_START, *VISION_TOKENS],
                          model_max_length=MODEL_MAX_LENGTH)


def tiny_qwen_image_configs(tokenizer) -> dict[str, dict]:
    """Configs of the tiny model's parts, by pipeline component name."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=2048, tie_word_embeddings=True,
                bos_token_id=ids(END_OF_TEXT), eos_token_id=ids(TURN_END),
                pad_token_id=ids(END_OF_TEXT),
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})  # 8 = head 16 / 2
    # the vision tower: one small block (the class needs one; captions never reach it)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                  out_hidden_size=text["hidden_size"], patch_size=2, spatial_merge_size=1,
                  temporal_patch_size=1, fullatt_block_indexes=[0], window_size=4)
    text_encoder = dict(text_config=text, vision_config=vision,
                        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                        vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
    z_dim = 4
    vae = dict(base_dim=16, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
               temperal_downsample=[False, True, True],   # three stages: 8x, as the real one
               latents_mean=[0.1, -0.2, 0.3, -0.4][:z_dim],
               latents_std=[1.5, 2.0, 2.5, 3.0][:z_dim])
    transformer = dict(patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2,
                       attention_head_dim=16, num_attention_heads=2,
                       joint_attention_dim=text["hidden_size"], guidance_embeds=False,
                       axes_dims_rope=(4, 6, 6))  # sums to the head size, 16
    return {"text_encoder": text_encoder, "transformer": transformer, "vae": vae,
            "scheduler": QWEN_IMAGE_SCHEDULER}


def build_tiny_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """The tiny model in memory, each part seeded on its own (`seeded_parts`)."""
    tokenizer = build_tiny_qwen25_tokenizer()
    configs = tiny_qwen_image_configs(tokenizer)

    seeded = seeded_parts(seed)
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
        vae=seeded(2, lambda: AutoencoderKLQwenImage(**configs["vae"])),
        text_encoder=seeded(0, lambda: Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(**configs["text_encoder"]))),
        tokenizer=tokenizer,
        transformer=seeded(1, lambda: QwenImageTransformer2DModel(**configs["transformer"])))


def build_tiny_qwen_image_model(folder, seed: int = 0) -> pathlib.Path:
    """Write the tiny Qwen-Image as a diffusers folder and return its path."""
    return write_pipeline(build_tiny_qwen_image_pipeline(seed), folder)


def tiny_qwen_image_model(seed: int = 0) -> pathlib.Path:
    """The tiny Qwen-Image (of `seed`), built once per process (tiny_flow.cached_tiny_model)."""
    return cached_tiny_model(f"tiny-qwen-image-{seed}",
                             lambda folder: build_tiny_qwen_image_model(folder, seed))
