"""The page's Import of OneTrainer's own files (tests/fixtures/onetrainer) gives the same
effective config as the CLI's `--config`, or the same refusal naming the key: it never puts a
default in place of what the job is (optimizer, adapter type, model, method, format), and never
keeps the page's own concepts for a Save config whose concept file was not uploaded with it."""
from __future__ import annotations

import shutil

import pytest

from onetrainer_files import (ALL, FIXTURES, REFUSED, copy_with_concept_file, entry, few_images,
                              raw)
from test_onetrainer import same_run
from trainer.config import load_config
from trainer.errors import ConfigError
from ui import presets


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "ws"))
    return tmp_path / "ws"


def uploaded(name: str, tmp_path):
    """The files a user selects in Import: the config, and the concept file it names when
    OneTrainer wrote one (each upload lands in a folder of its own, as gradio's do)."""
    images = few_images(tmp_path / "images")
    config = copy_with_concept_file(name, tmp_path / "config", images)
    files = [config]
    concept_file = entry(name).get("concept_file")
    if concept_file:
        own = tmp_path / "upload-2" / (config.parent / concept_file).name
        own.parent.mkdir(parents=True)
        shutil.copy(config.parent / concept_file, own)
        files.append(own)
    return config, files


PAGE = {"concepts": [{"path": "/the/page/own"}], "samples": []}


@pytest.mark.parametrize("name", ALL)
def test_the_page_imports_what_the_cli_reads(name, workspace, tmp_path):
    config_file, files = uploaded(name, tmp_path)
    try:
        cli = load_config(config_file, warn=lambda m: None)
    except ConfigError as error:
        cli = error
    try:
        page, _, messages, kind, _ = presets.import_files(files, PAGE)
    except ConfigError as error:
        page = error
    if isinstance(cli, ConfigError):
        assert isinstance(page, ConfigError), f"the page imported what the CLI refuses: {cli}"
        key = str(cli).split(":")[0].split(" —")[0]
        assert key in str(page), (str(cli), str(page))
        if name in REFUSED:
            assert REFUSED[name] in str(page)
    else:
        assert not isinstance(page, ConfigError), page
        assert kind == "OneTrainer"
        ours, theirs = same_run(page), same_run(cli)
        data = raw(name)
        if data.get("concepts") is None and "concept_file_name" not in data:
            # a partial preset: like every preset, it leaves the page's concepts and samples
            assert [c.path for c in page.concepts] == ["/the/page/own"]
            for key in presets.DATA_KEYS:
                ours.pop(key), theirs.pop(key)
        else:
            assert "/the/page/own" not in [c.path for c in page.concepts]
        assert ours == theirs


def test_a_save_config_without_its_concept_file_is_refused_not_filled_from_the_page(
        workspace, tmp_path):
    name = "sd15_lora_embedding_masked.saved"
    alone = tmp_path / "alone.json"
    shutil.copy(FIXTURES / entry(name)["file"], alone)
    with pytest.raises(ConfigError, match="concept_file_name.*mychar.json.*Import"):
        presets.import_files([alone], PAGE)
    config_file, files = uploaded(name, tmp_path)
    config = presets.import_files(files, PAGE)[0]
    assert len(config.concepts) == 1 and config.concepts[0].path != "/the/page/own"


def test_an_unknown_optimizer_or_adapter_type_is_never_replaced(workspace, tmp_path):
    for name, key in (("sd15_lora_came.saved", "optimizer.optimizer: 'CAME'"),
                      ("sd15_lora_oft.saved", "peft_type: 'OFT_2'")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            presets.import_files(uploaded(name, tmp_path / name)[1], PAGE)


def test_import_wants_one_config_among_the_files(workspace, tmp_path):
    name = "sd15_lora_embedding_masked.saved"
    _, files = uploaded(name, tmp_path)
    with pytest.raises(ConfigError, match="one config file"):
        presets.import_files(files[1:], PAGE)  # only the concepts (a JSON list)


@pytest.mark.parametrize("name, key", REFUSED.items())
def test_the_api_refuses_the_same_files_naming_the_key(name, key, workspace):
    """/submit_job and /start check a config as the page's Start does (ui/api.py)."""
    from ui.api import parse_config
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        parse_config((FIXTURES / entry(name)["file"]).read_text())
