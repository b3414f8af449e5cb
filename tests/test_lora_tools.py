"""The LoRA tools (issue 28; trainer/lora_tools/): merge-into gives what diffusers' own
`load_lora_weights` + `fuse_lora` gives (or, where diffusers has no loader — LoHa, LoKr,
kohya-layout DoRA — what peft's adapters give, read back by trainer/lora_reader.py); merge by
concatenation is exact; resize reports the SVD error a hand computation gives; extract gets a
known LoRA back; inspect reads kohya's sd-scripts files and ours; bad input is one line, exit 2.

LoRA fixtures are not trained: adapters are built on the tiny models the way training builds
them (lora.add_lora, every linear and conv layer: preset "full"), given random values (a
trained LoRA is just some values), and written by the engine's own writer (lora_formats).
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import outputs, sdxl_config, tiny_config
from trainer import lora, lora_formats
from trainer.cli import main
from trainer.lora_tools.extract import extract
from trainer.lora_tools.inspect import inspect
from trainer.lora_tools.layers import read_lora
from trainer.lora_tools.merge import merge
from trainer.lora_tools.merge_into import merge_into
from trainer.lora_tools.resize import resize
from trainer.models.family import load_family

KINDS = {"lora": {}, "loha": {"peft_type": "LOHA"}, "lokr": {"peft_type": "LOKR"},
         "dora": {"lora_decompose": True},
         "dora-diffusers": {"lora_decompose": True, "output_model_format": "DIFFUSERS_LORA"}}


FLOW_TYPES = {"sd3": "STABLE_DIFFUSION_3", "chroma": "CHROMA_1"}


class LoraMaker:
    """LoRA files on the tiny models, made once per (family, kind, seed)."""

    def __init__(self, root: Path, models: dict[str, Path]):
        self.root, self.models, self.made = root, models, {}

    def config(self, family: str, kind: str, **extra):
        make = sdxl_config if family == "sdxl" else tiny_config
        if family == "flux":  # the CLIP and the transformer (a T5 is never trained)
            extra = {"model_type": "FLUX_DEV_1", "lora_alpha": 8.0, **extra}
        elif family in FLOW_TYPES:  # the transformer alone
            extra = {"model_type": FLOW_TYPES[family], "lora_alpha": 8.0,
                     "text_encoder": {"train": False}, **extra}
        return make(self.models[family], self.root / "ws", lora_layer_preset="full",
                    **{**KINDS[kind], **extra})

    def __call__(self, family: str, kind: str = "lora", seed: int = 1, **extra) -> Path:
        key = (family, kind, seed, *sorted(extra.items()))
        if key not in self.made:
            config = self.config(family, kind, **extra)
            model = load_family(config)
            parts = [p for p in model.part_names if getattr(config, p).train]
            generator = torch.Generator().manual_seed(seed)
            for part in parts:
                lora.add_lora(model.parts[part], config, part)
                for name, p in model.parts[part].named_parameters():
                    if "magnitude" in name:  # DoRA: a magnitude near the weight's norm
                        p.data *= 1 + 0.1 * torch.randn(p.shape, generator=generator)
                    elif any(m in name for m in lora.ADAPTER_MARKERS):
                        p.data = 0.1 * torch.randn(p.shape, generator=generator)
            tag = "".join(f"-{v}" for v in extra.values())
            path = self.root / f"{family}-{kind}-{seed}{tag}.safetensors"
            lora_formats.save_lora(str(path), model, parts, config, dtype=torch.float32,
                                   steps=10, epochs=1, title=path.stem)
            self.made[key] = path
        return self.made[key]


@pytest.fixture(scope="module")
def make_lora(tmp_path_factory, tiny_sd15_dir, tiny_sdxl_dir, tiny_flux_dir, tiny_sd3_dir,
              tiny_chroma_dir):
    return LoraMaker(tmp_path_factory.mktemp("loras"),
                     {"sd15": tiny_sd15_dir, "sdxl": tiny_sdxl_dir, "flux": tiny_flux_dir,
                      "sd3": tiny_sd3_dir, "chroma": tiny_chroma_dir})


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def base_pipeline(make_lora, family):
    extra = {"add_watermarker": False} if family == "sdxl" else {"safety_checker": None}
    return pipeline_class(family).from_pretrained(make_lora.models[family], **extra)


def from_single_file(make_lora, family, path):
    extra = {} if family == "sdxl" else {"safety_checker": None}
    return pipeline_class(family).from_single_file(
        str(path), config=str(make_lora.models[family]), local_files_only=True, **extra)


def model_outputs(pipe):
    for module in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.eval()
    return outputs(pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))


def assert_outputs_equal(got, reference, untouched):
    for g, r, u in zip(got, reference, untouched):
        assert not torch.allclose(r, u, atol=1e-3)  # the LoRA changes every output
        torch.testing.assert_close(g, r, rtol=1e-4, atol=2e-5)


# --- merge-into -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind,strength", [("lora", 0.7), ("dora-diffusers", 0.6)])
def test_merge_into_equals_diffusers_fuse_lora(family, kind, strength, make_lora, tmp_path):
    """A kohya-layout LoRA (SDXL: the UNet by its SGM names) and a diffusers-layout DoRA, baked
    in at a strength: the single file, loaded by diffusers' from_single_file, gives what the
    base model with load_lora_weights + fuse_lora(lora_scale=strength) gives."""
    path = make_lora(family, kind)
    result = merge_into(str(make_lora.models[family]), [(path, strength)],
                        tmp_path / "merged.safetensors")
    merged = from_single_file(make_lora, family, result.output)
    pipe = base_pipeline(make_lora, family)
    untouched = model_outputs(pipe)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)
    assert_outputs_equal(model_outputs(merged), model_outputs(pipe), untouched)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_merge_into_equals_the_peft_adapters_where_diffusers_has_no_loader(
        family, kind, make_lora, tmp_path):
    """LoHa, LoKr and kohya-layout DoRA (diffusers loads none of them for SD): the merged
    model gives what the base model with the file's peft adapters gives (read back by the
    engine's reader, computed by peft's own forward)."""
    from trainer.lora_reader import load_lora_file
    path = make_lora(family, kind)
    result = merge_into(str(make_lora.models[family]), [(path, 1.0)],
                        tmp_path / "merged.safetensors")
    merged = from_single_file(make_lora, family, result.output)
    config = make_lora.config(family, kind)
    model = load_family(config)
    untouched = model_outputs(model.components)
    for part in model.part_names:
        lora.add_lora(model.parts[part], config, part)
    load_lora_file(path, {p: model.parts[p] for p in model.part_names}, model.kohya_prefixes)
    assert_outputs_equal(model_outputs(merged), model_outputs(model.components), untouched)


def test_every_layout_of_the_same_adapters_merges_into_the_same_model(make_lora, tmp_path):
    """SDXL's KOHYA_LORA (UNet by SGM names), LEGACY_LORA (diffusers UNet names), COMFY_LORA
    (ComfyUI's names) and DIFFUSERS_LORA of the same adapters: the same checkpoint, tensor for
    tensor (the KOHYA_LORA one is checked against diffusers above)."""
    merged = []
    for layout in ("KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA", "DIFFUSERS_LORA"):
        path = make_lora("sdxl", "lora", output_model_format=layout)
        merged.append(load_file(merge_into(str(make_lora.models["sdxl"]), [(path, 1.0)],
                                           tmp_path / f"{layout}.safetensors").output))
    for other in merged[1:]:
        assert other.keys() == merged[0].keys()
        for key in other:
            torch.testing.assert_close(other[key], merged[0][key], rtol=1e-5, atol=1e-6,
                                       msg=key)


def test_several_loras_into_a_diffusers_folder(make_lora, tmp_path):
    """Two LoRAs at their own strengths, as diffusers applies two adapters with weights; the
    folder loads with from_pretrained and its header records the sources."""
    a, b = make_lora("sd15", "lora", 1), make_lora("sd15", "lora", 2)
    steps = []
    result = merge_into(str(make_lora.models["sd15"]), [(a, 0.5), (b, -0.8)], tmp_path / "out",
                        output_format="DIFFUSERS",
                        on_progress=lambda done, total, what: steps.append((done, total)))
    assert steps and steps[-1][0] == steps[-1][1]
    from diffusers import StableDiffusionPipeline
    merged = StableDiffusionPipeline.from_pretrained(result.output, safety_checker=None)
    pipe = base_pipeline(make_lora, "sd15")
    untouched = model_outputs(pipe)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, -0.8])
    pipe.fuse_lora(adapter_names=["a", "b"])
    assert_outputs_equal(model_outputs(merged), model_outputs(pipe), untouched)
    with safe_open(str(result.output / "unet" / "diffusion_pytorch_model.safetensors"),
                   "pt") as f:
        record = json.loads(f.metadata()["atelier_lora_tool"])
    assert [(s["file"], s["strength"]) for s in record["sources"]] == [(a.name, 0.5),
                                                                        (b.name, -0.8)]
    assert record["sources"][0]["sha256"] == read_lora(a).sha256


def test_a_flux_lora_of_either_layout_merges_as_diffusers_fuses_it(make_lora, tmp_path):
    """Flux.1: the same adapters written as KOHYA_LORA (the original fused layer names, split
    back by trainer/flow_lora_names.py) and as DIFFUSERS_LORA bake into the same model, which is
    what diffusers' load_lora_weights + fuse_lora makes of the base (transformer and CLIP)."""
    from diffusers import FluxPipeline
    kohya = make_lora("flux", "lora", output_model_format="KOHYA_LORA")
    plain = make_lora("flux", "lora", output_model_format="DIFFUSERS_LORA")
    base = str(make_lora.models["flux"])
    merged = [FluxPipeline.from_pretrained(merge_into(base, [(f, 0.8)], tmp_path / f.stem,
                                                      output_format="DIFFUSERS").output)
              for f in (kohya, plain)]
    pipe = FluxPipeline.from_pretrained(base)
    untouched = {p: {k: v.clone() for k, v in getattr(pipe, p).state_dict().items()}
                 for p in ("transformer", "text_encoder")}
    pipe.load_lora_weights(str(plain))
    pipe.fuse_lora(components=["transformer", "text_encoder"], lora_scale=0.8)
    pipe.unload_lora_weights()  # the fused weights stay
    for part in ("transformer", "text_encoder"):
        reference = getattr(pipe, part).state_dict()
        changed = [k for k in reference if not torch.equal(reference[k], untouched[part][k])]
        assert changed, part
        for model in merged:
            got = getattr(model, part).state_dict()
            for key in reference:
                torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-6,
                                           msg=f"{part} {key}")


