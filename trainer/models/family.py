"""What the loop needs from a model family (SD 1.5, SDXL), behind one small interface, so the
loop reads the same for both: load, encode captions, predict noise, name LoRA files, sample,
export the whole model.
"""
from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trainer.config import ModelType, TrainConfig
from trainer.errors import ConfigError
from trainer.inpainting import check_unet_channels

@dataclass
class ModelFamily:
    """The loaded models of one family and the family's conventions.

    `parts` maps the config's part names ("text_encoder", "text_encoder_2", "unet") to modules;
    the loop may replace a module with its accelerate-wrapped version (`wrapped`), while
    `parts` keeps the plain module for saving and sampling. `config` (when set) supplies the
    per-text-encoder caption dropout and clip skip.
    """
    components: Any
    vae: torch.nn.Module
    noise_scheduler: Any
    parts: dict[str, torch.nn.Module]
    kohya_prefixes: dict[str, str]            # part -> 'lora_unet_', 'lora_te_', ...
    base_model_version: str                   # ss_base_model_version
    lora_architecture: str                    # modelspec.architecture of a LoRA
    wrapped: dict[str, torch.nn.Module] = field(default_factory=dict)
    config: TrainConfig | None = field(default=None, repr=False)
    # Which entries of `encode_text`'s result depend on the caption alone (the text cache
    # stores those; `batch_conditioning` supplies the rest).
    text_cache_keys: tuple[str, ...] = ("encoder_hidden_states",)
    # An inpainting model: its UNet also reads the mask and the masked image's latents
    # (trainer/inpainting.py); samples use the family's inpainting pipeline.
    inpainting: bool = False
    # The run's additional embeddings (trainer/embeddings.py), set by the loop; saved with
    # the output.
    embeddings: Any = field(default=None, repr=False)

    @property
    def checkpoint_architecture(self) -> str:
        """modelspec.architecture of a whole checkpoint of this family. SD 1.5 inpainting has
        an id of its own; SDXL inpainting has none, so it keeps the base model's."""
        architecture = self.lora_architecture.removesuffix("/lora")
        if self.inpainting and architecture == "stable-diffusion-v1":
            return "stable-diffusion-v1-inpainting"
        return architecture

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def module(self, part: str) -> torch.nn.Module:
        """The module to call in the training step (wrapped for DDP when trained)."""
        return self.wrapped.get(part, self.parts[part])

    def _setting(self, part: str, name: str, default):
        return getattr(getattr(self.config, part), name) if self.config is not None else default

    def encode_text(self, captions: list[str], batch: dict, *, clip_skip: int,
                    device: torch.device, grad: dict[str, bool]) -> dict[str, Any]:
        """The conditioning of `captions` (no caption dropout: see `caption_dropout`)."""
        raise NotImplementedError

    def batch_conditioning(self, batch: dict, device: torch.device) -> dict[str, Any]:
        """Conditioning that depends on the sample, not its caption (SDXL's sizes)."""
        return {}

    def caption_dropout(self, captions: list[str],
                        encode: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any]:
        """`encode(captions)` with each text encoder's caption dropout applied."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def pipeline(self):
        """An inference pipeline over the training components, for samples."""
        raise NotImplementedError

    def export_pipeline(self):
        """The pipeline a diffusers-folder export writes (the family's usual sampler)."""
        raise NotImplementedError

    def save_single_file(self, path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
        raise NotImplementedError


def _hidden_states(out, clip_skip: int, layers_before_last: int, part: str):
    """The hidden states `layers_before_last + clip_skip` layers before the last one."""
    index = -1 - layers_before_last - clip_skip
    if -index > len(out.hidden_states):
        raise ConfigError(f"{part}.clip_skip {clip_skip}: this text encoder has only "
                          f"{len(out.hidden_states) - 1} layers.")
    return out.hidden_states[index]


def _to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small tensor of host values on the device. Built on the host and copied without
    blocking: `torch.tensor(..., device="cuda")` would wait for all queued GPU work first."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


# Token ids per tokenizer and caption. A trained text encoder sees the same captions every
# epoch; each is tokenised once, not at every step (padded to the full length, a caption's ids
# do not depend on the others in its batch).
_TOKEN_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MAX_KEPT_CAPTIONS = 20_000


# Tokenizers with additional embeddings (trainer/embeddings.py): their placeholders are
# written out as all of their tokens before tokenising.
_WITH_EMBEDDINGS: weakref.WeakSet = weakref.WeakSet()


def forget_tokenized(tokenizer) -> None:
    """The tokenizer gained tokens: captions tokenised before read differently now."""
    _TOKEN_IDS.pop(tokenizer, None)
    _WITH_EMBEDDINGS.add(tokenizer)


def _tokenize(tokenizer, captions: list[str], device) -> torch.Tensor:
    known = _TOKEN_IDS.setdefault(tokenizer, {})
    missing = [c for c in dict.fromkeys(captions) if c not in known]
    if missing:
        if len(known) + len(missing) > MAX_KEPT_CAPTIONS:
            known.clear()
        texts = missing
        if tokenizer in _WITH_EMBEDDINGS:
            from trainer.embeddings import expand_placeholders
            texts = expand_placeholders(missing, tokenizer)
        ids = tokenizer(texts, padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        known.update(zip(missing, ids))
    return torch.stack([known[c] for c in captions]).to(device, non_blocking=True)


class SD15Family(ModelFamily):
    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        ids = _tokenize(self.components.tokenizer, captions, device)
        encoder = self.module("text_encoder")
        with torch.set_grad_enabled(grad.get("text_encoder", False)):
            out = encoder(ids, output_hidden_states=clip_skip > 0)
            if clip_skip == 0:
                return {"encoder_hidden_states": out[0]}
            # Clip skip: an earlier layer's states through the final layer norm, as A1111 does.
            plain = self.parts["text_encoder"]
            final_norm = (getattr(plain, "final_layer_norm", None)
                          or plain.text_model.final_layer_norm)
            hidden = _hidden_states(out, clip_skip, 0, "text_encoder")
            return {"encoder_hidden_states": final_norm(hidden)}

    def caption_dropout(self, captions, encode):
        # SD 1.5 was trained (and is sampled) with the empty caption as its unconditional input.
        probability = self._setting("text_encoder", "caption_dropout_probability", 0.0)
        return encode(["" if random.random() < probability else c for c in captions])

    def predict(self, noisy, timesteps, conditioning):
        unet = self.module("unet")
        dtype = next(self.parts["unet"].parameters()).dtype
        # The text encoder's weights may be stored in another type than the UNet's.
        return unet(noisy.to(dtype), timesteps,
                    conditioning["encoder_hidden_states"].to(dtype)).sample

    def pipeline(self):
        from trainer.models.sd15 import make_sd15_pipeline
        return make_sd15_pipeline(self.components, inpainting=self.inpainting)

    def export_pipeline(self):
        from diffusers import PNDMScheduler
        pipe = self.pipeline()
        pipe.scheduler = PNDMScheduler.from_config(self.noise_scheduler.config)  # SD 1.5's own
        return pipe

    def save_single_file(self, path, dtype, metadata):
        from trainer.models.single_file import save_sd15_single_file
        save_sd15_single_file(self.components, path, dtype, metadata)


class SDXLFamily(ModelFamily):
    """SDXL: TE1's and TE2's penultimate hidden states side by side as the cross-attention
    input, TE2's pooled projection plus six "time ids" (original size, crop top-left, target
    size) as the UNet's added conditioning."""

    ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))

    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        """`clip_skip` is TE1's (the loop's); TE2's comes from `config.text_encoder_2`. SDXL
        uses the penultimate layer, unnormalised: clip skip counts from there."""
        skips = {"text_encoder": clip_skip,
                 "text_encoder_2": self._setting("text_encoder_2", "clip_skip", 0)}
        hidden, pooled = [], None
        for part, tokenizer_name in self.ENCODERS:
            ids = _tokenize(getattr(self.components, tokenizer_name), captions, device)
            with torch.set_grad_enabled(grad.get(part, False)):
                out = self.module(part)(ids, output_hidden_states=True)
                hidden.append(_hidden_states(out, skips[part], 1, part))
                if part == "text_encoder_2":
                    pooled = out.text_embeds
        conditioning = {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}
        conditioning.update(self.batch_conditioning(batch, device))
        return conditioning

    def batch_conditioning(self, batch, device):
        out = {}
        for key in ("original_size", "crop_top_left"):  # (height, width), (top, left)
            if batch.get(key) is not None:
                out[key] = _to_device([list(v) for v in batch[key]], torch.float32, device)
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
        mask[:, :, :width1] *= _to_device(keep1, hidden.dtype, hidden.device)[:, None, None]
        mask[:, :, width1:] *= _to_device(keep2, hidden.dtype, hidden.device)[:, None, None]
        pooled = conditioning["text_embeds"]
        keep_pooled = _to_device(keep2, pooled.dtype, pooled.device)[:, None]
        return dict(conditioning, encoder_hidden_states=hidden * mask,
                    text_embeds=pooled * keep_pooled)

    def time_ids(self, conditioning: dict, latents: torch.Tensor) -> torch.Tensor:
        """[original h, w, crop top, left, target h, w] per sample; the target is the size
        trained at (the latents' size in pixels). Missing sizes: uncropped at the target."""
        n = latents.shape[0]
        scale = self.vae_scale_factor
        target = _to_device([latents.shape[-2] * scale, latents.shape[-1] * scale],
                            torch.float32, latents.device).expand(n, 2)
        original = conditioning.get("original_size")
        crop = conditioning.get("crop_top_left")
        original = target if original is None else original.to(latents.device, torch.float32)
        crop = torch.zeros_like(target) if crop is None else crop.to(latents.device, torch.float32)
        return torch.cat([original, crop, target], dim=1)

    def predict(self, noisy, timesteps, conditioning):
        unet = self.module("unet")
        dtype = next(self.parts["unet"].parameters()).dtype
        added = {"text_embeds": conditioning["text_embeds"].to(dtype),
                 "time_ids": self.time_ids(conditioning, noisy).to(dtype)}
        return unet(noisy.to(dtype), timesteps, conditioning["encoder_hidden_states"].to(dtype),
                    added_cond_kwargs=added).sample

    def pipeline(self):
        from trainer.models.sdxl import make_sdxl_pipeline
        return make_sdxl_pipeline(self.components, inpainting=self.inpainting)

    def export_pipeline(self):
        from diffusers import EulerDiscreteScheduler
        pipe = self.pipeline()
        pipe.scheduler = EulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        return pipe

    def save_single_file(self, path, dtype, metadata):
        from trainer.models.single_file import save_sdxl_single_file
        save_sdxl_single_file(self.components, path, dtype, metadata)


def load_family(config: TrainConfig) -> ModelFamily:
    """The model of `config.model_type`, refused when its UNet does not fit the type (a plain
    model for an inpainting type, or the other way round)."""
    family = _load_family(config)
    check_unet_channels(family.parts["unet"], config.model_type, config.base_model_name)
    return family


def _load_family(config: TrainConfig) -> ModelFamily:
    inpainting = config.model_type.is_inpainting
    if config.model_type.plain == ModelType.STABLE_DIFFUSION_15:
        from trainer.models.sd15 import load_sd15
        c = load_sd15(config.base_model_name, config.vae_model_name or None)
        return SD15Family(
            components=c, vae=c.vae, noise_scheduler=c.noise_scheduler,
            parts={"text_encoder": c.text_encoder, "unet": c.unet},
            kohya_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te_"},
            base_model_version="sd_v1", lora_architecture="stable-diffusion-v1/lora",
            config=config, inpainting=inpainting)
    if config.model_type.plain == ModelType.STABLE_DIFFUSION_XL_10_BASE:
        from trainer.models.sdxl import load_sdxl
        c = load_sdxl(config.base_model_name, config.vae_model_name or None)
        return SDXLFamily(
            components=c, vae=c.vae, noise_scheduler=c.noise_scheduler,
            parts={"text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2,
                   "unet": c.unet},
            kohya_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te1_",
                            "text_encoder_2": "lora_te2_"},
            base_model_version="sdxl_base_v1-0",
            lora_architecture="stable-diffusion-xl-v1-base/lora",
            config=config, text_cache_keys=("encoder_hidden_states", "text_embeds"),
            inpainting=inpainting)
    raise ValueError(f"model_type {config.model_type.value} has no loader")
