"""Flux.2 klein (FLUX_2: klein 4B / 9B and their base models): diffusers' Flux2Transformer2DModel
conditioned on a Qwen3 language model's hidden states, trained by flow matching on the
batch-normalised latents of Flux.2's VAE (AutoencoderKLFlux2).

What is Flux.2 klein about it (as diffusers' Flux2KleinPipeline and OneTrainer's Flux2Model /
BaseFlux2Setup do it):
- A caption is written as a chat turn with Qwen's chat template (a user message, the assistant's
  turn opened, thinking off), tokenised to `text_encoder_sequence_length` tokens (OneTrainer's
  key, 512) and read by the text encoder with its padding masked. The conditioning is the hidden
  states of layers 9, 18 and 27 side by side, of every token, padding included: neither the
  pipeline nor OneTrainer masks it in the transformer.
- The VAE's latents are cut into 2x2 patches (4x the channels), normalised by the VAE's batch-norm
  statistics per patched channel, and packed into tokens; each token's position is
  (0, row, column, 0), a text token's (0, 0, 0, index). The engine keeps latents unpatched
  (masks, buckets and the latent cache stay per latent pixel): `NormalizedLatents` hands it the
  normalised latents unpatched again, which is the same affine map per latent pixel.
- The time input is σ (the pipeline's timestep / 1000); the output is the velocity ε − x₀.
- Dynamic shifting uses the scheduler's constants on the 2x2 patches, as OneTrainer computes it.
- The text encoder is never trained (OneTrainer trains the transformer only); klein has no
  guidance embedding.
- A dropped caption is the empty one, the pipeline's unconditional input (OneTrainer has none).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                       Flux2Transformer2DModel)
from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

from trainer.errors import ModelLoadError
from trainer.models import loading
from trainer.models.family import compute_dtype_of, tokenize
from trainer.models.flow_family import EmptyCaptionDropout, FlowFamily, FlowSpec, WrappedVAE
from trainer.models.transformer_layouts import FLUX2

# OneTrainer's default `text_encoder_sequence_length` for Flux.2, and the pipeline's.
SEQUENCE_LENGTH = 512
# The encoder layers whose states the pipeline and OneTrainer read, side by side.
HIDDEN_LAYERS = (9, 18, 27)


def chat_prompt(tokenizer, caption: str) -> str:
    """The caption as Flux2KleinPipeline hands it to the tokenizer: one user turn, the
    assistant's turn opened, thinking off."""
    return tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


# --- latents: 2x2 patches, batch norm, tokens ----------------------------------------------------

def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, 4C, h/2, w/2]: each 2x2 patch's pixels as channels (C-major)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `patchify`."""
    b, c4, h, w = latents.shape
    pixels = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return pixels.reshape(b, c4 // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h·w, C]: one token per (patched) latent pixel."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c = tokens.shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """[h·w, 4] positions of an h x w grid of tokens: (0, row, column, 0)."""
    rows = torch.arange(h, device=device).view(h, 1).expand(h, w).reshape(-1)
    cols = torch.arange(w, device=device).view(1, w).expand(h, w).reshape(-1)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1)


def text_ids(length: int, device) -> torch.Tensor:
    """[length, 4] positions of the caption's tokens: (0, 0, 0, index)."""
    index = torch.arange(length, device=device)
    zeros = torch.zeros_like(index)
    return torch.stack([zeros, zeros, zeros, index], dim=-1)


class _Gaussian:
    """A latent distribution by its mean and standard deviation (what the engine reads)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def sample(self, generator=None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class NormalizedLatents(WrappedVAE):
    """Flux.2's VAE as the engine reads a VAE (trainer/data/cache.py: `encode(...).latent_dist`
    with a mean and std, then `config.shift_factor` / `config.scaling_factor`): its latent
    distribution already normalised by the batch-norm statistics of the 2x2-patched channels,
    and unpatched again, with a scaling factor of 1. The normalisation is affine per latent
    pixel, so mean' + std'·ε is exactly the normalised sample mean + std·ε. Samples and exports
    use the VAE itself (`.vae`), which the pipeline normalises the same way."""

    def __init__(self, vae: AutoencoderKLFlux2):
        super().__init__(vae)
        self.config = SimpleNamespace(**dict(vae.config), scaling_factor=1.0, shift_factor=None)

    def statistics(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return mean, std.to(dtype)

    def encode(self, pixels: torch.Tensor):
        dist = self.vae.encode(pixels).latent_dist
        mean, std = dist.mean, dist.std
        bn_mean, bn_std = self.statistics(mean.dtype)
        normalized = _Gaussian(unpatchify((patchify(mean) - bn_mean) / bn_std),
                               unpatchify(patchify(std) / bn_std))
        return SimpleNamespace(latent_dist=normalized)


# --- the transformer file in the original layout -------------------------------------------------

def single_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformer file's tensors (BFL's layout, what OneTrainer's ORIGINAL_TRANSFORMER and
    ComfyUI hold) as they are: diffusers' own single-file converter reads them."""
    if "double_stream_modulation_img.lin.weight" not in {
            k.removeprefix("model.diffusion_model.") for k in state}:
        raise ValueError("no Flux.2 global modulation")
    return state


FLUX2_SPEC = FlowSpec(
    name="Flux.2 klein",
    pipeline_class=Flux2KleinPipeline,
    pipeline_names=("Flux2KleinPipeline",),
    transformer_class=Flux2Transformer2DModel,
    text_encoders={"text_encoder": Qwen3ForCausalLM},
    tokenizers={"tokenizer": Qwen2Tokenizer},
    layout=FLUX2,
    vae_class=AutoencoderKLFlux2,
    single_file_state=single_file_state,
)


