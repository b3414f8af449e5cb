"""Embedding files: where each trained embedding's own file goes, beside the run's output (the
one rule that training, trainer/embeddings.py, writes by and publishing, trainer/publish.py,
reads by), and the keys its vectors have inside the files.

Keys, as OneTrainer writes them (its StableDiffusion(XL)EmbeddingSaver and LoRASaver):
- bundled in a LoRA file: `bundle_emb.<placeholder>.clip_l` (SD 1.5, and SDXL's first text
  encoder) and `bundle_emb.<placeholder>.clip_g` (SDXL's second). Forge does not use them
  (tools/forge_check.py, docs/forge_results.md): its LoRA loader leaves them unmatched, and in
  its embeddings folder the LoRA file errors (more than one tensor). ComfyUI's LoRA loader
  does not read them either; its embedding reader does when the LoRA file sits in
  `models/embeddings` and the prompt says `embedding:<file name>` (all the file's placeholders
  joined into one). A1111 was not checked.
- standalone: SDXL `clip_l` + `clip_g`; SD 1.5 `emb_params`. Here alone Atelier differs from
  OneTrainer, which writes `emp_params` (and reads only that): `emb_params` is kohya's name and
  the one InvokeAI looks for by name (without it, it takes the first tensor's first dimension
  as the width and refuses the file); Forge (measured with `emb_params`; its code takes any
  one-tensor file's tensor), ComfyUI and diffusers take a one-tensor file's only tensor
  whatever its name. Forge registers a standalone file under its file name, which the prompt
  must say (not the placeholder).
Readers take the other spellings too: Atelier's earlier `bundle_emb.<p>.string_to_param.*`
(a bundled spelling ComfyUI's embedding reader also reads), OneTrainer's `emp_params`, and
`string_to_param.*` (the `string_to_param` dict of WebUI `.pt` embeddings, flattened).

Light on purpose (no torch): `python -m trainer publish` imports it.
"""
from __future__ import annotations

import re
from pathlib import Path

from trainer.config import TrainConfig, TrainingMethod

# Each text encoder's name in embedding files (Forge's and ComfyUI's CLIP names: ViT-L, bigG).
ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
SD15_FILE_KEY = "emb_params"  # kohya's name for SD 1.5 textual-inversion vectors
# Other names of SD 1.5 vectors in a standalone file: OneTrainer's, the WebUI `.pt` dict's.
SD15_FILE_KEYS_READ = (SD15_FILE_KEY, "emp_params", "string_to_param.*")
BUNDLE_PREFIX = "bundle_emb."
OLD_SD15_BUNDLE_SUFFIX = ".string_to_param.*"  # what Atelier bundled for SD 1.5 before


def bundle_key(placeholder: str, part: str) -> str:
    """The LoRA file's key of one embedding's vectors for one text encoder."""
    return f"{BUNDLE_PREFIX}{placeholder}.{ENCODER_KEYS[part]}"


def bundled_embeddings(tensors: dict) -> dict[str, dict]:
    """{placeholder: {"clip_l": vectors[, "clip_g": vectors]}} of a LoRA file's bundled
    embeddings, in the current spelling or the earlier SD 1.5 one (`string_to_param.*`, the
    one text encoder's)."""
    found: dict[str, dict] = {}
    for key, value in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        rest = key[len(BUNDLE_PREFIX):]
        if rest.endswith(OLD_SD15_BUNDLE_SUFFIX):
            found.setdefault(rest.removesuffix(OLD_SD15_BUNDLE_SUFFIX), {})["clip_l"] = value
            continue
        placeholder, _, name = rest.rpartition(".")
        if name in ENCODER_KEYS.values():
            found.setdefault(placeholder, {})[name] = value
    return found


def embedding_file_paths(config: TrainConfig, output: Path) -> list[tuple[str, Path]]:
    """(placeholder, file) of every embedding, in config order: beside `output`, named after
    the placeholder (`lora-mychar.safetensors`); with EMBEDDING the first one is the output
    itself."""
    output = Path(output)
    found, used = [], set()
    for index, embedding in enumerate(config.additional_embeddings):
        if index == 0 and config.training_method == TrainingMethod.EMBEDDING:
            found.append((embedding.placeholder, output))
            used.add(output.name)
            continue
        stem = re.sub(r"[^A-Za-z0-9_-]+", "", embedding.placeholder) or "embedding"
        name = f"{output.stem}-{stem}.safetensors"
        if name in used:
            name = f"{output.stem}-{stem}-{index}.safetensors"
        used.add(name)
        found.append((embedding.placeholder, output.with_name(name)))
    return found
