"""Flux.1 (dev and schnell, and models of their shape): FluxTransformer2DModel conditioned on
CLIP-L's pooled output (text_encoder, OneTrainer's numbering) and T5's hidden states
(text_encoder_2), trained by flow matching on 2x2-packed latents.

What is Flux about it:
- Latents of the 8x VAE, centred and scaled (shift_factor, scaling_factor; the data pipeline
  applies both), are packed into tokens of 2x2 pixels: [B, C, h, w] -> [B, h/2·w/2, 4C]; each
  token's position id is (0, row, column); the text tokens' ids are zeros.
- The time input is σ (the pipeline's timestep / 1000).
- A model with a guidance embedding (dev) reads the guidance scale as an input: while training
  it is the constant `transformer.guidance_scale` (OneTrainer's key; 1.0 by default, as
  OneTrainer, ai-toolkit, SimpleTuner and kohya's docs use). Schnell has none and ignores it.
- T5 reads `text_encoder_2_sequence_length` tokens (OneTrainer's key and default, 77; the
  pipeline's own default is 512); samples use the same length.
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from trainer.models.family import compute_dtype_of, tokenize
from trainer.models.flow_family import FlowFamily, FlowSpec
from trainer.models.transformer_layouts import FLUX

FLUX_SPEC = FlowSpec(
    name="Flux.1",
    pipeline_class=FluxPipeline,
    pipeline_names=("FluxPipeline",),
    transformer_class=FluxTransformer2DModel,
    text_encoders={"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel},
    tokenizers={"tokenizer": CLIPTokenizer, "tokenizer_2": T5TokenizerFast},
    layout=FLUX,
)


class FluxComponents:
    """The loaded parts under the names diffusers' FluxPipeline takes."""

    def __init__(self, parts: dict):
        self.__dict__.update(parts)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2·w/2, 4C]: each 2x2 patch one token, channels-major within it."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of h x w pixels."""
    b, _, width = tokens.shape
    c = width // 4
    patches = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """[h·w, 3] position ids of an h x w grid of tokens: (0, row, column)."""
    rows = torch.arange(h, device=device).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=device).view(1, w).expand(h, w)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.reshape(h * w, 3).to(dtype)


class FluxFamily(FlowFamily):
    SPEC = FLUX_SPEC
    DROPOUT_KEYS = {"text_encoder": ("pooled_projections",),
                    "text_encoder_2": ("encoder_hidden_states",)}
    # OneTrainer's BaseFluxSetup presets ("transformer_block" matches both kinds of block).
    LAYER_PRESETS = {"attn-mlp": ["attn", "ff.net", "proj_mlp"], "attn-only": ["attn"],
                     "blocks": ["transformer_block"], "full": []}
    LAYER_NAME_EXAMPLE = "transformer_blocks.0.attn.to_q, single_transformer_blocks.0.proj_mlp"

    @classmethod
    def card(cls, model_type):
        from trainer.model_card import FLOW_CARD, FamilyCard
        return FamilyCard(("flux",), "FluxPipeline", "FluxTransformer2DModel",
                          comfy_text_encoders="a *DualCLIPLoader* (type flux: clip_l and t5xxl)",
                          **FLOW_CARD)

    @classmethod
    def load(cls, config):
        parts = cls.load_components(config)
        components = FluxComponents(parts)
        return cls(
            components=components, vae=parts["vae"], noise_scheduler=parts["noise_scheduler"],
            parts={"text_encoder": parts["text_encoder"],
                   "text_encoder_2": parts["text_encoder_2"],
                   "transformer": parts["transformer"]},
            kohya_prefixes={"transformer": "lora_unet_", "text_encoder": "lora_te1_"},
            base_model_version="flux1", lora_architecture=cls.architecture(parts) + "/lora",
            config=config, text_cache_keys=("encoder_hidden_states", "pooled_projections"),
            objective=cls.objective_for(parts["noise_scheduler"], config))

    @staticmethod
    def architecture(parts) -> str:
        """modelspec.architecture (the ids kohya's sd-scripts write)."""
        guided = parts["transformer"].config.guidance_embeds
        return "flux-1-dev" if guided else "flux-1-schnell"

    @property
    def checkpoint_architecture(self) -> str:
        return self.lora_architecture.removesuffix("/lora")

    @property
    def implementation(self) -> str:
        return "https://github.com/black-forest-labs/flux"

    @property
    def guided(self) -> bool:
        """The model reads a guidance scale (Flux.1 dev), or not (schnell)."""
        return bool(self.parts["transformer"].config.guidance_embeds)

    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        """CLIP-L's pooled output and T5's last hidden states (clip skip does not apply: Flux
        reads CLIP's pooled output only). With `transformer.attention_mask`, T5's states of
        the padding tokens are zeroed, as OneTrainer does."""
        clip_ids = tokenize(self.components.tokenizer, captions, device)
        length = self.sequence_length("text_encoder_2")
        t5_ids = tokenize(self.components.tokenizer_2, captions, device, max_length=length)
        with torch.set_grad_enabled(grad.get("text_encoder", False)):
            pooled = self.module("text_encoder")(clip_ids, output_hidden_states=False).pooler_output
        with torch.set_grad_enabled(grad.get("text_encoder_2", False)):
            hidden = self.module("text_encoder_2")(t5_ids)[0]
        if self._setting("transformer", "attention_mask", False):
            pad = self.components.tokenizer_2.pad_token_id
            hidden = hidden * (t5_ids != pad).to(hidden.dtype)[:, :, None]
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def predict(self, noisy, timesteps, conditioning):
        transformer = self.module("transformer")
        plain = self.parts["transformer"]
        dtype = compute_dtype_of(plain)
        b, _, h, w = noisy.shape
        text = conditioning["encoder_hidden_states"].to(dtype)
        guidance = None
        if self.guided:
            scale = self._setting("transformer", "guidance_scale", 1.0)
            guidance = torch.full((b,), float(scale), device=noisy.device, dtype=torch.float32)
        out = transformer(
            hidden_states=pack(noisy).to(dtype), encoder_hidden_states=text,
            pooled_projections=conditioning["pooled_projections"].to(dtype),
            timestep=(timesteps / 1000).to(dtype),
            img_ids=image_ids(h // 2, w // 2, noisy.device, dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=dtype),
            guidance=guidance, return_dict=False)[0]
        return unpack(out, h, w)

    def pipeline(self):
        c = self.components
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            vae=self.vae, text_encoder=self.parts["text_encoder"], tokenizer=c.tokenizer,
            text_encoder_2=self.parts["text_encoder_2"], tokenizer_2=c.tokenizer_2,
            transformer=self.parts["transformer"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_inputs(self):
        return {"max_sequence_length": self.sequence_length("text_encoder_2")}
