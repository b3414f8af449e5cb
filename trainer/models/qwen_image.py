"""Qwen-Image (QWEN): diffusers' QwenImageTransformer2DModel (a double-stream MMDiT) conditioned
on the last hidden states of a Qwen2.5-VL language model, trained by flow matching on the
latents of its own VAE, AutoencoderKLQwenImage.

What is Qwen-Image about it (as diffusers' QwenImagePipeline and OneTrainer's QwenModel /
BaseQwenSetup do it):
- A caption is put into Qwen-Image's prompt template (a system turn asking to describe the
  image, then the caption as the user's turn, the assistant's turn opened), tokenised to
  34 + 512 tokens, read by the text encoder with its padding masked; the conditioning is the
  last layer's states with the template's 34 system tokens cut off (the caption, its turn's
  end and the assistant's opening), padding zeroed. The text cache keeps those 512 states and
  their mask; `predict` cuts a batch to its longest caption and passes the mask (none when
  every token counts), as OneTrainer does.
- The VAE is a video VAE (a frame axis of one) whose latents are normalised per channel by the
  mean and standard deviation in its config, not by one scaling factor: `QwenLatentVAE` hands
  the engine the normalised 4-D latent distribution, so its latent cache and noise draws work
  unchanged, and the pipelines get the VAE itself.
- The transformer reads 2x2 patches of the latents packed into tokens, the time as t/1000, and
  predicts the velocity ε − x₀ itself (no negation).
- The scheduler's shift is 1 unless `dynamic_timestep_shifting` is on; then the resolution-
  dependent shift uses the scheduler config's constants (Qwen-Image's: 0.5 at 256 tokens, 0.9
  at 8192), as OneTrainer computes it.
- The text encoder is never trained (OneTrainer's Qwen presets keep it frozen); nor is the
  vision tower of the Qwen2.5-VL class, which captions never reach.
- Guidance is true classifier-free guidance on a negative prompt (QwenImagePipeline's
  `true_cfg_scale`, with its norm rescaling); the sample's CFG scale is passed as that, with the
  empty negative prompt when none is given.
- A dropped caption (caption dropout) is the empty one, the pipeline's unconditional input
  (OneTrainer has no caption dropout for Qwen-Image).
- The original layout (what ComfyUI loads and the Qwen-Image release has) is diffusers' own
  names: the single file is the transformer's state dict as it is.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                       QwenImagePipeline, QwenImageTransformer2DModel)
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from trainer.errors import ModelLoadError
from trainer.models import loading
from trainer.models.family import tokenize
from trainer.models.flow_family import FlowFamily, FlowSpec, load_dtypes, load_flow_components

QWEN_IMAGE_SPEC = FlowSpec(
    name="Qwen-Image",
    pipeline_class=QwenImagePipeline,
    pipeline_names=("QwenImagePipeline",),
    transformer_class=QwenImageTransformer2DModel,
    text_encoders={"text_encoder": Qwen2_5_VLForConditionalGeneration},
    tokenizers={"tokenizer": Qwen2Tokenizer},
    layout="qwen_image",
    vae_class=AutoencoderKLQwenImage,
)

# QwenImagePipeline's prompt template and the count of its system tokens before the caption
# (prompt_template_encode, prompt_template_encode_start_idx); OneTrainer's are the same.
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, "
                   "texture, quantity, text, spatial relationships of the objects and "
                   "background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                   "<|im_start|>assistant\n")
TEMPLATE_TOKENS = 34
# OneTrainer's caption length in tokens after the system turn (the pipeline samples with 512).
SEQUENCE_LENGTH = 512


def prompt_text(caption: str) -> str:
    return PROMPT_TEMPLATE.format(caption)


class QwenLatentVAE(torch.nn.Module):
    """AutoencoderKLQwenImage as the engine reads a VAE: `encode(pixels).latent_dist` of 4-D
    images gives the latents' mean and std already normalised per channel ((x − mean_c) /
    std_c, what OneTrainer's scale_latents does), so `config.scaling_factor` is 1 and there is
    no shift. `block_out_channels` only tells the engine the 8x compression."""

    def __init__(self, vae: AutoencoderKLQwenImage):
        super().__init__()
        self.vae = vae
        stages = len(vae.config.temperal_downsample)
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None,
                                      block_out_channels=[0] * (stages + 1),
                                      latent_channels=vae.config.z_dim)

    # The real VAE's halves, for the sampling hooks that cast the pipeline's inputs.
    encoder = property(lambda self: self.vae.encoder)
    decoder = property(lambda self: self.vae.decoder)
    quant_conv = property(lambda self: self.vae.quant_conv)
    post_quant_conv = property(lambda self: self.vae.post_quant_conv)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _channel_stats(self, like: torch.Tensor):
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=like.dtype)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=like.dtype)
        return mean.view(shape), std.view(shape)

    def encode(self, pixels: torch.Tensor):
        dist = self.vae.encode(pixels.unsqueeze(2)).latent_dist  # a frame axis of one
        mean, std = dist.mean.squeeze(2), dist.std.squeeze(2)
        channel_mean, channel_std = self._channel_stats(mean)
        normalised = SimpleNamespace(mean=(mean - channel_mean) / channel_std,
                                     std=std / channel_std)
        return SimpleNamespace(latent_dist=normalised)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 · w/2, 4C]: 2x2 patches as tokens (QwenImagePipeline's order)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, channels = tokens.shape
    x = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


def batch_captions(conditioning: dict, dtype: torch.dtype):
    """(states, mask) of a batch cut to its longest caption; the mask None when no token of it
    is padding (the pipeline passes none then, and attention runs unmasked)."""
    mask = conditioning["text_attention_mask"].bool()
    longest = max(int(mask.sum(dim=1).max()), 1)
    states = conditioning["encoder_hidden_states"][:, :longest].to(dtype)
    mask = mask[:, :longest].to(states.device)
    return states, (None if bool(mask.all()) else mask)


class SamplingPipeline(QwenImagePipeline):
    """QwenImagePipeline called as the engine samples (`guidance_scale` = the sample's CFG):
    Qwen-Image guides with `true_cfg_scale` on a negative prompt, the empty one when none is
    given. A user's `QwenImagePipeline(..., negative_prompt="", true_cfg_scale=cfg)` draws the
    same image. Never saved: exports are plain QwenImagePipelines."""

    def __call__(self, prompt=None, negative_prompt=None, guidance_scale=None, **kwargs):
        cfg = 1.0 if guidance_scale is None else float(guidance_scale)
        if cfg > 1.0 and negative_prompt is None:
            negative_prompt = ""
        return super().__call__(prompt, negative_prompt=negative_prompt if cfg > 1.0 else None,
                                true_cfg_scale=cfg, **kwargs)


def load_original_transformer(path: str, config_folder: str, dtype: torch.dtype
                              ) -> QwenImageTransformer2DModel:
    """A transformer file (`transformer.model_name`, e.g. ComfyUI's diffusion model file: the
    release's names, diffusers' own) on the config of the base model's folder, through
    diffusers' single-file loader."""
    source = loading.resolve_source(path, "transformer.model_name", None, hub_probe="config.json")
    if source.kind != "single_file":
        raise ModelLoadError(f"transformer.model_name: '{path}' is not a .safetensors file.")
    try:
        from safetensors.torch import load_file
        state = load_file(source.location)
        prefix = "model.diffusion_model."  # ComfyUI's saved checkpoints carry it
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
        if "txt_norm.weight" not in state:
            raise ValueError("not a Qwen-Image transformer")
        return QwenImageTransformer2DModel.from_single_file(
            state, config=config_folder, subfolder="transformer", torch_dtype=dtype,
            local_files_only=True)
    except Exception as err:  # noqa: BLE001 - the file does not fit this model
        raise ModelLoadError(
            f"transformer.model_name: '{path}' is not a Qwen-Image transformer of this model's "
            f"shape ({type(err).__name__}).") from None


class QwenImageFamily(FlowFamily):
    SPEC = QWEN_IMAGE_SPEC
    # OneTrainer's BaseQwenSetup presets: parts of layer names.
    LAYER_PRESETS = {"attn-mlp": ["attn", "img_mlp", "txt_mlp"], "attn-only": ["attn"],
                     "blocks": ["transformer_block"], "full": []}
    LAYER_NAME_EXAMPLE = "transformer_blocks.0.attn.to_q, transformer_blocks.0.img_mlp.net.2"

    @classmethod
    def card(cls, model_type):
        from trainer.model_card import FLOW_CARD, FamilyCard
        return FamilyCard(("qwen-image",), "QwenImagePipeline", "QwenImageTransformer2DModel",
                          comfy_text_encoders="a *Load CLIP* node (type qwen_image: "
                                              "qwen_2.5_vl_7b)",
                          **FLOW_CARD)

    @classmethod
    def load_components(cls, config):
        file = getattr(config.transformer, "model_name", "") or ""
        dtypes = load_dtypes(config)
        if config.vae_model_name:
            raise ModelLoadError("vae_model_name: Qwen-Image uses its own VAE (its model "
                                 "folder's vae/); leave vae_model_name empty.")
        parts = load_flow_components(cls.SPEC, config.base_model_name, None, dtypes=dtypes)
        if file:  # the folder's transformer replaced by a single file
            folder = loading.resolve_source(config.base_model_name, loading.BASE_FIELD, None,
                                            hub_probe="model_index.json").location
            parts["transformer"] = load_original_transformer(
                file, folder, dtypes.get("transformer", torch.float32)).eval()
        return parts

    @classmethod
    def load(cls, config):
        parts = cls.load_components(config)
        return cls(
            components=SimpleNamespace(**parts), vae=QwenLatentVAE(parts["vae"]),
            noise_scheduler=parts["noise_scheduler"],
            parts={"text_encoder": parts["text_encoder"], "transformer": parts["transformer"]},
            kohya_prefixes={"transformer": "lora_unet_"},
            # modelspec.architecture as OneTrainer writes it (resources/sd_model_spec/
            # qwen*.json); kohya's sd-scripts has no Qwen-Image id: "qwen_image" is Atelier's
            base_model_version="qwen_image", lora_architecture="Qwen-Image/lora",
            config=config, text_cache_keys=("encoder_hidden_states", "text_attention_mask"),
            objective=cls.objective_for(parts["noise_scheduler"], config))

    @property
    def implementation(self) -> str:
        return "https://github.com/QwenLM/Qwen-Image"

    def text_cache_identity(self) -> list:
        return super().text_cache_identity() + [SEQUENCE_LENGTH, TEMPLATE_TOKENS, "last"]

    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        """The last layer's states of the caption in its template, the 34 system tokens cut
        off and the padding zeroed, and the caption's mask (clip skip is a CLIP setting and
        does not apply). The language model's head is skipped: its logits are not used."""
        tokenizer = self.components.tokenizer
        ids = tokenize(tokenizer, [prompt_text(c) for c in captions], device,
                       max_length=TEMPLATE_TOKENS + SEQUENCE_LENGTH)
        # <|endoftext|> pads, and the template never writes it
        mask = ids != tokenizer.pad_token_id
        encoder = self.parts["text_encoder"].model  # Qwen2_5_VLModel: no LM head
        with torch.set_grad_enabled(grad.get("text_encoder", False)):
            out = encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        states = out.hidden_states[-1][:, TEMPLATE_TOKENS:]
        mask = mask[:, TEMPLATE_TOKENS:]
        return {"encoder_hidden_states": states * mask.unsqueeze(-1).to(states.dtype),
                "text_attention_mask": mask}

    def caption_dropout(self, captions, encode):
        """Each caption is dropped with the text encoder's probability: it becomes the empty
        caption, the pipeline's unconditional input, rather than zeroed states."""
        probability = self._setting("text_encoder", "caption_dropout_probability", 0.0)
        return encode(["" if random.random() < probability else c for c in captions])

    def predict(self, noisy, timesteps, conditioning):
        transformer = self.module("transformer")
        dtype = next(self.parts["transformer"].parameters()).dtype
        h, w = noisy.shape[-2:]
        states, mask = batch_captions(conditioning, dtype)
        out = transformer(hidden_states=pack(noisy.to(dtype)), timestep=timesteps.float() / 1000,
                          encoder_hidden_states=states, encoder_hidden_states_mask=mask,
                          img_shapes=[[(1, h // 2, w // 2)]] * noisy.shape[0],
                          return_dict=False)[0]
        return unpack(out, h, w).to(noisy.dtype)

    def _pipeline(self, cls):
        pipe = cls(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            vae=self.vae.vae, text_encoder=self.parts["text_encoder"],
            tokenizer=self.components.tokenizer, transformer=self.parts["transformer"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self):
        return self._pipeline(SamplingPipeline)

    def export_pipeline(self):
        return self._pipeline(QwenImagePipeline)

    def sample_inputs(self):
        return {"max_sequence_length": SEQUENCE_LENGTH}

    def save_single_file(self, path, dtype, metadata):
        """The transformer alone, under its own (the release's, ComfyUI's) names."""
        from trainer.io import atomic_save_safetensors
        state = self.parts["transformer"].state_dict()
        atomic_save_safetensors({k: v.detach().to("cpu", dtype).contiguous()
                                 for k, v in state.items()}, str(path), metadata)
