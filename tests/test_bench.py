"""The benchmark suite runs end to end on the tiny models (a smoke test of the bench: no
timing is asserted, only that every runner measured what it should and the report holds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cases import CASES, FLOW_SMOKE_CASES, SMOKE_CASES, estimate_peak_gb
from bench.report import ROW_KEYS, table

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_on_the_tiny_models_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--cases", ",".join(SMOKE_CASES), "--quick",
         "--device", "cpu", "--json", str(out), "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["case"], r["runner"]) for r in rows] == [
        (case, runner) for case in SMOKE_CASES for runner in ("limit", "naive", "atelier")]
    for row in rows:
        assert set(ROW_KEYS) <= set(row), row
        assert row["device"] == "cpu" and not row.get("error")
        for key in ("step_s_median", "first_step_s", "startup_s", "peak_mem_mb"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row)
        assert row["steps_measured"] == 3 and row["warmup_steps"] == 2
        assert row["loss_finite"] is True
        assert row["startup_s"] >= row["imports_s"] > 0
    atelier = [r for r in rows if r["runner"] == "atelier"]
    # the engine's start-up phases were seen through its status events
    assert all(r["startup_dataset_s"] <= r["startup_model_s"] <= r["startup_s"] for r in atelier)
    # the printed table has a row per runner and the ratios on the atelier rows
    assert "atelier/limit" in done.stdout and "naive/atelier" in done.stdout
    assert done.stdout.count("atelier ") >= 2


def test_every_case_is_described_and_gpu_cases_are_skipped_on_the_cpu(tmp_path):
    names = ["tiny-sd15-64", "tiny-sd15-128", "tiny-sdxl-128", "sd15-256", "sd15-256-gc",
             "sd15-256-ft", "sdxl-512", "sd15-512-lowmem", "sdxl-1024-lowmem"]
    assert set(names) <= set(CASES)
    for name, case in CASES.items():
        assert case.note and case.runners, name
        if case.base:
            assert case.base in CASES, name
        assert estimate_peak_gb(case, "atelier", "cpu") > 0
    # a full fine-tune needs its weights, gradients and AdamW state: more than a LoRA
    assert (estimate_peak_gb(CASES["sd15-256-ft"], "atelier", "cpu")
            > estimate_peak_gb(CASES["sd15-256"], "atelier", "cpu") + 10)
    # the fused pass drops the gradients, 8-bit AdamW most of the state
    ft = estimate_peak_gb(CASES["sd15-256-ft"], "atelier", "cpu")
    assert estimate_peak_gb(CASES["sd15-256-ft-fused"], "atelier", "cpu") < ft - 3
    assert estimate_peak_gb(CASES["sd15-256-ft-8bit"], "atelier", "cpu") < ft - 4

    out = tmp_path / "skipped.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--cases", "sd15-512-lowmem", "--device", "cpu",
         "--json", str(out), "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {r["runner"] for r in rows} == {"limit", "naive", "atelier"}
    assert all("GPU-only" in r["skipped"] and r["step_s_median"] is None for r in rows)
    assert "GPU-only" in done.stdout


def test_table_shows_ratios_and_levers():
    def row(case, runner, step, peak):
        return {"case": case, "runner": runner, "step_s_median": step, "first_step_s": step,
                "startup_s": 5.0, "peak_mem_mb": peak, "train_peak_mem_mb": peak}
    rows = [row("sd15-256", "limit", 2.0, 5000), row("sd15-256", "naive", 4.0, 6000),
            row("sd15-256", "atelier", 2.1, 5500),
            row("sd15-256-gc", "atelier", 3.0, 5000)]
    text = table(rows, "cpu")
    atelier_line = next(line for line in text.splitlines() if " atelier " in line
                        and "1.05" in line)
    assert "1.90" in atelier_line  # naive / atelier
    assert "sd15-256-gc vs sd15-256" in text and "1.43" in text and "500" in text


def test_fused_overhead_bench_counts_the_optimizer_calls(capsys):
    """The host-side bench of the fused pass: SD 1.5's 686 weight tensors are one optimizer
    call each without buckets, a few dozen with them (no timing asserted)."""
    from bench import fused_overhead

    assert fused_overhead.main(["--families", "sd15", "--steps", "1", "--rounds", "1"]) == 0
    rows = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("sd15")}
    assert rows["plain"][2] == "1" and rows["per-param"][2] == "686"
    assert 10 <= int(rows["bucketed"][2]) <= 40
    assert all(float(row[3]) > 0 for row in rows.values())


def test_text_encoder_lever_cases_train_and_checkpoint_only_the_text_encoder(tmp_path):
    from bench.runners import atelier_config_dict
    from trainer.config import config_from_dict

    config = config_from_dict(atelier_config_dict(CASES["sd15-256-te-gc"], tmp_path / "m",
                                                  tmp_path / "d", tmp_path / "w", "cpu"))
    assert config.text_encoder.train and config.unet.train
    assert config.gradient_checkpointing and config.text_encoder.gradient_checkpointing
    assert not config.unet.gradient_checkpointing
    assert not CASES["sd15-256-te-gc"].denoiser_checkpointing
    assert CASES["sd15-256-te"].runners == ("atelier",)
    plain = config_from_dict(atelier_config_dict(CASES["sd15-256"], tmp_path / "m",
                                                 tmp_path / "d", tmp_path / "w", "cpu"))
    assert not plain.text_encoder.train


@pytest.mark.parametrize("name, marker", [("sd15-256-dora", "lora_magnitude_vector"),
                                          ("sd15-256-loha", "hada_w1_a"),
                                          ("sd15-256-lokr", "lokr_w1")])
def test_adapter_type_cases_differ_from_plain_lora_only_by_the_adapter(name, marker,
                                                                       tiny_sd15_dir, tmp_path):
    """DoRA, LoHa and LoKr at sd15-256 against plain LoRA: the same case but for the adapter,
    built by the engine's own trainer/lora.py from the config the atelier runner trains."""
    import dataclasses

    from bench.runners import atelier_config_dict
    from diffusers import UNet2DConditionModel
    from trainer import lora
    from trainer.config import check_supported, config_from_dict

    case = CASES[name]
    assert case.base == "sd15-256" and "atelier" in case.runners
    plain = CASES["sd15-256"]
    same = dataclasses.replace(case, name=plain.name, peft_type="LORA", lora_decompose=False,
                               runners=plain.runners, base="", note=plain.note)
    assert same == plain
    data = atelier_config_dict(case, tiny_sd15_dir, tmp_path / "d", tmp_path / "w", "cpu")
    config = config_from_dict(data)
    check_supported(config)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
    lora.add_lora(unet, config, "unet")
    assert any(marker in n for n, _ in unet.named_parameters())


