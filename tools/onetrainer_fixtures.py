#!/usr/bin/env python
"""Write tests/fixtures/onetrainer/: configs made by OneTrainer's own config classes.

The tests of OneTrainer import (tests/test_onetrainer*.py) read only these files, never a
config typed by hand in Atelier's idea of OneTrainer's names. This script is run by a person
when OneTrainer changes (not by the tests or CI: nothing is downloaded at test time); the
files it writes are committed, OneTrainer's code never is.

    python tools/onetrainer_fixtures.py --repo /path/to/OneTrainer/.git [--out DIR]

`--repo` is a git directory of github.com/Nerogar/OneTrainer that holds the commits below.
Each commit is extracted with `git archive` into a temporary folder, and a child process
imports that tree's `modules.util.config` classes (they import with Atelier's own
dependencies) and does what OneTrainer's UI does:

- Save config (top bar)  = `TrainConfig.to_settings_dict(secrets=False)`; files `*.saved.json`;
- Export (train tab)     = `TrainConfig.to_pack_dict(secrets=False)`: concepts and samples
  read from their files and packed in; files `*.exported.json`;
- a preset loaded        = `TopBarController.load_config_from_file` (built-in '#' presets are
  not migrated), then saved as above; files `preset.*.saved.json` (a fixture with `start`
  begins from a preset so loaded, then takes the user's edits);
- what the UI's widgets write into the config when it shows it: the model tab picks the first
  allowed output format when the config's is not allowed for the method (its options_kv); the
  LoRA tab writes the layer preset's patterns into the layer filter (its layer widget, with
  the model's LAYER_PRESETS read from OneTrainer's setup module); the top bar fills the
  optimizer with OneTrainer's defaults for it (optimizer_util.change_optimizer, its table
  OPTIMIZER_DEFAULT_PARAMETERS read from the source).

A few fixtures are OneTrainer's own files as git holds them (older presets without a layer
key): `old_preset.*.json`. LoKr fixtures also record the adapter shapes OneTrainer builds on
Atelier's tiny SD 1.5 model: its own `LoRAModuleWrapper` / `LoKrModule` run on that model's
layers. Importing `modules.module.LoRAModule` needs two packages Atelier does not install,
`parse` and `gguf` (used only by OneTrainer's checkpoint conversion and GGUF quantization,
neither of which runs here); the child process stubs exactly those two.

Everything the script did for each file is in `manifest.json` beside them: the commit, the
config version, the UI steps, the user's edits, and, for LoKr, the expected shapes.

The manifest's `layer_presets` holds, for each model type Atelier trains, the LAYER_PRESETS of
OneTrainer's setup module at the current commit and the denoiser layers OneTrainer's own
`LoRAModuleWrapper` picks with each preset (and with a few custom filters, plain and regex) on
Atelier's tiny model of that type, called as its LoRA setups call it.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "onetrainer"
UPSTREAM = "https://github.com/Nerogar/OneTrainer"

# The commits the fixtures come from (full hashes: the manifest records them).
COMMITS = {
    # the pinned current commit: TrainConfig __version 11
    "current": "23df3832e8f213d64c337e39f9365ba46e99fed0",
    # the last commit whose TrainConfig was __version 10 (the next one, de1437cb, made it 11)
    "v10": "1e0263b3ac9bc763455889578f8b08496367b226",
    # the last commit whose TrainConfig was __version 6 (the next one, c581f229, made it 7);
    # its LoRA presets had no layer key, and its LoRA tab chose the first layer preset
    # (attn-mlp) for a config without one
    "v6": "ca5035305ec4256f61025f0cca593f71e35b1c88",
}

# A fixed uuid for OneTrainer's main `embedding` (its default is a fresh uuid4 each run), so
# that running the script twice writes the same files.
FIXED_UUID = "00000000-0000-4000-8000-000000000001"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_LORA = {"model_type": "STABLE_DIFFUSION_15", "training_method": "LORA"}
SDXL_LORA = {"model_type": "STABLE_DIFFUSION_XL_10_BASE", "training_method": "LORA"}
FLUX_LORA = {"model_type": "FLUX_DEV_1", "training_method": "LORA"}
CHROMA_LORA = {"model_type": "CHROMA_1", "training_method": "LORA"}


def concept(path: str, **values) -> dict:
    """One concept as a user fills it in OneTrainer's concept window (its key names)."""
    return {"name": Path(path).name, "path": path, "seed": 1234, **values}


SAMPLE = {"prompt": "a photo of a cat", "seed": 7}

