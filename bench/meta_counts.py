"""Sizes of the full-size flow models, counted on the meta device (no memory, no weights):
the parameters of each part, and the activations a denoiser's forward keeps for its backward
pass. They give bench/cases.py its FULL_PARAMETERS and ACTIVATION_GB_256 entries for Flux.1-dev
and SD 3.5 Large, models this machine cannot hold.

    python -m bench.meta_counts [--resolution 256]

Where the configs come from (see the comments in bench/cases.py): Flux.1-dev's transformer is
diffusers' FluxTransformer2DModel defaults with a guidance embedding; SD 3.5 Large's parts and
T5-XXL are the configs the project ships in trainer/models/configs/sd35/large; CLIP-L is
configs/sdxl's.

The activation count runs one forward of the real-size model on meta tensors with every weight
trainable (an upper bound for LoRA on every linear layer) and adds up the tensors autograd
saves, once each, leaving out the weights. Attention is counted as a fused kernel keeps it
(flash / memory-efficient SDPA on a GPU: q, k, v, the output, a row statistic); the math path
of the meta device would keep the T x T attention matrix, which no GPU run here does.
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib

import torch

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "trainer" / "models" / "configs"
T5_TOKENS = 77  # the engine's T5 length for Flux (text_encoder_2_sequence_length) and SD 3


def _meta_parts(family: str) -> dict[str, torch.nn.Module]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from trainer.models.random_full import flow_meta_parts
    if family in ("flux", "sd35"):
        return flow_meta_parts(family)
    if family in ("sd15", "sdxl"):  # the reference the activation ratio is taken from
        with init_empty_weights(include_buffers=True):
            return {"unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(CONFIGS / family / "unet"))}
    raise ValueError(f"family {family!r}: choose flux, sd35, sd15 or sdxl")


def parameter_counts(family: str) -> dict[str, int]:
    """{part: parameters} of the full-size model of a flow family ("flux" | "sd35")."""
    if family not in ("flux", "sd35"):
        raise ValueError(f"family {family!r}: choose flux or sd35")
    return {part: sum(p.numel() for p in module.parameters())
            for part, module in _meta_parts(family).items()}


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel saves for backward: q, k, v, the output, a row statistic."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1]))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: only the forward's saved tensors are counted
        raise NotImplementedError


@contextlib.contextmanager
def _fused_attention():
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(*args, **kwargs):
        query, key, value = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")
                                           ][len(args):])[:3]
        return _FusedAttention.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _forward(family: str, model: torch.nn.Module, resolution: int):
    side = resolution // 8  # latent pixels of the 8x VAEs
    with torch.device("meta"):
        if family == "flux":
            tokens = (side // 2) ** 2
            return model(hidden_states=torch.randn(1, tokens, 64),
                         encoder_hidden_states=torch.randn(1, T5_TOKENS, 4096),
                         pooled_projections=torch.randn(1, 768), timestep=torch.ones(1),
                         img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(T5_TOKENS, 3),
                         guidance=torch.ones(1), return_dict=False)[0]
        if family == "sd35":  # CLIPs' 77 tokens, then T5's
            return model(hidden_states=torch.randn(1, 16, side, side), timestep=torch.ones(1),
                         encoder_hidden_states=torch.randn(1, 77 + T5_TOKENS, 4096),
                         pooled_projections=torch.randn(1, 2048), return_dict=False)[0]
        width = 768 if family == "sd15" else 2048
        extra = {} if family == "sd15" else {"added_cond_kwargs": {
            "text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}}
        return model(torch.randn(1, 4, side, side), torch.ones(1),
                     torch.randn(1, 77, width), **extra).sample


def saved_activation_gb(family: str, resolution: int = 256) -> float:
    """GB of the tensors one forward of the family's denoiser (batch 1, float32, every weight
    trainable, no checkpointing) keeps for its backward pass, weights left out."""
    model = next(m for part, m in _meta_parts(family).items() if part in ("unet", "transformer"))
    model.train()
    weights = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in weights and id(tensor) not in weights:
            saved[id(base)] = max(saved.get(id(base), 0), base.numel() * base.element_size())
        return tensor

    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        output = _forward(family, model, resolution)  # kept alive: ids stay unique
    del output
    return sum(saved.values()) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args(argv)
    for family in ("flux", "sd35"):
        counts = parameter_counts(family)
        print(family, {k: f"{v:,}" for k, v in counts.items()}, f"total {sum(counts.values()):,}")
    for family in ("sd15", "sdxl", "flux", "sd35"):
        print(f"{family}: {saved_activation_gb(family, args.resolution):.2f} GB saved for "
              f"backward at {args.resolution} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
