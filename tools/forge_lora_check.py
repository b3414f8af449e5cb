"""What Stable Diffusion WebUI Forge applies of an Atelier LoRA (SD 1.5, SDXL), shown by Forge's
own code.

    python tools/forge_lora_check.py --forge GIT_DIR --base BASE.safetensors --model MODEL_DIR
                                     --family sd15|sdxl LORA [LORA ...] [--checkpoint FILE]
                                     [--json | --markdown]

`--checkpoint FILE` (a fine-tune's single file) instead reports Forge's loader's split of it
(`split_state_dict`) and which tensors its UNet and text encoders load (see check_checkpoint).

Forge's `backend/` and `packages_3rdparty/` are taken from its git mirror (`git archive`, into a
temporary folder, never into this repository) and imported unchanged, with Forge's command-line
switch `--always-cpu`; `huggingface_guess` (the package Forge's loader detects models with) must
be installed in the Python that runs this.

The base model is built as Forge's loader builds it (backend/loader.py `split_state_dict` and
`load_huggingface_component`; that module itself imports the web UI, so its steps are taken one
by one here): the UNet is Forge's `IntegratedUNet2DConditionModel` made inside its
`using_forge_operations` from the configuration `huggingface_guess` detects in the checkpoint and
the SD15 / SDXL class adds to, the checkpoint's weights loaded with Forge's `load_state_dict`,
the configuration kept on the model as Forge keeps it; the text encoders are Forge's
`IntegratedCLIP` around transformers' CLIPTextModel, fed the checkpoint's CLIP weights after the
class's `process_clip_state_dict` (its key names), in Forge's `CLIP` object; the UNet in a
`ModelPatcher` around Forge's `KModel` (with the model's own scheduler), as its engines
wrap it. The LoRA is then matched
as the LoRA extension's `load_lora_for_models` matches it (extensions-builtin/sd_forge_lora/
networks.py, which imports the web UI too: its steps here are `model_lora_keys_unet`,
`model_lora_keys_clip`, `load_lora` for the UNet then the CLIP, and its rule that more than 12
unmatched keys apply nothing), added with each patcher's `add_patches` at strength 1 and merged
into the weights by `refresh_loras` (Forge's `LoraLoader`, its offline mode: the default).

Reported per file: the keys Forge matched and those it left, whether it applies the LoRA, and for
every patched weight the change Forge made against the change the file's adapters make, computed
from the tensors by tools/comfyui_check.py's formulas (up·down·alpha/rank, LoHa, LoKr, DoRA), as
max |applied - expected| over max |expected|.

The tiny test models have shapes no real model has: `huggingface_guess` matches no class for
them, so `--family` names the class it picks for the real model (model_list.SD15 / SDXL), built
on the configuration its own `detect_unet_config` reads from the file; the CLIP configurations
come from the tiny model's folder (`--model`) where Forge reads the real ones from its
backend/huggingface folder. Key names and weight math are Forge's, unchanged. The tiny SDXL's
CLIP-G projection (64 -> 32) is padded to square as Forge's `add_text_projection` makes it (the
real one is 1280 x 1280); no LoRA layer touches it. How docs/forge_results.md was made is
written there.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfyui_check import (compare_layers, group_modules, key_report,  # noqa: E402
                           _square_projection)
from forge_check import FORGE_UNMATCHED_LIMIT, forge_commit  # noqa: E402

UNET_PREFIX = "model.diffusion_model."
CLIP_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


# ---------------------------------------------------------------------------------------------
# Forge's code, from its git mirror
# ---------------------------------------------------------------------------------------------

def extract_forge(git_dir: str, dest: str) -> str:
    """Forge's backend/ and packages_3rdparty/ at HEAD, unpacked under `dest`; its commit."""
    archive = subprocess.run(["git", "--git-dir", git_dir, "archive", "HEAD", "backend",
                              "packages_3rdparty"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return forge_commit(git_dir)


@contextlib.contextmanager
def forge_on_path(folder: str):
    """Forge importable from `folder`, its argument parser reading `--always-cpu` (it parses
    sys.argv when imported)."""
    argv = sys.argv
    sys.argv = [argv[0], "--always-cpu"]
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.argv = argv


def forge_unet(sd: dict, family: str, model_dir: str):
    """The UNet as Forge's loader builds it, in Forge's KModel (with the model's scheduler, as
    the SD engines make it)."""
    from diffusers import DDPMScheduler
    from huggingface_guess import model_list
    from huggingface_guess.detection import detect_unet_config

    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    guess = {"sd15": model_list.SD15, "sdxl": model_list.SDXL}[family](
        detect_unet_config(sd, UNET_PREFIX))
    unet_config = guess.unet_config.copy()
    with using_forge_operations(device=torch.device("cpu"), dtype=torch.float32,
                                manual_cast_enabled=False):
        unet = IntegratedUNet2DConditionModel.from_config(unet_config).to(torch.float32)
    load_state_dict(unet, {k[len(UNET_PREFIX):]: v for k, v in sd.items()
                           if k.startswith(UNET_PREFIX)})
    unet._internal_dict = unet_config  # as Forge's loader leaves it (its key map reads it)
    unet.storage_dtype = unet.computation_dtype = torch.float32
    from backend.modules.k_model import KModel
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    return guess, KModel(model=unet, diffusers_scheduler=scheduler, config=guess)


def forge_clip(sd: dict, guess, model_dir: str):
    """Forge's CLIP object with the checkpoint's text encoders, as its loader feeds them."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.nn.clip import IntegratedCLIP
    from backend.patcher.clip import CLIP
    from backend.state_dict import load_state_dict, try_filter_state_dict

    processed = guess.process_clip_state_dict(dict(sd))
    encoders = {}
    for name in guess.clip_target(processed):
        config = CLIPTextConfig.from_pretrained(os.path.join(model_dir, CLIP_FOLDERS[name]))
        model = IntegratedCLIP(CLIPTextModel, config, add_text_projection=True).float()
        load_state_dict(model, try_filter_state_dict(processed, [name + "."]), ignore_errors=[
            "transformer.text_projection.weight", "transformer.text_model.embeddings.position_ids",
            "logit_scale"])
        encoders[name] = model
    return CLIP(model_dict=encoders, tokenizer_dict={})


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in module.state_dict().items()}


def failing_merges(patches: dict, weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """{model key: Forge's error} for each weight whose patch Forge's merge_lora_to_weight
    cannot apply (the patch as ModelPatcher.add_patches stores it, strength 1)."""
    from backend.patcher.lora import merge_lora_to_weight
    failed = {}
    for key, patch in patches.items():
        try:
            merge_lora_to_weight([[1.0, patch, 1.0, None, None]], weights[key].clone(), key)
        except RuntimeError as err:
            failed[key] = str(err).splitlines()[0]
    return failed


def check_lora(sd: dict, family: str, model_dir: str, lora_path: str,
               padded: frozenset = frozenset()) -> dict:
    """Forge's LoRA extension's work on `lora_path` over the base `sd`, and how it compares.
    `padded`: model keys of weights padded to Forge's shape (the tiny SDXL's CLIP-G
    projection): a LoRA layer on one has the tiny shape, cannot merge, and is left out."""
    from backend.patcher.base import ModelPatcher
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
    from backend.utils import load_torch_file

    guess, kmodel = forge_unet(sd, family, model_dir)
    clip = forge_clip(sd, guess, model_dir)
    unet = ModelPatcher(kmodel, load_device=torch.device("cpu"),
                        offload_device=torch.device("cpu"))
    lora = load_torch_file(lora_path, safe_load=True)
    unet_keys = model_lora_keys_unet(kmodel, {})
    clip_keys = model_lora_keys_clip(clip.cond_stage_model, {})
    # networks.py load_lora_for_models
    lora_unet, unmatched = load_lora(lora, unet_keys)
    lora_clip, unmatched = load_lora(unmatched, clip_keys)
    applied = len(unmatched) <= FORGE_UNMATCHED_LIMIT

    tiny_shape = sorted(k for k in lora_clip if k in padded)
    lora_clip = {k: v for k, v in lora_clip.items() if k not in padded}
    originals = {**_weights(clip.cond_stage_model), **_weights(kmodel)}
    loaded: set = set()
    failed: dict[str, str] = {}
    if applied:
        name = os.path.basename(lora_path)
        loaded |= unet.add_patches(filename=name, patches=lora_unet, strength_patch=1.0)
        loaded |= clip.add_patches(filename=name, patches=lora_clip, strength_patch=1.0)
        try:
            unet.refresh_loras()
            clip.patcher.refresh_loras()
        except RuntimeError:
            # Forge stops at the first weight it cannot merge: find each one, by merging the
            # patches one weight at a time with its own function
            failed = failing_merges({**lora_unet, **lora_clip}, originals)
    patched = {**_weights(clip.cond_stage_model), **_weights(kmodel)}

    # Each file module's target: the weight its key-map entry names, where Forge patched it.
    key_maps = {**clip_keys, **unet_keys}
    targets = {module: (key_maps[module], None) for module in group_modules(lora)
               if module in key_maps and key_maps[module] in loaded}
    layers = compare_layers(lora, targets, originals, patched)
    report = key_report(lora.keys(), [k for k in lora if k not in unmatched])
    changed = [r for r in layers if not r.unchanged]
    return {
        "lora": lora_path, "family": family, "keys_total": report.total,
        "merge_errors": failed, "layers_not_comparable_tiny_shape": tiny_shape,
        "keys_matched": report.loaded, "not_matched": report.not_loaded,
        "embeddings_not_matched": report.embeddings_not_loaded, "applied": applied,
        "modules_in_file": len(group_modules(lora)), "layers_patched": len(loaded),
        "layers_compared": len(layers),
        "max_relative_error": max((r.relative_error for r in changed), default=None),
        "unchanged_layers": len(layers) - len(changed),
        "worst_layers": [vars(r) for r in sorted(layers, key=lambda r: -r.relative_error)[:3]],
    }


def _loaded_into(model: torch.nn.Module, state_dict: dict, ignored=()) -> dict:
    """Forge's backend/state_dict.py load_state_dict (strict=False, its ignore lists), with
    what it would print kept: the tensors given, missing and unexpected."""
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in ignored]
    unexpected = [k for k in result.unexpected_keys if k not in ignored]
    return {"given": len(state_dict), "missing": missing, "unexpected": unexpected}


def check_checkpoint(sd: dict, family: str, model_dir: str, path: str) -> dict:
    """Forge's loader's split of a single-file checkpoint (split_state_dict) and its component
    loads: which tensors reach the UNet, the VAE and each text encoder, which are missing or
    unexpected there, and which no component takes."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.nn.clip import IntegratedCLIP
    from backend.state_dict import try_filter_state_dict

    sd = dict(sd)
    total = len(sd)
    from huggingface_guess.detection import unet_prefix_from_state_dict
    guess, kmodel = forge_unet(dict(sd), family, model_dir)
    guess.unet_key_prefix = [unet_prefix_from_state_dict(sd)]  # as huggingface_guess.guess sets it
    clip_target = guess.clip_target(sd)
    sd = guess.process_vae_state_dict(sd)
    parts = {"unet": try_filter_state_dict(sd, guess.unet_key_prefix),
             "vae": try_filter_state_dict(sd, guess.vae_key_prefix)}
    sd = guess.process_clip_state_dict(sd)
    for name in clip_target:
        parts[name] = try_filter_state_dict(sd, [name + "."])
    report = {"checkpoint": path, "family": family, "tensors": total,
              "taken_by_no_component": sorted(sd)}
    report["unet"] = _loaded_into(kmodel.diffusion_model, parts["unet"])
    # Forge's VAE class normalises in groups of 32 channels, more than the tiny VAE has: its
    # tensors are counted as Forge routes them to it, not loaded
    report["vae_tensors_routed"] = len(parts["vae"])
    for name in clip_target:
        config = CLIPTextConfig.from_pretrained(os.path.join(model_dir, CLIP_FOLDERS[name]))
        model = IntegratedCLIP(CLIPTextModel, config, add_text_projection=True)
        report[name] = _loaded_into(model, parts[name], ignored=(
            "transformer.text_projection.weight",
            "transformer.text_model.embeddings.position_ids", "logit_scale"))
    return report


def table_row(r: dict) -> str:
    """One row of docs/forge_results.md's LoRA table."""
    left = r["not_matched"] + r["embeddings_not_matched"]
    keys = f"{r['keys_matched']}/{r['keys_total']}"
    if left:
        keys += f" (left: {len(left)}, e.g. `{left[0]}`)"
    error = r["max_relative_error"]
    compared = (f"{r['layers_compared']}, max {error:.1e}" if error is not None
                else "none (nothing applied)")
    if r["unchanged_layers"]:
        compared += f"; {r['unchanged_layers']} unchanged (no gradient)"
    if r["layers_not_comparable_tiny_shape"]:
        compared += "; CLIP-G projection left out (tiny shape)"
    if r["merge_errors"]:
        compared += f"; {len(r['merge_errors'])} failed to merge"
    return (f"| {r['family']} | `{os.path.basename(r['lora'])}` | {keys} | "
            f"{'yes' if r['applied'] else '**no**'} | {compared} |")


def checkpoint_row(r: dict) -> str:
    """One row of docs/forge_results.md's checkpoint table."""
    components = [name for name in ("unet", "clip_l", "clip_g") if name in r]
    cells = [f"vae {r['vae_tensors_routed']} (routed, not built)"]
    for name in components:
        part = r[name]
        wrong = len(part["missing"]) + len(part["unexpected"])
        cells.append(f"{name} {part['given']}" + (f" (**{len(part['missing'])} missing, "
                                                  f"{len(part['unexpected'])} unexpected**)"
                                                  if wrong else ""))
    left = r["taken_by_no_component"]
    return (f"| {r['family']} | `{os.path.basename(r['checkpoint'])}` | {r['tensors']} | "
            f"{', '.join(cells)} | {len(left)}" + (f" (e.g. `{left[0]}`)" if left else "") + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", required=True, help="Forge's bare git mirror (git dir)")
    parser.add_argument("--base", required=True, help="the base model as one .safetensors file")
    parser.add_argument("--model", required=True,
                        help="the base model's diffusers folder (its CLIP configurations)")
    parser.add_argument("--family", required=True, choices=("sd15", "sdxl"))
    parser.add_argument("lora", nargs="*")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a fine-tune's single file: what Forge's loader takes of it")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="rows of docs/forge_results.md")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    sd = load_file(args.base)
    padded = frozenset(_square_projection(sd)) if args.family == "sdxl" else frozenset()
    with tempfile.TemporaryDirectory(prefix="atelier-forge-") as folder:
        commit = extract_forge(args.forge, folder)
        # Forge prints as it loads: to stderr, so that --json stays readable
        with forge_on_path(folder), contextlib.redirect_stdout(sys.stderr):
            results = [check_lora(sd, args.family, args.model, path, padded)
                       for path in args.lora]
            for path in args.checkpoint:
                checkpoint = load_file(path)
                if args.family == "sdxl":
                    _square_projection(checkpoint)
                results.append(check_checkpoint(checkpoint, args.family, args.model, path))
    for result in results:
        result["forge_commit"] = commit
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    elif args.markdown:
        print("\n".join(table_row(r) if "lora" in r else checkpoint_row(r) for r in results))
    else:
        for r in (r for r in results if "checkpoint" in r):
            print(checkpoint_row(r))
        for r in (r for r in results if "lora" in r):
            print(f"{os.path.basename(r['lora'])}: {r['keys_matched']}/{r['keys_total']} keys "
                  f"matched, applied {r['applied']}, {r['layers_compared']} layers compared, "
                  f"max rel. error {r['max_relative_error']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