# name -> what to make. `commit`: key of COMMITS; `choose`: the top bar's model type and
# training method; `edits`: what the user changes in the UI (nested, OneTrainer's keys);
# `save`: "settings" (Save config) or "pack" (Export); `concept_file`: write the concepts
# into this file beside the fixture (a Save config keeps them in their own file).
FIXTURES: dict[str, dict] = {
    # --- defaults, saved and exported --------------------------------------------------------
    "sd15_lora.saved": {"commit": "current", "save": "settings",
                        "choose": SD15_LORA},
    "sd15_lora.exported": {"commit": "current", "save": "pack",
                           "choose": SD15_LORA,
                           "concepts": [concept("training_images/mychar")], "samples": [SAMPLE]},
    "sdxl_lora.saved": {"commit": "current", "save": "settings",
                        "choose": SDXL_LORA,
                        "edits": {"base_model_name": SDXL_BASE, "resolution": "1024"}},
    "sdxl_lora.exported": {"commit": "current", "save": "pack",
                           "choose": SDXL_LORA,
                           "edits": {"base_model_name": SDXL_BASE, "resolution": "1024"},
                           "concepts": [concept("training_images/mychar")], "samples": [SAMPLE]},
    # --- particular jobs ---------------------------------------------------------------------
    "sdxl_lora_part_dtypes.saved": {
        "commit": "current", "save": "settings",
        "choose": SDXL_LORA,
        "edits": {"base_model_name": SDXL_BASE, "resolution": "1024", "train_dtype": "BFLOAT_16",
                  "output_dtype": "BFLOAT_16", "output_model_format": "KOHYA_LORA",
                  "unet": {"weight_dtype": "BFLOAT_16"},
                  "text_encoder": {"weight_dtype": "FLOAT_16", "train": False},
                  "text_encoder_2": {"weight_dtype": "BFLOAT_16", "train": True,
                                     "learning_rate": 0.0001},
                  "vae": {"weight_dtype": "FLOAT_32"}}},
    "sd15_finetune_ema.saved": {
        "commit": "current", "save": "settings",
        "choose": {"model_type": "STABLE_DIFFUSION_15", "training_method": "FINE_TUNE"},
        "edits": {"ema": "GPU", "ema_decay": 0.998, "ema_update_step_interval": 2,
                  "learning_rate": 1e-05, "text_encoder": {"train": False}}},
    "sd15_lora_embedding_masked.saved": {
        "commit": "current", "save": "settings",
        "choose": SD15_LORA,
        "edits": {"masked_training": True, "unmasked_probability": 0.2, "unmasked_weight": 0.05,
                  "normalize_masked_area_loss": True, "embedding_learning_rate": 0.001,
                  "concept_file_name": "training_concepts/mychar.json",
                  "additional_embeddings": [{"uuid": "00000000-0000-4000-8000-000000000002",
                                             "placeholder": "<mychar>", "token_count": 2,
                                             "initial_embedding_text": "woman"}]},
        "concept_file": "training_concepts/mychar.json",
        "concepts": [concept("training_images/mychar")]},
    "sd15_loha.saved": {
        "commit": "current", "save": "settings",
        "choose": SD15_LORA,
        "edits": {"peft_type": "LOHA", "lora_rank": 4, "lora_alpha": 2.0,
                  "output_model_format": "KOHYA_LORA", "layer_filter_preset": "attn-only"}},
    # LoKr with OneTrainer's own rank (lokr_dim, its LoKr tab; lora_rank stays 16) and a
    # factor that makes OneTrainer order some factor pairs (see the manifest's shapes).
    "sd15_lokr.saved": {
        "commit": "current", "save": "settings",
        "choose": SD15_LORA,
        "edits": {"peft_type": "LOKR", "lokr_dim": 2, "lokr_decompose_factor": 8,
                  "lora_alpha": 2.0, "output_model_format": "KOHYA_LORA"},
        "lokr_shapes": True},
    # the same LoKr left in OneTrainer's default LoRA format (DIFFUSERS_LORA)
    "sd15_lokr_default_format.saved": {
        "commit": "current", "save": "settings",
        "choose": SD15_LORA,
        "edits": {"peft_type": "LOKR", "lokr_dim": 2, "lokr_decompose_factor": 8}},
    "sd15_dora.saved": {
        "commit": "current", "save": "settings",
        "choose": SD15_LORA,
        "edits": {"lora_decompose": True, "lora_rank": 4, "lora_alpha": 4.0,
                  "output_model_format": "KOHYA_LORA", "layer_filter_preset": "attn-mlp"}},
    "sd15_lora_accumulation.saved": {
        "commit": "current", "save": "settings",
        "choose": SD15_LORA,
        "edits": {"gradient_accumulation_steps": 4, "learning_rate_warmup_steps": 40,
                  "learning_rate_scheduler": "COSINE", "learning_rate": 0.0003,
                  "sample_after": 8, "sample_after_unit": "STEP",
                  "text_encoder": {"stop_training_after": 6, "stop_training_after_unit": "STEP"},
                  "output_model_format": "KOHYA_LORA"},
        # the learning rate of every update as OneTrainer's create_lr_scheduler sets it, for
        # an epoch of 100 batches and 2 epochs
        "lr_schedule": {"epoch_length_batches": 100, "epochs": 2}},
    "sd15_lora_renamed_keys.saved": {
        "commit": "current", "save": "settings",
        "choose": SD15_LORA,
        "edits": {"dropout_probability": 0.1, "text_encoder_layer_skip": 1,
                  "text_encoder": {"dropout_probability": 0.05},
                  "loss_weight_fn": "MIN_SNR_GAMMA", "loss_weight_strength": 5.0,
                  "output_model_format": "KOHYA_LORA", "layer_filter_preset": "attn-mlp",
                  "concept_file_name": "training_concepts/renamed.json"},
        "concept_file": "training_concepts/renamed.json",
        "concepts": [concept("training_images/mychar", balancing=2.0,
                             image={"enable_random_flip": True, "enable_crop_jitter": False,
                                    "enable_resolution_override": True,
                                    "resolution_override": "72"}),
                     concept("training_images/style", balancing=3, balancing_strategy="SAMPLES",
                             loss_weight=0.5)]},
    "sdxl_lora_offload.saved": {
        "commit": "current", "save": "settings",
        "choose": SDXL_LORA,
        "edits": {"base_model_name": SDXL_BASE, "resolution": "1024",
                  "output_model_format": "KOHYA_LORA", "text_encoder_2_layer_skip": 1,
                  "unet": {"offload_fraction": 0.5, "activation_offloading": True},
                  "text_encoder": {"train": False}, "text_encoder_2": {"train": False}}},
    "sd15_lora_continue.saved": {
        "commit": "current", "save": "settings",
        "choose": SD15_LORA,
        "edits": {"lora_model_name": "models/previous.safetensors", "lora_rank": 4,
                  "output_model_format": "KOHYA_LORA", "text_encoder": {"train": False}}},
    "sd15_lora_validation_concept.exported": {
        "commit": "current", "save": "pack",
        "choose": SD15_LORA,
        "concepts": [concept("training_images/mychar"),
                     concept("training_images/held_out", type="VALIDATION")],
        "samples": [SAMPLE]},
    # a prior-prediction concept beside the trained one, and masked prior preservation
    "sd15_lora_prior_prediction.exported": {
        "commit": "current", "save": "pack",
        "choose": SD15_LORA,
        "edits": {"masked_training": True, "masked_prior_preservation_weight": 0.5},
        "concepts": [concept("training_images/mychar"),
                     concept("training_images/people", type="PRIOR_PREDICTION")],
        "samples": [SAMPLE]},
    "sd15_lora_oft.saved": {
        "commit": "current", "save": "settings",
        "choose": SD15_LORA,
        "edits": {"peft_type": "OFT_2"}},
    "sd15_finetune_fused.saved": {
        "commit": "current", "save": "settings",
        "choose": {"model_type": "STABLE_DIFFUSION_15", "training_method": "FINE_TUNE"},
        "edits": {"clip_grad_norm": None, "train_dtype": "BFLOAT_16",
                  "output_model_format": "ORIGINAL_SINGLE_FILE", "text_encoder": {"train": False},
                  "optimizer": {"optimizer": "ADAFACTOR", "fused_back_pass": True}}},
    "sd15_lora_came.saved": {
        "commit": "current", "save": "settings",
        "choose": SD15_LORA,
        "edits": {"optimizer": {"optimizer": "CAME"}}},
    # OneTrainer's Flux LoRA preset loaded, its quantized weights set to BFLOAT_16 by the user
    # (the model tab's weight types), saved
    "flux_lora_bf16.saved": {
        "commit": "current", "save": "settings", "start": "Flux Dev.1/#flux LoRA.json",
        "choose": FLUX_LORA,
        "edits": {"transformer": {"weight_dtype": "BFLOAT_16"},
                  "text_encoder_2": {"weight_dtype": "BFLOAT_16"}}},
    # the same preset with a city96 GGUF file in the model tab's "Override Transformer / GGUF"
    # (its file dialog writes an absolute path) and the transformer's type set to GGUF, as the
    # field's tooltip asks; T5 set to BFLOAT_16
    "flux_lora_gguf.saved": {
        "commit": "current", "save": "settings", "start": "Flux Dev.1/#flux LoRA.json",
        "choose": FLUX_LORA,
        "edits": {"transformer": {"model_name": "/data/models/flux1-dev-Q8_0.gguf",
                                  "weight_dtype": "GGUF"},
                  "text_encoder_2": {"weight_dtype": "BFLOAT_16"}}},
    # OneTrainer's Chroma LoRA 16GB preset with a GGUF file and the type "GGUF A8 int" (the
    # file's weights with int8 activations)
    "chroma_lora_gguf_a8_int.saved": {
        "commit": "current", "save": "settings", "start": "Chroma/#chroma LoRA 16GB.json",
        "choose": CHROMA_LORA,
        "edits": {"transformer": {"model_name": "/data/models/Chroma1-HD-Q8_0.gguf",
                                  "weight_dtype": "GGUF_A8_INT"}}},
    # --- older OneTrainer versions -----------------------------------------------------------
    "sd15_lora.v10.saved": {"commit": "v10", "save": "settings",
                            "choose": SD15_LORA,
                            "edits": {"layer_filter_preset": "attn-mlp"}},
    "sdxl_lora_offload.v10.saved": {
        "commit": "v10", "save": "settings",
        "choose": SDXL_LORA,
        "edits": {"base_model_name": SDXL_BASE, "resolution": "1024",
                  "gradient_checkpointing": "CPU_OFFLOADED", "layer_offload_fraction": 0.25,
                  "text_encoder": {"train": False}, "text_encoder_2": {"train": False}}},
    "sd15_finetune.v10.saved": {"commit": "v10", "save": "settings",
                                "choose": {"model_type": "STABLE_DIFFUSION_15",
                                           "training_method": "FINE_TUNE"}},
    # the LoRA tab shown once: it sets the layer preset to its first one, attn-mlp
    "sd15_lora.v6.saved": {"commit": "v6", "save": "settings",
                           "choose": SD15_LORA},
    # saved without the LoRA tab's help: the layer preset is null (OneTrainer's migration 6:
    # full; its training then: an empty filter, every layer)
    "sd15_lora_null_preset.v6.saved": {"commit": "v6", "save": "settings", "no_lora_tab": True,
                                       "choose": {"model_type": "STABLE_DIFFUSION_15",
                                                  "training_method": "LORA"}},
    "sd15_finetune.v6.saved": {"commit": "v6", "save": "settings",
                               "choose": {"model_type": "STABLE_DIFFUSION_15",
                                          "training_method": "FINE_TUNE"}},
}

