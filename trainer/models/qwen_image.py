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

from types import SimpleNamespace

import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                       QwenImagePipeline, QwenImageTransformer2DModel)
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from trainer.errors import ModelLoadError
from trainer.models.family import compute_dtype_of, tokenize
from trainer.models.flow_family import EmptyCaptionDropout, FlowFamily, FlowSpec, WrappedVAE
# the same 2x2 patches as tokens as Flux.1's (QwenImagePipeline's order)
from trainer.models.flux import pack, unpack

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


class QwenLatentVAE(WrappedVAE):
    """AutoencoderKLQwenImage as the engine reads a VAE: `encode(pixels).latent_dist` of 4-D
    images gives the latents' mean and std already normalised per channel ((x − mean_c) /
    std_c, what OneTrainer's scale_latents does), so `config.scaling_factor` is 1 and there is
    no shift. `block_out_channels` only tells the engine the 8x compression."""

    def __init__(self, vae: AutoencoderKLQwenImage):
        super().__init__(vae)
        stages = len(vae.config.temperal_downsample)
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None,
                                      block_out_channels=[0] * (stages + 1),
                                      latent_channels=vae.config.z_dim)

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


def single_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformer file's tensors (e.g. ComfyUI's diffusion model file: the release's names,
    diffusers' own) as diffusers' single-file loader reads them."""
    prefix = "model.diffusion_model."  # ComfyUI's saved checkpoints carry it
    if any(k.startswith(prefix) for k in state):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    if "txt_norm.weight" not in state:
        raise ValueError("not a Qwen-Image transformer")
    return state


QWEN_IMAGE_SPEC = FlowSpec(
    name="Qwen-Image",
    pipeline_class=QwenImagePipeline,
    pipeline_names=("QwenImagePipeline",),
    transformer_class=QwenImageTransformer2DModel,
    text_encoders={"text_encoder": Qwen2_5_VLForConditionalGeneration},
    tokenizers={"tokenizer": Qwen2Tokenizer},
    layout="qwen_image",
    vae_class=AutoencoderKLQwenImage,
    single_file_state=single_file_state,
)


class QwenImageFamily(EmptyCaptionDropout, FlowFamily):
    SPEC = QWEN_IMAGE_SPEC
    # OneTrainer's BaseQwenSetup presets: parts of layer names.
    LAYER_PRESETS = {"attn-mlp": ["attn", "img_mlp", "txt_mlp"], "attn-only": ["attn"],
                     "blocks": ["transformer_block"], "full": []}
    LAYER_NAME_EXAMPLE = "transformer_blocks.0.attn.to_q, transformer_blocks.0.img_mlp.net.2"
    # The last block's text stream (to_add_out, txt_mlp) feeds nothing: its output is dropped.
    UNUSED_LAYERS = True

    @classmethod
    def card(cls, model_type):
        from trainer.model_card import FLOW_CARD, FamilyCard
        return FamilyCard(("qwen-image",), "QwenImagePipeline", "QwenImageTransformer2DModel",
                          comfy_text_encoders="a *Load CLIP* node (type qwen_image: "
                                              "qwen_2.5_vl_7b)",
                          guidance_argument="true_cfg_scale",
                          empty_negative_prompt=True, **FLOW_CARD)

    @classmethod
    def load_components(cls, config):
        if config.vae_model_name:
            raise ModelLoadError("vae_model_name: Qwen-Image uses its own VAE (its model "
                                 "folder's vae/); leave vae_model_name empty.")
        return super().load_components(config)

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
        encoder = self.module("text_encoder").model  # Qwen2_5_VLModel: no LM head
        with torch.set_grad_enabled(grad.get("text_encoder", False)):
            out = encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        states = out.hidden_states[-1][:, TEMPLATE_TOKENS:]
        mask = mask[:, TEMPLATE_TOKENS:]
        return {"encoder_hidden_states": states * mask.unsqueeze(-1).to(states.dtype),
                "text_attention_mask": mask}

    def predict(self, noisy, timesteps, conditioning):
        transformer = self.module("transformer")
        dtype = compute_dtype_of(self.parts["transformer"])
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

    def original_state_dict(self):
        """The transformer under its own (the release's, ComfyUI's) names."""
        return self.parts["transformer"].state_dict()
