"""Presets, export, import (Atelier and OneTrainer JSON), and the optimizer edits they carry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import TrainConfig, check_supported, config_from_dict, load_config
from trainer.demo import DEMO_DATASET_DIR
from trainer.errors import ConfigError
from ui import optimizers, presets


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "ws"))
    return tmp_path / "ws"


def test_built_in_presets_load_cleanly(workspace):
    values = [value for _, value in presets.choices()]
    assert values[0] == presets.DEFAULT_PRESET
    for name in ("sd15_lora", "sd15_masked_lora", "sdxl_lora", "sdxl_finetune",
                 "prodigy_lora", "demo"):
        assert presets.BUILTIN + name in values
    for value in values:
        config, memory, messages = presets.merge_preset(presets.read_preset(value), None)
        assert messages == [], (value, messages)
        check_supported(config)  # the engine accepts every built-in preset


def test_demo_preset_paths_point_into_the_workspace(workspace):
    config, _, _ = presets.merge_preset(presets.read_preset("builtin:demo"), None)
    assert config.base_model_name == str(workspace / "tiny-sd15")
    assert config.workspace_dir == str(workspace / "demo")
    assert Path(config.concepts[0].path).resolve() == DEMO_DATASET_DIR.resolve()


def test_preset_without_data_keeps_the_pages_concepts_and_samples(workspace):
    page_lists = {"concepts": [{"path": "/my/photos"}], "samples": [{"prompt": "me"}]}
    config, _, _ = presets.merge_preset(presets.read_preset("builtin:sd15_lora"),
                                        {"concepts": page_lists["concepts"]})
    assert [c.path for c in config.concepts] == ["/my/photos"]
    assert config.learning_rate == 3e-4 and config.resolution == "512"
    assert config.workspace_dir == str(workspace / "sd15-lora")


def test_masked_and_prodigy_presets_say_what_they_are(workspace):
    masked, _, _ = presets.merge_preset(presets.read_preset("builtin:sd15_masked_lora"), None)
    assert masked.masked_training and masked.unmasked_weight == 0.1
    prodigy, _, _ = presets.merge_preset(presets.read_preset("builtin:prodigy_lora"), None)
    assert prodigy.optimizer.optimizer.value == "PRODIGY" and prodigy.learning_rate == 1
    assert "learning rate" in optimizers.hint("PRODIGY")


def test_saved_preset_round_trips_with_optimizer_edits(workspace):
    config = config_from_dict({"learning_rate": 5e-4, "lora_rank": 32,
                               "optimizer": {"optimizer": "LION", "beta2": 0.95}},
                              warn=lambda m: None)
    memory = {"LION": {"beta2": 0.95}, "ADAMW": {"weight_decay": 0.05}}
    value, path = presets.save_user_preset("My run / v2", config, memory)
    assert path.parent == workspace / "presets" and value == "user:My run  v2"
    assert ("My run  v2 (saved)", value) in presets.choices()
    loaded, loaded_memory, messages = presets.merge_preset(presets.read_preset(value), None)
    assert messages == []
    assert loaded.lora_rank == 32 and loaded.optimizer.beta2 == 0.95
    assert loaded_memory == memory


def test_on_a_shared_server_each_user_saves_lists_and_overwrites_only_their_own(workspace):
    from trainer.ownership import Access, Realm, Viewer
    realm = Realm(workspace, shared=True, confine=True)
    alice, bob = Access(realm, Viewer("alice", False)), Access(realm, Viewer("bob", False))
    root = Access(realm, Viewer("root", admin=True))
    old = workspace / "presets" / "team.json"  # the shared folder of an older version
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"lora_rank": 8}))
    slow = config_from_dict({"learning_rate": 1e-5}, warn=lambda m: None)
    value, path = presets.save_user_preset("mine", slow, {}, alice)
    assert path == workspace / "users" / "alice" / "presets" / "mine.json"
    kept = path.read_bytes()
    # bob saves under the same name: his own file; alice's is byte for byte what she saved
    fast = config_from_dict({"learning_rate": 1e-2}, warn=lambda m: None)
    assert presets.save_user_preset("mine", fast, {}, bob)[1] == (
        workspace / "users" / "bob" / "presets" / "mine.json")
    assert path.read_bytes() == kept
    assert presets.read_preset(value, alice)["learning_rate"] == 1e-5
    assert presets.read_preset(value, bob)["learning_rate"] == 1e-2
    listed = {v for _, v in presets.choices(bob) if not v.startswith(presets.BUILTIN)}
    assert listed == {"user:mine"}  # his own; not alice's, not the shared folder
    with pytest.raises(ConfigError, match="does not exist"):
        presets.read_preset("shared:team", bob)
    # an admin also sees (and loads) the older shared folder; the built-ins stay read-only
    assert "shared:team" in {v for _, v in presets.choices(root)}
    assert presets.read_preset("shared:team", root)["lora_rank"] == 8
    assert presets.user_presets_dir(root) == workspace / "users" / "root" / "presets"
    builtin = sorted(presets.builtin_presets().values())[0]
    before = builtin.read_bytes()
    presets.save_user_preset(builtin.stem, slow, {}, root)
    assert builtin.read_bytes() == before


def test_preset_names_are_checked(workspace):
    with pytest.raises(ConfigError, match="name"):
        presets.save_user_preset("  /// ", TrainConfig(), {})


def test_export_is_a_config_the_cli_accepts(workspace, tmp_path):
    config = config_from_dict({"learning_rate": 1e-3, "epochs": 3, "resolution": "768x512",
                               "optimizer": {"optimizer": "PRODIGY", "growth_rate": "inf"},
                               "concepts": [{"path": "/data/cats", "repeats": 3}]},
                              warn=lambda m: None)
    memory = {"PRODIGY": {"growth_rate": float("inf")}, "ADAMW": {"weight_decay": 0.05}}
    path = presets.write_export(config, memory)
    data = json.loads(path.read_text())
    assert data["optimizer_defaults"]["ADAMW"]["weight_decay"] == 0.05
    warnings = []
    again = load_config(path, warn=warnings.append)  # what `python -m trainer train` does
    assert warnings == []
    assert again.model_dump(exclude={"optimizer_defaults"}) == config.model_dump(
        exclude={"optimizer_defaults"})
    assert again.optimizer_defaults["ADAMW"] == {"weight_decay": 0.05}


def test_import_of_an_atelier_export(workspace):
    config = config_from_dict({"lora_rank": 8, "epochs": 12}, warn=lambda m: None)
    raw = presets.export_dict(config, {"LION": {"beta2": 0.9}})
    imported, memory, messages, kind = presets.import_config(raw)
    assert kind == "Atelier" and messages == []
    assert imported.lora_rank == 8 and memory == {"LION": {"beta2": 0.9}}


# OneTrainer's own files through the page's Import: tests/test_onetrainer_import.py (they are
# written by OneTrainer's code: tests/fixtures/onetrainer).


def test_import_refuses_what_is_not_a_config(workspace, tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        presets.import_config(["not", "a", "dict"])
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        presets.read_json_file(bad)


def test_optimizer_edits_are_remembered_per_optimizer():
    memory, lion = optimizers.switch({}, "ADAMW", {"weight_decay": 0.05, "beta1": 0.9}, "LION")
    assert lion["beta2"] == 0.99 and lion["weight_decay"] == 0.0  # Lion's own defaults
    memory, adamw = optimizers.switch(memory, "LION", {**lion, "beta2": 0.95}, "ADAMW")
    assert adamw["weight_decay"] == 0.05 and adamw["beta2"] == 0.999
    memory, lion = optimizers.switch(memory, "ADAMW", adamw, "LION")
    assert lion["beta2"] == 0.95
    assert set(memory) == {"ADAMW", "LION"}
    # Switching keeps only the optimizer's own parameters.
    assert "momentum" not in memory["ADAMW"]


def test_optimizer_dialog_text_values():
    growth = next(p for p in optimizers.schema("PRODIGY") if p.name == "growth_rate")
    assert optimizers.display(float("inf")) == "inf"
    assert optimizers.parse(growth, "inf") == float("inf")
    beta3 = next(p for p in optimizers.schema("PRODIGY") if p.name == "beta3")
    assert optimizers.display(None) == "" and optimizers.parse(beta3, " ") is None
    assert optimizers.display(1e-8) == "1e-08" and optimizers.parse(beta3, "0.5") == 0.5
    assert "Default 0.01" in optimizers.tooltip(next(
        p for p in optimizers.schema("ADAMW") if p.name == "weight_decay"))
    switches = {p.name: p for p in optimizers.schema("PRODIGY") if p.kind == "bool"}
    assert "Default off." in optimizers.tooltip(switches["use_bias_correction"])
    assert "Default on." in optimizers.tooltip(switches["decouple"])
