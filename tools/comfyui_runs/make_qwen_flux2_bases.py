"""Qwen-Image and Flux.2 klein tiny models and their base transformers as one original-layout
file each (what ComfyUI's Load Diffusion Model reads).

Qwen-Image: make-tiny-model's model as it is (ComfyUI's QwenImage class holds any size; the
check reads the sizes its detection leaves at the real model's off the file).
Flux.2: ComfyUI's Flux model embeds the timestep from 256 sinusoidal channels (fixed in
comfy/ldm/flux/model.py), the tiny model from 32: widened to 256 (diffusers' default for
Flux2Transformer2DModel). Everything else as make-tiny-model."""
import sys
sys.path.insert(0, "/work/main")
from safetensors.torch import load_file, save_file
import trainer.models.tiny_flux2 as tf2
from trainer.models.transformer_layouts import FLUX2, to_original

ROOT = "/tmp/comfy_runs/models"
qwen = load_file(f"{ROOT}/qwen/transformer/diffusion_pytorch_model.safetensors")
save_file({k: v.contiguous() for k, v in qwen.items()}, f"{ROOT}/qwen.safetensors")

original = tf2.tiny_flux2_configs
def wide(*a, **k):
    configs = original(*a, **k)
    configs["transformer"].update(timestep_guidance_channels=256)
    return configs
tf2.tiny_flux2_configs = wide
tf2.build_tiny_flux2_model(f"{ROOT}/flux2")
flux2 = load_file(f"{ROOT}/flux2/transformer/diffusion_pytorch_model.safetensors")
save_file({k: v.contiguous() for k, v in to_original(FLUX2, flux2).items()},
          f"{ROOT}/flux2.safetensors")
print("ok", len(qwen), len(flux2))