# OneTrainer's built-in presets for the model types Atelier trains, and SD 2.x (refused by
# name), loaded and saved by the current commit. (folder, file) -> fixture name
PRESETS = {
    ("SD1.5", "#sd 1.5 LoRA.json"): "preset.sd15_lora.saved",
    ("SD1.5", "#sd 1.5 embedding.json"): "preset.sd15_embedding.saved",
    ("SD1.5", "#sd 1.5 inpaint masked.json"): "preset.sd15_inpaint_masked.saved",
    ("SD1.5", "#sd 1.5 inpaint.json"): "preset.sd15_inpaint.saved",
    ("SD1.5", "#sd 1.5 masked.json"): "preset.sd15_masked.saved",
    ("SD1.5", "#sd 1.5.json"): "preset.sd15_finetune.saved",
    ("SDXL", "#sdxl 1.0 LoRA.json"): "preset.sdxl_lora.saved",
    ("SDXL", "#sdxl 1.0 embedding.json"): "preset.sdxl_embedding.saved",
    ("SDXL", "#sdxl 1.0 inpaint LoRA.json"): "preset.sdxl_inpaint_lora.saved",
    ("SDXL", "#sdxl 1.0.json"): "preset.sdxl_finetune.saved",
    ("SD2.0", "#sd 2.0 inpaint LoRA.json"): "preset.sd20_inpaint_lora.saved",
    ("SD2.1", "#sd 2.1 LoRA.json"): "preset.sd21_lora.saved",
    # the flow-matching families (issue 25)
    ("Flux Dev.1", "#flux LoRA.json"): "preset.flux_lora.saved",
    ("Chroma", "#chroma LoRA 8GB.json"): "preset.chroma_lora_8gb.saved",
    ("Chroma", "#chroma LoRA 16GB.json"): "preset.chroma_lora_16gb.saved",
    ("Chroma", "#chroma LoRA 24GB.json"): "preset.chroma_lora_24gb.saved",
    ("SD3", "#sd 3 LoRA.json"): "preset.sd3_lora.saved",
    ("SD3", "#sd 3.json"): "preset.sd3_finetune.saved",
    # Z-Image (issue 29)
    ("Z-Image", "#z-image LoRA 16GB.json"): "preset.z_image_lora_16gb.saved",
    ("Z-Image", "#z-image LoRA 8GB.json"): "preset.z_image_lora_8gb.saved",
    ("Z-Image", "#z-image Finetune 24GB.json"): "preset.z_image_finetune_24gb.saved",
    ("Z-Image", "#z-image DeTurbo LoRA 16GB.json"): "preset.z_image_deturbo_lora_16gb.saved",
    # Qwen-Image (issue 29)
    ("QwenImage", "#qwen LoRA 16GB.json"): "preset.qwen_lora_16gb.saved",
    ("QwenImage", "#qwen LoRA 24GB.json"): "preset.qwen_lora_24gb.saved",
    ("QwenImage", "#qwen Finetune 16GB.json"): "preset.qwen_finetune_16gb.saved",
    ("QwenImage", "#qwen Finetune 24GB.json"): "preset.qwen_finetune_24gb.saved",
    # Flux.2 klein (issue 29)
    ("Flux 2", "#flux2 LoRA 16GB.json"): "preset.flux2_lora_16gb.saved",
    ("Flux 2", "#flux2 LoRA 8GB.json"): "preset.flux2_lora_8gb.saved",
    ("Flux 2", "#flux2 Finetune 16GB.json"): "preset.flux2_finetune_16gb.saved",
    ("Flux 2", "#flux2 Finetune 24GB.json"): "preset.flux2_finetune_24gb.saved",
}
# OneTrainer's LoRA presets as they were before they named a layer preset (2025-12-04), as
# git holds them at the v6 commit (partial configs, no __version).
OLD_PRESETS = {
    "#sd 1.5 LoRA.json": "old_preset.sd15_lora",
    "#sdxl 1.0 LoRA.json": "old_preset.sdxl_lora",
    "#sdxl 1.0 inpaint LoRA.json": "old_preset.sdxl_inpaint_lora",
}


