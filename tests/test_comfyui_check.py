"""tools/comfyui_check.py without ComfyUI: its key matching and delta comparison on synthetic
adapter files, and the committed results table (docs/comfyui_results.md) against the formats
the code offers."""
import importlib.util
import math
import pathlib
import re
import sys

import pytest
import torch

from trainer.config import ModelType, TrainingMethod, output_formats

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "comfyui_results.md"


def _load_tool():
    spec = importlib.util.spec_from_file_location("comfyui_check",
                                                  ROOT / "tools" / "comfyui_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = _load_tool()


def _lora(out=6, inp=5, rank=2, alpha=1.0, seed=0, conv=False):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, inp, *((3, 3) if conv else ()), generator=g)
    up = torch.randn(out, rank, *((1, 1) if conv else ()), generator=g)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha)}


def test_modules_are_grouped_by_prefix_and_bundled_embeddings_are_not_layers():
    keys = ["lora_unet_a_to_q.lora_down.weight", "lora_unet_a_to_q.lora_up.weight",
            "lora_unet_a_to_q.alpha", "lora_unet_a_to_q.dora_scale",
            "unet.b.to_k.lora_A.weight", "unet.b.to_k.lora_B.weight",
            "unet.b.to_k.lora_magnitude_vector.weight",
            "lora_te_c.hada_w1_a", "lora_te_c.hada_w2_b", "lora_unet_d.lokr_w1",
            "bundle_emb.<x>.clip_l", "bundle_emb.<x>.string_to_param.*"]
    modules = check.group_modules(keys)
    assert set(modules) == {"lora_unet_a_to_q", "unet.b.to_k", "lora_te_c", "lora_unet_d"}
    assert "lora_magnitude_vector.weight" in modules["unet.b.to_k"]
    assert modules["lora_unet_a_to_q"] == {
        "lora_down.weight": "lora_unet_a_to_q.lora_down.weight",
        "lora_up.weight": "lora_unet_a_to_q.lora_up.weight",
        "alpha": "lora_unet_a_to_q.alpha", "dora_scale": "lora_unet_a_to_q.dora_scale"}
    assert check.split_adapter_key("model.weight") is None


def test_lora_delta_is_up_times_down_times_alpha_over_rank():
    t = _lora(rank=2, alpha=1.0)
    expected = t["lora_up.weight"] @ t["lora_down.weight"] * 0.5
    assert torch.allclose(check.adapter_delta(t, torch.zeros(6, 5)), expected)
    # peft's names carry no alpha: the product is the change itself
    peft = {"lora_A.weight": t["lora_down.weight"], "lora_B.weight": t["lora_up.weight"]}
    assert torch.allclose(check.adapter_delta(peft, torch.zeros(6, 5)),
                          t["lora_up.weight"] @ t["lora_down.weight"])


def test_conv_lora_delta_takes_the_kernel_shape():
    t = _lora(out=4, inp=3, rank=2, alpha=2.0, conv=True)
    delta = check.adapter_delta(t, torch.zeros(4, 3, 3, 3))
    assert delta.shape == (4, 3, 3, 3)
    # output channel o, input i, kernel (y, x): sum over rank of up[o, r] * down[r, i, y, x]
    manual = torch.einsum("or,riyx->oiyx", t["lora_up.weight"][:, :, 0, 0],
                          t["lora_down.weight"])
    assert torch.allclose(delta, manual)


def test_loha_delta_is_the_hadamard_product_of_two_low_rank_products():
    g = torch.Generator().manual_seed(1)
    t = {name: torch.randn(*shape, generator=g) for name, shape in (
        ("hada_w1_a", (6, 2)), ("hada_w1_b", (2, 5)), ("hada_w2_a", (6, 2)), ("hada_w2_b", (2, 5)))}
    t["alpha"] = torch.tensor(1.0)
    delta = check.adapter_delta(t, torch.zeros(6, 5))
    entry = sum(t["hada_w1_a"][3, r] * t["hada_w1_b"][r, 4] for r in range(2)) * sum(
        t["hada_w2_a"][3, r] * t["hada_w2_b"][r, 4] for r in range(2)) * 0.5
    assert delta[3, 4].item() == pytest.approx(entry.item(), rel=1e-5)