@pytest.mark.parametrize("family,layout", [("sd3", "KOHYA_LORA"), ("chroma", "COMFY_LORA")])
def test_sd3_and_chroma_loras_of_the_original_layout_merge_like_their_diffusers_copy(
        family, layout, make_lora, tmp_path):
    """SD 3 and Chroma: a LoRA under the original fused layer names bakes into the same
    transformer (the single file: the transformer alone) as its DIFFUSERS_LORA copy, and it
    changes it."""
    base = str(make_lora.models[family])
    merged = [load_file(merge_into(base, [(make_lora(family, "lora", output_model_format=f),
                                           0.8)], tmp_path / f"{f}.safetensors").output)
              for f in (layout, "DIFFUSERS_LORA")]
    untouched = load_file(merge_into(base, [(make_lora(family, "lora", seed=2), 0.0)],
                                     tmp_path / "base.safetensors").output)
    assert merged[0].keys() == merged[1].keys() == untouched.keys()
    assert any(not torch.equal(merged[0][k], untouched[k]) for k in untouched)
    for key in merged[0]:
        torch.testing.assert_close(merged[0][key], merged[1][key], rtol=1e-5, atol=1e-6,
                                   msg=key)


# --- merge, resize ----------------------------------------------------------------------------

def deltas(path) -> dict[str, torch.Tensor]:
    return {n: layer.delta() for n, layer in read_lora(path).layers.items()}