# The layer picks (issue 25): Atelier's tiny model of each kind -> OneTrainer's model type.
LAYER_PICK_MODELS = {"sd15": "STABLE_DIFFUSION_15", "sdxl": "STABLE_DIFFUSION_XL_10_BASE",
                     "flux": "FLUX_DEV_1", "flux-schnell": "FLUX_DEV_1", "chroma": "CHROMA_1",
                     "sd3": "STABLE_DIFFUSION_3", "sd35": "STABLE_DIFFUSION_35",
                     "z-image": "Z_IMAGE", "qwen": "QWEN", "flux2": "FLUX_2"}
# Custom filters a user may type in the LoRA tab (layer_filter, layer_filter_regex), by the
# denoiser's kind: substrings with spaces around them, a regular expression that is searched
# (not matched from the start), one that names the top-level layers exactly, and a name that
# matches nothing (OneTrainer refuses the run).
CUSTOM_LAYER_FILTERS = {
    "unet": [("to_k, conv1", False),
             (r"down_blocks\.\d\.attentions\.0\..*to_[qv]$", True),
             (r"^(conv_in|conv_out|time_embedding\.linear_1)$", True),
             ("no_such_layer", False)],
    "transformer": [("to_q, proj_out", False),
                    (r"transformer_blocks\.0\.attn\.(to|add)_[qk]", True),
                    (r"^(proj_out|norm_out\.linear)$", True),
                    ("no_such_layer", False)],
}


# --- The parent: extract the commits, run one child per commit, write the manifest -----------

def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={repo}", *args], check=True,
                          capture_output=True).stdout


def extract(repo: Path, commit: str, into: Path) -> Path:
    tree = into / commit[:8]
    tree.mkdir(parents=True)
    archive = git(repo, "archive", commit, "modules", "training_presets")
    subprocess.run(["tar", "x", "-C", str(tree)], input=archive, check=True)
    return tree


