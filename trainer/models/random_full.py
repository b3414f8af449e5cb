"""Full-size SD 1.5, SDXL and Flux.1-dev models with random weights, built offline from the
configs this project ships (trainer/models/configs/): the real architectures (UNet or
transformer, VAE, CLIP and T5 text encoders, the real CLIP tokenizer) at their real sizes, for
benchmarks and memory checks. Nothing is downloaded.

    python -m trainer.models.random_full sd15|sdxl|flux OUT_DIR [--dtype float16]

Flux.1-dev (`flux`): its transformer is diffusers' FluxTransformer2DModel defaults with the
guidance embedding (19 double + 38 single blocks, 24 heads x 128: 11.9 B parameters, what
diffusers' single-file converter assumes for Flux.1-dev); CLIP-L from configs/sdxl; T5-XXL
(4.8 B) from configs/sd35/large; the VAE is SD 3's 16-channel autoencoder (configs/sd35/large,
the same architecture) with Flux's scale and shift; the scheduler Flux.1-dev's. Its T5
tokenizer is the one trainer/models/tiny_flow.py builds in code (the project ships no T5-XXL
tokenizer): captions become other ids, but every caption is padded to the same T5 length, so
the compute and memory are the real model's.

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

CONFIGS = pathlib.Path(__file__).parent / "configs"
CONFIG_DIRS = {"sd15": CONFIGS / "sd15", "sdxl": CONFIGS / "sdxl"}
FAMILIES = (*CONFIG_DIRS, "flux")  # what build_random_model builds
# Flux.1-dev's VAE latents (its vae/config.json) and scheduler (its scheduler/config.json)
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                  "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}
FLUX_INDEX = {"_class_name": "FluxPipeline",
              "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "text_encoder": ["transformers", "CLIPTextModel"],
              "text_encoder_2": ["transformers", "T5EncoderModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"],
              "tokenizer_2": ["transformers", "T5TokenizerFast"],
              "transformer": ["diffusers", "FluxTransformer2DModel"],
              "vae": ["diffusers", "AutoencoderKL"]}
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


def flow_meta_parts(family: str, *, include_buffers: bool = True,
                    overrides: dict[str, dict] | None = None) -> dict[str, torch.nn.Module]:
    """The parts of a full-size flow model ("flux" | "sd35") on the meta device. Buffers on the
    meta device too by default (counting: SD 3's position table is one, and with buffers left
    on the CPU accelerate's patching also unties T5's two embedding tables); a model to fill
    keeps them real. `overrides`: config values per part (tests narrow the model with them)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel
    large = CONFIGS / "sd35" / "large"
    changed = overrides or {}

    def config(part: str, cls, folder: pathlib.Path, **fixed):
        if hasattr(cls, "load_config"):  # diffusers
            return cls.from_config({**cls.load_config(folder), **fixed, **changed.get(part, {})})
        values = cls.config_class.from_pretrained(folder).to_dict()
        return cls(cls.config_class.from_dict({**values, **changed.get(part, {})}))

    with init_empty_weights(include_buffers=include_buffers):
        if family == "flux":
            return {"transformer": FluxTransformer2DModel(
                        **{"guidance_embeds": True, **changed.get("transformer", {})}),
                    "vae": config("vae", AutoencoderKL, large / "vae", **FLUX_VAE),
                    "text_encoder": config("text_encoder", CLIPTextModel,
                                           CONFIGS / "sdxl" / "text_encoder"),
                    "text_encoder_2": config("text_encoder_2", T5EncoderModel,
                                             large / "text_encoder_3")}
        if family == "sd35":
            clip = CLIPTextModelWithProjection
            return {"transformer": config("transformer", SD3Transformer2DModel,
                                          large / "transformer"),
                    "vae": config("vae", AutoencoderKL, large / "vae"),
                    "text_encoder": config("text_encoder", clip, large / "text_encoder"),
                    "text_encoder_2": config("text_encoder_2", clip, large / "text_encoder_2"),
                    "text_encoder_3": config("text_encoder_3", T5EncoderModel,
                                             large / "text_encoder_3")}
    raise ValueError(f"family {family!r}: choose flux or sd35")