# --- The flow-matching families (Flux.1, SD 3.5) --------------------------------------------

FLOW_CASES = ["tiny-flux-64", "tiny-sd35-64", "flux-512", "flux-1024", "sd35-1024"]


def test_quick_bench_runs_the_flow_paths_of_every_runner_on_tiny_flux(tmp_path):
    """limit (the family's objective and predict on latents encoded once), naive (VAE and
    text encoders every step) and atelier (the engine) all train the tiny Flux.1-dev."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--cases", ",".join(FLOW_SMOKE_CASES), "--quick",
         "--device", "cpu", "--json", str(out), "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["case"], r["runner"]) for r in rows] == [
        (case, runner) for case in FLOW_SMOKE_CASES for runner in ("limit", "naive", "atelier")]
    for row in rows:
        assert not row.get("error") and row["steps_measured"] == 3, row
        assert row["step_s_median"] > 0 and row["loss_finite"] is True
        # a velocity target (noise - latents) of unit-scale latents: a loss well above 0
        assert 0.1 < row["loss_last"] < 10, row
    assert "atelier/limit" in done.stdout and "tiny-flux-64" in done.stdout
    assert (tmp_path / "cache" / "models" / "tiny-flux" / "transformer").is_dir()


@pytest.mark.parametrize("name", FLOW_CASES)
def test_flow_cases_train_the_transformer_and_never_a_t5(name, tmp_path):
    from bench.runners import atelier_config_dict
    from trainer.config import check_supported, config_from_dict

    case = CASES[name]
    config = config_from_dict(atelier_config_dict(case, tmp_path / "m", tmp_path / "d",
                                                  tmp_path / "w", "cuda"))
    check_supported(config)
    assert config.model_type.value == case.model_type and case.denoiser == "transformer"
    assert config.transformer.train
    assert config.output_model_format.value == "DIFFUSERS_LORA"
    kinds = dict(case.facts.encoders)
    assert "T5" in kinds.values()
    assert not any(getattr(config, part).train for part in kinds)
    if case.size == "full":  # the GPU sizes: bf16 frozen weights, checkpointed transformer
        assert case.cuda_only and config.transformer.weight_dtype.value == "BFLOAT_16"
        assert config.gradient_checkpointing and config.transformer.gradient_checkpointing


@pytest.mark.parametrize("name, kind", [("tiny-flux-64", "flux"), ("tiny-sd35-64", "sd35")])
def test_tiny_flow_cases_layer_presets_pick_layers_of_their_transformer(name, kind, tmp_path):
    """attn-mlp for Flux, attn-only for SD 3.5 (which has no attn-mlp preset): the engine's
    trainer/lora.py finds layers to adapt in the tiny transformer with them."""
    from bench.runners import atelier_config_dict
    from trainer import lora
    from trainer.config import config_from_dict
    from trainer.models.family import load_family
    from trainer.models.tiny_flow import tiny_flow_model

    case = CASES[name]
    config = config_from_dict(atelier_config_dict(case, tiny_flow_model(kind), tmp_path / "d",
                                                  tmp_path / "w", "cpu"))
    family = load_family(config)
    assert case.lora_layer_preset in type(family).LAYER_PRESETS
    params = lora.add_lora(family.parts["transformer"], config, "transformer")
    assert params and all(p.requires_grad for p in params)


def test_runners_centre_flow_latents_as_the_engine_does(tiny_flux_dir, tiny_sd15_dir):
    """The limit and naive runners' latents are the engine's (trainer/data/cache.py): Flux's
    VAE shifts then scales; SD's only scales, exactly as before."""
    import torch
    from diffusers import AutoencoderKL

    from bench.runners import scaled_latents
    from trainer.data.cache import batch_latents

    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    for folder, shifted in ((tiny_flux_dir, True), (tiny_sd15_dir, False)):
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        assert bool(getattr(vae.config, "shift_factor", None)) == shifted
        with torch.no_grad():
            ours = scaled_latents(vae, vae.encode(pixels).latent_dist.sample(
                torch.Generator().manual_seed(3)))
            engine = batch_latents({"pixel_values": pixels, "caption": ["", ""]}, vae,
                                   torch.Generator().manual_seed(3), torch.device("cpu"))
        assert torch.equal(ours, engine)