def commit_date(repo: Path, commit: str) -> str:
    return git(repo, "show", "-s", "--format=%cI", commit).decode().strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, type=Path,
                        help="a git directory of Nerogar/OneTrainer holding the pinned commits")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", nargs=3, metavar=("TREE", "JOBS", "RESULT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"about": "Configs written by OneTrainer's own code; see "
                         "tools/onetrainer_fixtures.py. Tests read these, never hand-written "
                         "imitations.",
                "onetrainer": {"repository": UPSTREAM,
                               "commits": {k: {"hash": c, "date": commit_date(args.repo, c)}
                                           for k, c in COMMITS.items()}},
                "fixtures": {}}
    with tempfile.TemporaryDirectory(prefix="onetrainer-fixtures-") as temp:
        temp = Path(temp)
        tiny = build_tiny_model(temp / "tiny-sd15")
        layer_models = build_layer_pick_models(temp / "layer-models")
        for key, commit in COMMITS.items():
            tree = extract(args.repo, commit, temp)
            jobs = {name: spec for name, spec in FIXTURES.items() if spec["commit"] == key}
            if key == "current":
                jobs.update({name: {"commit": key, "preset": f"{folder}/{file}"}
                             for (folder, file), name in PRESETS.items()})
            if key == "v6":  # the older presets as that commit's UI loaded and saved them
                jobs.update({f"{name}.v6.saved": {"commit": key, "preset": file}
                             for file, name in OLD_PRESETS.items()})
            result = temp / f"result-{key}.json"
            run_dir = temp / f"run-{key}"
            run_dir.mkdir()
            request = {"jobs": jobs, "out": str(out), "tiny": str(tiny)}
            if key == "current":
                request["layer_models"] = {k: str(p) for k, p in layer_models.items()}
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--repo",
                            str(args.repo), "--worker", str(tree), json.dumps(request),
                            str(result)], cwd=run_dir, check=True,
                           env={**os.environ, "PYTHONPATH": str(tree)})
            answer = json.loads(result.read_text())
            for name, entry in answer["fixtures"].items():
                manifest["fixtures"][name] = {"commit": commit, **entry}
            if "layer_presets" in answer:
                manifest["layer_presets"] = {"commit": commit, **answer["layer_presets"]}
        v6_tree = temp / COMMITS["v6"][:8]
        for file, name in OLD_PRESETS.items():
            data = json.loads((v6_tree / "training_presets" / file).read_text())
            (out / f"{name}.json").write_text(json.dumps(data, indent=4) + "\n")
            manifest["fixtures"][name] = {
                "commit": COMMITS["v6"], "file": f"{name}.json",
                "how": f"OneTrainer's preset training_presets/{file} as git holds it at this "
                       "commit (a partial config, no __version, no layer key), keys and "
                       "values unchanged"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"Wrote {len(manifest['fixtures'])} fixtures to {out}")
    return 0


def build_tiny_model(path: Path) -> Path:
    """Atelier's tiny SD 1.5 (the model the tests train), for OneTrainer's LoKr shapes."""
    sys.path.insert(0, str(REPO_ROOT))
    from trainer.models.tiny import build_tiny_sd15
    return build_tiny_sd15(path)


def build_layer_pick_models(folder: Path) -> dict[str, Path]:
    """Atelier's tiny models (the ones the tests build: default seeds) of LAYER_PICK_MODELS."""
    sys.path.insert(0, str(REPO_ROOT))
    from trainer.models.tiny import build_tiny_sd15, build_tiny_sdxl
    from trainer.models.tiny_flow import build_tiny_flow_model
    from trainer.models.tiny_flux2 import build_tiny_flux2_model
    from trainer.models.tiny_qwen_image import build_tiny_qwen_image_model
    from trainer.models.tiny_z_image import build_tiny_z_image_model
    builders = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl,
                "z-image": build_tiny_z_image_model, "qwen": build_tiny_qwen_image_model,
                "flux2": build_tiny_flux2_model}
    return {kind: (builders[kind](folder / kind) if kind in builders
                   else build_tiny_flow_model(kind, folder / kind))
            for kind in LAYER_PICK_MODELS}


# --- The child: one OneTrainer commit imported ------------------------------------------------

def worker(tree: str, jobs_json: str, result_path: str) -> int:
    sys.path.insert(0, tree)
    request = json.loads(jobs_json)
    out = Path(request["out"])
    results = {}
    for name, spec in request["jobs"].items():
        if "preset" in spec:
            results[name] = make_preset(Path(tree), spec["preset"], out / f"{name}.json")
        else:
            results[name] = make_config(Path(tree), spec, out, name)
            if spec.get("lokr_shapes"):
                results[name]["expected_lokr_shapes"] = lokr_shapes(
                    out / f"{name}.json", Path(request["tiny"]))
            if spec.get("lr_schedule"):
                results[name]["expected_lr_schedule"] = lr_schedule(
                    Path(tree), out / f"{name}.json", **spec["lr_schedule"])
    answer = {"fixtures": results}
    if request.get("layer_models"):
        answer["layer_presets"] = layer_picks(Path(tree), request["layer_models"])
    Path(result_path).write_text(json.dumps(answer))
    return 0


