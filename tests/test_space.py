"""app.py started as a Hugging Face Space starts it: SPACE_ID set, persistent storage mounted
(`ATELIER_DATA_DIR` stands in for /data). `--print-settings` runs the start up to the point
where everything is decided and prints it as the libraries see it."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.limits import ServerLimits

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the tests set for themselves (conftest) and a Space does not.
NOT_ON_A_SPACE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_HOME",
                  "HF_HUB_CACHE", "ATELIER_WORKSPACE", "SPACE_ID", "ATELIER_QUANTIZED_CACHE_DIR")


def start_settings(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in NOT_ON_A_SPACE}
    # As the Space runs it: `python app.py` in the repository's folder.
    done = subprocess.run([sys.executable, "app.py", "--print-settings"], cwd=REPO_ROOT,
                          env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_a_space_is_shared_online_and_keeps_models_and_outputs_on_persistent_storage(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    space = start_settings(SPACE_ID="alice/atelier", ATELIER_DATA_DIR=str(data),
                           SPACE_AUTHOR_NAME="alice")
    assert space["shared"] and space["confine_paths"]
    # A Space is a shared server: its limits, and its token publishes under its owner only.
    assert space["limits"] == dataclasses.asdict(ServerLimits.shared_defaults())
    assert space["publish_namespaces"] == ["alice"]
    assert space["hub_offline"] is False  # base models download from the hub there
    assert space["workspace"] == str(data / "workspace")
    assert space["hf_home"] == str(data / ".huggingface")
    assert Path(space["hub_cache"]).is_relative_to(data)
    # quantized base models: one folder for every job (each runs in a folder of its own)
    assert space["quantized_cache"] == str(data / "workspace" / "cache" / "quantized")
    # latents and text: each user's jobs share their own folder, kept under its cap
    assert space["data_cache"] == str(data / "workspace" / "users" / "<user>" / "cache")
    assert space["data_cache_gb"] == 5.0

    # The same machine without SPACE_ID is someone's own: local, offline, their own hub cache.
    local = start_settings(ATELIER_DATA_DIR=str(data),
                           HF_HOME=str(tmp_path / "own-hf-home"))
    assert not local["shared"] and local["hub_offline"] is True
    assert set(local["limits"].values()) == {None} and local["publish_namespaces"] == []
    assert local["hf_home"] == str(tmp_path / "own-hf-home")
    assert local["data_cache"] == str(data / "workspace" / "cache")
    # A Space whose HF_HOME is set keeps it.
    kept = start_settings(SPACE_ID="alice/atelier", ATELIER_DATA_DIR=str(data),
                          HF_HOME=str(tmp_path / "chosen"))
    assert kept["hf_home"] == str(tmp_path / "chosen") and kept["shared"]


def test_without_persistent_storage_a_space_keeps_the_defaults(tmp_path):
    missing = tmp_path / "no-such-folder"
    space = start_settings(SPACE_ID="alice/atelier", ATELIER_DATA_DIR=str(missing),
                           ATELIER_WORKSPACE=str(tmp_path / "ws"))
    assert space["shared"] and space["hub_offline"] is False
    assert not Path(space["hf_home"]).is_relative_to(missing)
    assert space["workspace"] == str(tmp_path / "ws")