def test_full_size_flow_cases_are_refused_where_they_cannot_be_built(tmp_path):
    """On a CPU they are GPU-only; asked for on CUDA where there is none, Flux.1's random
    full-size model is refused (it is built only where it trains), and SD 3.5's says why it
    cannot be built (no stand-in); nothing is allocated."""
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        done = subprocess.run(
            [sys.executable, "-m", "bench", "--cases", "flux-512,flux-512-nf4,sd35-1024",
             "--device", device, "--json", str(out), "--cache-dir", str(tmp_path / "cache")],
            cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = json.loads(out.read_text())
        assert len(rows) == 7 and all(r["step_s_median"] is None for r in rows), rows
        if device == "cpu":
            assert all("GPU-only" in r["skipped"] for r in rows), rows
    flux = [r["skipped"] for r in rows if r["case"].startswith("flux")]
    sd35 = [r["skipped"] for r in rows if r["case"].startswith("sd35")]
    assert len(flux) == 4 and all("on a machine with a CUDA device" in r for r in flux), flux
    assert all("not buildable yet" in r and "T5-XXL tokenizer" in r for r in sd35), sd35
    assert not (tmp_path / "cache" / "models").exists()


def test_the_random_flux_builder_writes_a_folder_the_engine_trains(tmp_path):
    """Flux.1-dev's random full-size builder (trainer/models/random_full.py), narrowed to a
    few channels and one block of each kind: a FluxPipeline folder (CLIP's real tokenizer,
    the T5 tokenizer built in code, Flux.1-dev's scheduler, its VAE scale and shift) that the
    engine loads and trains on, T5's token table one tensor; at full size its parts count
    what FULL_PARAMETERS says."""
    import torch
    from safetensors import safe_open

    from bench.cases import FULL_PARAMETERS
    from helpers import tiny_config
    from trainer.control import Control
    from trainer.loop import train
    from trainer.models import random_full

    narrow = {"transformer": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2,
                              "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6),
                              "joint_attention_dim": 32, "pooled_projection_dim": 32},
              "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
              "text_encoder": {"hidden_size": 32, "intermediate_size": 37,
                               "num_hidden_layers": 1, "num_attention_heads": 2},
              "text_encoder_2": {"d_model": 32, "d_ff": 37, "num_layers": 1, "num_heads": 2,
                                 "d_kv": 16}}
    model = random_full._build_random_flux(tmp_path / "flux", seed=0, dtype=torch.bfloat16,
                                           overrides=narrow)
    assert random_full.is_built(model)
    assert json.loads((model / "vae" / "config.json").read_text())["scaling_factor"] == 0.3611
    with safe_open(str(next((model / "text_encoder_2").glob("*.safetensors"))), "pt") as f:
        assert [k for k in f.keys() if "embed" in k or "shared" in k] == ["shared.weight"]
    config = tiny_config(model, tmp_path, model_type="FLUX_DEV_1", text_encoder={"train": False},
                         output_model_format="DIFFUSERS_LORA", epochs=1, batch_size=5,
                         aspect_ratio_bucketing=False)
    result = train(config, Control())
    assert result.global_step == 1 and Path(result.output_path).is_file()
    full = {part: sum(p.numel() for p in m.parameters())
            for part, m in random_full.flow_meta_parts("flux").items()}
    assert full == FULL_PARAMETERS["flux"]