def write_json(path: Path, data) -> None:
    """As OneTrainer writes its files (path_util.write_json_atomic: indent 4)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4))


def make_config(tree: Path, spec: dict, out: Path, name: str) -> dict:
    from modules.util.config.ConceptConfig import ConceptConfig
    from modules.util.config.TrainConfig import TrainConfig

    config = TrainConfig.default_values()
    steps = ["TrainConfig.default_values()"]
    version = config.config_version
    if spec.get("start"):  # the user starts from one of OneTrainer's presets
        steps += load_preset(tree, config, spec["start"])
    # the top bar's model type and training method, as the UI's variables write them
    # (from_dict of the current version: no migration), and what the UI then shows
    config.from_dict({"__version": version, **spec["choose"]})
    steps.append(f"top bar: {spec['choose']}")
    config.embedding.uuid = FIXED_UUID
    config.train_device = "cuda"  # OneTrainer's default on a machine with a CUDA GPU
    lora_tab = not spec.get("no_lora_tab")
    steps += show_in_ui(tree, config, lora_tab=lora_tab)
    # then the user's edits: the optimizer's through its window (a new optimizer first gets
    # OneTrainer's defaults for it), a new layer preset through the LoRA tab's widget
    edits = dict(spec.get("edits", {}))
    optimizer_edits = dict(edits.pop("optimizer", {}))
    if edits:
        config.from_dict({"__version": version, **edits})
        steps.append(f"user edits: {edits}")
    if "optimizer" in optimizer_edits:
        config.from_dict({"__version": version,
                          "optimizer": {"optimizer": optimizer_edits.pop("optimizer")}})
        steps.append(optimizer_defaults(tree, config))
    if optimizer_edits:
        config.optimizer.from_dict(optimizer_edits)
        steps.append(f"optimizer window: {optimizer_edits}")
    if lora_tab and any("layer" in key for key in edits):
        steps.append(layer_widget(tree, config))

    # (the child runs in a fresh folder: OneTrainer reads these files relative to it)
    if spec.get("concepts") is not None:
        concepts = [ConceptConfig.default_values().from_dict(c).to_dict()
                    for c in spec["concepts"]]
        target = spec.get("concept_file")
        if target:  # the concept window saves them in their own file, beside the config
            write_json(out / target, concepts)
            steps.append(f"concepts written by ConceptConfig.to_dict to {target}")
        write_json(Path(config.concept_file_name), concepts)
    if spec.get("samples") is not None:
        samples = [sample_config(config).from_dict(s).to_dict() for s in spec["samples"]]
        write_json(Path(config.sample_definition_file_name), samples)
    if spec["save"] == "pack":
        data = config.to_pack_dict(secrets=False)
        steps.append("to_pack_dict(secrets=False) (Export)")
    else:
        data = config.to_settings_dict(secrets=False)
        steps.append("to_settings_dict(secrets=False) (Save config)")
    write_json(out / f"{name}.json", data)
    return {"file": f"{name}.json", "version": data["__version"], "how": steps,
            **({"concept_file": spec["concept_file"]} if spec.get("concept_file") else {})}


def sample_config(config):
    from modules.util.config.SampleConfig import SampleConfig
    try:
        return SampleConfig.default_values(config.model_type)
    except TypeError:  # older commits: no per-model defaults
        return SampleConfig.default_values()


def make_preset(tree: Path, preset: str, path: Path) -> dict:
    from modules.util.config.TrainConfig import TrainConfig

    config = TrainConfig.default_values()
    steps = load_preset(tree, config, preset)
    config.embedding.uuid = FIXED_UUID
    config.train_device = "cuda"
    steps += show_in_ui(tree, config, lora_tab=True)
    write_json(path, config.to_settings_dict(secrets=False))
    steps.append("to_settings_dict(secrets=False) (Save config)")
    # what the preset itself sets (the keys a mirror of it must give the same values)
    values = json.loads((tree / "training_presets" / preset).read_text())
    return {"file": path.name, "version": json.loads(path.read_text())["__version"],
            "how": steps, "preset": preset, "preset_values": values}


def load_preset(tree: Path, config, preset: str) -> list[str]:
    """One of OneTrainer's presets loaded into `config` as its top bar loads it."""
    from modules.util.config.TrainConfig import TrainConfig

    config.embedding.uuid = FIXED_UUID
    config.train_device = "cuda"
    source = tree / "training_presets" / preset
    try:
        from modules.ui.TopBarController import TopBarController
    except ImportError:  # older commits: the loading lived in the Tk view (TopBar.py)
        TopBarController = None
    if TopBarController is not None:
        controller = TopBarController(config)
        if controller.load_config_from_file(str(source)) is None:
            raise SystemExit(f"OneTrainer could not load its preset {preset}")
        steps = [f"TopBarController.load_config_from_file('training_presets/{preset}')"]
    else:
        # what that commit's TopBar.__load_current_config does: a built-in ('#') preset is
        # taken as the current version (no migration), over the defaults, without concepts
        # and samples
        loaded = json.loads(source.read_text())
        loaded["__version"] = config.config_version
        unpacked = TrainConfig.default_values().from_dict(loaded).to_unpacked_config()
        config.from_dict(unpacked.to_dict())
        steps = [f"as TopBar.__load_current_config: training_presets/{preset} read with __version "
                 f"{config.config_version} (no migration) over TrainConfig.default_values(), "
                 "to_unpacked_config()"]
    config.embedding.uuid = FIXED_UUID
    config.train_device = "cuda"
    return steps


