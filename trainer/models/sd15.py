"""Stable Diffusion 1.5: load the parts a trainer needs, from wherever the user's model is.

`base_model_name` may be a diffusers folder, a single-file `.safetensors` checkpoint (the
original LDM layout that ComfyUI/A1111 use), or a Hugging Face hub id; the shared loader
(loading.py) handles all three, offline-safe, and refuses pickle files. This module says what
is SD 1.5 about it: one CLIP text encoder, the LDM single-file layout, the shipped configs.

Every failure a user can fix is a `ModelLoadError` whose message starts with the config field
at fault ("base_model_name: ..." or "vae_model_name: ...") and names the path or id.
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
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.errors import ModelLoadError
from trainer.inpainting import check_unet_channels
from trainer.models.family import ModelFamily, compute_dtype_of, hidden_states_before_last, tokenize
from trainer.models.objectives import DDPMObjective
from trainer.models import loading
from trainer.models.loading import BASE_FIELD, VAE_FIELD, load_vae  # noqa: F401 (re-exported)

SD15_CONFIG_DIR = pathlib.Path(__file__).parent / "configs" / "sd15"


@dataclass
class SD15Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler  # training schedule (add_noise, velocity), from the model's config


def _ldm_state_dicts(models: dict) -> dict[str, dict]:
    from trainer.models.single_file import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

    return {
        "unet": unet_to_ldm(models["unet"].state_dict()),
        "vae": vae_to_ldm(models["vae"].state_dict()),
        "text_encoder": text_encoder_to_ldm(models["text_encoder"].state_dict()),
    }


def _check_index(index: dict, where: str) -> None:
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise ModelLoadError(
            f"{BASE_FIELD}: '{where}' is an SDXL model; choose the SDXL model type "
            "(STABLE_DIFFUSION_XL_10_BASE) for it."
        )
    missing = [part for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler") if part not in index]
    if missing:
        raise ModelLoadError(
            f"{BASE_FIELD}: '{where}' is not a Stable Diffusion 1.5 model "
            f"({index.get('_class_name', 'unknown pipeline')}, no {', '.join(missing)})."
        )


def _check_keys(keys: list[str], path: pathlib.Path) -> None:
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelLoadError(
            f"{BASE_FIELD}: '{path}' is an SDXL checkpoint; choose the SDXL model type "
            "(STABLE_DIFFUSION_XL_10_BASE) for it."
        )
    loading.check_common_keys(keys, path)
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelLoadError(
            f"{BASE_FIELD}: '{path}' is a Stable Diffusion 2.x checkpoint (OpenCLIP text "
            "encoder); SD 2.x single files are not supported. Use a diffusers folder of it."
        )


SD15_SPEC = loading.FamilySpec(
    name="SD 1.5",
    pipeline_class=StableDiffusionPipeline,
    config_dir=SD15_CONFIG_DIR,
    text_encoders={"text_encoder": CLIPTextModel},
    tokenizers=("tokenizer",),
    ldm_state_dicts=_ldm_state_dicts,
    check_index=_check_index,
    check_keys=_check_keys,
    other_architectures="SD 2.x, SDXL",
    single_file_kwargs={"safety_checker": None, "feature_extractor": None,
                        "requires_safety_checker": False},
)


# --- Public API ------------------------------------------------------------------------------

def load_sd15(
    base_model_name: str,
    vae_name: str | None = None,
    workspace_dir=None,
    *,
    allowed_root: str | os.PathLike | None = None,
    single_file_config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> SD15Components:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler.

    workspace_dir: the run's folder (TrainConfig.workspace_dir). Loading reads nothing from
        it and does not confine model paths to it: models usually live elsewhere.
    allowed_root: on a shared server, the folder local model paths must lie inside (SPEC §7);
        relative paths are then taken from it. None: any local path.
    single_file_config: for a single-file checkpoint, the diffusers-style folder whose JSON
        configs (and tokenizer) describe it; None means the shipped SD 1.5 configs. A model of
        another size (such as the tiny demo model) needs its own.
    dtype: the weights' dtype after loading (float32 masters for training by default).
    """
    del workspace_dir  # accepted for the loop's call; see the docstring
    parts = loading.load_components(SD15_SPEC, base_model_name, vae_name, allowed_root=allowed_root,
                                    single_file_config=single_file_config, dtype=dtype)
    return SD15Components(**parts)


