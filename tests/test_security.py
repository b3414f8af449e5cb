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
