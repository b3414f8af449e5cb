"""A tiny CLIPSeg built offline: the real architecture (CLIP text and vision towers, FiLM
conditioning, the transposed-convolution decoder of `rd64-refined`), random weights, ~200 KB.

Tests and demos run the clipseg mask method end to end with it; its masks mean nothing.
The tokenizer is the tiny BPE of `trainer.models.tiny`, so nothing is downloaded.
"""
from __future__ import annotations

import pathlib

import torch

from trainer.models.tiny import build_tiny_tokenizer
from trainer.io import atomic_folder

IMAGE_SIZE = 32  # the processor resizes every image to this square, as the real one does to 352
# CLIP's normalisation, as the real processor has it
_MEAN = [0.48145466, 0.4578275, 0.40821073]
_STD = [0.26862954, 0.26130258, 0.27577711]


def _image_processor():
    try:  # transformers >= 5 without torchvision: the PIL backend, named to skip a warning
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    return Processor(do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                     resample=2, do_rescale=True, do_normalize=True,
                     image_mean=_MEAN, image_std=_STD)


def build_tiny_clipseg_parts(seed: int = 0):
    """(CLIPSegForImageSegmentation, CLIPSegProcessor) in memory, seeded."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
    )

    tokenizer = build_tiny_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.eos_token_id}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 8}
    config = CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=16,
                           extract_layers=[0, 1], reduce_dim=16, decoder_num_attention_heads=2,
                           decoder_intermediate_size=32, use_complex_transposed_convolution=True)
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    processor = CLIPSegProcessor(image_processor=_image_processor(), tokenizer=tokenizer)
    return model, processor


def build_tiny_clipseg(out_dir, seed: int = 0) -> pathlib.Path:
    """Write the tiny CLIPSeg (safetensors weights + processor) to `out_dir`; returns it.

    Written beside the destination and renamed into place, so a crash never leaves a
    half-written model folder.
    """
    model, processor = build_tiny_clipseg_parts(seed)
    out_dir = pathlib.Path(out_dir)
    with atomic_folder(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return out_dir
