"""The files OneTrainer's own code wrote (tests/fixtures/onetrainer, made by
tools/onetrainer_fixtures.py; its manifest.json says the commit and how each was made), and
how the tests run them on the tiny models: only paths, sizes and CPU types are changed, as a
user would with `--set` (the settings under test stay as OneTrainer wrote them)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from trainer.demo import DEMO_DATASET_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "onetrainer"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
ALL = sorted(MANIFEST["fixtures"])

# Fixtures Atelier refuses, and the key the refusal names (everything else trains).
REFUSED = {
    "preset.sd20_inpaint_lora.saved": "model_type",        # SD 2.x: another family
    "preset.sd21_lora.saved": "model_type",
    "sd15_lora_oft.saved": "peft_type",                    # OFT_2 is not built here
    "sd15_lora_came.saved": "optimizer.optimizer",         # CAME is not one of Atelier's
    "preset.z_image_deturbo_lora_16gb.saved": "transformer.weight_dtype",  # INT_W8A8
    "preset.flux2_lora_16gb.saved": "transformer.weight_dtype",  # INT_W8A8
    "preset.flux2_lora_8gb.saved": "transformer.weight_dtype",  # INT_W8A8
    "chroma_lora_gguf_a8_int.saved": "transformer.weight_dtype",  # GGUF_A8_INT
}
# Accepted by the translation, refused when the run starts (check_supported), with the key.
REFUSED_AT_START = {
    "sd15_lokr_default_format.saved": "output_model_format",  # a LoKr in DIFFUSERS_LORA
}
ACCEPTED = [name for name in ALL if name not in REFUSED and name not in REFUSED_AT_START]

TINY_MODELS = {"STABLE_DIFFUSION_15": "tiny_sd15_dir",
               "STABLE_DIFFUSION_15_INPAINTING": "tiny_sd15_inpaint_dir",
               "STABLE_DIFFUSION_XL_10_BASE": "tiny_sdxl_dir",
               "STABLE_DIFFUSION_XL_10_BASE_INPAINTING": "tiny_sdxl_inpaint_dir"}
# The accepted files of the flow-matching families (Flux.1, Chroma, SD 3) are read and checked
# key by key here (tests/test_onetrainer_flow.py); the others also train on the tiny models.
TRAINED = [name for name in ACCEPTED
           if json.loads((FIXTURES / MANIFEST["fixtures"][name]["file"]).read_text(
               encoding="utf-8")).get("model_type", "STABLE_DIFFUSION_15") in TINY_MODELS]
# A UNet layer's kohya name by the diffusers UNet (SD 1.5, LEGACY_LORA) or by the original SGM
# one (SDXL's KOHYA_LORA: an attention block is the second module of its input/output block).
ATTENTION_BLOCK = re.compile(
    r"_attentions_\d+_|_(input_blocks_\d+|output_blocks_\d+|middle_block)_1_")
RESNET = re.compile(r"_resnets_\d+_|_(in_layers|out_layers|emb_layers)_")
TRAIN_DTYPES_ON_CPU = {"FLOAT_16": "FLOAT_32"}  # float16 needs a CUDA GPU; bfloat16 runs


def path(name: str) -> Path:
    return FIXTURES / MANIFEST["fixtures"][name]["file"]


def raw(name: str) -> dict:
    return json.loads(path(name).read_text(encoding="utf-8"))


def entry(name: str) -> dict:
    return MANIFEST["fixtures"][name]


def model_type(name: str) -> str:
    return raw(name).get("model_type", "STABLE_DIFFUSION_15")


def few_images(folder: Path, count: int = 2) -> Path:
    """`count` of the demo's square images (one bucket) with their captions and masks."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in ("cat", "coffee", "astronaut", "rocket", "photographer")[:count]:
        for source in DEMO_DATASET_DIR.glob(f"{stem}*"):
            shutil.copy(source, folder / source.name)
    return folder


def copy_with_concept_file(name: str, into: Path, images: Path) -> Path:
    """The fixture and the concept file it names, copied beside each other as OneTrainer left
    them, the concepts' folders pointed at `images` (their only change)."""
    into.mkdir(parents=True, exist_ok=True)
    config = into / path(name).name
    shutil.copy(path(name), config)
    concept_file = entry(name).get("concept_file")
    if concept_file:
        concepts = json.loads((FIXTURES / concept_file).read_text(encoding="utf-8"))
        for index, concept in enumerate(concepts):
            folder = images / f"concept{index}"
            if not folder.exists():
                shutil.copytree(images, folder)
            concept["path"] = str(folder)
        (into / concept_file).parent.mkdir(parents=True, exist_ok=True)
        (into / concept_file).write_text(json.dumps(concepts, indent=4), encoding="utf-8")
    return config


def tiny_overrides(name: str, model_dir: Path, tmp_path: Path, images: Path) -> list[str]:
    """`--set` assignments that put the fixture on the tiny model of its type, on the CPU, for
    one epoch at 64 px, writing into tmp_path. Concepts: those the fixture carries (Export) or
    names (a concept file beside it) keep their settings, with `images` as their folder; a Save
    config whose concept file OneTrainer kept elsewhere gets one concept, as `--set` gives it."""
    data = raw(name)
    out = Path(data.get("output_model_destination") or "model.safetensors").name
    sets = {"base_model_name": str(model_dir), "workspace_dir": str(tmp_path / "ws"),
            "output_model_destination": str(tmp_path / "out" / out), "resolution": "64",
            "epochs": 1}
    train_dtype = data.get("train_dtype", "FLOAT_16")  # OneTrainer's default, and Atelier's
    if train_dtype in TRAIN_DTYPES_ON_CPU:
        sets["train_dtype"] = TRAIN_DTYPES_ON_CPU[train_dtype]
    for part in ("unet", "text_encoder", "text_encoder_2"):
        dtype = (data.get(part) or {}).get("weight_dtype")
        if dtype in TRAIN_DTYPES_ON_CPU:
            sets[f"{part}.weight_dtype"] = TRAIN_DTYPES_ON_CPU[dtype]
    if data.get("weight_dtype") in TRAIN_DTYPES_ON_CPU:  # the oldest files' one for all parts
        sets["weight_dtype"] = TRAIN_DTYPES_ON_CPU[data["weight_dtype"]]
    batch = int(data.get("batch_size", 1))
    if isinstance(data.get("concepts"), list):
        sets["concepts"] = [{**c, "path": str(images)} for c in data["concepts"]]
    elif not entry(name).get("concept_file"):
        sets["concepts"] = [{"path": str(images), "repeats": max(1, batch // 2)}]
    return [f"{key}={json.dumps(value)}" for key, value in sets.items()]