class Flux2SamplingPipeline(Flux2KleinPipeline):
    """Flux2KleinPipeline called as the engine calls every sampler: the prompt first, and a
    negative prompt as text (the pipeline itself takes an image first and a negative prompt
    only as states; without one it encodes the empty caption, as before). For samples only:
    exports write the pipeline itself."""

    def __call__(self, prompt=None, negative_prompt=None, **kwargs):
        if negative_prompt and "negative_prompt_embeds" not in kwargs:
            states, _ = self.encode_prompt(
                negative_prompt, device=self._execution_device,
                max_sequence_length=kwargs.get("max_sequence_length", SEQUENCE_LENGTH))
            kwargs["negative_prompt_embeds"] = states
        return super().__call__(prompt=prompt, **kwargs)


class Flux2Family(EmptyCaptionDropout, FlowFamily):
    SPEC = FLUX2_SPEC
    # OneTrainer's BaseFlux2Setup presets ("transformer_block" matches both kinds of block).
    # OneTrainer's Flux.2 presets are blocks and full; attn-only (Atelier's default preset)
    # is every attention projection, the single blocks' fused qkv + MLP input among them.
    LAYER_PRESETS = {"attn-only": ["attn"], "blocks": ["transformer_block"], "full": []}
    LAYER_NAME_EXAMPLE = ("transformer_blocks.0.attn.to_q, "
                          "single_transformer_blocks.0.attn.to_qkv_mlp_proj")

    @classmethod
    def card(cls, model_type):
        from trainer.model_card import FLOW_CARD, FamilyCard
        return FamilyCard(("flux2", "flux2-klein"), "Flux2KleinPipeline",
                          "Flux2Transformer2DModel",
                          comfy_text_encoders="a *Load CLIP* node (type flux2: qwen_3_4b or "
                                              "qwen_3_8b)",
                          **FLOW_CARD)

    @classmethod
    def load_components(cls, config):
        if config.vae_model_name:
            raise ModelLoadError("vae_model_name: a separate VAE is not read for Flux.2 klein "
                                 "(its folder's AutoencoderKLFlux2 is); leave it empty.")
        parts = super().load_components(config)
        # klein (step-distilled) or klein base: the pipeline ignores CFG for the former
        folder = loading.resolve_source(config.base_model_name, loading.BASE_FIELD, None,
                                        hub_probe="model_index.json").location
        parts["is_distilled"] = bool(
            Flux2KleinPipeline.load_config(folder).get("is_distilled", False))
        return parts

    @classmethod
    def load(cls, config):
        parts = cls.load_components(config)
        return cls(
            components=SimpleNamespace(**parts), vae=NormalizedLatents(parts["vae"]),
            noise_scheduler=parts["noise_scheduler"],
            parts={"text_encoder": parts["text_encoder"], "transformer": parts["transformer"]},
            kohya_prefixes={"transformer": "lora_unet_"},
            # modelspec.architecture as OneTrainer writes it (resources/sd_model_spec/
            # flux_2.0-lora.json); kohya's sd-scripts has no Flux.2 id: "flux2" is Atelier's
            base_model_version="flux2", lora_architecture="Flux.2/lora",
            config=config, text_cache_keys=("encoder_hidden_states",),
            objective=cls.objective_for(parts["noise_scheduler"], config))

    @property
    def implementation(self) -> str:
        return "https://github.com/black-forest-labs/flux2"

    def sequence_length(self, part: str = "text_encoder") -> int:
        length = getattr(self.config, "text_encoder_sequence_length", None) if self.config else None
        return int(length or SEQUENCE_LENGTH)

    def text_cache_identity(self) -> list:
        return [self.sequence_length(), list(HIDDEN_LAYERS)]

    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        """Qwen3's states of layers 9, 18 and 27 side by side, read with the padding masked
        (clip skip is a CLIP setting and does not apply)."""
        tokenizer = self.components.tokenizer
        prompts = [chat_prompt(tokenizer, c) for c in captions]
        ids = tokenize(tokenizer, prompts, device, max_length=self.sequence_length())
        # <|endoftext|> pads, and the chat template never writes it: ids != pad is the
        # tokenizer's attention mask, on whichever side it pads
        mask = (ids != tokenizer.pad_token_id).long()
        encoder = self.module("text_encoder")
        # the causal LM's body: its hidden states without the vocabulary projection
        body = getattr(encoder, "model", encoder)
        with torch.set_grad_enabled(grad.get("text_encoder", False)):
            out = body(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                       use_cache=False)
        states = torch.cat([out.hidden_states[k] for k in HIDDEN_LAYERS], dim=-1)
        return {"encoder_hidden_states": states}

    def predict(self, noisy, timesteps, conditioning):
        transformer = self.module("transformer")
        dtype = compute_dtype_of(self.parts["transformer"])
        patched = patchify(noisy)
        _, _, h, w = patched.shape
        text = conditioning["encoder_hidden_states"].to(dtype)
        out = transformer(
            hidden_states=pack(patched).to(dtype), encoder_hidden_states=text,
            timestep=(timesteps / 1000).to(dtype), guidance=None,
            img_ids=image_ids(h, w, noisy.device), txt_ids=text_ids(text.shape[1], noisy.device),
            return_dict=False)[0]
        return unpatchify(unpack(out, h, w)).to(noisy.dtype)

    def _pipeline(self, cls):
        pipe = cls(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            vae=self.vae.vae, text_encoder=self.parts["text_encoder"],
            tokenizer=self.components.tokenizer, transformer=self.parts["transformer"],
            is_distilled=getattr(self.components, "is_distilled", False))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self):
        return self._pipeline(Flux2SamplingPipeline)

    def export_pipeline(self):
        return self._pipeline(Flux2KleinPipeline)

    def sample_inputs(self):
        return {"max_sequence_length": self.sequence_length()}
