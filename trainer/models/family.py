"""What the loop needs from a model family (SD 1.5, SDXL), behind one small interface, so the
loop reads the same for both: load, encode captions, predict noise, name LoRA files, sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.config import ModelType, TrainConfig


@dataclass
class ModelFamily:
    """The loaded models of one family and the family's conventions.

    `parts` maps the config's part names ("text_encoder", "text_encoder_2", "unet") to modules;
    the loop may replace a module with its accelerate-wrapped version (`wrapped`), while
    `parts` keeps the plain module for saving and sampling.
    """
    components: Any
    vae: torch.nn.Module
    noise_scheduler: Any
    parts: dict[str, torch.nn.Module]
    kohya_prefixes: dict[str, str]            # part -> 'lora_unet_', 'lora_te_', ...
    base_model_version: str                   # ss_base_model_version
    lora_architecture: str                    # modelspec.architecture
    wrapped: dict[str, torch.nn.Module] = field(default_factory=dict)

    def module(self, part: str) -> torch.nn.Module:
        """The module to call in the training step (wrapped for DDP when trained)."""
        return self.wrapped.get(part, self.parts[part])

    def encode_text(self, captions: list[str], batch: dict, *, clip_skip: int,
                    device: torch.device, grad: dict[str, bool]) -> dict[str, Any]:
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def pipeline(self):
        raise NotImplementedError


class SD15Family(ModelFamily):
    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        tokenizer = self.components.tokenizer
        ids = tokenizer(captions, padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        encoder = self.module("text_encoder")
        with torch.set_grad_enabled(grad.get("text_encoder", False)):
            out = encoder(ids.to(device), output_hidden_states=clip_skip > 0)
            if clip_skip == 0:
                return {"encoder_hidden_states": out[0]}
            # Clip skip: an earlier layer's states through the final layer norm, as A1111 does.
            plain = self.parts["text_encoder"]
            final_norm = (getattr(plain, "final_layer_norm", None)
                          or plain.text_model.final_layer_norm)
            return {"encoder_hidden_states": final_norm(out.hidden_states[-1 - clip_skip])}

    def predict(self, noisy, timesteps, conditioning):
        unet = self.module("unet")
        dtype = next(self.parts["unet"].parameters()).dtype
        return unet(noisy.to(dtype), timesteps, conditioning["encoder_hidden_states"]).sample

    def pipeline(self):
        from trainer.models.sd15 import make_sd15_pipeline
        return make_sd15_pipeline(self.components)


def load_family(config: TrainConfig) -> ModelFamily:
    if config.model_type == ModelType.STABLE_DIFFUSION_15:
        from trainer.models.sd15 import load_sd15
        c = load_sd15(config.base_model_name, config.vae_model_name or None)
        return SD15Family(
            components=c, vae=c.vae, noise_scheduler=c.noise_scheduler,
            parts={"text_encoder": c.text_encoder, "unet": c.unet},
            kohya_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te_"},
            base_model_version="sd_v1", lora_architecture="stable-diffusion-v1/lora")
    raise ValueError(f"model_type {config.model_type.value} has no loader")
