"""tools/forge_check.py without Forge: its expected shape, the vectors it compares and how, the
prompt walk, the LoRA loader's unmatched-key rule, and the committed results table
(docs/forge_results.md) against the files it must cover."""
import importlib.util
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "forge_results.md"


def _load_tool():
    spec = importlib.util.spec_from_file_location("forge_check", ROOT / "tools" / "forge_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = _load_tool()


def test_expected_shape_is_forges_constant_for_real_widths_and_the_same_rule_for_tiny_ones():
    assert check.forge_expected_shape("sd15", check.REAL_WIDTHS) == 768
    assert check.forge_expected_shape("sdxl", check.REAL_WIDTHS) == 2048
    assert check.forge_expected_shape("sd15", {"clip_l": 32}) == 32
    assert check.forge_expected_shape("sdxl", {"clip_l": 32, "clip_g": 64}) == 96


def test_the_vectors_forge_inserts_are_the_encoders_entry_or_the_one_tensor():
    l, g = torch.randn(2, 4), torch.randn(2, 6)
    assert check.vectors_used({"clip_l": l, "clip_g": g}, "clip_g") is g
    assert check.vectors_used(l, "clip_l") is l


def test_stored_vectors_come_from_atelier_keys_and_a_lora_has_none():
    l, g = torch.randn(2, 4), torch.randn(2, 6)
    assert check.stored_vectors({"emb_params": l}, "clip_l") is l
    assert check.stored_vectors({"emb_params": l}, "clip_g") is None
    assert check.stored_vectors({"clip_l": l, "clip_g": g}, "clip_g") is g
    lora = {"bundle_emb.<x>.clip_l": l, "lora_unet_a.lora_down.weight": torch.randn(2, 3)}
    assert check.stored_vectors(lora, "clip_l") is None
    assert check.bundled_vectors(lora, "<x>", "clip_l") is l
    assert check.bundled_vectors(lora, "<y>", "clip_l") is None


def test_compare_is_exact_only_for_equal_values_of_the_same_shape():
    stored = torch.randn(2, 4).half()
    same = check.compare(stored.float(), stored)  # Forge reads every file as float32
    assert same == {"exact": True, "max_abs_difference": 0.0}
    nudged = stored.float().clone()
    nudged[1, 2] += 1e-3
    off = check.compare(nudged, stored)
    assert not off["exact"] and off["max_abs_difference"] == pytest.approx(1e-3, rel=1e-3)
    assert check.compare(stored.float()[:1], stored) == {
        "exact": False, "reason": "shape (1, 4) vs (2, 4)"}
    assert check.compare(None, stored)["exact"] is False
    assert check.compare(stored.float(), None)["reason"] == "nothing stored"


class _Named:
    def __init__(self, name):
        self.name = name


class _Database:
    """Forge's lookup contract: (embedding, token length) of the longest name at a position."""

    def __init__(self, names):
        self.names = names  # {name: token ids}

    def find_embedding_at_position(self, tokens, offset):
        for name, ids in sorted(self.names.items(), key=lambda x: -len(x[1])):
            if tokens[offset:offset + len(ids)] == ids:
                return _Named(name), len(ids)
        return None, None


def test_the_prompt_walk_finds_each_name_once_and_skips_its_tokens():
    database = _Database({"ab": [1, 2], "abc": [1, 2, 3], "c": [3]})
    assert check.embeddings_in_prompt(database, [9, 1, 2, 3, 3, 8]) == ["abc", "c"]
    assert check.embeddings_in_prompt(database, [1, 2, 9]) == ["ab"]
    assert check.embeddings_in_prompt(database, [9, 8]) == []


def test_more_than_twelve_unmatched_keys_make_forge_drop_the_whole_lora():
    keys = {f"bundle_emb.<p{i}>.clip_l": 0 for i in range(12)}
    result = check.unmatched_lora_keys(keys)
    assert result["lora_applied"] and len(result["bundle_keys_unmatched"]) == 12
    result = check.unmatched_lora_keys({**keys, "lora_unet_x.hada_w1_a": 0})
    assert not result["lora_applied"]
    assert result["bundle_keys_unmatched"] == sorted(keys)


def test_the_best_case_key_map_holds_every_adapter_module_and_no_embedding():
    tensors = {"lora_unet_a.lora_down.weight": 0, "lora_unet_a.lora_up.weight": 0,
               "lora_unet_a.alpha": 0, "lora_te_b.dora_scale": 0,
               "bundle_emb.<x>.clip_l": 0, "bundle_emb.<x>.clip_g": 0}
    assert check.best_case_key_map(tensors) == {"lora_unet_a": "lora_unet_a.weight",
                                                "lora_te_b": "lora_te_b.weight"}


def test_the_placeholder_comes_from_atelier_header_or_the_bundle():
    assert check.placeholder_of({"emb_params": 0}, {"atelier_placeholder": "<zq>"}) == "<zq>"
    assert check.placeholder_of({"bundle_emb.<zq>.clip_l": 0}, {}) == "<zq>"
    assert check.placeholder_of({"emb_params": 0}, {}) == ""


def test_the_table_names_the_prompt_word_only_for_registered_files_and_flags_differences():
    registered = check.FileReport(file="a.safetensors", kind="standalone", status="registered",
                                  name="out-zq", prompt_finds_name=True, vectors=2,
                                  exact={"clip_l": {"exact": True}, "clip_g": {"exact": False,
                                                                                "reason": "x"}},
                                  exact_bundle={"clip_l": {"exact": False}})
    errored = check.FileReport(file="b.safetensors", kind="LoRA", status="errored",
                               reason="multiple terms", name="",
                               lora_loader={"bundle_keys_unmatched": ["k1", "k2"]})
    lines = check.table([("A", registered), ("B", errored)]).splitlines()
    assert len(lines) == 4
    assert "| `out-zq` | yes / no | 2 |" in lines[2]
    assert "clip_l: exact, ≠ LoRA's bundle_emb; clip_g: differs (x)" in lines[2]
    assert lines[3].startswith("| B | errored: multiple terms; as a LoRA (models/Lora) its 2 ")
    assert lines[3].endswith("| – | – | – | – |")


def test_the_committed_results_cover_every_file_kind_the_brief_names():
    text = RESULTS.read_text(encoding="utf-8")
    embeddings = text.split("## LoRAs", 1)[0]
    rows = [line for line in embeddings.splitlines() if line.startswith("| sd")]
    assert "dfdcbab685e57677014f05a3309b48cc87383167" in text
    kinds = {"sd15 standalone": "sd15 `sd15_lora-atelierx", "sdxl standalone":
             "sdxl `sdxl_lora-atelierx", "sd15 LoRA": "sd15 `sd15_lora.safetensors",
             "sdxl LoRA": "sdxl `sdxl_lora.safetensors", "sd15 embedding run": "sd15 `sd15_ti"}
    for kind, start in kinds.items():
        assert any(row.startswith(f"| {start}") for row in rows), kind
    # the rows' cells agree with what the README and tooltips now say
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if "_lora.safetensors" in cells[0]:
            assert cells[1].startswith("errored") and cells[2] == "–"
        elif cells[1].startswith("registered"):
            assert cells[3] == "yes / no" and "differs" not in cells[5]


def _card_usage(overrides, weights, embeddings):
    from trainer.config import config_from_dict
    from trainer.model_card import CardEmbedding, CardFacts, build_model_card
    facts = CardFacts(repo_id="alice/cat", weights=weights, config_file="cat.json",
                      base_model=None, base_model_label="local", instance_prompt=None,
                      samples=(), steps=1, epochs=1,
                      embeddings=tuple(CardEmbedding(p, f) for p, f in embeddings))
    text = build_model_card(config_from_dict(overrides), facts).text
    return text.split("## How to use", 1)[1]


def test_the_model_cards_forge_recipe_is_the_measured_one():
    """The file name in the prompt (what Forge registers), never the bundled copies, and
    A1111 said to be unchecked."""
    ti = _card_usage({"training_method": "EMBEDDING", "output_model_format": "SAFETENSORS",
                      "additional_embeddings": [{"placeholder": "<zq>"}]},
                     "zq.safetensors", [("<zq>", "zq.safetensors")])
    assert ("Forge: put `zq.safetensors` in its `embeddings/` folder and write `zq` (the file "
            "name, not the placeholder)") in ti
    assert "AUTOMATIC1111 was not checked" in ti
    lora = _card_usage({"additional_embeddings": [{"placeholder": "<zq>"}]},
                       "cat.safetensors", [("<zq>", "cat-zq.safetensors")])
    assert "read them with the LoRA" not in lora
    assert "(`cat-zq`) in the prompt where the placeholder goes; Forge does not use" in lora
    assert "Forge applies none" not in lora
    unbundled = _card_usage({"additional_embeddings": [{"placeholder": "<zq>"}],
                             "bundle_additional_embeddings": False},
                            "cat.safetensors", [("<zq>", "cat-zq.safetensors")])
    assert "The trained embeddings are not in the LoRA file" in unbundled


@pytest.mark.parametrize("count, dropped", [(6, False), (7, True)])
def test_the_card_warns_when_bundled_keys_pass_forges_limit(count, dropped):
    placeholders = [f"<p{i}>" for i in range(count)]
    usage = _card_usage({"model_type": "STABLE_DIFFUSION_XL_10_BASE",
                         "additional_embeddings": [{"placeholder": p} for p in placeholders]},
                        "cat.safetensors",
                        [(p, f"cat-p{i}.safetensors") for i, p in enumerate(placeholders)])
    assert ("Forge applies none of this LoRA: its 14 bundled keys" in usage) == dropped


def _lora_rows(section_title: str = "## LoRAs") -> dict[str, list[str]]:
    """docs/forge_results.md's LoRA (or another) table: file name -> cells."""
    section = RESULTS.read_text(encoding="utf-8").split(section_title, 1)[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| sd"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[1].strip("`")] = cells
    return rows


def test_forge_applies_kohya_and_legacy_loras_whole_and_the_card_offers_forge_only_those():
    """What tools/forge_lora_check.py measured with Forge's code: every KOHYA_LORA and
    LEGACY_LORA adapter type applied whole and exactly; COMFY_LORA only without text-encoder
    keys; DIFFUSERS_LORA never. The model card's A1111/Forge recipe follows it."""
    import re

    from trainer.config import ModelFormat
    from trainer.model_card import LOADERS
    rows = _lora_rows()
    for family in ("sd15", "sdxl", "sd15-inpaint", "sdxl-inpaint"):
        adapters = {"KOHYA_LORA": ("LORA", "DORA", "LOHA", "LOKR"),
                    "LEGACY_LORA": ("LORA", "LOHA", "LOKR")}
        for fmt, kinds in adapters.items():
            for adapter in kinds if "inpaint" not in family else ("LORA",):
                cells = rows[f"{family}__{fmt}__{adapter}.safetensors"]
                matched, total = cells[2].split()[0].split("/")
                error = float(re.search(r"max ([0-9.e+-]+)", cells[4]).group(1))
                assert matched == total and cells[3] == "yes" and error < 1e-4, cells
        assert rows[f"{family}__COMFY_LORA__LORA.safetensors"][3] == "**no**"
        assert rows[f"{family}__DIFFUSERS_LORA__LORA.safetensors"][3] == "**no**"
    for family in ("sd15", "sdxl"):
        assert rows[f"{family}__COMFY_LORA__LORA_UNET.safetensors"][3] == "yes"
    offered = {f for f, tools in LOADERS.items() if f.name.endswith("LORA") and "a1111" in tools}
    assert offered == {ModelFormat.KOHYA_LORA, ModelFormat.LEGACY_LORA}


def test_forge_routes_every_tensor_of_a_single_file_and_its_parts_load_whole():
    rows = _lora_rows("## Single-file checkpoints")
    for family in ("sd15", "sdxl", "sd15-inpaint", "sdxl-inpaint"):
        for name in (f"{family}__ORIGINAL_SINGLE_FILE__FINE_TUNE.safetensors",
                     f"{family}.safetensors"):
            cells = rows[name]
            assert cells[4] == "0" and "missing" not in cells[3], cells
            assert ("clip_g" in cells[3]) == family.startswith("sdxl")
