"""Presets by GPU memory (issue 26): for SDXL, Flux.1, Chroma and SD 3.5 LoRAs, an 8, 16 and
24 GB variant whose memory estimate (trainer/memory_estimate.py, the standard models counted
from their configs) stays within 90 % of its GPU, each a different recipe: the smaller GPU's
preset would not be needed on the larger one, and the larger one's does not fit the smaller."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer import memory_estimate as M
from trainer.config import check_supported, config_from_dict

PRESETS = Path(__file__).parents[1] / "presets"
SIZES = (8, 16, 24)
FAMILIES = {"sdxl": "STABLE_DIFFUSION_XL_10_BASE", "flux": "FLUX_DEV_1", "chroma": "CHROMA_1",
            "sd35": "STABLE_DIFFUSION_35"}


def preset(family: str, gb: int):
    data = json.loads((PRESETS / f"{family}_lora_{gb}gb.json").read_text(encoding="utf-8"))
    assert data["__name"].endswith(f"LoRA, {gb} GB GPU")
    return config_from_dict({k: v for k, v in data.items() if not k.startswith("__")})


@pytest.mark.parametrize("family", FAMILIES)
def test_each_memory_preset_fits_its_gpu_and_needs_more_than_the_smaller_one(family):
    totals = {}
    for gb in SIZES:
        config = preset(family, gb)
        assert config.model_type.value == FAMILIES[family]
        assert config.training_method.value == "LORA"
        check_supported(config)
        result = M.estimate(config, device_gb=gb)
        assert result.total_gb <= 0.9 * gb, (gb, result.total_gb)
        assert result.fits and M.warning_sentence(config, result) is None
        totals[gb] = result.total_gb
    # each recipe uses what its GPU has: the larger GPU's preset would not fit the smaller GPU
    for smaller, larger in zip(SIZES, SIZES[1:]):
        assert totals[larger] > 0.9 * smaller, totals
