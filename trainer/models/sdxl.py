"""Stable Diffusion XL 1.0 (base): load the parts a trainer needs, from wherever the model is.

Same sources as SD 1.5 (a diffusers folder, a single-file `.safetensors` checkpoint in
Stability's SGM layout, a hub id), through the same shared loader (loading.py). What is SDXL
about it: two tokenizers and two text encoders (TE1 = CLIP ViT-L, TE2 = OpenCLIP ViT-bigG
with a projection whose pooled output conditions the UNet), a VAE that must not run in float16
(`force_upcast`), and the SGM single-file layout (conditioner.embedders.0/1).
"""
from __future__ import annotations

import os
import pathlib
import random
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer.errors import ModelLoadError
from trainer.inpainting import check_unet_channels
from trainer.models.family import (ModelFamily, compute_dtype_of, hidden_states_before_last,
                                   to_device, tokenize)
from trainer.models.objectives import DDPMObjective
from trainer.models import loading
from trainer.models.loading import BASE_FIELD

SDXL_CONFIG_DIR = pathlib.Path(__file__).parent / "configs" / "sdxl"


@dataclass
class SDXLComponents:
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler  # training schedule, from the model's scheduler config


def _sgm_state_dicts(models: dict) -> dict[str, dict]:
    from trainer.models.single_file import (
        SDXL_TEXT_ENCODER_PREFIX,
        open_clip_to_sgm,
        text_encoder_to_ldm,
        unet_to_ldm,
        vae_to_ldm,
    )

    return {
        "unet": unet_to_ldm(models["unet"].state_dict()),
        "vae": vae_to_ldm(models["vae"].state_dict()),
        "text_encoder": text_encoder_to_ldm(models["text_encoder"].state_dict(),
                                            SDXL_TEXT_ENCODER_PREFIX),
        "text_encoder_2": open_clip_to_sgm(models["text_encoder_2"].state_dict()),
    }


def _check_index(index: dict, where: str) -> None:
    name = str(index.get("_class_name", ""))
    if "text_encoder_2" not in index and "XL" not in name:
        raise ModelLoadError(
            f"{BASE_FIELD}: '{where}' is not an SDXL model ({name or 'unknown pipeline'}, one "
            "text encoder); for a Stable Diffusion 1.5 model choose STABLE_DIFFUSION_15."
        )
    if (index.get("text_encoder") or [None])[0] is None:  # the refiner lists it as null
        raise ModelLoadError(
            f"{BASE_FIELD}: '{where}' has no first text encoder: it looks like the SDXL "
            "refiner, which is not supported; use an SDXL base model."
        )
    missing = [part for part in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2",
                                 "unet", "vae", "scheduler") if part not in index]
    if missing:
        raise ModelLoadError(
            f"{BASE_FIELD}: '{where}' is not an SDXL base model ({name}, no {', '.join(missing)})."
        )


def _check_keys(keys: list[str], path: pathlib.Path) -> None:
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        raise ModelLoadError(
            f"{BASE_FIELD}: '{path}' is a Stable Diffusion 1.5 checkpoint; choose the "
            "STABLE_DIFFUSION_15 model type for it."
        )
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelLoadError(
            f"{BASE_FIELD}: '{path}' is a Stable Diffusion 2.x checkpoint, not SDXL; SD 2.x "
            "is not supported."
        )
    loading.check_common_keys(keys, path)
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ModelLoadError(
            f"{BASE_FIELD}: '{path}' is an SDXL refiner checkpoint (OpenCLIP only); the refiner "
            "is not supported, use an SDXL base model."
        )
    for prefix, what in (("conditioner.embedders.0.transformer.", "text encoder 1 (CLIP ViT-L)"),
                         ("conditioner.embedders.1.model.", "text encoder 2 (OpenCLIP bigG)")):
        if not any(k.startswith(prefix) for k in keys):
            raise ModelLoadError(
                f"{BASE_FIELD}: '{path}' is not an SDXL checkpoint: it has no {what} weights "
                f"'{prefix}*'."
            )