def test_lokr_delta_is_a_kronecker_product_scaled_only_when_a_factor_is_low_rank():
    g = torch.Generator().manual_seed(2)
    w1 = torch.randn(2, 2, generator=g)
    w2a, w2b = torch.randn(3, 1, generator=g), torch.randn(1, 4, generator=g)
    low_rank = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(4.0)}
    delta = check.adapter_delta(low_rank, torch.zeros(6, 8))
    # block (i, j) of a Kronecker product is w1[i, j] * w2; alpha / rank = 4 / 1
    assert torch.allclose(delta[3:6, 0:4], w1[1, 0] * (w2a @ w2b) * 4.0)
    whole = {"lokr_w1": w1, "lokr_w2": w2a @ w2b, "alpha": torch.tensor(4.0)}
    assert torch.allclose(check.adapter_delta(whole, torch.zeros(6, 8)), delta / 4.0)


def _dora_case():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    t = _lora(rank=2, alpha=2.0, seed=4)
    low_rank = t["lora_up.weight"] @ t["lora_down.weight"]
    return base, t, low_rank, torch.rand(6, generator=g) + 0.5


def test_peft_dora_rescales_each_output_row_to_its_magnitude():
    base, t, low_rank, magnitude = _dora_case()
    peft = {"lora_A.weight": t["lora_down.weight"], "lora_B.weight": t["lora_up.weight"],
            "lora_magnitude_vector": magnitude}
    merged = base + check.adapter_delta(peft, base)
    assert torch.allclose(merged.norm(dim=1), magnitude, atol=1e-5)
    direction = base + low_rank
    assert torch.allclose(merged / merged.norm(dim=1, keepdim=True),
                          direction / direction.norm(dim=1, keepdim=True), atol=1e-5)


def test_a_kohya_dora_scale_written_from_peft_gives_the_same_weight():
    # Atelier's file: dora_scale = m * ||W0|| / ||W0 + dW|| per output row (trainer/lora.py)
    base, t, low_rank, magnitude = _dora_case()
    peft = {"lora_A.weight": t["lora_down.weight"], "lora_B.weight": t["lora_up.weight"],
            "lora_magnitude_vector": magnitude}
    rows = lambda w: w.norm(dim=1)  # noqa: E731
    kohya = dict(t, dora_scale=(magnitude * rows(base) / rows(base + low_rank * 1.0)
                                ).reshape(-1, 1))
    kohya["alpha"] = torch.tensor(2.0)  # alpha / rank = 1: the same dW as peft's
    assert torch.allclose(check.adapter_delta(kohya, base), check.adapter_delta(peft, base),
                          atol=1e-5)
    # read as peft's magnitude instead, the same numbers give another weight
    wrong = dict(peft, lora_magnitude_vector=kohya["dora_scale"].flatten())
    assert not torch.allclose(check.adapter_delta(wrong, base), check.adapter_delta(peft, base),
                              atol=1e-3)


def test_a_dora_scale_on_the_input_axis_sets_each_columns_norm():
    base, t, low_rank, _ = _dora_case()
    magnitude = torch.rand(1, 5) + 0.5
    merged = base + check.adapter_delta(dict(t, dora_scale=magnitude), base)
    assert torch.allclose(merged.norm(dim=0), magnitude.flatten(), atol=1e-5)


def test_relative_error_is_the_largest_difference_over_the_largest_change():
    expected = torch.tensor([[2.0, -4.0]])
    assert check.relative_error(expected, expected) == 0.0
    assert check.relative_error(torch.tensor([[2.0, -3.0]]), expected) == pytest.approx(0.25)
    assert check.relative_error(torch.zeros(2, 1), expected) == math.inf
    assert check.relative_error(torch.zeros(1, 2), expected) == 1.0  # a change not applied


