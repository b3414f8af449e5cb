"""Full-size SD 1.5 and SDXL models with random weights, built offline from the configs this
project ships (trainer/models/configs/): the real architectures (UNet, VAE, CLIP text
encoders, the real CLIP tokenizer) at their real sizes, for benchmarks and memory checks.
Nothing is downloaded.

    python -m trainer.models.random_full sd15 OUT_DIR [--dtype float16]

Random init of an 860M-parameter UNet (2.6B for SDXL) through the modules' own initialisers
is slow; here every module is created on the meta device (no memory, no init), then given
storage and filled once: matrices and kernels ~ N(0, 1/fan_in) (activations keep roughly unit
scale through the network, so the loss is finite and not NaN), norm scales 1, biases 0, the
last layer of each network small. The values mean nothing; the compute and memory are those
of the real model. Weights are written in `dtype` (float16 by default: half the disk and load
time; the loader casts to the training dtype), as a diffusers folder that `base_model_name`
accepts.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil

import torch
from trainer.io import atomic_folder

CONFIG_DIRS = {"sd15": pathlib.Path(__file__).parent / "configs" / "sd15",
               "sdxl": pathlib.Path(__file__).parent / "configs" / "sdxl"}
MARKER = "random_full.json"  # written last: a folder with it is complete


def _text_encoder_classes(family: str) -> dict[str, type]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    if family == "sd15":
        return {"text_encoder": CLIPTextModel}
    return {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}


def meta_model(family: str, part: str, config_dir: pathlib.Path) -> torch.nn.Module:
    """One part of the full-size model on the meta device: its shapes, no memory."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    with init_empty_weights():
        if part == "unet":
            return UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(config_dir / "unet"))
        if part == "vae":
            return AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        cls = _text_encoder_classes(family)[part]
        return cls(cls.config_class.from_pretrained(config_dir / part))


# The output layer of each network: kept small so that a random model's output (the noise
# prediction, the VAE's moments) has a sane scale.
_LAST_LAYERS = ("conv_out.weight", "quant_conv.weight", "text_projection.weight")


@torch.no_grad()
def fill_random(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every meta parameter storage (in its dtype) and cheap random values."""
    module.to_empty(device="cpu")
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            std = 1.0 / math.sqrt(fan_in)
            if name.endswith(_LAST_LAYERS):
                std *= 0.05
            param.normal_(0.0, std, generator=generator)
        elif name.endswith("weight"):  # norm scales
            param.fill_(1.0)
        else:  # biases, scalars
            param.zero_()
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point() and not torch.isfinite(buffer).all():
            raise RuntimeError(f"buffer {name} is not initialised")


def build_random_model(family: str, out_dir, *, seed: int = 0,
                       dtype: torch.dtype = torch.float16) -> pathlib.Path:
    """Write a random full-size `family` ("sd15" | "sdxl") model as a diffusers folder and
    return its path. One part is built, filled and written at a time, so the peak memory is
    that of the largest part (SDXL's UNet: 5.1 GB in float16). Written beside `out_dir` and
    renamed into place: a folder that exists is whole."""
    config_dir = CONFIG_DIRS[family]
    out_dir = pathlib.Path(out_dir)
    with atomic_folder(out_dir) as staging:
        shutil.copy(config_dir / "model_index.json", staging / "model_index.json")
        shutil.copytree(config_dir / "scheduler", staging / "scheduler")
        for name in ("tokenizer", "tokenizer_2"):
            if (config_dir / name).is_dir():
                shutil.copytree(config_dir / name, staging / name)
        counts = {}
        parts = ["unet", "vae", *_text_encoder_classes(family)]
        for index, part in enumerate(parts):
            # nn.Module.to: diffusers' own .to() warns about casts it cannot judge on meta
            model = torch.nn.Module.to(meta_model(family, part, config_dir), dtype)
            generator = torch.Generator().manual_seed(seed + index)
            fill_random(model, generator)
            counts[part] = sum(p.numel() for p in model.parameters())
            if part in ("unet", "vae"):
                model.save_pretrained(staging / part, safe_serialization=True)
            else:
                model.save_pretrained(staging / part)  # transformers: safetensors
            del model
        (staging / MARKER).write_text(json.dumps(
            {"family": family, "seed": seed, "dtype": str(dtype).removeprefix("torch."),
             "parameters": counts}, indent=2) + "\n", encoding="utf-8")
    return out_dir


def is_built(path) -> bool:
    return (pathlib.Path(path) / MARKER).is_file()


def parameter_counts(family: str) -> dict[str, int]:
    """Parameters per part of the full-size model, counted on the meta device (no memory)."""
    config_dir = CONFIG_DIRS[family]
    return {part: sum(p.numel() for p in meta_model(family, part, config_dir).parameters())
            for part in ["unet", "vae", *_text_encoder_classes(family)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(CONFIG_DIRS))
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    args = parser.parse_args(argv)
    path = build_random_model(args.family, args.out_dir, seed=args.seed,
                              dtype=getattr(torch, args.dtype))
    print(f"Wrote a random full-size {args.family} model to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
