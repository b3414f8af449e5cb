"""Try it: a trained LoRA drawn beside its base model, with the engine's loader and sampler and
diffusers' LoRA loading: the LoRA side is what training sampled, the other side the base."""
import numpy as np
import pytest

from helpers import LAST_STEP_SAMPLE, tiny_config, train_sampling_at_the_end
from trainer.config import SampleConfig
from trainer.errors import ConfigError
from trainer.try_lora import TryModel, find_loras, read_lora


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def trained(tiny_sd15_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("try")
    config, result, events, spec = train_sampling_at_the_end(tiny_config, tiny_sd15_dir, tmp_path)
    sample = [e for e in events if e.get("type") == "sample"][-1]["path"]
    return config, result, sample


def test_the_lora_side_is_what_training_sampled_and_the_other_the_base(trained):
    from PIL import Image
    config, result, sample = trained
    lora = read_lora(result.output_path)
    assert (lora.base_model_name, lora.model_type, lora.resolution) == (
        config.base_model_name, "STABLE_DIFFUSION_15", 64)
    model = TryModel()
    spec = SampleConfig(**LAST_STEP_SAMPLE)
    without, with_lora = model.images(lora, spec, 1.0)
    trained_sample = pixels(Image.open(sample).convert("RGB"))
    assert np.abs(pixels(with_lora) - trained_sample).max() <= 2
    assert np.abs(pixels(without) - trained_sample).mean() > 2  # the LoRA changes the image
    # strength 0 is the base model; a second call reuses the loaded pipeline
    pipeline = model._pipeline
    again, zero = model.images(lora, spec, 0.0)
    assert model._pipeline is pipeline
    assert np.abs(pixels(zero) - pixels(without)).max() <= 1
    assert np.array_equal(pixels(again), pixels(without))
    half = model.images(lora, spec, 0.5)[1]
    assert 0 < np.abs(pixels(half) - pixels(without)).mean() < \
        np.abs(pixels(with_lora) - pixels(without)).mean()
    model.release()
    assert model._pipeline is None


def test_the_workspace_loras_are_listed_newest_first(trained, tmp_path):
    import os
    import shutil
    config, result, _ = trained
    folder = tmp_path / "ws"
    (folder / "a").mkdir(parents=True)
    (folder / "backup" / "step-1").mkdir(parents=True)
    old, new = folder / "a" / "old.safetensors", folder / "new.safetensors"
    for path in (old, new, folder / "backup" / "step-1" / "lora.safetensors"):
        shutil.copy(result.output_path, path)
    os.utime(old, (1, 1))
    (folder / "notes.safetensors").write_bytes(b"not a safetensors file")
    assert find_loras(folder) == [new, old]


def test_files_it_cannot_try_say_why(trained, tmp_path):
    from safetensors.torch import load_file, save_file
    _, result, _ = trained
    with pytest.raises(ConfigError, match="does not exist"):
        read_lora(tmp_path / "gone.safetensors")
    comfy = tmp_path / "comfy.safetensors"
    save_file({"diffusion_model.x.lora_A.weight": next(iter(load_file(result.output_path)
                                                            .values()))}, str(comfy))
    with pytest.raises(ConfigError, match="COMFY_LORA"):
        read_lora(comfy)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(result.output_path), str(bare))  # no metadata: base model unknown
    with pytest.raises(ConfigError, match="set the base model"):
        TryModel().images(read_lora(bare), SampleConfig(**LAST_STEP_SAMPLE), 1.0)


# --- The page's panel ---------------------------------------------------------------------------

@pytest.fixture()
def workspace_with_lora(trained, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "ws"))
    folder = tmp_path / "ws" / "run" / "output"
    folder.mkdir(parents=True)
    shutil.copy(trained[1].output_path, folder / "lora.safetensors")
    return folder / "lora.safetensors"


def test_the_panel_lists_draws_and_refuses_by_name(workspace_with_lora, monkeypatch):
    from ui import state, try_panel
    listed = try_panel.refresh(None)
    assert listed["lora"]["value"] == str(workspace_with_lora)
    assert listed["lora"]["choices"] == [("run/output/lora.safetensors",
                                          str(workspace_with_lora))]
    assert (listed["width"], listed["height"]) == (64, 64)  # its training size
    args = [str(workspace_with_lora), "a photo of a cat", "", 1.0, 7, 4, 3.0, 64, 64]
    out = try_panel.generate(*args)
    assert out["without"].size == out["with"].size == (64, 64)
    assert "lora.safetensors at strength 1" in out["message"]
    assert "steps:" in try_panel.generate(*args[:5], 0, *args[6:])["message"]
    assert "Type a prompt" in try_panel.generate(args[0], " ", *args[2:])["message"]
    monkeypatch.setattr(type(state.SESSION), "running", property(lambda self: True))
    assert "training job is running" in try_panel.generate(*args)["message"]


