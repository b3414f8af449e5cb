"""The tiny flow models' CLIP encoders as the standalone files ComfyUI's CLIP loaders read
(transformers layout under text_model., text_projection.weight at the top)."""
from safetensors.torch import load_file, save_file
for fam, parts in {"flux": {"clip_l": "text_encoder"}, "sd35": {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}, "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}}.items():
    for name, part in parts.items():
        sd = load_file(f"/tmp/comfy_runs/models/{fam}/{part}/model.safetensors")
        out = {}
        for k, v in sd.items():
            if not (k.startswith("text_model.") or k.startswith("text_projection")):
                k = "text_model." + k
            out[k] = v.contiguous()
        save_file(out, f"/tmp/comfy_runs/models/{fam}-{name}.safetensors")
        print(fam, name, len(out))
