"""The memory estimate of a transformer read from a GGUF file (transformer.weight_dtype GGUF):
its weights are what the loaded transformer holds (the file's packed tensors as stored, its
F32 / F16 tensors at the train dtype), counted from the file's header; a training step's
peak is held to the estimate (its layers keep no dequantized copies for the backward pass);
no lever proposes another storage type for it; a missing or broken file is one sentence. The files are
the tiny families' transformers written by the gguf library (tests/gguf_files.py)."""
from __future__ import annotations

import json

import gguf
import pytest

from trainer import memory_estimate as M
from trainer.errors import AtelierError
from trainer.models.family import load_family

from gguf_files import write_gguf
from test_memory_estimate import config, training_step_peak

FLUX = "FLUX_DEV_1"
FAMILIES = [("tiny_chroma_dir", "CHROMA_1"), ("tiny_sd3_dir", "STABLE_DIFFUSION_3"),
            ("tiny_qwen_image_dir", "QWEN"), ("tiny_flux2_dir", "FLUX_2"),
            ("tiny_z_image_dir", "Z_IMAGE")]


def gguf_settings(folder, path, model_type=FLUX, **values):
    transformer = {"model_name": str(path), "weight_dtype": "GGUF",
                   **values.pop("transformer", {})}
    values.setdefault("text_encoder", {"train": False})
    return config(model_type=model_type, base_model_name=str(folder), transformer=transformer,
                  **values)


def write_transformer(folder, model_type, path, qtype):
    """The tiny family's transformer in its original layout, written as a .gguf file."""
    plain = load_family(config(model_type=model_type, base_model_name=str(folder)))
    return write_gguf(plain.original_state_dict(), path, qtype)


@pytest.fixture(scope="module")
def flux_gguf(tiny_flux_dir, tmp_path_factory):
    """{qtype: the tiny Flux.1's transformer as a .gguf file}, Q8_0 and Q4_0."""
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for qtype in ("Q8_0", "Q4_0"):
        files[qtype] = folder / f"flux-{qtype}.gguf"
        written = write_transformer(tiny_flux_dir, FLUX, files[qtype], qtype)
        assert {qtype, "F32"} <= set(written.values())
    return files


def file_tensor_bytes(path, plain_bytes: int | None = None) -> int:
    """The tensor bytes the gguf library reads from the file; F32 / F16 tensors at
    `plain_bytes` an element when given."""
    total = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        plain = t.tensor_type.name in ("F32", "F16")
        total += int(t.n_elements) * plain_bytes if plain and plain_bytes else int(t.n_bytes)
    return total


def loaded_bytes(module) -> int:
    """What the loaded module holds of a model file: its state dict (Chroma's non-persistent
    `mod_proj` table is made at construction, from no file, and counted for no file type)."""
    tensors = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_a_gguf_transformer_is_the_files_tensor_bytes(qtype, flux_gguf, tiny_flux_dir):
    path = flux_gguf[qtype]
    # float32 training: every tensor as the file stores it, to the byte
    result = M.estimate(gguf_settings(tiny_flux_dir, path, train_dtype="FLOAT_32"),
                        device_gb=None)
    assert result.part_bytes["transformer"] == file_tensor_bytes(path)
    assert result.parts["transformer"] == file_tensor_bytes(path) / M.GB
    assert "GGUF file" in result.source
    # bfloat16 training: the F32 tensors become bfloat16 as the loader casts them, the packed
    # ones stay as stored; what the loaded transformer holds
    settings = gguf_settings(tiny_flux_dir, path, train_dtype="BFLOAT_16")
    result = M.estimate(settings, device_gb=None)
    assert result.part_bytes["transformer"] == file_tensor_bytes(path, 2) < file_tensor_bytes(path)
    assert result.part_bytes["transformer"] == loaded_bytes(load_family(settings).parts["transformer"])
    # smaller than the same model's transformer stored in bfloat16, and the rest unchanged
    plain = M.estimate(config(model_type=FLUX, base_model_name=str(tiny_flux_dir),
                              train_dtype="BFLOAT_16", text_encoder={"train": False},
                              transformer={"weight_dtype": "BFLOAT_16"}), device_gb=None)
    assert result.part_bytes["transformer"] < plain.part_bytes["transformer"]
    assert {p: b for p, b in result.part_bytes.items() if p != "transformer"} == \
        {p: b for p, b in plain.part_bytes.items() if p != "transformer"}
    assert result.trained_parameters == plain.trained_parameters  # the same adapters


@pytest.mark.parametrize("qtype, train_dtype", [("Q4_0", "BFLOAT_16"), ("BF16", "FLOAT_32")])
@pytest.mark.parametrize("fixture, model_type", FAMILIES)
def test_each_familys_gguf_transformer_is_what_it_loads_as(fixture, model_type, qtype,
                                                           train_dtype, request, tmp_path):
    """Q4_0 as llama.cpp leaves a file; BF16 as city96's converter writes one (its tensors no
    GGUF layer reads, SD 3's positional embedding, are dequantized into the train dtype)."""
    folder = request.getfixturevalue(fixture)
    path = tmp_path / "transformer.gguf"
    write_transformer(folder, model_type, path, qtype)
    settings = gguf_settings(folder, path, model_type, train_dtype=train_dtype)
    loaded = loaded_bytes(load_family(settings).parts["transformer"])
    assert M.estimate(settings, device_gb=None).part_bytes["transformer"] == loaded