SDXL_SPEC = loading.FamilySpec(
    name="SDXL",
    pipeline_class=StableDiffusionXLPipeline,
    config_dir=SDXL_CONFIG_DIR,
    text_encoders={"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection},
    tokenizers=("tokenizer", "tokenizer_2"),
    ldm_state_dicts=_sgm_state_dicts,
    check_index=_check_index,
    check_keys=_check_keys,
    other_architectures="SD 1.5, SD 2.x, the SDXL refiner",
    # The invisible-watermark package is optional; samples for the trainer need no watermark.
    single_file_kwargs={"add_watermarker": False},
)


def load_sdxl(
    base_model_name: str,
    vae_name: str | None = None,
    workspace_dir=None,
    *,
    allowed_root: str | os.PathLike | None = None,
    single_file_config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> SDXLComponents:
    """Load both tokenizers and text encoders, the VAE, the UNet and the training noise
    scheduler. The arguments are those of `load_sd15`; `single_file_config` defaults to the
    shipped SDXL base configs."""
    del workspace_dir
    parts = loading.load_components(SDXL_SPEC, base_model_name, vae_name, allowed_root=allowed_root,
                                    single_file_config=single_file_config, dtype=dtype)
    return SDXLComponents(**parts)


def expected_sgm_shapes(config_dir: pathlib.Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per part, the SGM tensor names and shapes a checkpoint of the model described by
    `config_dir` has (meta device: no memory used)."""
    return loading.expected_shapes(SDXL_SPEC, pathlib.Path(config_dir))


def make_sdxl_pipeline(components: SDXLComponents,
                       inpainting: bool = False) -> StableDiffusionXLPipeline:
    """An inference pipeline over the training components (shared, not copied), for samples;
    the inpainting pipeline for an inpainting model (no aesthetic score: the base model's six
    time ids, as SDXL 1.0 inpainting has them).
    DDIM from the training schedule's config, deterministic for a seed; no watermark."""
    extra = {"requires_aesthetics_score": False} if inpainting else {}
    pipeline_class = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
    pipe = pipeline_class(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SDXLFamily(ModelFamily):
    """SDXL: TE1's and TE2's penultimate hidden states side by side as the cross-attention
    input, TE2's pooled projection plus six "time ids" (original size, crop top-left, target
    size) as the UNet's added conditioning."""

    # OneTrainer's BaseStableDiffusion(XL)Setup presets: "attentions" is every layer of the
    # UNet's transformer blocks, "attn" only their attention projections.
    LAYER_PRESETS = {"attn-only": ["attn"], "attn-mlp": ["attentions"], "full": []}
    LAYER_NAME_EXAMPLE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"

    @classmethod
    def card(cls, model_type):
        from trainer.model_card import FamilyCard
        return FamilyCard(("stable-diffusion-xl",), "AutoPipelineForText2Image",
                          "StableDiffusionXLPipeline",
                          inpaint_pipeline="AutoPipelineForInpainting",
                          inpaint_single_file="StableDiffusionXLInpaintPipeline",
                          embedding_encoders=(("clip_l", "text_encoder", "tokenizer"),
                                              ("clip_g", "text_encoder_2", "tokenizer_2")))

    @classmethod
    def load(cls, config):
        """As SD15Family.load, for SDXL."""
        c = load_sdxl(config.base_model_name, config.vae_model_name or None)
        family = cls(
            components=c, vae=c.vae, noise_scheduler=c.noise_scheduler,
            parts={"text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2,
                   "unet": c.unet},
            kohya_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te1_",
                            "text_encoder_2": "lora_te2_"},
            base_model_version="sdxl_base_v1-0",
            lora_architecture="stable-diffusion-xl-v1-base/lora",
            config=config, text_cache_keys=("encoder_hidden_states", "text_embeds"),
            inpainting=config.model_type.is_inpainting,
            objective=DDPMObjective(c.noise_scheduler, config))
        check_unet_channels(c.unet, config.model_type, config.base_model_name)
        return family

    ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))

    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        """`clip_skip` is TE1's (the loop's); TE2's comes from `config.text_encoder_2`. SDXL
        uses the penultimate layer, unnormalised: clip skip counts from there."""
        skips = {"text_encoder": clip_skip,
                 "text_encoder_2": self._setting("text_encoder_2", "clip_skip", 0)}
        hidden, pooled = [], None
        for part, tokenizer_name in self.ENCODERS:
            ids = tokenize(getattr(self.components, tokenizer_name), captions, device)
            with torch.set_grad_enabled(grad.get(part, False)):
                out = self.module(part)(ids, output_hidden_states=True)
                hidden.append(hidden_states_before_last(out, skips[part], 1, part))
                if part == "text_encoder_2":
                    pooled = out.text_embeds
        conditioning = {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}
        conditioning.update(self.batch_conditioning(batch, device))
        return conditioning

    def batch_conditioning(self, batch, device):
        out = {}
        for key in ("original_size", "crop_top_left"):  # (height, width), (top, left)
            if batch.get(key) is not None:
                out[key] = to_device([list(v) for v in batch[key]], torch.float32, device)
        return out

    def caption_dropout(self, captions, encode):
        """Each encoder's output is zeroed on its own with its probability, as SDXL itself was
        trained (and as diffusers samples an empty negative prompt: zeros)."""
        conditioning = encode(captions)
        p1 = self._setting("text_encoder", "caption_dropout_probability", 0.0)
        p2 = self._setting("text_encoder_2", "caption_dropout_probability", 0.0)
        keep1 = [random.random() >= p1 for _ in captions]
        keep2 = [random.random() >= p2 for _ in captions]
        if all(keep1) and all(keep2):
            return conditioning
        hidden = conditioning["encoder_hidden_states"]
        width1 = self.parts["text_encoder"].config.hidden_size
        mask = torch.ones(hidden.shape[0], 1, hidden.shape[-1], device=hidden.device,
                          dtype=hidden.dtype)
        mask[:, :, :width1] *= to_device(keep1, hidden.dtype, hidden.device)[:, None, None]
        mask[:, :, width1:] *= to_device(keep2, hidden.dtype, hidden.device)[:, None, None]
        pooled = conditioning["text_embeds"]
        keep_pooled = to_device(keep2, pooled.dtype, pooled.device)[:, None]
        return dict(conditioning, encoder_hidden_states=hidden * mask,
                    text_embeds=pooled * keep_pooled)

    def time_ids(self, conditioning: dict, latents: torch.Tensor) -> torch.Tensor:
        """[original h, w, crop top, left, target h, w] per sample; the target is the size
        trained at (the latents' size in pixels). Missing sizes: uncropped at the target."""
        n = latents.shape[0]
        scale = self.vae_scale_factor
        target = to_device([latents.shape[-2] * scale, latents.shape[-1] * scale],
                            torch.float32, latents.device).expand(n, 2)
        original = conditioning.get("original_size")
        crop = conditioning.get("crop_top_left")
        original = target if original is None else original.to(latents.device, torch.float32)
        crop = torch.zeros_like(target) if crop is None else crop.to(latents.device, torch.float32)
        return torch.cat([original, crop, target], dim=1)

    def predict(self, noisy, timesteps, conditioning):
        unet = self.module("unet")
        dtype = compute_dtype_of(self.parts["unet"])
        added = {"text_embeds": conditioning["text_embeds"].to(dtype),
                 "time_ids": self.time_ids(conditioning, noisy).to(dtype)}
        return unet(noisy.to(dtype), timesteps, conditioning["encoder_hidden_states"].to(dtype),
                    added_cond_kwargs=added).sample

    def pipeline(self):
        return make_sdxl_pipeline(self.components, inpainting=self.inpainting)

    def export_pipeline(self):
        from diffusers import EulerDiscreteScheduler
        pipe = self.pipeline()
        pipe.scheduler = EulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        return pipe

    def save_single_file(self, path, dtype, metadata):
        from trainer.models.single_file import save_sdxl_single_file
        save_sdxl_single_file(self.components, path, dtype, metadata)
