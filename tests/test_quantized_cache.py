"""The disk cache of quantized parts (issue 26): a run writes each quantized part once; the next
run reads it instead of the model's files (the part's loader is never called: spy), trains
exactly as the first did, and a changed source file rebuilds its part's entry alone."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, T5EncoderModel

from trainer import quantization as q
from trainer import quantized_cache
from trainer.config import DataType
from trainer.control import Control
from trainer.loop import train

from helpers import RUNS_ARE_BIT_EXACT, read_metrics, same_trained, tiny_config


@pytest.fixture(autouse=True)
def workspace_cache(monkeypatch):
    """Entries in each test's workspace (the app points every job at one folder)."""
    monkeypatch.delenv(quantized_cache.CACHE_DIR_ENV, raising=False)


def test_the_app_points_every_job_at_one_folder(tmp_path, monkeypatch):
    from helpers import tiny_config as make
    config = make("model", tmp_path)
    assert quantized_cache.cache_root(config) == tmp_path / "ws" / "cache" / "quantized"
    monkeypatch.setenv(quantized_cache.CACHE_DIR_ENV, str(tmp_path / "shared"))
    assert quantized_cache.cache_root(config) == tmp_path / "shared"


@pytest.fixture
def loaded(monkeypatch):
    """How many times each part's class was read from the model's files."""
    counts = {"transformer": 0, "text_encoder": 0, "text_encoder_2": 0}

    def counting(cls, part):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, **kwargs):
            counts[part] += 1
            return real(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    counting(FluxTransformer2DModel, "transformer")
    counting(CLIPTextModel, "text_encoder")
    counting(T5EncoderModel, "text_encoder_2")
    return counts


def run(config, output):
    events = []
    config = config.model_copy(update={"output_model_destination": str(output)})
    (tmp := config.workspace_dir + "/metrics.jsonl") and os.path.exists(tmp) and os.remove(tmp)
    train(config, Control(on_event=events.append))
    status = [e["message"] for e in events if e["type"] == "status"]
    return status, [m["loss"] for m in read_metrics(config)], load_file(str(output))


def test_a_second_run_reads_the_quantized_parts_and_trains_the_same(loaded, tiny_flux_dir,
                                                                   tmp_path):
    if not q.bitsandbytes_runs("NFLOAT_4", "cpu") or not q.bitsandbytes_runs("INT_8", "cpu"):
        pytest.skip("bitsandbytes does not run here: its refusal is tested in test_quantization")
    model = tmp_path / "model"
    shutil.copytree(tiny_flux_dir, model)
    # all three types: the transformer in FLOAT_8, CLIP in INT_8, T5 in NF4
    config = tiny_config(model, tmp_path, model_type="FLUX_DEV_1",
                         text_encoder={"train": False, "weight_dtype": "INT_8"},
                         text_encoder_2={"weight_dtype": "NFLOAT_4"},
                         transformer={"weight_dtype": "FLOAT_8"},
                         output_model_format="DIFFUSERS_LORA", epochs=2, batch_size=5,
                         aspect_ratio_bucketing=False)
    status, losses, lora = run(config, tmp_path / "first.safetensors")
    assert loaded == {"transformer": 1, "text_encoder": 1, "text_encoder_2": 1}
    wrote = [line for line in status if line.startswith("Wrote the quantized")]
    assert len(wrote) == 3, status
    entries = sorted(p.name.split("-")[0] for p in quantized_cache.cache_root(config).iterdir())
    assert entries == ["text_encoder", "text_encoder_2", "transformer"]

    loaded.update(transformer=0, text_encoder=0, text_encoder_2=0)
    status, again, lora_again = run(config, tmp_path / "second.safetensors")
    assert loaded == {"transformer": 0, "text_encoder": 0, "text_encoder_2": 0}
    read = [line for line in status if line.startswith("Read the")]
    assert len(read) == 3 and not any("Wrote the quantized" in line for line in status), status
    assert again == losses
    assert lora_again.keys() == lora.keys()
    assert all(torch.equal(lora[k], lora_again[k]) for k in lora)

    # A new transformer file (same bytes, a later time): its entry alone is rebuilt.
    weights = next((model / "transformer").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    loaded.update(transformer=0, text_encoder=0, text_encoder_2=0)
    status, _, _ = run(config, tmp_path / "third.safetensors")
    assert loaded == {"transformer": 1, "text_encoder": 0, "text_encoder_2": 0}
    assert [line for line in status if line.startswith("Wrote the quantized")] == [
        f"Wrote the quantized transformer to "
        f"{quantized_cache.cache_root(config) / quantized_cache.part_key(config, 'transformer')[0]}"
        " for the next run"]
    assert len(list(quantized_cache.cache_root(config).iterdir())) == 3  # replaced, not added


@pytest.mark.parametrize("dtype", ["FLOAT_8", "INT_8", "NFLOAT_4"])
def test_an_entry_rebuilds_each_quantized_type_exactly(dtype, tiny_flux_dir, tmp_path):
    """T5 (tied token table, a layer kept in float32) stored and read back: the same outputs."""
    if dtype != "FLOAT_8" and not q.bitsandbytes_runs(dtype, "cpu"):
        pytest.skip("bitsandbytes does not run here")
    config = tiny_config(tiny_flux_dir, tmp_path, model_type="FLUX_DEV_1",
                         text_encoder_2={"weight_dtype": dtype})
    t5 = T5EncoderModel.from_pretrained(tiny_flux_dir, subfolder="text_encoder_2")
    names = q.layers_to_quantize(t5, part="text_encoder_2")
    q.quantize_part(t5, names, DataType(dtype), torch.float32)
    quantized_cache.store(config, "text_encoder_2", t5, names, DataType(dtype))
    again = quantized_cache.load(config, "text_encoder_2")
    assert again is not None and type(again.encoder.block[0].layer[0].SelfAttention.q) is type(
        t5.encoder.block[0].layer[0].SelfAttention.q)
    assert again.shared.weight is again.encoder.embed_tokens.weight  # one table, as loaded
    ids = torch.tensor([[5, 9, 3, 1]])
    with torch.no_grad():
        assert torch.equal(again(ids).last_hidden_state, t5(ids).last_hidden_state)


def test_a_damaged_entry_is_rebuilt_not_fatal(tiny_flux_dir, tmp_path, monkeypatch):
    config = tiny_config(tiny_flux_dir, tmp_path, model_type="FLUX_DEV_1",
                         text_encoder_2={"weight_dtype": "FLOAT_8"})
    t5 = T5EncoderModel.from_pretrained(tiny_flux_dir, subfolder="text_encoder_2")
    names = q.layers_to_quantize(t5, part="text_encoder_2")
    q.quantize_part(t5, names, DataType.FLOAT_8, torch.float32)
    quantized_cache.store(config, "text_encoder_2", t5, names, DataType.FLOAT_8)
    folder = quantized_cache.cache_root(config) / quantized_cache.part_key(
        config, "text_encoder_2")[0]
    (folder / quantized_cache.WEIGHTS).write_bytes(b"not a safetensors file")
    assert quantized_cache.load(config, "text_encoder_2") is None
    assert not folder.exists()  # removed: the run writes it again
    # another filter or type is another key: not served
    other = config.model_copy(update={"text_encoder_2": config.text_encoder_2.model_copy(
        update={"weight_dtype": DataType.INT_8})})
    assert quantized_cache.part_key(other, "text_encoder_2") != quantized_cache.part_key(
        config, "text_encoder_2")
    monkeypatch.setenv("ATELIER_QUANTIZED_CACHE", "off")  # the benchmarks' throw-away runs
    assert not quantized_cache.writes_enabled()


def test_a_full_disk_is_not_filled_and_a_failed_write_leaves_nothing(tiny_flux_dir, tmp_path,
                                                                     monkeypatch):
    """No room: not written, said with the sizes; a write that fails (the disk filled up in
    between): said, no half entry left; either way the part is quantized again next time."""
    import shutil as shell
    config = tiny_config(tiny_flux_dir, tmp_path, model_type="FLUX_DEV_1",
                         text_encoder_2={"weight_dtype": "FLOAT_8"})
    t5 = T5EncoderModel.from_pretrained(tiny_flux_dir, subfolder="text_encoder_2")
    names = q.layers_to_quantize(t5, part="text_encoder_2")
    q.quantize_part(t5, names, DataType.FLOAT_8, torch.float32)
    root = quantized_cache.cache_root(config)
    real = shell.disk_usage
    monkeypatch.setattr(quantized_cache.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=2**29))
    line = quantized_cache.store(config, "text_encoder_2", t5, names, DataType.FLOAT_8)
    assert line.startswith(f"Not writing the quantized text_encoder_2 to {root}: it takes 0.0 GB "
                           "and the disk has 0.5 GB free") and not any(root.iterdir())
    monkeypatch.setattr(quantized_cache.shutil, "disk_usage", real)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("safetensors.torch.save_file", full)
    line = quantized_cache.store(config, "text_encoder_2", t5, names, DataType.FLOAT_8)
    assert line == (f"Could not write the quantized text_encoder_2 to {root} (No space left on "
                    "device); the next run quantizes it again")
    assert not any(root.iterdir()) and quantized_cache.load(config, "text_encoder_2") is None


FAMILIES = [("tiny_sd15_dir", "STABLE_DIFFUSION_15"), ("tiny_sdxl_dir", "STABLE_DIFFUSION_XL_10_BASE"),
            ("tiny_chroma_dir", "CHROMA_1"), ("tiny_sd3_dir", "STABLE_DIFFUSION_3"),
            ("tiny_qwen_image_dir", "QWEN"), ("tiny_flux2_dir", "FLUX_2"),
            ("tiny_z_image_dir", "Z_IMAGE")]


@pytest.mark.parametrize("fixture, model_type", FAMILIES)
def test_every_familys_parts_come_back_from_the_cache(fixture, model_type, request, tmp_path):
    """Each family's loader serves every quantized part from its entry (Flux.1: the first test),
    its classes and configs rebuilt (CLIP, T5, Qwen2.5-VL, Qwen3; UNet and transformers), the
    stored tensors unchanged."""
    from trainer.models import registry
    from trainer.models.family import load_family
    parts = registry.facts(model_type).parts
    config = tiny_config(request.getfixturevalue(fixture), tmp_path, model_type=model_type,
                         **{part: {"weight_dtype": "FLOAT_8", "train": part in ("unet",
                                                                              "transformer")}
                            for part in parts})
    family = load_family(config)
    q.quantize_frozen_parts(family, config, torch.device("cpu"))
    with quantized_cache.serving(config):
        again = load_family(config)
    for part in parts:
        assert getattr(again.parts[part], quantized_cache.FROM_CACHE, None), part
        stored, read = family.parts[part].state_dict(), again.parts[part].state_dict()
        assert stored.keys() == read.keys(), part
        assert all(torch.equal(stored[k], read[k]) for k in stored), part


# --- SD 1.5 / SDXL single files: diffusers' from_single_file is given the cached parts -------

@pytest.fixture
def built_from_file(monkeypatch):
    """The components diffusers' from_single_file converted and loaded from the file."""
    from diffusers.loaders import single_file
    names = []
    real = single_file.load_single_file_sub_model

    def spy(*args, name, **kwargs):
        names.append(name)
        return real(*args, name=name, **kwargs)
    monkeypatch.setattr(single_file, "load_single_file_sub_model", spy)
    return names


def single_file_of(model_dir, model_type, path, monkeypatch, config_dir=None):
    """The tiny model of `model_dir` written as an original single file at `path`, its family
    reading single files with `config_dir` (the tiny model's own configs by default): the run
    config names no config folder, and the shipped ones describe full-size models."""
    import dataclasses

    from trainer.models import sd15, sdxl
    from trainer.models.single_file import save_sd15_single_file, save_sdxl_single_file
    if model_type.startswith("STABLE_DIFFUSION_XL"):
        save_sdxl_single_file(sdxl.load_sdxl(str(model_dir)), path)
        monkeypatch.setattr(sdxl, "SDXL_SPEC", dataclasses.replace(
            sdxl.SDXL_SPEC, config_dir=config_dir or model_dir))
    else:
        save_sd15_single_file(sd15.load_sd15(str(model_dir)), path)
        monkeypatch.setattr(sd15, "SD15_SPEC", dataclasses.replace(
            sd15.SD15_SPEC, config_dir=config_dir or model_dir))
    return path


SINGLE_FILES = [("tiny_sd15_dir", "STABLE_DIFFUSION_15", ("text_encoder",)),
                ("tiny_sdxl_dir", "STABLE_DIFFUSION_XL_10_BASE",
                 ("text_encoder", "text_encoder_2"))]


@pytest.mark.parametrize("fixture, model_type, encoders", SINGLE_FILES)
def test_a_single_files_second_run_reads_its_quantized_parts(fixture, model_type, encoders,
                                                            built_from_file, request, tmp_path,
                                                            monkeypatch):
    """The UNet and the text encoders (the first trained: its LoRA runs on the served layers)
    quantized from a single file are written once; the next run gives them to diffusers, which
    converts only the VAE, and trains the same; a touched file rebuilds both entries."""
    model = single_file_of(request.getfixturevalue(fixture), model_type,
                           tmp_path / "model.safetensors", monkeypatch)
    parts = (*encoders, "unet")
    config = tiny_config(model, tmp_path, model_type=model_type, epochs=1,
                         **{part: {"weight_dtype": "FLOAT_8",
                                   "train": part in ("unet", "text_encoder")} for part in parts})
    status, losses, lora = run(config, tmp_path / "first.safetensors")
    assert set(parts) <= set(built_from_file), built_from_file
    assert len([line for line in status if line.startswith("Wrote the quantized")]) == len(parts)
    assert any(k.startswith("lora_te") for k in lora) and any("unet" in k for k in lora)

    built_from_file.clear()
    status, again, lora_again = run(config, tmp_path / "second.safetensors")
    assert not set(parts) & set(built_from_file) and "vae" in built_from_file, built_from_file
    read = [line for line in status if line.startswith("Read the")]
    assert [line.split()[2] for line in read] == list(parts), status
    assert not any("Wrote the quantized" in line for line in status), status
    assert again == losses if RUNS_ARE_BIT_EXACT else again == pytest.approx(losses, rel=1e-3)
    assert lora_again.keys() == lora.keys()
    assert all(same_trained(lora[k], lora_again[k]) for k in lora)

    # The same bytes written again (a later time): every part comes from the file, so both
    # entries are rebuilt, each in its own slot.
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    built_from_file.clear()
    status, _, _ = run(config, tmp_path / "third.safetensors")
    assert set(parts) <= set(built_from_file), built_from_file
    assert len([line for line in status if line.startswith("Wrote the quantized")]) == len(parts)
    assert len(list(quantized_cache.cache_root(config).iterdir())) == len(parts)


def test_an_inpainting_single_files_unet_comes_back_with_its_channels(
        built_from_file, tiny_sd15_inpaint_dir, tiny_sd15_dir, tmp_path, monkeypatch):
    """The 9-channel UNet of a single file read with 4-channel configs (built from a temporary
    copy of them): its entry keeps the 9 channels and is keyed on the folder given, so it is
    served; the same file read with another config folder is another entry."""
    from trainer.models.family import load_family
    model = single_file_of(tiny_sd15_inpaint_dir, "STABLE_DIFFUSION_15_INPAINTING",
                           tmp_path / "inpaint.safetensors", monkeypatch, tiny_sd15_dir)
    config = tiny_config(model, tmp_path, model_type="STABLE_DIFFUSION_15_INPAINTING",
                         unet={"weight_dtype": "FLOAT_8"},
                         text_encoder={"train": False, "weight_dtype": "FLOAT_8"})
    family = load_family(config)
    assert family.parts["unet"].config.in_channels == 9
    q.quantize_frozen_parts(family, config, torch.device("cpu"))
    built_from_file.clear()
    with quantized_cache.serving(config):
        again = load_family(config)
    assert "unet" not in built_from_file and "text_encoder" not in built_from_file
    unet = again.parts["unet"]
    assert getattr(unet, quantized_cache.FROM_CACHE, None) and unet.config.in_channels == 9
    stored, read = family.parts["unet"].state_dict(), unet.state_dict()
    assert stored.keys() == read.keys() and all(torch.equal(stored[k], read[k]) for k in stored)

    # The same configs in another folder: another key, so the parts are built (and written)
    other = tmp_path / "other-config"
    shutil.copytree(tiny_sd15_dir, other)
    single_file_of(tiny_sd15_inpaint_dir, "STABLE_DIFFUSION_15_INPAINTING",
                   tmp_path / "inpaint.safetensors", monkeypatch, other)
    assert quantized_cache.part_key(config, "unet", str(other))[0] != quantized_cache.part_key(
        config, "unet", str(tiny_sd15_dir))[0]
    with quantized_cache.serving(config):
        third = load_family(config)
    assert "unet" in built_from_file and "text_encoder" in built_from_file
    assert getattr(third.parts["unet"], quantized_cache.CONFIG_FOLDER) == str(other)
    assert not hasattr(third.parts["unet"], quantized_cache.FROM_CACHE)