def test_the_cli_counts_a_gguf_transformer(flux_gguf, tiny_flux_dir, tmp_path, capsys,
                                           monkeypatch):
    from trainer.cli import main
    monkeypatch.setattr(M, "device_memory_gb", lambda: None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": FLUX, "base_model_name": str(tiny_flux_dir),
                                "train_dtype": "FLOAT_32", "text_encoder": {"train": False},
                                "transformer": {"model_name": str(flux_gguf["Q4_0"]),
                                                "weight_dtype": "GGUF"}}))
    assert main(["estimate", "--config", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parts"]["transformer"] == round(file_tensor_bytes(flux_gguf["Q4_0"]) / M.GB, 3)
    assert "GGUF file" in out["source"]
    # a missing file: one line, exit 2
    assert main(["estimate", "--config", str(path), "--set",
                 f"transformer.model_name={tmp_path / 'gone.gguf'}"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: transformer.model_name: '{tmp_path / 'gone.gguf'}' does not exist.\n"


def test_a_missing_or_broken_gguf_file_is_one_sentence(tiny_flux_dir, tmp_path):
    missing = tmp_path / "nothing.gguf"
    with pytest.raises(AtelierError) as caught:
        M.estimate(gguf_settings(tiny_flux_dir, missing), device_gb=None)
    assert str(caught.value) == f"transformer.model_name: '{missing}' does not exist."
    broken = tmp_path / "broken.gguf"
    for content in (b"\xff" * 64, b"GGUF\x03\x00\x00\x00" + b"\x00" * 8):
        broken.write_bytes(content)
        with pytest.raises(AtelierError) as caught:
            M.estimate(gguf_settings(tiny_flux_dir, broken), device_gb=None)
        assert str(caught.value) == (f"transformer.model_name: '{broken}' is not a readable "
                                     "GGUF file (corrupt or truncated?).")


def test_no_lever_changes_a_gguf_transformers_type(flux_gguf, tiny_flux_dir):
    """The file decides a GGUF transformer's types; streaming it and the other parts' levers
    stay, each one a setting the engine takes."""
    stored = gguf_settings(tiny_flux_dir, flux_gguf["Q8_0"], train_dtype="BFLOAT_16")
    plain = config(**{**stored.model_dump(mode="json"),
                      "transformer": {"weight_dtype": "BFLOAT_16"}})

    def described(settings):
        return [d for d, _ in M.candidate_levers(settings)]
    # with the transformer in bfloat16 both kinds are offered (what the GGUF case must lack)
    assert any("transformer FLOAT_8" in d for d in described(plain))
    assert any(d.startswith("offloading (transformer") for d in described(plain))
    levers = M.candidate_levers(stored)
    assert not any("transformer" in d for d, _ in levers
                   if d.startswith("a smaller weight dtype"))
    assert any(d.startswith("offloading (transformer") for d, _ in levers)
    assert "a smaller weight dtype (text_encoder FLOAT_8, text_encoder_2 FLOAT_8, vae " \
           "FLOAT_8)" not in described(stored)  # (the VAE is never quantized)
    assert "a smaller weight dtype (text_encoder NFLOAT_4, text_encoder_2 NFLOAT_4)" in \
        described(stored)
    for description, changes in levers:
        changed = M._with(stored, **changes)
        assert changed.transformer.weight_dtype.value == "GGUF", description
        M.estimate(changed, device_gb=None)  # the engine takes it
    assert M.combined(stored, M.estimate(stored, device_gb=None)) is not None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_gguf_training_step_measures_as_estimated(checkpointing, flux_gguf, tiny_flux_dir):
    """One LoRA step's peak above the loaded model against the estimate's (as
    test_activations_match_a_measured_training_step does for the plain models). Its layers
    dequantize again in the backward pass (trainer/quantization.py _GGUFMatmul): the step
    costs what the same model's float32 step costs, give or take one layer's weight, and the
    estimate adds nothing for it."""
    common = dict(model_type=FLUX, base_model_name=str(tiny_flux_dir), lora_rank=4,
                  lora_layer_preset="attn-mlp", train_dtype="FLOAT_32", resolution="256",
                  gradient_checkpointing=checkpointing, text_encoder={"train": False})
    stored = config(**common, transformer={"model_name": str(flux_gguf["Q8_0"]),
                                           "weight_dtype": "GGUF"})
    plain = config(**common, transformer={"weight_dtype": "FLOAT_32"})

    def step(settings):
        measured, trained = training_step_peak(settings, 256, 1)
        result = M.estimate(settings, device_gb=None)
        assert trained == result.trained_parameters
        return measured, result.phases["training"]["activations_gb"] * M.GB + 4 * trained
    measured, estimated = step(stored)
    assert 0.85 < measured / estimated < 1.15, (measured, estimated)
    plain_measured, plain_estimated = step(plain)
    assert estimated == plain_estimated
    largest_layer = max(t.numel for t in M.model_tensors(stored).parts["transformer"]) * 4
    assert measured - plain_measured <= 2 * largest_layer, (measured, plain_measured)


def test_a_base_model_without_transformer_weights_takes_the_gguf_ones(flux_gguf,
                                                                       tiny_flux_dir, tmp_path):
    """A base folder for the text encoders and VAE only (the transformer's config, no weights)
    beside a GGUF file: the loader reads it so, and the estimate counts it."""
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(tiny_flux_dir, bare)
    for weights in (bare / "transformer").glob("*.safetensors"):
        weights.unlink()
    settings = gguf_settings(bare, flux_gguf["Q4_0"], train_dtype="FLOAT_32")
    assert M.estimate(settings, device_gb=None).part_bytes["transformer"] == \
        file_tensor_bytes(flux_gguf["Q4_0"])