def show_in_ui(tree: Path, config, *, lora_tab: bool) -> list[str]:
    """What OneTrainer's UI writes into a config when it shows it (see the module note)."""
    steps = []
    from modules.util.enum.TrainingMethod import TrainingMethod
    supported = getattr(config.model_type, "supported_output_formats", None)
    if supported is not None:
        allowed = supported(config.training_method)
        if config.output_model_format not in allowed:
            steps.append(f"model tab: output_model_format {config.output_model_format} is not "
                         f"allowed for {config.training_method}; the UI selects the first, "
                         f"{allowed[0]}")
            config.output_model_format = allowed[0]
    if lora_tab and config.training_method == TrainingMethod.LORA:
        steps.append(layer_widget(tree, config))
    steps.append(optimizer_defaults(tree, config))
    return steps


def layer_widget(tree: Path, config) -> str:
    presets = layer_presets(tree, config.model_type)
    names = list(presets) + ["custom"]
    if hasattr(config, "layer_filter_preset"):  # __version >= 7
        preset = config.layer_filter_preset
        if not preset or preset not in names:
            preset = config.layer_filter_preset = names[0]
        if preset != "custom":
            # a preset is its patterns, or {"patterns": [...], "regex": bool} (Z-Image): the
            # tab writes the patterns and the regex switch (ctk_components' preset choice)
            chosen = presets[preset]
            patterns = chosen.get("patterns", []) if isinstance(chosen, dict) else chosen
            config.layer_filter = ",".join(patterns)
            config.layer_filter_regex = isinstance(chosen, dict) and bool(chosen.get("regex"))
        return (f"LoRA tab: layer preset {preset} writes layer_filter "
                f"{config.layer_filter!r}" + (" (regex)" if config.layer_filter_regex else ""))
    preset = config.lora_layer_preset  # __version 6: its LoraTab
    if not preset or preset not in names:
        preset = config.lora_layer_preset = names[0]
    if preset != "custom":
        config.lora_layers = ",".join(presets[preset])
    return f"LoRA tab: layer preset {preset} writes lora_layers {config.lora_layers!r}"


# OneTrainer's setup module that holds the LAYER_PRESETS of each family Atelier trains beyond
# SD 1.5 (by its ModelType predicate).
SETUP_MODULES = {"is_stable_diffusion_xl": "BaseStableDiffusionXLSetup.py",
                 "is_flux_1": "BaseFluxSetup.py", "is_chroma": "BaseChromaSetup.py",
                 "is_stable_diffusion_3": "BaseStableDiffusion3Setup.py",
                 "is_z_image": "BaseZImageSetup.py", "is_qwen": "BaseQwenSetup.py",
                 "is_flux_2": "BaseFlux2Setup.py"}


def layer_presets(tree: Path, model_type) -> dict:
    """The model's LAYER_PRESETS (PRESETS in older commits), read from OneTrainer's source."""
    return layer_presets_source(tree, model_type)[1]


def layer_presets_source(tree: Path, model_type) -> tuple[str, dict]:
    """(the setup module they were read from, the model's layer presets)."""
    xl = model_type.is_stable_diffusion_xl()
    setup = next((file for test, file in SETUP_MODULES.items()
                  if getattr(model_type, test, lambda: False)()), "BaseStableDiffusionSetup.py")
    candidates = [(setup, "LAYER_PRESETS"),
                  ("StableDiffusionXLLoRASetup.py" if xl else "StableDiffusionLoRASetup.py",
                   "PRESETS")]
    for file, name in candidates:
        source = tree / "modules" / "modelSetup" / file
        for node in ast.walk(ast.parse(source.read_text())):
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and getattr(node.targets[0], "id", None) == name):
                return f"modules/modelSetup/{file}", ast.literal_eval(node.value)
    raise SystemExit(f"no layer presets found for {model_type}")


def layer_picks(tree: Path, models: dict[str, str]) -> dict:
    """OneTrainer's layer presets of each model type in LAYER_PICK_MODELS, and the denoiser
    layers its LoRAModuleWrapper picks on each tiny model with each preset and each custom
    filter (CUSTOM_LAYER_FILTERS): {"model_types": {type: {setup_module, presets}},
    "tiny_models": {kind: {model_type, denoiser, presets: {preset: [layer]},
    custom: [{layer_filter, layer_filter_regex, picks | refused}]}}}. The wrapper is built as
    the LoRA setups build it: on the whole denoiser, with config.layer_filter split at commas."""
    from unittest import mock

    import diffusers  # before the stubs: they look for gguf
    for missing in ("parse", "gguf"):  # see the module note
        sys.modules.setdefault(missing, mock.MagicMock(__path__=[], __name__=missing))

    from modules.module.LoRAModule import LoRAModuleWrapper
    from modules.util.config.TrainConfig import TrainConfig
    from modules.util.enum.ModelType import ModelType
    from modules.util.enum.TrainingMethod import TrainingMethod

    def picks(denoiser, part: str, model_type, layer_filter: str, regex: bool) -> dict:
        config = TrainConfig.default_values()
        config.model_type, config.training_method = model_type, TrainingMethod.LORA
        config.layer_filter, config.layer_filter_regex = layer_filter, regex
        config.train_device = "cpu"
        try:
            wrapper = LoRAModuleWrapper(denoiser, part, config, config.layer_filter.split(","))
        except ValueError as error:
            return {"refused": str(error)}
        return {"picks": sorted(wrapper.lora_modules)}

    model_types, tiny_models = {}, {}
    for kind, type_name in LAYER_PICK_MODELS.items():
        model_type = ModelType[type_name]
        setup_module, presets = layer_presets_source(tree, model_type)
        model_types[type_name] = {"setup_module": setup_module, "presets": presets}
        part = "unet" if kind in ("sd15", "sdxl") else "transformer"
        folder = Path(models[kind]) / part
        class_name = json.loads((folder / "config.json").read_text())["_class_name"]
        denoiser = getattr(diffusers, class_name).from_pretrained(folder)
        entry = {"model_type": type_name, "denoiser": part, "presets": {}, "custom": []}
        for preset, patterns in presets.items():
            # a preset is its patterns, or (Z-Image) {"patterns": [...], "regex": True}
            regex = isinstance(patterns, dict) and bool(patterns.get("regex"))
            patterns = patterns["patterns"] if isinstance(patterns, dict) else patterns
            entry["presets"][preset] = picks(denoiser, part, model_type, ",".join(patterns),
                                             regex)["picks"]
        for layer_filter, regex in CUSTOM_LAYER_FILTERS[part]:
            entry["custom"].append({"layer_filter": layer_filter, "layer_filter_regex": regex,
                                    **picks(denoiser, part, model_type, layer_filter, regex)})
        tiny_models[kind] = entry
        del denoiser
    return {"model_types": model_types, "tiny_models": tiny_models}