def test_a_shared_server_tries_only_the_visitors_files(workspace_with_lora, trained, tmp_path,
                                                       monkeypatch):
    import json
    import shutil

    from trainer.limits import ServerLimits
    from trainer.ownership import Access, Realm, Viewer
    from ui import state, try_panel
    ws = workspace_with_lora.parents[2]
    job = ws / "jobs" / "1"
    (job / "output").mkdir(parents=True)
    (job / "job.json").write_text(json.dumps({"owner": "alice"}))
    alices = job / "output" / "lora.safetensors"
    shutil.copy(workspace_with_lora, alices)
    realm = Realm(ws, shared=True, confine=True)
    alice, bob = Access(realm, Viewer("alice", False)), Access(realm, Viewer("bob", False))
    assert [label for label, _ in try_panel.lora_choices(alice)] == [
        "jobs/1/output/lora.safetensors"]
    assert try_panel.lora_choices(bob) == []
    assert try_panel.size_of(str(alices), bob) == {}
    args = ["a cat", "", 1.0, 7, 4, 3.0, 64, 64]
    outside = trained[1].output_path  # the training run's own folder, outside the workspace
    for path in (str(alices), outside, str(workspace_with_lora)):  # (the last: the server's)
        out = try_panel.generate(path, *args, access=bob)
        assert "lora: " in out["message"] and "cannot be read by you" in out["message"]
    # alice's own LoRA; its base model (the tiny model's folder) is outside the workspace
    out = try_panel.generate(str(alices), *args, access=alice)
    assert "base_model_name" in out["message"] and "cannot be read by you" in out["message"]
    # the server's Try it limits, named with their options
    monkeypatch.setattr(state, "LIMITS", ServerLimits(try_max_size=32, try_max_steps=3))
    out = try_panel.generate(str(alices), *args, access=alice)
    assert "width: 64 is above this server&#x27;s limit of 32 (--try-max-size)" in out["message"]
    out = try_panel.generate(str(alices), *args[:6], 32, 32, access=alice)
    assert "steps: 4 is above this server&#x27;s limit of 3 (--try-max-steps)" in out["message"]
    assert "32 px" in try_panel.limits_text() and "3 steps" in try_panel.limits_text()


def test_training_does_not_start_while_a_lora_is_drawn_and_frees_its_model(monkeypatch):
    from trainer.errors import AtelierError
    from ui import state
    released, started = [], []
    monkeypatch.setattr(state.TRY, "release", lambda: released.append(1))
    monkeypatch.setattr(state.SESSION, "start", lambda config, viewer: started.append(config))
    with state.TRY_LOCK:
        with pytest.raises(AtelierError, match="Try it is drawing"):
            state.start_training("config")
    assert not started and not released
    state.start_training("config")
    assert started == ["config"] and released == [1]


def test_a_lora_with_bundled_embeddings_draws_its_placeholders(tiny_sd15_dir, tmp_path):
    """Pivotal tuning: the file's `bundle_emb.*` vectors are loaded as textual inversions, so
    a prompt with the placeholder is drawn with them; the LoRA side matches training's sample."""
    from PIL import Image

    from trainer.control import Control
    from trainer.loop import train
    prompt = {**LAST_STEP_SAMPLE, "prompt": "a photo of <zq>"}
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, samples=[prompt], sample_after=2,
                         sample_after_unit="EPOCH",
                         additional_embeddings=[{"placeholder": "<zq>", "token_count": 2,
                                                 "initial_embedding_text": "cat"}])
    events = []
    result = train(config, Control(on_event=events.append))
    sample = [e for e in events if e.get("type") == "sample"][-1]["path"]
    model = TryModel()
    without, with_lora = model.images(read_lora(result.output_path), SampleConfig(**prompt), 1.0)
    trained_sample = pixels(Image.open(sample).convert("RGB"))
    assert np.abs(pixels(with_lora) - trained_sample).max() <= 2
    assert model._embedded
    # another file after it: the placeholders go with the file they came from
    plain = tiny_config(tiny_sd15_dir, tmp_path / "plain", epochs=1)
    model.images(read_lora(train(plain).output_path), SampleConfig(**LAST_STEP_SAMPLE), 1.0)
    assert not model._embedded and "<zq>" not in model._pipeline.tokenizer.get_vocab()


def test_a_lycoris_file_says_diffusers_cannot_try_it(tiny_sd15_dir, tmp_path):
    from trainer.loop import train
    loha = train(tiny_config(tiny_sd15_dir, tmp_path, epochs=1, peft_type="LOHA"))
    with pytest.raises(ConfigError, match="LOHA \\(LyCORIS\\) file, which diffusers does not"):
        read_lora(loha.output_path)


