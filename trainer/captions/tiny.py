"""Tiny captioning models built offline: the real Florence-2 and BLIP architectures (DaViT vision
tower + BART, ViT + BERT decoder), random weights, a few hundred KB each.

Tests and demos run automatic captioning end to end with them; their captions are strings of
real words in a random order. The tokenizers are made in code from a small vocabulary of whole
words (a byte-level BPE for Florence-2, a WordPiece for BLIP, as the real ones are), so nothing
is downloaded and every generated token decodes to a word.
"""
from __future__ import annotations

import pathlib

import torch

from trainer.io import atomic_folder

# Whole words the tiny models can say: each is one token, so a caption of N tokens is N words.
WORDS = (
    "a an the of with on in at and photo picture image close up view portrait black white "
    "red blue green yellow orange brown grey dark bright small large old young man woman "
    "person astronaut cat dog cup coffee rocket launch night sky space suit camera table "
    "window tree street city field water light shadow standing sitting holding looking"
).split()

FLORENCE_IMAGE_SIZE = 64  # DaViT downsamples 32x: a 2 x 2 grid, + 1 pooled token = 5 tokens
BLIP_IMAGE_SIZE = 32
# The real processors' normalisations: Florence-2 ImageNet's, BLIP OpenAI CLIP's.
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _pil_processor(name: str):
    """transformers >= 5 without torchvision: the PIL backend, named to skip a warning."""
    import transformers
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


# --------------------------------------------------------------------------------------------
# Florence-2


def _florence_tokenizer():
    """A byte-level BPE like Florence-2's (BART's): `Ġ` marks a space; <image> is the token
    the processor repeats once per image feature."""
    from transformers import BartTokenizer

    from trainer.models.tiny import _bytes_to_unicode

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    alphabet = list(_bytes_to_unicode().values())
    words = ["Ġ" + word for word in WORDS]
    tokens = list(dict.fromkeys(specials + alphabet + words + ["<mask>", "<image>"]))
    vocab = {token: index for index, token in enumerate(tokens)}
    # Merges that rebuild every word from its characters, so the words tokenize as one token.
    merges: list[tuple[str, str]] = []
    known = set(alphabet)
    for word in words:
        piece = word[0]
        for char in word[1:]:
            if piece + char not in known:
                merges.append((piece, char))
                known.add(piece + char)
                if piece + char not in vocab:
                    vocab[piece + char] = len(vocab)
            piece += char
    return BartTokenizer(vocab=vocab, merges=merges,
                         extra_special_tokens={"image_token": "<image>"})


def build_tiny_florence2_parts(seed: int = 0):
    """(Florence2ForConditionalGeneration, Florence2Processor) in memory, seeded."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    tokenizer = _florence_tokenizer()
    grid = FLORENCE_IMAGE_SIZE // 32
    image_processor = _pil_processor("CLIPImageProcessor")(
        do_resize=True, size={"height": FLORENCE_IMAGE_SIZE, "width": FLORENCE_IMAGE_SIZE},
        do_center_crop=False, do_rescale=True, do_normalize=True, resample=3,
        image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD,
        image_seq_length=grid * grid + 1)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   post_processor_config={"pure_text": {}})
    text = {"vocab_size": len(tokenizer), "d_model": 16, "encoder_layers": 1,
            "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
            "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 256,
            "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_eos_token_id": tokenizer.eos_token_id}
    vision = {"depths": [1, 1, 1, 1], "embed_dim": [8, 16, 16, 16], "num_heads": [1, 2, 2, 2],
              "num_groups": [1, 2, 2, 2], "window_size": 2, "projection_dim": 16,
              "max_position_embeddings": 8, "drop_path_rate": 0.0}
    config = Florence2Config(text_config=text, vision_config=vision,
                             image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    # The byte alphabet outnumbers the words 4 to 1, and random weights would mostly pick
    # bytes, which decode to stray characters: the saved generation config keeps the model
    # to whole words (and the end of text), so its captions read as words.
    words = {tokenizer.convert_tokens_to_ids("Ġ" + word) for word in WORDS}
    model.generation_config.suppress_tokens = sorted(
        set(range(len(tokenizer))) - words - {tokenizer.eos_token_id})
    return model, processor


# --------------------------------------------------------------------------------------------
# BLIP


def _blip_tokenizer():
    """A WordPiece like BLIP's (BERT's, with [DEC] as the decoder's start token)."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(specials + WORDS))}
    return BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)


def build_tiny_blip_parts(seed: int = 0):
    """(BlipForConditionalGeneration, BlipProcessor) in memory, seeded."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    tokenizer = _blip_tokenizer()
    image_processor = _pil_processor("BlipImageProcessor")(
        do_resize=True, size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE}, resample=3,
        do_rescale=True, do_normalize=True, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "encoder_hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 128, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.sep_token_id, "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": BLIP_IMAGE_SIZE, "patch_size": 8,
              "initializer_range": 0.02}
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config).eval(), processor


# --------------------------------------------------------------------------------------------


def _write(parts, out_dir) -> pathlib.Path:
    """Written beside the destination and renamed into place, so a crash never leaves a
    half-written model folder."""
    model, processor = parts
    out_dir = pathlib.Path(out_dir)
    with atomic_folder(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return out_dir


def build_tiny_florence2(out_dir, seed: int = 0) -> pathlib.Path:
    """Write the tiny Florence-2 (safetensors weights + processor) to `out_dir`; returns it."""
    return _write(build_tiny_florence2_parts(seed), out_dir)


def build_tiny_blip(out_dir, seed: int = 0) -> pathlib.Path:
    """Write the tiny BLIP (safetensors weights + processor) to `out_dir`; returns it."""
    return _write(build_tiny_blip_parts(seed), out_dir)