def optimizer_defaults(tree: Path, config) -> str:
    """optimizer_util.change_optimizer: OneTrainer's defaults for the chosen optimizer,
    overlaid by the user's remembered values for it (optimizer_defaults)."""
    from modules.util.config.TrainConfig import TrainOptimizerConfig
    from modules.util.enum.Optimizer import Optimizer

    source = tree / "modules" / "util" / "optimizer_util.py"
    table = None
    for node in ast.walk(ast.parse(source.read_text())):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "OPTIMIZER_DEFAULT_PARAMETERS"):
            table = eval(compile(ast.Expression(node.value), str(source), "eval"),
                         {"Optimizer": Optimizer, "__builtins__": {"float": float}})
    if table is None:
        raise SystemExit("OPTIMIZER_DEFAULT_PARAMETERS not found")
    chosen = config.optimizer.optimizer
    optimizer = TrainOptimizerConfig.default_values()
    optimizer.from_dict(table[chosen])
    optimizer.optimizer = chosen
    remembered = config.optimizer_defaults.get(str(chosen))
    if remembered is not None:
        optimizer.from_dict(remembered.to_dict())
    config.optimizer = optimizer
    return f"top bar: optimizer {chosen} filled with OneTrainer's defaults for it"


def lokr_shapes(config_path: Path, tiny: Path) -> dict:
    """The LoKr tensors OneTrainer builds for this config on Atelier's tiny SD 1.5, by its own
    LoRAModuleWrapper (as StableDiffusionLoRASetup calls it): {part: {layer: {name: shape}}}."""
    from unittest import mock

    from diffusers import UNet2DConditionModel  # before the stubs: they look for gguf
    from transformers import CLIPTextModel
    for missing in ("parse", "gguf"):  # see the module note
        sys.modules.setdefault(missing, mock.MagicMock(__path__=[], __name__=missing))

    from modules.module.LoRAModule import LoRAModuleWrapper
    from modules.util.config.TrainConfig import TrainConfig

    config = TrainConfig.default_values().from_dict(json.loads(config_path.read_text()))
    config.train_device = "cpu"
    parts = {"unet": (UNet2DConditionModel.from_pretrained(tiny / "unet"),
                      config.layer_filter.split(",")),
             "text_encoder": (CLIPTextModel.from_pretrained(tiny / "text_encoder"), None)}
    shapes = {}
    for part, (module, layer_filter) in parts.items():
        wrapper = LoRAModuleWrapper(module, part, config, layer_filter)
        shapes[part] = {name: {p: list(t.shape) for p, t in lora.named_parameters()}
                        for name, lora in sorted(wrapper.lora_modules.items())}
    return shapes


def lr_schedule(tree: Path, config_path: Path, *, epoch_length_batches: int,
                epochs: int) -> dict:
    """The learning-rate multiplier of every optimizer update, from OneTrainer's own
    `create_lr_scheduler` (modules/util/create.py, compiled alone: importing that module would
    need OneTrainer's data loader package, mgds) stepped once per update as its trainer does."""
    import importlib

    import torch
    from torch.optim.lr_scheduler import LambdaLR, LRScheduler, SequentialLR

    from modules.util import lr_scheduler_util
    from modules.util.config.TrainConfig import TrainConfig
    from modules.util.enum.LearningRateScheduler import LearningRateScheduler

    source = tree / "modules" / "util" / "create.py"
    function = next(node for node in ast.parse(source.read_text()).body
                    if isinstance(node, ast.FunctionDef) and node.name == "create_lr_scheduler")
    namespace = {**vars(lr_scheduler_util), "LambdaLR": LambdaLR, "SequentialLR": SequentialLR,
                 "LRScheduler": LRScheduler, "LearningRateScheduler": LearningRateScheduler,
                 "TrainConfig": TrainConfig, "torch": torch, "importlib": importlib, "ast": ast}
    exec(compile(ast.Module([function], type_ignores=[]), str(source), "exec"), namespace)
    config = TrainConfig.default_values().from_dict(json.loads(config_path.read_text()))
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    accumulation = config.gradient_accumulation_steps
    scheduler = namespace["create_lr_scheduler"](
        config, optimizer, config.learning_rate_scheduler, config.learning_rate_warmup_steps,
        config.learning_rate_cycles, config.learning_rate_min_factor, epochs, config.batch_size,
        epoch_length_batches, accumulation)
    updates = int(epoch_length_batches * epochs / accumulation)
    multipliers = []
    for _ in range(updates):
        multipliers.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return {"epoch_length_batches": epoch_length_batches, "epochs": epochs,
            "updates": updates, "multipliers": multipliers}


if __name__ == "__main__":
    sys.exit(main())