# --- The transformer families ---------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_trained(tmp_path_factory):
    """A Flux.1 DIFFUSERS_LORA of the tiny Flux.1-dev, sampled at its last step."""
    from trainer.control import Control
    from trainer.loop import train
    from trainer.models.tiny_flow import tiny_flow_model
    tmp_path = tmp_path_factory.mktemp("try-flux")
    config = tiny_config(tiny_flow_model("flux"), tmp_path, model_type="FLUX_DEV_1",
                         text_encoder={"train": False}, output_model_format="DIFFUSERS_LORA",
                         epochs=2, samples=[LAST_STEP_SAMPLE], sample_after=2,
                         sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    sample = [e for e in events if e.get("type") == "sample"][-1]["path"]
    return config, result, sample


def test_a_flux_lora_is_drawn_by_the_flux_pipeline_before_and_after(flux_trained):
    from PIL import Image
    config, result, sample = flux_trained
    lora = read_lora(result.output_path)
    assert (lora.model_type, lora.base_model_name, lora.resolution) == (
        "FLUX_DEV_1", config.base_model_name, 64)
    # samples encode the prompt at the trained T5 length (77), not the tokenizer's 512
    assert lora.settings["text_encoder_2_sequence_length"] == 77
    model = TryModel()
    without, with_lora = model.images(lora, SampleConfig(**LAST_STEP_SAMPLE), 1.0)
    assert type(model._pipeline).__name__ == "FluxPipeline"
    trained_sample = pixels(Image.open(sample).convert("RGB"))
    assert np.abs(pixels(with_lora) - trained_sample).max() <= 2  # what training drew
    assert np.abs(pixels(without) - pixels(with_lora)).mean() > 1  # the LoRA changes it
    model.release()


def fake_lora(path, keys, metadata=None):
    import torch
    from safetensors.torch import save_file
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path), metadata)
    return path


def test_other_trainers_flow_loras_are_recognised_by_their_header_or_names(tmp_path):
    from trainer.try_lora import _fitting
    kohya = {"ss_network_module": "networks.lora"}
    flux = fake_lora(tmp_path / "flux.safetensors",
                     ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"],
                     {**kohya, "ss_base_model_version": "flux1", "ss_sd_model_name": "flux1-dev"})
    assert (read_lora(flux).model_type, read_lora(flux).base_model_name) == (
        "FLUX_DEV_1", "flux1-dev")
    chroma = fake_lora(tmp_path / "chroma.safetensors",
                       ["lora_unet_single_blocks_0_linear1.lora_down.weight"],
                       {**kohya, "modelspec.architecture": "chroma/lora"})
    assert read_lora(chroma).model_type == "CHROMA_1"
    # No header: the layer names say Flux-shaped; the page's model type picks Chroma or Flux.1
    bare = read_lora(fake_lora(tmp_path / "bare.safetensors",
                               ["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]))
    assert (bare.model_type, bare.fits) == ("", ("FLUX_DEV_1", "CHROMA_1"))
    assert _fitting("CHROMA_1", bare.fits) == "CHROMA_1"
    assert _fitting("STABLE_DIFFUSION_15", bare.fits) == "FLUX_DEV_1"
    assert _fitting("STABLE_DIFFUSION_15", ()) == "STABLE_DIFFUSION_15"
    # ComfyUI's names of Flux.1: diffusers' Flux loader reads them (not SD's, not SD 3's)
    comfy = fake_lora(tmp_path / "comfy.safetensors",
                      ["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"],
                      {**kohya, "ss_base_model_version": "flux1"})
    assert read_lora(comfy).model_type == "FLUX_DEV_1"
    # ... and without a header: Flux.1's double blocks have img_mlp / img_mod too, not Qwen's
    bare_comfy = read_lora(fake_lora(tmp_path / "bare-comfy.safetensors",
                                     ["diffusion_model.double_blocks.0.img_mlp.0.lora_down.weight",
                                      "diffusion_model.double_blocks.0.img_mod.lin.lora_down.weight"]))
    assert bare_comfy.fits == ("FLUX_DEV_1", "CHROMA_1")
    sd3 = fake_lora(tmp_path / "sd3.safetensors",
                    ["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"],
                    {**kohya, "modelspec.architecture": "stable-diffusion-3-5-large/lora"})
    with pytest.raises(ConfigError, match="'sd3.safetensors' is a KOHYA_LORA file, which "
                                          "diffusers does not read for Stable Diffusion 3.5; "
                                          "train with DIFFUSERS_LORA to try it here."):
        read_lora(sd3)


def test_a_transformer_file_the_lora_names_must_be_the_visitors(tmp_path):
    import json

    from trainer.ownership import Access, Realm, Viewer
    from trainer.try_lora import LoraFile, check_try_paths
    ws = tmp_path / "ws"
    (ws / "jobs" / "1" / "output").mkdir(parents=True)
    (ws / "jobs" / "1" / "job.json").write_text(json.dumps({"owner": "alice"}))
    path = fake_lora(ws / "jobs" / "1" / "output" / "lora.safetensors", ["x.lora_A.weight"])
    alice = Access(Realm(ws, shared=True, confine=True), Viewer("alice", False))
    mine = LoraFile(path, "org/flux", "FLUX_DEV_1", "", 64)
    check_try_paths(mine, alice)  # a hub id and no transformer file: fine
    elsewhere = LoraFile(path, "org/flux", "FLUX_DEV_1", "", 64, settings={
        "transformer": {"model_name": str(tmp_path / "theirs.safetensors")}})
    with pytest.raises(ConfigError, match="^transformer.model_name: .*outside the workspace"):
        check_try_paths(elsewhere, alice)
