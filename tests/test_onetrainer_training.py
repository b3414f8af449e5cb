"""Every config OneTrainer's own code wrote for a model type Atelier trains (saved, exported,
its presets loaded and saved, older versions, older presets) trains as it is, through the path
a user's file takes: `load_config` (the CLI's --config with --set, which translates it and
reads the files beside it), then `train` (which runs check_supported first). Only paths,
sizes and CPU types are set (tests/onetrainer_files.py); what was trained is checked in the
output file. The effective config, key by key: tests/test_onetrainer.py."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from onetrainer_files import (ATTENTION_BLOCK, MANIFEST, REFUSED_AT_START, RESNET,
                              TINY_MODELS, TRAINED, copy_with_concept_file, entry, few_images,
                              model_type, raw, tiny_overrides)
from trainer.config import check_supported, load_config
from trainer.errors import ConfigError
from trainer.loop import train


def run(name: str, request, tmp_path: Path, extra: list[str] = ()):
    """The fixture on the tiny model of its type; returns (config, result, output keys)."""
    model_dir = request.getfixturevalue(TINY_MODELS[model_type(name)])
    images = few_images(tmp_path / "images")
    config_file = copy_with_concept_file(name, tmp_path / "config", images)
    warnings: list[str] = []
    config = load_config(config_file, [*tiny_overrides(name, model_dir, tmp_path, images),
                                       *extra], warn=warnings.append)
    assert not [w for w in warnings if w.startswith("Unknown")], warnings  # all understood
    result = train(config)
    return config, result, output_keys(Path(result.output_path))


def output_keys(path: Path) -> dict[str, list[int]]:
    """The output's tensors and their shapes (a diffusers folder: its files)."""
    if path.is_dir():
        return {p.relative_to(path).as_posix(): [] for p in path.rglob("*.safetensors")}
    with safe_open(str(path), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


# What each output says about the job OneTrainer's file described (beyond "it trained").
def check_output(name: str, config, keys: dict[str, list[int]]) -> None:
    method = raw(name).get("training_method", "FINE_TUNE")
    fmt = config.output_model_format.value
    if method == "LORA" and fmt in ("KOHYA_LORA", "LEGACY_LORA"):
        modules = {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}
        preset = config.lora_layer_preset.value
        if preset == "attn-mlp":  # every layer of the transformer blocks, and only those
            assert modules and all(ATTENTION_BLOCK.search(m) for m in modules)
            assert any(m.endswith("_ff_net_2") for m in modules)
        elif preset == "attn-only":
            assert modules and all("_attn1_" in m or "_attn2_" in m for m in modules)
        elif preset == "full":
            assert any(RESNET.search(m) for m in modules)
        suffixes = {k.split(".", 1)[1] for k in keys if k.startswith("lora_unet_")}
        kind = {"LOHA": "hada_", "LOKR": "lokr_"}.get(config.peft_type.value, "lora_down.")
        assert any(s.startswith(kind) for s in suffixes), suffixes
        assert ("dora_scale" in suffixes) == config.lora_decompose
        trained_te = config.text_encoder.train
        assert any(k.startswith(("lora_te_", "lora_te1_")) for k in keys) == trained_te
    elif method == "LORA":  # DIFFUSERS_LORA: diffusers' own names
        assert keys and all(k.startswith(("unet.", "text_encoder")) for k in keys)
    elif method == "FINE_TUNE" and fmt == "DIFFUSERS":
        assert "unet/diffusion_pytorch_model.safetensors" in keys
    elif method == "FINE_TUNE":  # ORIGINAL_SINGLE_FILE / LEGACY_SAFETENSORS
        channels = keys["model.diffusion_model.input_blocks.0.0.weight"][1]
        assert channels == (9 if config.model_type.is_inpainting else 4)
    elif method == "EMBEDDING":
        assert set(keys) == ({"clip_l", "clip_g"} if config.model_type.is_sdxl
                             else {"emb_params"})


# (the file that continues a LoRA trains in test_onetrainer.py, after the LoRA it names)
@pytest.mark.parametrize("name", [n for n in TRAINED if n != "sd15_lora_continue.saved"])
def test_onetrainers_file_trains_as_it_is(name, request, tmp_path):
    config, result, keys = run(name, request, tmp_path)
    assert result.global_step >= 1 and not result.stopped_early
    check_output(name, config, keys)


@pytest.mark.parametrize("name, key", REFUSED_AT_START.items())
def test_what_cannot_start_is_refused_naming_the_key(name, key, request, tmp_path):
    model_dir = request.getfixturevalue(TINY_MODELS[model_type(name)])
    images = few_images(tmp_path / "images")
    config = load_config(copy_with_concept_file(name, tmp_path, images),
                         tiny_overrides(name, model_dir, tmp_path, images), warn=lambda m: None)
    with pytest.raises(ConfigError, match=key):
        check_supported(config)


def test_lokr_shapes_are_onetrainers_for_its_rank_and_factor(request, tmp_path):
    """LoKr's rank is OneTrainer's lokr_dim (2 here; lora_rank 16 is not used) and each layer's
    sizes are split by lokr_decompose_factor (8) as OneTrainer's own LoKrModule splits them on
    the same tiny model (the manifest's shapes, written by the fixture script)."""
    name = "sd15_lokr.saved"
    config, _, keys = run(name, request, tmp_path)
    assert (config.lora_rank, config.lokr_decompose_factor) == (2, 8)
    expected = entry(name)["expected_lokr_shapes"]
    with safe_open(str(Path(config.output_model_destination)), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
    compared = 0
    for part, layers in expected.items():
        for layer, tensors in layers.items():
            name_in_file = prefixes[part] + layer.replace(".", "_")
            for tensor, shape in tensors.items():
                if tensor.startswith("lokr_"):
                    assert shapes[f"{name_in_file}.{tensor}"] == shape, (name_in_file, tensor)
                    compared += 1
    written = {k for k in shapes if ".lokr_" in k}
    assert compared == len(written) > 100  # every LoKr tensor, and no other
    # the factor orders each pair as OneTrainer (LyCORIS) does: a 32-wide layer is (4, 8)
    assert shapes["lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1"] == \
        expected["unet"]["down_blocks.0.attentions.0.proj_in"]["lokr_w1"]


def test_minute_units_sample_and_back_up_by_the_clock(request, tmp_path, monkeypatch):
    """OneTrainer's defaults: samples every 10 MINUTE, backups every 30 MINUTE. With a clock
    that moves 31 minutes per reading, both happen after every step."""
    import trainer.backup as backup
    clock = iter(range(0, 10**9, 31 * 60))
    monkeypatch.setattr(backup.time, "monotonic", lambda: float(next(clock)))
    name = "sd15_lora.exported"  # it carries a sample
    assert (raw(name)["sample_after_unit"], raw(name)["backup_after_unit"]) == ("MINUTE", "MINUTE")
    sample = {"prompt": "a cat", "width": 64, "height": 64, "diffusion_steps": 2}
    from trainer.control import Control
    events = []
    model_dir = request.getfixturevalue("tiny_sd15_dir")
    images = few_images(tmp_path / "images")
    config = load_config(copy_with_concept_file(name, tmp_path / "c", images),
                         [*tiny_overrides(name, model_dir, tmp_path, images),
                          f"samples={json.dumps([sample])}"], warn=lambda m: None)
    result = train(config, Control(on_event=events.append))
    steps = result.global_step
    assert steps >= 2
    assert len([e for e in events if e["type"] == "sample"]) == steps
    assert len([e for e in events if e["type"] == "backup"]) >= steps


def test_the_manifest_names_onetrainers_commit():
    commits = MANIFEST["onetrainer"]["commits"]
    assert commits["current"]["hash"].startswith("23df3832")
    assert all(len(c["hash"]) == 40 for c in commits.values())
    assert {entry(n)["version"] for n in TRAINED if "version" in entry(n)} == {6, 10, 11}


def test_the_cli_trains_a_save_config_with_its_concept_file_beside_it(tiny_sd15_dir, tmp_path):
    """`python -m trainer train --config <OneTrainer's Save config>`: the concepts come from the
    file it names, beside it; the embedding trains with the LoRA; masked training is on."""
    from test_cli import run
    name = "sd15_lora_embedding_masked.saved"
    images = few_images(tmp_path / "images")
    config_file = copy_with_concept_file(name, tmp_path / "config", images)
    sets = tiny_overrides(name, tiny_sd15_dir, tmp_path, images)
    done = run("train", "--config", str(config_file), *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "concepts: 1 read from 'training_concepts/mychar.json'" in done.stderr
    assert "set aside" in done.stderr and "Unknown config key" not in done.stderr
    lora_file = tmp_path / "out" / Path(raw(name)["output_model_destination"]).name
    with safe_open(str(lora_file), "pt") as f:  # DIFFUSERS_LORA: the embedding beside it
        assert f.keys() and not [k for k in f.keys() if k.startswith("bundle_emb")]
    assert lora_file.with_name(f"{lora_file.stem}-mychar.safetensors").is_file()


# --- Layer presets: OneTrainer's, picking OneTrainer's layers --------------------------------
# The manifest's `layer_presets` (tools/onetrainer_fixtures.py) holds each model type's
# LAYER_PRESETS read from OneTrainer's setup module, and the layers OneTrainer's own
# LoRAModuleWrapper picked with each preset and a few custom filters on Atelier's tiny models.

LAYERS = MANIFEST["layer_presets"]
TINY_DIRS = {"sd15": "tiny_sd15_dir", "sdxl": "tiny_sdxl_dir", "flux": "tiny_flux_dir",
             "flux-schnell": "tiny_flux_schnell_dir", "chroma": "tiny_chroma_dir",
             "sd3": "tiny_sd3_dir", "sd35": "tiny_sd35_dir", "z-image": "tiny_z_image_dir",
             "qwen": "tiny_qwen_image_dir", "flux2": "tiny_flux2_dir"}


def preset_patterns(preset) -> tuple[list[str], bool]:
    """(patterns, regex) of one of OneTrainer's presets: a list, or (Z-Image's) a dict with
    its patterns and regex flag."""
    if isinstance(preset, dict):
        return preset["patterns"], bool(preset.get("regex"))
    return preset, False


def onetrainers_pick(denoiser, layer_filter: str, regex: bool) -> list[str] | None:
    """The layers OneTrainer gives adapters, by its rules (read in modules/util/ModuleFilter.py
    and modules/module/LoRAModule.py's LoRAModuleWrapper, not imported): every named module of
    the denoiser that is a torch Linear or Conv2d (a '.checkpoint.' wrapper left out of its
    name), picked when any comma-separated entry of the filter, stripped, is a substring of
    the name (an empty entry: every layer; regex: `re.search`). `any()` stops at the first
    entry that matches, and only that entry counts as used; an unused entry refuses the run
    (None here)."""
    entries = [p.strip() for p in layer_filter.split(",")]
    searches = [re.compile(p).search if regex and p else None for p in entries]
    used, picked = set(), []
    for name, module in denoiser.named_modules():
        name = name.replace(".checkpoint.", ".")
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        for index, (pattern, search) in enumerate(zip(entries, searches)):
            if not pattern or (search(name) is not None if search else pattern in name):
                used.add(index)
                picked.append(name)
                break
    return sorted(picked) if len(used) == len(entries) else None


_denoisers: dict[str, torch.nn.Module] = {}


def loaded_denoiser(kind: str, model_dir: Path) -> torch.nn.Module:
    """The tiny model's denoiser as diffusers loads it (loaded once; never change it)."""
    if kind not in _denoisers:
        import diffusers

        from trainer.models.chroma import quiet_pos_embed_warning
        folder = model_dir / LAYERS["tiny_models"][kind]["denoiser"]
        name = json.loads((folder / "config.json").read_text())["_class_name"]
        with quiet_pos_embed_warning():  # Chroma's, as its family loads it
            _denoisers[kind] = getattr(diffusers, name).from_pretrained(folder)
    return _denoisers[kind]


def atelier_pick(kind: str, model_dir: Path, tmp_path: Path, **layer_settings) -> list[str]:
    """The denoiser layers that get an adapter in a run: what add_lora (the run's own call)
    leaves wrapped in a peft layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from helpers import tiny_config
    from trainer.lora import add_lora
    tiny = LAYERS["tiny_models"][kind]
    config = tiny_config(model_dir, tmp_path, model_type=tiny["model_type"], **layer_settings)
    denoiser = copy.deepcopy(loaded_denoiser(kind, model_dir))  # adapters go into it
    add_lora(denoiser, config, tiny["denoiser"])
    return sorted(n for n, m in denoiser.named_modules() if isinstance(m, BaseTunerLayer))


# Presets Atelier adds to OneTrainer's: Flux.2 klein takes the default attn-only preset too
# (OneTrainer has blocks and full for it).
ATELIER_PRESETS = {"FLUX_2": {"attn-only": ["attn"]}}


def test_every_family_has_onetrainers_layer_presets():
    """Each family's LAYER_PRESETS are OneTrainer's for its model type (names and patterns),
    and every family Atelier trains is recorded."""
    from trainer.models import registry
    assert LAYERS["commit"] == MANIFEST["onetrainer"]["commits"]["current"]["hash"]
    recorded = LAYERS["model_types"]
    assert set(recorded) == {f.plain_type for f in registry.FAMILIES.values()}
    assert {t: registry.family_class(t).LAYER_PRESETS for t in recorded} == \
        {t: {**{name: preset_patterns(p)[0] for name, p in r["presets"].items()},
             **ATELIER_PRESETS.get(t, {})}
         for t, r in recorded.items()}
    assert {t: registry.family_class(t).REGEX_PRESETS for t in recorded} == \
        {t: {name for name, p in r["presets"].items() if preset_patterns(p)[1]}
         for t, r in recorded.items()}
    assert recorded["FLUX_DEV_1"]["setup_module"].endswith("BaseFluxSetup.py")


def layer_cases():
    for kind, tiny in LAYERS["tiny_models"].items():
        for preset in tiny["presets"]:
            yield pytest.param(kind, preset, None, id=f"{kind}-{preset}")
        for index, _ in enumerate(tiny["custom"]):
            # among them a top-level 'proj_out' that peft, given a list, would also match as
            # the name suffix of every single block's proj_out (trainer/lora.py: exactly)
            yield pytest.param(kind, "custom", index, id=f"{kind}-custom{index}")


@pytest.mark.parametrize("kind, preset, custom", list(layer_cases()))
def test_the_layers_get_adapters_that_onetrainer_picks(kind, preset, custom, request, tmp_path):
    """On each tiny model, each of OneTrainer's presets and each custom filter (plain, regex)
    adapts exactly the layers OneTrainer's LoRAModuleWrapper picked (the manifest), which are
    also what its rules give on the model here; a filter it refuses is refused here."""
    model_dir = request.getfixturevalue(TINY_DIRS[kind])
    tiny = LAYERS["tiny_models"][kind]
    if custom is None:
        recorded = tiny["presets"][preset]
        patterns, regex = preset_patterns(
            LAYERS["model_types"][tiny["model_type"]]["presets"][preset])
        layer_filter = ",".join(patterns)  # as OneTrainer's LoRA tab writes it
        settings = {"lora_layer_preset": preset}
    else:
        case = tiny["custom"][custom]
        recorded = case.get("picks")  # None: OneTrainer refused it
        layer_filter, regex = case["layer_filter"], case["layer_filter_regex"]
        settings = {"lora_layer_preset": "custom", "layer_filter": layer_filter,
                    "layer_filter_regex": regex}
    # the rules as read give OneTrainer's own pick (on the tiny model as it is today)
    assert onetrainers_pick(loaded_denoiser(kind, model_dir), layer_filter, regex) == recorded
    if recorded is None:
        with pytest.raises(ConfigError, match=r"^layer_filter: .* matched no"):
            atelier_pick(kind, model_dir, tmp_path, **settings)
        return
    ours = atelier_pick(kind, model_dir, tmp_path, **settings)
    assert ours == recorded, {"Atelier only": sorted(set(ours) - set(recorded)),
                              "OneTrainer only": sorted(set(recorded) - set(ours))}
