"""Shared-server mode: paths confined to the workspace root, no custom code, no pickles."""
import os

import pytest

from trainer.config import config_from_dict
from trainer.errors import ConfigError, ModelLoadError
from trainer.security import confine_config, confine_path
from trainer.session import TrainingSession


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "data").mkdir(parents=True)
    return r


@pytest.mark.parametrize("value", ["../outside", "data/../../outside", "/etc/passwd"])
def test_paths_outside_the_root_are_refused(root, value):
    with pytest.raises(ConfigError, match="concepts\\[0\\].path: .* is outside the workspace"):
        confine_path(value, root, "concepts[0].path")


def test_symlink_escape_is_refused(root, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    os.symlink(outside, root / "data" / "link")
    with pytest.raises(ConfigError, match="outside the workspace"):
        confine_path("data/link", root, "base_model_name")


def test_paths_inside_are_resolved_against_the_root(root):
    assert confine_path("data", root, "x") == str((root / "data").resolve())
    assert confine_path(str(root / "data"), root, "x") == str((root / "data").resolve())


def test_config_paths_are_confined_and_hub_ids_pass(root):
    config = config_from_dict({"base_model_name": "org/model", "workspace_dir": "runs/a",
                               "concepts": [{"path": "data"}]})
    safe = confine_config(config, root)
    assert safe.base_model_name == "org/model"
    assert safe.workspace_dir == str(root.resolve() / "runs" / "a")
    with pytest.raises(ConfigError, match="output_model_destination"):
        confine_config(config.model_copy(update={"output_model_destination": "/tmp/x.safetensors"}),
                       root)


def test_shared_session_refuses_escapes_and_custom_code(root):
    session = TrainingSession(allow_custom_code=True, workspace_root=root)
    assert session.allow_custom_code is False
    with pytest.raises(ConfigError, match="workspace_dir"):
        session.start(config_from_dict({"workspace_dir": "../../elsewhere",
                                        "concepts": [{"path": "data"}]}))
    assert not session.running


def test_pickle_checkpoint_is_refused(root):
    checkpoint = root / "model.ckpt"
    checkpoint.write_bytes(b"\x80\x04not really a pickle")
    from trainer.models.sd15 import load_sd15
    with pytest.raises(ModelLoadError, match="base_model_name"):
        load_sd15(str(checkpoint))


def test_confinement_checks_stay_cheap_for_absurd_paths(root):
    import time
    from pathlib import Path

    from trainer.security import is_inside
    started = time.monotonic()
    assert not is_inside(Path("a/" * 100_000), [root])        # refused before resolving
    deep = root / "/".join(["d"] * 1_900)                      # long, yet resolvable
    assert is_inside(deep, [root]) and not is_inside(deep, [root / "data"])
    with pytest.raises(ConfigError, match=r"concepts\[0\].path: A path of"):
        confine_path("a/" * 100_000, root, "concepts[0].path")
    assert time.monotonic() - started < 2


def test_every_model_source_is_confined(root, tmp_path):
    base = {"base_model_name": "org/model", "workspace_dir": "runs/a",
            "concepts": [{"path": "data"}]}
    outside = str(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ConfigError, match="vae_model_name"):
        confine_config(config_from_dict({**base, "vae_model_name": outside}), root)
    with pytest.raises(ConfigError, match=r"additional_embeddings\[0\]\.model_name"):
        confine_config(config_from_dict(
            {**base, "additional_embeddings": [{"placeholder": "<x>", "model_name": outside}]}),
            root)
    inside = confine_config(config_from_dict(
        {**base, "additional_embeddings": [{"placeholder": "<x>", "model_name": "e.safetensors"}]}),
        root)
    assert inside.additional_embeddings[0].model_name == str(root.resolve() / "e.safetensors")
    # the transformer's own file (a .safetensors or .gguf beside a flow model)
    flux = {**base, "model_type": "FLUX_DEV_1"}
    with pytest.raises(ConfigError, match=r"^transformer\.model_name"):
        confine_config(config_from_dict({**flux, "transformer": {"model_name": outside}}), root)
    inside = confine_config(config_from_dict(
        {**flux, "transformer": {"model_name": "t.gguf", "weight_dtype": "GGUF"}}), root)
    assert inside.transformer.model_name == str(root.resolve() / "t.gguf")


def test_the_confined_check_without_owners_keeps_its_messages(root, tmp_path):
    from trainer.demo import DEMO_DATASET_DIR
    from trainer.security import check_shared_paths
    ok = config_from_dict({"base_model_name": str(root / "model"),
                           "workspace_dir": str(root / "run"),
                           "concepts": [{"path": str(DEMO_DATASET_DIR)}]})
    check_shared_paths(ok, root, [DEMO_DATASET_DIR])
    for key, value in (("base_model_name", "/etc/models/x"),
                       ("workspace_dir", str(tmp_path / "elsewhere")),
                       ("output_model_destination", str(tmp_path / "x.safetensors"))):
        with pytest.raises(ConfigError, match=f"^{key}: .* is outside the workspace"):
            check_shared_paths(ok.model_copy(update={key: value}), root, [DEMO_DATASET_DIR])