def test_merge_by_concatenation_is_exact(make_lora, tmp_path):
    a, b = make_lora("sdxl", "lora", 1), make_lora("sdxl", "lora", 2)
    result = merge([(a, 0.5), (b, 1.5)], tmp_path / "merged.safetensors")
    got, da, db = deltas(result.output), deltas(a), deltas(b)
    assert got.keys() == da.keys() == db.keys()
    for name in got:
        torch.testing.assert_close(got[name], 0.5 * da[name] + 1.5 * db[name],
                                   rtol=1e-5, atol=1e-7)
    assert {layer["rank"] for layer in result.layers} == {8}  # 4 + 4
    assert result.overall_error == 0


def hand_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float, float]:
    """(the best rank-`rank` delta, its relative error, the kept energy), by hand."""
    matrix = delta.flatten(1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    error = float((s[rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    return best.reshape(delta.shape).float(), error, float((s[:rank] ** 2).sum() / (s ** 2).sum())


def test_merge_to_a_rank_reports_the_kept_energy_per_layer(make_lora, tmp_path):
    a, b = make_lora("sd15", "lora", 1), make_lora("sd15", "lora", 2)
    result = merge([(a, 1.0), (b, 1.0)], tmp_path / "m.safetensors", rank=3)
    da, db = deltas(a), deltas(b)
    for layer in result.layers:
        best, error, energy = hand_svd(da[layer["name"]] + db[layer["name"]], 3)
        assert layer["rank"] == 3
        assert layer["kept_energy"] == pytest.approx(energy, rel=1e-4)
        assert layer["error"] == pytest.approx(error, rel=1e-3, abs=1e-6)


def test_resize_to_full_rank_is_exact(make_lora, tmp_path):
    path = make_lora("sd15", "lora")
    result = resize(path, tmp_path / "r.safetensors", rank=4)
    before, after = deltas(path), deltas(result.output)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-6)
    assert result.overall_error < 1e-5


def test_resize_to_a_lower_rank_reports_the_svd_error_of_a_hand_computation(make_lora,
                                                                            tmp_path, capsys):
    path = make_lora("sdxl", "lora")
    out = tmp_path / "r2.safetensors"
    assert main(["lora", "resize", str(path), "--out", str(out), "--rank", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    before, after = deltas(path), deltas(out)
    squared_errors = total = 0.0
    for layer in report["layers"]:
        best, error, _ = hand_svd(before[layer["name"]], 2)
        assert layer["rank"] == 2 and layer["rank_before"] == 4
        assert layer["error"] == pytest.approx(error, rel=1e-3, abs=1e-6)
        torch.testing.assert_close(after[layer["name"]], best, rtol=1e-3, atol=1e-5)
        norm = before[layer["name"]].double().norm().item()
        squared_errors += (error * norm) ** 2
        total += norm ** 2
    assert report["overall_error"] == pytest.approx((squared_errors / total) ** 0.5, rel=1e-3)
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "2" and "ss_base_model_version" in metadata
    assert json.loads(metadata["atelier_lora_tool"])["sources"][0]["file"] == path.name


def test_resize_by_energy_keeps_the_smallest_rank_that_holds_it(make_lora, tmp_path):
    path = make_lora("sd15", "loha")  # LoHa layers become plain LoRA layers
    result = resize(path, tmp_path / "e.safetensors", energy=0.9)
    before = deltas(path)
    for layer in result.layers:
        s = torch.linalg.svdvals(before[layer.name].flatten(1).double())
        shares = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert layer.rank == int((shares < 0.9).sum()) + 1
        assert layer.kept_energy >= 0.9 - 1e-6
    assert {l.kind for l in read_lora(result.output).layers.values()} == {"lora"}


# --- extract ----------------------------------------------------------------------------------

def test_extract_recovers_a_merged_lora_at_its_rank(make_lora, tmp_path):
    """Merge a known rank-4 LoRA into the base (a diffusers folder: the tuned model), extract
    at rank 4: every layer it changed comes back (conv and text-encoder layers included) with
    the same delta, and no other layer."""
    path = make_lora("sdxl", "lora")
    tuned = merge_into(str(make_lora.models["sdxl"]), [(path, 1.0)], tmp_path / "tuned",
                       output_format="DIFFUSERS").output
    result = extract(str(make_lora.models["sdxl"]), str(tuned), tmp_path / "x.safetensors",
                     rank=4)
    known, got = deltas(path), deltas(result.output)
    assert got.keys() == known.keys()
    assert {l["part"] for l in result.layers} == {"unet", "text_encoder", "text_encoder_2"}
    assert any(d.dim() == 4 and d.shape[-1] == 3 for d in got.values())  # a 3x3 conv
    for name in known:
        scale = known[name].abs().max()
        torch.testing.assert_close(got[name] / scale, known[name] / scale, rtol=0, atol=1e-4)
    assert result.overall_error < 1e-5


# --- inspect ----------------------------------------------------------------------------------

def write_kohya_file(path: Path) -> None:
    """A LoRA as kohya's sd-scripts writes one for SD 1.5 (float16, its layer names, its ss_*
    header), written by hand."""
    g = torch.Generator().manual_seed(0)
    layers = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
              "lora_unet_mid_block_attentions_0_proj_in": (1280, 1280),
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}
    tensors = {}
    for name, (out, inp) in layers.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(8, inp, generator=g).half()
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 8, generator=g).half()
        tensors[f"{name}.alpha"] = torch.tensor(4.0).half()
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "8",
                "ss_network_alpha": "4.0", "ss_base_model_version": "sd_v1",
                "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
                "ss_learning_rate": "0.0001", "ss_optimizer": "bitsandbytes.optim.AdamW8bit",
                "ss_num_epochs": "10", "ss_resolution": "(512, 512)",
                "ss_tag_frequency": json.dumps({"10_ohwx dog": {"ohwx dog": 20, "grass": 3,
                                                                 "sitting": 7}})}
    save_file(tensors, str(path), metadata)


def test_inspect_reads_a_kohya_sd_scripts_file(tmp_path, capsys):
    path = tmp_path / "kohya.safetensors"
    write_kohya_file(path)
    assert main(["lora", "inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "STABLE_DIFFUSION_15"
    assert report["model_type_source"] == "header"
    assert report["adapter_types"] == {"lora": 3}
    assert report["parts"] == {"unet": 2, "text_encoder": 1}
    assert report["ranks"] == [8] and report["alphas"] == [4.0]
    assert report["trigger_words"][:3] == ["ohwx dog", "sitting", "grass"]
    assert report["settings"]["optimizer"] == "bitsandbytes.optim.AdamW8bit"
    assert report["layouts"] == ["kohya"]


def test_inspect_reads_ours_of_each_type(make_lora):
    for kind, expected in [("lokr", "lokr"), ("dora-diffusers", "lora (DoRA)")]:
        report = inspect(make_lora("sdxl", kind)).to_dict()
        assert report["family"] == "SDXL" and report["model_type_source"] == "header"
        assert list(report["adapter_types"]) == [expected]
        assert set(report["parts"]) == {"unet", "text_encoder", "text_encoder_2"}
        assert report["settings"]["atelier lora_rank"] == "4"


def test_inspect_guesses_sdxl_from_a_file_without_a_header(make_lora, tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(make_lora("sdxl", "lora")), str(bare))
    report = inspect(bare).to_dict()
    assert report["family"] == "SDXL" and report["model_type_source"].startswith("layer names")


def test_bundled_embeddings_are_reported_and_carried_through_a_resize(make_lora, tmp_path):
    tensors = load_file(make_lora("sd15", "lora"))
    tensors["bundle_emb.ohwx.clip_l"] = torch.randn(2, 32)
    path = tmp_path / "with-embedding.safetensors"
    save_file(tensors, str(path), {"ss_base_model_version": "sd_v1"})
    assert inspect(path).to_dict()["embeddings"] == {"ohwx": [[2, 32]]}
    out = resize(path, tmp_path / "small.safetensors", rank=1).output
    assert torch.equal(load_file(out)["bundle_emb.ohwx.clip_l"], tensors["bundle_emb.ohwx.clip_l"])


def test_the_command_runs_as_python_m_trainer(make_lora, tmp_path):
    """The real entry point: JSON on stdout and exit 0; a bad file, one line and exit 2."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ok = subprocess.run([sys.executable, "-m", "trainer", "lora", "inspect",
                         str(make_lora("sd15", "loha")), "--json"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert list(json.loads(ok.stdout)["adapter_types"]) == ["loha"]
    bad = subprocess.run([sys.executable, "-m", "trainer", "lora", "resize", "nothing.safetensors",
                          "--out", str(tmp_path / "x.safetensors"), "--rank", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "nothing.safetensors" in bad.stderr and not (tmp_path / "x.safetensors").exists()


# --- bad input --------------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str]:
    try:
        code = main(["lora", *map(str, args)])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_input_is_one_line_naming_the_file_or_flag_and_exit_2(make_lora, tmp_path, capsys):
    good = make_lora("sd15", "lora")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 40)
    checkpoint = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(2)}, str(checkpoint))
    out = tmp_path / "out.safetensors"
    cases = [
        (("inspect", tmp_path / "missing.safetensors"), "missing.safetensors"),
        (("inspect", corrupt), "corrupt.safetensors"),
        (("inspect", checkpoint), "checkpoint.safetensors"),
        (("resize", good, "--out", out), "--rank"),
        (("resize", good, "--out", out, "--rank", "2", "--energy", "0.5"), "--rank"),
        (("resize", good, "--out", out, "--rank", "two"), "--rank"),
        (("resize", good, "--out", out, "--energy", "1.5"), "--energy"),
        (("merge", f"{good}:strong", "--out", out), "strength"),
        (("merge-into", "--base", make_lora.models["sd15"], "--lora", make_lora("sdxl"),
          "--out", out), "sdxl-lora-1.safetensors"),
        (("merge-into", "--base", tmp_path / "no-model", "--lora", good, "--out", out),
         "--base"),
        (("merge-into", "--base", make_lora.models["sd15"], "--lora", good, "--out", out,
          "--format", "CKPT"), "--format"),
    ]
    for args, named in cases:
        code, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        assert len(err.splitlines()) == 1 and named in err, (args, err)
        assert "Traceback" not in err
        assert not out.exists()
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written either


# --- the page's Tools section (its handlers; the browser test drives the page) ----------------

def test_the_tools_section_writes_into_the_visitors_folder_and_confines_paths(make_lora,
                                                                               tmp_path):
    """Results go to the visitor's own lora-tools folder; on a shared server a base model
    outside the workspace, or a LoRA path that is not theirs, is refused by name and nothing
    is written."""
    from trainer.ownership import Access, Realm, Viewer
    from ui import tools_panel
    workspace = tmp_path / "ws"
    workspace.mkdir()
    local = Access(Realm(workspace), Viewer())
    lora_file = make_lora("sd15", "lora")
    done = tools_panel.resize_file(str(lora_file), 2, None, local)
    assert "rank 2" in done["message"]
    assert Path(done["result"]).name == f"{lora_file.stem}-rank2.safetensors"
    assert (workspace / "lora-tools" / f"{lora_file.stem}-rank2.safetensors").is_file()
    assert "Stable Diffusion 1.5" in tools_panel.inspect_file(str(lora_file), local)["report"]

    shared = Access(Realm(workspace, shared=True, confine=True), Viewer("bob", False))
    inside = workspace / "users" / "bob" / "mine.safetensors"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(lora_file.read_bytes())
    refused = tools_panel.merge_into_file(str(inside), str(make_lora.models["sd15"]), 1.0,
                                          "ORIGINAL_SINGLE_FILE", shared)
    assert "Base model" in refused["message"] and "result" not in refused
    refused = tools_panel.resize_file(str(lora_file), 2, None, shared)  # not bob's file
    assert "LoRA file" in refused["message"] and "result" not in refused
    done = tools_panel.resize_file(str(inside), None, 0.5, shared)
    assert (workspace / "users" / "bob" / "lora-tools" / "mine-energy0.5.safetensors").is_file()
    assert "drop a .safetensors" in tools_panel.inspect_file(None, shared)["message"]
