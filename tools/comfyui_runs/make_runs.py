"""Train every (family, format, adapter) Atelier writes on the tiny models, a few steps each."""
import json, subprocess, sys, os, pathlib
ROOT = pathlib.Path("/tmp/comfy_runs")
DEMO = "/work/main/trainer/demo/dataset"
TYPES = {"sd15": "STABLE_DIFFUSION_15", "sd15-inpaint": "STABLE_DIFFUSION_15_INPAINTING",
         "sdxl": "STABLE_DIFFUSION_XL_10_BASE", "flux": "FLUX_DEV_1", "chroma": "CHROMA_1",
         "sd35": "STABLE_DIFFUSION_35", "sdxl-inpaint": "STABLE_DIFFUSION_XL_10_BASE_INPAINTING",
         "sd3": "STABLE_DIFFUSION_3", "z-image": "Z_IMAGE",
         "qwen": "QWEN", "flux2": "FLUX_2"}
def runs():
    for fam in ("sd15", "sdxl"):
        for fmt in ("KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA", "DIFFUSERS_LORA"):
            yield fam, fmt, "LORA", {}
        for fmt in ("KOHYA_LORA", "COMFY_LORA", "DIFFUSERS_LORA"):
            yield fam, fmt, "DORA", {"lora_decompose": True}
        for ad in ("LOHA", "LOKR"):
            for fmt in ("KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA"):
                yield fam, fmt, ad, {"peft_type": ad}
        yield fam, "KOHYA_LORA", "LORA+EMB", {"additional_embeddings": [
            {"placeholder": "<atelierx>", "initial_embedding_text": "cat", "token_count": 2}]}
        yield fam, "ORIGINAL_SINGLE_FILE", "FINE_TUNE", {"training_method": "FINE_TUNE"}
    for fmt in ("KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA", "DIFFUSERS_LORA"):
        yield "sd15-inpaint", fmt, "LORA", {}
    yield "sd15-inpaint", "ORIGINAL_SINGLE_FILE", "FINE_TUNE", {"training_method": "FINE_TUNE"}
    for fmt in ("KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA", "DIFFUSERS_LORA"):
        yield "sdxl-inpaint", fmt, "LORA", {}
    yield "sdxl-inpaint", "ORIGINAL_SINGLE_FILE", "FINE_TUNE", {"training_method": "FINE_TUNE"}
    for fam in ("flux", "chroma", "sd35", "sd3"):
        for fmt in ("DIFFUSERS_LORA", "KOHYA_LORA", "COMFY_LORA"):
            yield fam, fmt, "LORA", {}
        yield fam, "DIFFUSERS_LORA", "DORA", {"lora_decompose": True}
        yield fam, "ORIGINAL_SINGLE_FILE", "FINE_TUNE", {"training_method": "FINE_TUNE"}

    # the families that offer DIFFUSERS_LORA and COMFY_LORA only (their text encoders frozen);
    # every linear layer of the transformer (the "full" preset), so that every name ComfyUI
    # must map is in the file
    for fam in ("z-image", "qwen", "flux2"):
        for fmt in ("DIFFUSERS_LORA", "COMFY_LORA"):
            yield fam, fmt, "LORA", {"lora_layer_preset": "full"}
            yield fam, fmt, "DORA", {"lora_decompose": True, "lora_layer_preset": "full"}
        yield fam, "ORIGINAL_SINGLE_FILE", "FINE_TUNE", {"training_method": "FINE_TUNE"}
    # Flux.2's DIFFUSERS_LORA loses the layers outside the blocks: its own blocks preset
    yield "flux2", "DIFFUSERS_LORA", "LORA_BLOCKS", {"lora_layer_preset": "blocks"}

def main(only=None):
    for fam, fmt, ad, extra in runs():
        name = f"{fam}__{fmt}__{ad}"
        if only and only not in name:
            continue
        out = ROOT / "out" / (name + ".safetensors")
        if out.exists():
            continue
        cfg = {"model_type": TYPES[fam], "base_model_name": str(ROOT / "models" / fam),
               "workspace_dir": str(ROOT / "ws" / name), "output_model_destination": str(out),
               "output_model_format": fmt, "concepts": [{"path": DEMO}],
               "resolution": "64", "train_dtype": "FLOAT_32", "output_dtype": "FLOAT_32",
               "gradient_checkpointing": False, "learning_rate": 1e-2,
               "learning_rate_warmup_steps": 0, "lora_rank": 4, "lora_alpha": 2.0,
               "batch_size": 2, "epochs": 1, "text_encoder": {"train": True,
               "stop_training_after_unit": "NEVER"}}
        if fam in ("chroma", "z-image", "qwen", "flux2"):
            cfg["text_encoder"] = {"train": False}
        if fam in ("sdxl", "sdxl-inpaint"):
            cfg["text_encoder_2"] = {"train": True, "stop_training_after_unit": "NEVER"}
        cfg.update(extra)
        if cfg.get("additional_embeddings"):
            cfg["text_encoder"]["train_embedding"] = True
        path = ROOT / "configs" / (name + ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg, indent=1))
        r = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(path)],
                           cwd="/work/main", capture_output=True, text=True, timeout=900)
        print(name, "OK" if r.returncode == 0 else "FAIL " + (r.stderr or r.stdout)[-600:], flush=True)

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