# The output layer of each network: kept small so that a random model's output (the noise
# prediction, the VAE's moments) has a sane scale.
_LAST_LAYERS = ("conv_out.weight", "quant_conv.weight", "text_projection.weight")


def _materialize(module: torch.nn.Module) -> None:
    """Storage for every meta parameter (a shared one stays shared: T5's token table); the
    buffers, real already, are kept (`to_empty` would leave them uninitialised)."""
    made: dict[int, torch.nn.Parameter] = {}
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                     requires_grad=param.requires_grad)
            owner._parameters[name] = made[id(param)]


@torch.no_grad()
def fill_random(module: torch.nn.Module, generator: torch.Generator,
                pool: torch.Tensor | None = None) -> None:
    """Give every meta parameter storage (in its dtype) and cheap random values. With `pool`
    (unit normal values), a matrix is filled with copies of it, scaled: a copy runs at memory
    speed where drawing 16.7 B values for Flux.1 took minutes (the values mean nothing
    either way)."""
    _materialize(module)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            std = 1.0 / math.sqrt(fan_in)
            if name.endswith(_LAST_LAYERS):
                std *= 0.05
            if pool is None:
                param.normal_(0.0, std, generator=generator)
            else:
                flat = param.view(-1)
                for start in range(0, flat.numel(), pool.numel()):
                    piece = flat[start:start + pool.numel()]
                    piece.copy_(pool[:piece.numel()]).mul_(std)
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
    out_dir = pathlib.Path(out_dir)
    if family == "flux":
        return _build_random_flux(out_dir, seed=seed, dtype=dtype)
    config_dir = CONFIG_DIRS[family]
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
        _mark_complete(staging, family, seed, dtype, counts)
    return out_dir


def _build_random_flux(out_dir: pathlib.Path, *, seed: int, dtype: torch.dtype,
                       overrides: dict[str, dict] | None = None) -> pathlib.Path:
    """A random Flux.1-dev as a diffusers folder (FluxPipeline's layout), one part at a time:
    the peak memory is the transformer's (23.8 GB in bfloat16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from trainer.models.tiny_flow import build_tiny_t5_tokenizer
    with atomic_folder(out_dir) as staging:
        (staging / "model_index.json").write_text(json.dumps(FLUX_INDEX, indent=2) + "\n",
                                                  encoding="utf-8")
        FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).save_pretrained(staging / "scheduler")
        shutil.copytree(CONFIGS / "sdxl" / "tokenizer", staging / "tokenizer")
        build_tiny_t5_tokenizer().save_pretrained(staging / "tokenizer_2")
        counts = {}
        # 2^24 + 1 values: a prime-ish length, so that rows of a matrix do not repeat in step
        pool = torch.randn(2**24 + 1, generator=torch.Generator().manual_seed(seed))
        for index, part in enumerate(("transformer", "vae", "text_encoder", "text_encoder_2")):
            meta = flow_meta_parts("flux", include_buffers=False, overrides=overrides)[part]
            if part == "text_encoder_2":  # one token table, as T5's files hold it
                meta.set_input_embeddings(meta.shared)
            # the VAE in float32, as the engine holds it
            model = torch.nn.Module.to(meta, torch.float32 if part == "vae" else dtype)
            fill_random(model, torch.Generator().manual_seed(seed + index), pool)
            counts[part] = sum(p.numel() for p in model.parameters())
            model.save_pretrained(staging / part)
            del model
        _mark_complete(staging, "flux", seed, dtype, counts)
    return out_dir


def _mark_complete(staging: pathlib.Path, family: str, seed: int, dtype: torch.dtype,
                   counts: dict[str, int]) -> None:
    """The marker written last: a folder with it is whole."""
    (staging / MARKER).write_text(json.dumps(
        {"family": family, "seed": seed, "dtype": str(dtype).removeprefix("torch."),
         "parameters": counts}, indent=2) + "\n", encoding="utf-8")


def is_built(path) -> bool:
    return (pathlib.Path(path) / MARKER).is_file()


def parameter_counts(family: str) -> dict[str, int]:
    """Parameters per part of the full-size model, counted on the meta device (no memory)."""
    config_dir = CONFIG_DIRS[family]
    return {part: sum(p.numel() for p in meta_model(family, part, config_dir).parameters())
            for part in ["unet", "vae", *_text_encoder_classes(family)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
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
