"""The benchmark suite runs end to end on the tiny models (a smoke test of the bench: no
timing is asserted, only that every runner measured what it should and the report holds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cases import CASES, SMOKE_CASES, estimate_peak_gb
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
    assert not CASES["sd15-256-te-gc"].unet_checkpointing
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
