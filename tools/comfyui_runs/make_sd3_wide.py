"""The tiny SD 3 / 3.5 with MMDiT heads of 64 (2 heads, width 128) instead of 4 x 8: ComfyUI's
MMDiT derives its width from its depth (64 x depth, one 64-wide head per block), so it can hold
only such a model. Everything else as make-tiny-model."""
import sys
sys.path.insert(0, "/work/main")
import trainer.models.tiny_flow as tf
original = tf.tiny_flow_configs
def wide(kind, *a, **k):
    configs = original(kind, *a, **k)
    if kind in ("sd3", "sd35"):
        configs["transformer"].update(attention_head_dim=64, num_attention_heads=2,
                                      caption_projection_dim=128)
    return configs
tf.tiny_flow_configs = wide
for kind in ("sd3", "sd35"):
    tf.build_tiny_flow_model(kind, f"/tmp/comfy_runs/models/{kind}")
print("ok")