def expected_ldm_shapes(config_dir: pathlib.Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per part ("unet", "vae", "text_encoder"), the LDM tensor names and shapes a checkpoint
    of the model described by `config_dir` has. Built on the meta device: no memory used."""
    return loading.expected_shapes(SD15_SPEC, pathlib.Path(config_dir))


def make_sd15_pipeline(components: SD15Components,
                       inpainting: bool = False) -> StableDiffusionPipeline:
    """An inference pipeline over the training components (shared, not copied), for samples;
    the inpainting pipeline for an inpainting model.

    DDIM from the training schedule's config: deterministic for a given seed, and good in
    few steps. No safety checker: samples are for the person training the model.
    """
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = pipeline_class(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SD15Family(ModelFamily):
    # OneTrainer's BaseStableDiffusion(XL)Setup presets: "attentions" is every layer of the
    # UNet's transformer blocks, "attn" only their attention projections.
    LAYER_PRESETS = {"attn-only": ["attn"], "attn-mlp": ["attentions"], "full": []}
    LAYER_NAME_EXAMPLE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"

    @classmethod
    def card(cls, model_type):
        from trainer.model_card import FamilyCard
        return FamilyCard(("stable-diffusion",), "AutoPipelineForText2Image",
                          "StableDiffusionPipeline",
                          inpaint_pipeline="AutoPipelineForInpainting",
                          inpaint_single_file="StableDiffusionInpaintPipeline")

    @classmethod
    def load(cls, config):
        """The model of config.base_model_name (+ VAE override), refused when its UNet does not
        fit the type (a plain model for an inpainting type, or the other way round)."""
        c = load_sd15(config.base_model_name, config.vae_model_name or None)
        family = cls(
            components=c, vae=c.vae, noise_scheduler=c.noise_scheduler,
            parts={"text_encoder": c.text_encoder, "unet": c.unet},
            kohya_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te_"},
            base_model_version="sd_v1", lora_architecture="stable-diffusion-v1/lora",
            config=config, inpainting=config.model_type.is_inpainting,
            objective=DDPMObjective(c.noise_scheduler, config))
        check_unet_channels(c.unet, config.model_type, config.base_model_name)
        return family

    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        ids = tokenize(self.components.tokenizer, captions, device)
        encoder = self.module("text_encoder")
        with torch.set_grad_enabled(grad.get("text_encoder", False)):
            out = encoder(ids, output_hidden_states=clip_skip > 0)
            if clip_skip == 0:
                return {"encoder_hidden_states": out[0]}
            # Clip skip: an earlier layer's states through the final layer norm, as A1111 does.
            plain = self.parts["text_encoder"]
            final_norm = (getattr(plain, "final_layer_norm", None)
                          or plain.text_model.final_layer_norm)
            hidden = hidden_states_before_last(out, clip_skip, 0, "text_encoder")
            return {"encoder_hidden_states": final_norm(hidden)}

    def caption_dropout(self, captions, encode):
        # SD 1.5 was trained (and is sampled) with the empty caption as its unconditional input.
        probability = self._setting("text_encoder", "caption_dropout_probability", 0.0)
        return encode(["" if random.random() < probability else c for c in captions])

    def predict(self, noisy, timesteps, conditioning):
        unet = self.module("unet")
        dtype = compute_dtype_of(self.parts["unet"])
        # The text encoder's weights may be stored in another type than the UNet's.
        return unet(noisy.to(dtype), timesteps,
                    conditioning["encoder_hidden_states"].to(dtype)).sample

    def pipeline(self):
        return make_sd15_pipeline(self.components, inpainting=self.inpainting)

    def export_pipeline(self):
        from diffusers import PNDMScheduler
        pipe = self.pipeline()
        pipe.scheduler = PNDMScheduler.from_config(self.noise_scheduler.config)  # SD 1.5's own
        return pipe

    def save_single_file(self, path, dtype, metadata):
        from trainer.models.single_file import save_sd15_single_file
        save_sd15_single_file(self.components, path, dtype, metadata)
