"""Every config OneTrainer's own code wrote for a model type Atelier trains (saved, exported,
its presets loaded and saved, older versions, older presets) trains as it is, through the path
a user's file takes: `load_config` (the CLI's --config with --set, which translates it and
reads the files beside it), then `train` (which runs check_supported first). Only paths,
sizes and CPU types are set (tests/onetrainer_files.py); what was trained is checked in the
output file. The effective config, key by key: tests/test_onetrainer.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
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