def test_a_layer_the_adapters_leave_alone_is_measured_against_its_weight():
    weight = torch.full((1, 2), 4.0)
    rounding = torch.tensor([[1e-6, 0.0]])
    assert check.is_unchanged(torch.zeros(1, 2), weight)
    assert check.relative_error(rounding, torch.zeros(1, 2), weight) == pytest.approx(2.5e-7)
    # a trained layer is still measured against its change, however small the weight makes it
    change = torch.tensor([[1e-3, 0.0]])
    assert not check.is_unchanged(change, weight)
    assert check.relative_error(change * 1.5, change, weight) == pytest.approx(0.5)


def test_key_report_counts_what_the_loader_left_and_names_bundled_embeddings_apart():
    keys = ["a.lora_down.weight", "a.lora_up.weight", "a.alpha", "b.lora_down.weight",
            "b.lora_up.weight", "bundle_emb.<x>.clip_l"]
    report = check.key_report(keys, {"a.lora_down.weight", "a.lora_up.weight", "a.alpha"})
    assert (report.loaded, report.total, report.complete) == (3, 6, False)
    assert report.not_loaded == ["b.lora_down.weight", "b.lora_up.weight"]
    assert report.embeddings_not_loaded == ["bundle_emb.<x>.clip_l"]
    assert check.key_report(keys[:3], keys[:3]).complete


def _patched(originals, file, targets):
    """What a correct loader does: add each module's change to the weight it aims at."""
    patched = {k: v.clone() for k, v in originals.items()}
    modules = check.group_modules(file)
    for module, (key, part) in targets.items():
        tensors = {name: file[k] for name, k in modules[module].items()}
        view = patched[key] if part is None else patched[key].narrow(*part)
        view += check.adapter_delta(tensors, view.clone())
    return patched


def test_compare_layers_finds_a_faithful_load_exact_and_a_swapped_one_wrong():
    g = torch.Generator().manual_seed(5)
    originals = {"q.weight": torch.randn(6, 5, generator=g),
                 "k.weight": torch.randn(6, 5, generator=g),
                 "qkv.weight": torch.randn(12, 5, generator=g)}
    file = {}
    for i, name in enumerate(["lora_q", "lora_k", "lora_fused_q", "lora_fused_k"]):
        file.update({f"{name}.{k}": v for k, v in _lora(seed=10 + i).items()})
    targets = {"lora_q": ("q.weight", None), "lora_k": ("k.weight", None),
               "lora_fused_q": ("qkv.weight", (0, 0, 6)), "lora_fused_k": ("qkv.weight", (0, 6, 6))}
    faithful = check.compare_layers(file, targets, originals,
                                    _patched(originals, file, targets))
    assert len(faithful) == 4
    assert max(r.relative_error for r in faithful) < 1e-6
    # q's change applied to k's weight and k's to q's: the comparison must see it
    swapped = _patched(originals, file, {"lora_q": ("k.weight", None),
                                         "lora_k": ("q.weight", None),
                                         "lora_fused_q": ("qkv.weight", (0, 6, 6)),
                                         "lora_fused_k": ("qkv.weight", (0, 0, 6))})
    wrong = check.compare_layers(file, targets, originals, swapped)
    assert min(r.relative_error for r in wrong) > 0.1


def _swap_halves(weight):
    # ComfyUI's swap_scale_shift: diffusers keeps (scale, shift) rows, the original (shift, scale)
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def test_a_target_with_a_conversion_is_compared_after_converting_the_expected_change():
    g = torch.Generator().manual_seed(6)
    originals = {"norm_out.weight": torch.randn(6, 5, generator=g)}
    file = {f"lora_norm_out.{k}": v for k, v in _lora(seed=20).items()}
    delta = check.adapter_delta(_lora(seed=20), torch.zeros(6, 5))
    # ComfyUI adds the converted change (its key map's third element) to the weight
    patched = {"norm_out.weight": originals["norm_out.weight"] + _swap_halves(delta)}
    converted = check.compare_layers(file, {"lora_norm_out": ("norm_out.weight", None,
                                                              _swap_halves)},
                                     originals, patched)
    assert converted[0].relative_error < 1e-6
    # the same patch read without the conversion is a wrong load
    plain = check.compare_layers(file, {"lora_norm_out": ("norm_out.weight", None)},
                                 originals, patched)
    assert plain[0].relative_error > 0.1