def test_flow_sizes_are_the_meta_device_counts_of_the_real_configs():
    """FULL_PARAMETERS and ACTIVATION_GB_256 of Flux.1-dev and SD 3.5 Large are what
    bench/meta_counts.py counts (the activations scaled by SD 1.5's measured/counted ratio),
    and each GPU case's note states its estimated peak."""
    import re

    from bench import meta_counts
    from bench.cases import ACTIVATION_GB_256, FULL_PARAMETERS

    reference = ACTIVATION_GB_256["sd15"] / meta_counts.saved_activation_gb("sd15")
    for family in ("flux", "sd35"):
        assert FULL_PARAMETERS[family] == meta_counts.parameter_counts(family)
        counted = meta_counts.saved_activation_gb(family) * reference
        assert ACTIVATION_GB_256[family] == pytest.approx(counted, abs=0.05)
    assert 11.8e9 < FULL_PARAMETERS["flux"]["transformer"] < 12.0e9  # "Flux.1 is 12B"
    for name in ("flux-512", "flux-1024", "sd35-1024"):
        case = CASES[name]
        stated = int(re.search(r"peak ~(\d+) GB", case.note).group(1))
        assert stated == round(estimate_peak_gb(case, "atelier", "cuda")), name


# --- Z-Image, Qwen-Image, Flux.2 klein -------------------------------------------------------

