"""The tiny Z-Image widened to what ComfyUI's Z-Image model (`ZImage`, NextDiT in
comfy/ldm/lumina/model.py) can hold, and the base transformer as one original-layout file.

ComfyUI sizes NextDiT's timestep embedder as min(dim, 1024) -> 256 and its modulation input as
min(dim, 256); diffusers' ZImageTransformer2DModel as 256 -> 1024 -> min(dim, 256). The two agree
only for dim >= 1024 (the real model: 3840). ComfyUI also rounds the feed-forward width
int(dim * 8/3) up to a multiple of 256, which diffusers does not: they agree when dim is a
multiple of 96 (3840 is). So width 1152 (the smallest multiple of 96 and of 128 from 1024 up),
heads of 128 with ComfyUI's Z-Image rotary axes (32, 48, 48), one main block and one of each
refiner; the text encoder, VAE and everything else as make-tiny-model."""
import sys
sys.path.insert(0, "/work/main")
from safetensors.torch import save_file
import trainer.models.tiny_z_image as tz
from trainer.models.z_image import to_original

original = tz.tiny_z_image_configs
def wide(*a, **k):
    configs = original(*a, **k)
    configs["transformer"].update(dim=1152, n_heads=9, n_kv_heads=9, n_layers=1,
                                  n_refiner_layers=1, axes_dims=[32, 48, 48])
    return configs
tz.tiny_z_image_configs = wide
folder = tz.build_tiny_z_image_model("/tmp/comfy_runs/models/z-image")
pipe = tz.build_tiny_z_image_pipeline()
state = {k: v.contiguous() for k, v in to_original(pipe.transformer.state_dict()).items()}
save_file(state, "/tmp/comfy_runs/models/z-image.safetensors")
print("ok", sum(v.numel() for v in state.values()))