def test_an_embedding_files_vectors_are_found_for_each_encoder():
    l, g = torch.randn(2, 4), torch.randn(2, 8)
    bundled = {"bundle_emb.<x>.clip_l": l, "bundle_emb.<x>.clip_g": g,
               "a.lora_up.weight": torch.zeros(1)}
    assert torch.equal(check.expected_embedding(bundled, "clip_g"), g)
    assert torch.equal(check.expected_embedding({"emb_params": l}, "clip_l"), l)
    sd15 = {"bundle_emb.<x>.string_to_param.*": l}
    assert torch.equal(check.expected_embedding(sd15, "clip_l"), l)
    assert check.expected_embedding({"clip_l": l}, "clip_g") is None


# --- the committed results table keeps up with the formats the code offers -------------------

def _table_rows() -> set[tuple[str, str]]:
    rows = set()
    for line in RESULTS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"[A-Z0-9_]+", cells[0]) and cells[1].isupper():
            rows.add((cells[0], cells[1]))
    return rows


def _offered() -> set[tuple[str, str]]:
    offered = set()
    for model_type in ModelType:
        for fmt in output_formats(model_type, TrainingMethod.LORA):
            offered.add((model_type.value, fmt))
        if "ORIGINAL_SINGLE_FILE" in output_formats(model_type, TrainingMethod.FINE_TUNE):
            offered.add((model_type.value, "ORIGINAL_SINGLE_FILE"))
    return offered


def test_every_output_format_of_every_family_has_a_row_in_the_comfyui_results():
    missing = sorted(_offered() - _table_rows())
    assert not missing, (f"{RESULTS.name} has no row for {missing}: run tools/comfyui_check.py "
                         "on that family's output and add its result")


def test_the_results_table_reading_sees_the_rows_it_should():
    # guards the test above from passing on a table it cannot read
    rows = _table_rows()
    assert ("STABLE_DIFFUSION_15", "KOHYA_LORA") in rows
    assert len(rows) >= len(_offered()) - 2


# The runs behind the table trained every text encoder a family lets train: not T5 (Chroma's
# only one) nor the Qwen3 / Qwen2.5-VL encoders of Z-Image, Qwen-Image and Flux.2.
TRAINED_ENCODERS = {"STABLE_DIFFUSION_15", "STABLE_DIFFUSION_15_INPAINTING",
                    "STABLE_DIFFUSION_XL_10_BASE", "STABLE_DIFFUSION_XL_10_BASE_INPAINTING",
                    "FLUX_DEV_1", "STABLE_DIFFUSION_3", "STABLE_DIFFUSION_35"}


def _result_rows() -> list[dict]:
    rows = []
    for line in RESULTS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and re.fullmatch(r"[A-Z0-9_]+", cells[0]) and cells[1].isupper():
            adapter, _, preset = cells[2].replace("+EMB", "").partition(" (")
            # the layer preset of the run (tools/comfyui_runs/make_runs.py): the families
            # without a kohya layout were trained on "full", one Flux.2 run on "blocks"
            preset = preset.removesuffix(" preset)") or (
                "full" if cells[0] in ("QWEN", "Z_IMAGE", "FLUX_2") else "attn-only")
            rows.append({"model_type": cells[0], "format": cells[1], "adapter": adapter,
                         "preset": preset, "result": cells[7]})
    return rows