NEW_FLOW_CASES = [("tiny-z-image-64", "Z_IMAGE", "attn-mlp", "tiny_z_image_dir"),
                  ("tiny-qwen-64", "QWEN", "attn-mlp", "tiny_qwen_image_dir"),
                  ("tiny-flux2-64", "FLUX_2", "blocks", "tiny_flux2_dir")]


@pytest.mark.parametrize("name, model_type, preset, fixture", NEW_FLOW_CASES)
def test_new_flow_cases_train_their_transformer_on_onetrainers_default_preset(
        name, model_type, preset, fixture, request, tmp_path):
    """Each case is its family on OneTrainer's default LoRA preset (Z-Image and Qwen-Image
    attn-mlp, Flux.2 blocks), run by every runner; the engine accepts its config, keeps the
    Qwen text encoder frozen, and its preset picks layers of the tiny transformer."""
    from bench.runners import atelier_config_dict
    from trainer import lora
    from trainer.config import check_supported, config_from_dict
    from trainer.models.family import load_family

    case = CASES[name]
    assert (case.model_type, case.lora_layer_preset, case.size) == (model_type, preset, "tiny")
    assert case.runners == ("limit", "naive", "atelier")
    config = config_from_dict(atelier_config_dict(case, request.getfixturevalue(fixture),
                                                  tmp_path / "d", tmp_path / "w", "cpu"))
    check_supported(config)
    assert config.transformer.train and not config.text_encoder.train
    family = load_family(config)
    assert preset in type(family).LAYER_PRESETS
    params = lora.add_lora(family.parts["transformer"], config, "transformer")
    assert params and all(p.requires_grad for p in params)


def test_worker_builds_the_new_families_tiny_models_with_their_own_builders(monkeypatch,
                                                                            tmp_path):
    """worker.build_model calls what `python -m trainer make-tiny-model z-image|qwen|flux2`
    calls, into the case's cache folder (recorded here instead of built: the builders have
    tests of their own)."""
    import importlib

    from bench import worker

    built = []
    for module, function in worker._TINY_BUILDERS.values():
        monkeypatch.setattr(importlib.import_module(module), function,
                            lambda folder, f=function: built.append((f, folder)))
    for name in ("tiny-z-image-64", "tiny-qwen-64", "tiny-flux2-64"):
        case = CASES[name]
        worker.build_model(case, tmp_path / case.model_key())
    assert built == [("build_tiny_z_image_model", tmp_path / "tiny-z-image"),
                     ("build_tiny_qwen_image_model", tmp_path / "tiny-qwen"),
                     ("build_tiny_flux2_model", tmp_path / "tiny-flux2")]


@pytest.mark.parametrize("model_type, fixture", [("QWEN", "tiny_qwen_image_dir"),
                                                 ("FLUX_2", "tiny_flux2_dir")])
def test_runners_draw_wrapped_vae_latents_as_the_engine_does(model_type, fixture, request):
    """Qwen-Image's and Flux.2's VAEs are read through the family's wrapper (normalised
    latents; Qwen's distribution has no `sample`): the limit and naive runners' latents are
    the engine's (trainer/data/cache.py) for the same generator."""
    import torch

    from bench.runners import sample_latents, scaled_latents
    from trainer.config import config_from_dict
    from trainer.data.cache import batch_latents
    from trainer.models.family import load_family

    config = config_from_dict({"model_type": model_type,
                               "base_model_name": str(request.getfixturevalue(fixture))})
    vae = load_family(config).vae
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ours = scaled_latents(vae, sample_latents(vae, pixels, torch.Generator().manual_seed(3)))
        engine = batch_latents({"pixel_values": pixels, "caption": ["", ""]}, vae,
                               torch.Generator().manual_seed(3), torch.device("cpu"))
    assert ours.shape == engine.shape == (2, vae.config.latent_channels, 8, 8)
    assert torch.allclose(ours, engine, atol=1e-6)
