"""The tiny SD 1.5 (and inpainting) with UNet widths (32, 64) instead of (32, 48): ComfyUI's UNet
stores whole channel multipliers, so it cannot build a 1.5x level. Everything else as make-tiny-model."""
import sys
sys.path.insert(0, "/work/main")
import trainer.models.tiny as tiny
original = tiny.tiny_sd15_configs
def widened(*a, **k):
    configs = original(*a, **k)
    configs["unet"]["block_out_channels"] = (32, 64)
    return configs
tiny.tiny_sd15_configs = widened
tiny.build_tiny_sd15("/tmp/comfy_runs/models/sd15")
tiny.build_tiny_sd15_inpaint("/tmp/comfy_runs/models/sd15-inpaint")
print("ok")