def test_the_partial_loads_measured_are_the_ones_the_engine_warns_about():
    from trainer.advice import COMFYUI_PARTIAL, comfyui_loads_part
    from trainer.config import config_from_dict
    rows = [r for r in _result_rows() if r["format"] != "ORIGINAL_SINGLE_FILE"
            and r["adapter"] in ("LORA", "DORA", "LOHA", "LOKR")]
    partial = {(r["model_type"], r["format"], r["adapter"]) for r in rows
               if "partial" in r["result"]}
    assert partial and len(partial) < len(rows)
    assert partial <= set(COMFYUI_PARTIAL), partial - set(COMFYUI_PARTIAL)
    for row in rows:  # the warning of the run's own settings (family, format, adapter, preset)
        adapter = row["adapter"]
        config = config_from_dict({
            "model_type": row["model_type"], "output_model_format": row["format"],
            "lora_decompose": adapter == "DORA", "concepts": [{"path": "x"}],
            "peft_type": adapter if adapter in ("LOHA", "LOKR") else "LORA",
            "lora_layer_preset": row["preset"],
            "text_encoder": {"train": row["model_type"] in TRAINED_ENCODERS}})
        warned = comfyui_loads_part(config) is not None
        assert warned == ("partial" in row["result"]), row
    # an entry not measured itself stands on a measured partial load of its family and format
    measured = {key[:2] for key in partial}
    assert {key[:2] for key in COMFYUI_PARTIAL} <= measured


def test_the_model_card_gives_a_comfyui_recipe_only_for_files_that_load_whole():
    # the runs behind the table trained every text encoder a family lets train (T5 none; the
    # Qwen3 / Qwen2.5-VL encoders of Z-Image, Qwen-Image and Flux.2 none)
    from trainer.config import config_from_dict
    from trainer.model_card import loaders
    frozen = {"CHROMA_1", "QWEN", "Z_IMAGE", "FLUX_2"}
    for row in _result_rows():
        if (row["format"] == "ORIGINAL_SINGLE_FILE" or row["adapter"] not in ("LORA", "DORA")
                or row["result"].startswith("not checked")):
            continue
        config = config_from_dict({
            "model_type": row["model_type"], "output_model_format": row["format"],
            "lora_decompose": row["adapter"] == "DORA", "concepts": [{"path": "x"}],
            "lora_layer_preset": row["preset"],
            "text_encoder": {"train": row["model_type"] not in frozen}})
        claimed = "comfyui" in loaders(config)
        assert claimed == row["result"].startswith(("complete", "LoRA complete")), row


def test_choosing_a_format_comfyui_loads_in_part_warns_with_what_it_drops():
    from trainer.advice import comfyui_loads_part
    from trainer.config import config_from_dict

    def warning(**settings):
        return comfyui_loads_part(config_from_dict({"concepts": [{"path": "x"}], **settings}))

    message = warning(output_model_format="DIFFUSERS_LORA")
    assert "to_q" in message and "KOHYA_LORA" in message
    assert warning(output_model_format="KOHYA_LORA") is None
    assert warning(model_type="FLUX_DEV_1", output_model_format="DIFFUSERS_LORA") is None
    flux_dora = warning(model_type="FLUX_DEV_1", output_model_format="DIFFUSERS_LORA",
                        lora_decompose=True)
    assert "DoRA magnitude" in flux_dora
    # SD 3 loses only a text encoder's projection: no warning when no text encoder trains
    assert "text_projection" in warning(model_type="STABLE_DIFFUSION_3",
                                        output_model_format="DIFFUSERS_LORA")
    assert warning(model_type="STABLE_DIFFUSION_3", output_model_format="DIFFUSERS_LORA",
                   text_encoder={"train": False}) is None


def test_a_run_in_a_format_comfyui_loads_in_part_says_so(tiny_sd15_dir, tmp_path):
    """The run warns once at its start (the page's warnings, the CLI's stderr); the file is
    still written in the format chosen."""
    from helpers import tiny_config

    from trainer.control import Control
    from trainer.loop import train
    events: list[dict] = []
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=1, output_model_format="DIFFUSERS_LORA")
    result = train(config, Control(on_event=events.append))
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert sum("ComfyUI loads this file only in part" in w for w in warnings) == 1
    assert result.output_path.endswith(".safetensors")
    kohya = tiny_config(tiny_sd15_dir, tmp_path / "k", epochs=1, output_model_format="KOHYA_LORA")
    events.clear()
    train(kohya, Control(on_event=events.append))
    assert not [e for e in events if e["type"] == "warning" and "ComfyUI" in e["message"]]
