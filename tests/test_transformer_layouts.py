"""The flow-matching transformers' original weight layouts (trainer/models/transformer_layouts.py)
and their LoRA names (trainer/flow_lora_names.py), on tiny transformers built here and, where
diffusers' readers assume Flux.1's real width, on real-width shapes held on the meta device."""
import pytest
import torch
from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel
from safetensors.torch import save_file

from trainer import flow_lora_names as names
from trainer.errors import ConfigError, ModelLoadError
from trainer.models import transformer_layouts as layouts

# diffusers 0.42.1's own ChromaTransformer2DModel imports FluxPosEmbed from its deprecated place
pytestmark = pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")

FLUX_TINY = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 axes_dims_rope=[4, 4, 8])
SD3_TINY = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                pooled_projection_dim=64, out_channels=4)
# layout -> (class, config); SD 3 gets two blocks so the last one (no context MLP, swapped
# adaLN halves) differs from the first
TINY = {
    "flux-dev": (FluxTransformer2DModel, dict(FLUX_TINY, pooled_projection_dim=32,
                                              guidance_embeds=True)),
    "flux-schnell": (FluxTransformer2DModel, dict(FLUX_TINY, pooled_projection_dim=32)),
    "chroma": (ChromaTransformer2DModel, dict(FLUX_TINY, approximator_num_channels=8,
                                              approximator_hidden_dim=16, approximator_layers=2)),
    "sd3": (SD3Transformer2DModel, SD3_TINY),
    "sd35": (SD3Transformer2DModel, dict(SD3_TINY, qk_norm="rms_norm",
                                         dual_attention_layers=(0,))),
}
# original keys each layout must have (the published names), and keys it must not
EXPECTED = {
    "flux-dev": ({"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_mod.lin.bias",
                  "double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.1.linear1.bias",
                  "single_blocks.0.modulation.lin.weight", "guidance_in.in_layer.weight",
                  "vector_in.out_layer.bias", "final_layer.adaLN_modulation.1.weight"}, set()),
    "flux-schnell": ({"time_in.in_layer.weight", "single_blocks.1.linear2.weight"},
                     {"guidance_in.in_layer.weight"}),
    "chroma": ({"distilled_guidance_layer.layers.1.out_layer.weight",
                "distilled_guidance_layer.norms.0.scale", "distilled_guidance_layer.in_proj.bias",
                "double_blocks.0.txt_attn.qkv.weight", "single_blocks.0.linear1.weight"},
               {"double_blocks.0.img_mod.lin.weight", "final_layer.adaLN_modulation.1.weight",
                "time_in.in_layer.weight"}),
    "sd3": ({"pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.2.bias",
             "y_embedder.mlp.0.weight", "joint_blocks.0.context_block.attn.proj.weight",
             "joint_blocks.1.context_block.adaLN_modulation.1.weight",
             "joint_blocks.0.x_block.mlp.fc2.bias", "final_layer.adaLN_modulation.1.bias"},
            {"joint_blocks.1.context_block.attn.proj.weight",
             "joint_blocks.1.context_block.mlp.fc1.weight",
             "joint_blocks.0.x_block.attn.ln_q.weight"}),
    "sd35": ({"joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.0.x_block.attn2.ln_k.weight",
              "joint_blocks.1.context_block.attn.ln_q.weight"},
             {"joint_blocks.1.x_block.attn2.qkv.weight"}),
}


def _random(model: torch.nn.Module) -> torch.nn.Module:
    # every weight random (norm gains too), so a misplaced or swapped tensor cannot pass
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return model


@pytest.fixture(scope="module")
def tiny():
    return {layout: _random(cls(**config)) for layout, (cls, config) in TINY.items()}


def _equal_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- diffusers <-> original -------------------------------------------------------------------

@pytest.mark.parametrize("layout", list(TINY))
def test_to_original_then_diffusers_converter_returns_every_tensor_bit_identical(tiny, layout):
    state = tiny[layout].state_dict()
    original = layouts.to_original(layout, state)
    must, must_not = EXPECTED[layout]
    assert must <= set(original) and not must_not & set(original)
    assert layouts.original_layout_family(original) == layout
    back = layouts.to_diffusers(layout, original)  # diffusers' own converter
    assert _equal_state(back, state)


def test_real_width_flux_goes_through_diffusers_converter_as_is():
    # Flux.1's own width (3072) is what diffusers' converter splits linear1 at; no padding
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    state = model.state_dict()
    original = layouts.to_original("FLUX_DEV_1", state)
    assert original["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 12288, 3072)
    back = layouts.to_diffusers("flux", original)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}


@pytest.mark.parametrize("layout", list(TINY))
def test_from_single_file_loads_the_written_file_offline(tiny, tmp_path, layout):
    model = tiny[layout]
    model.save_config(tmp_path / "model" / "transformer")  # configs only, no weights
    path = tmp_path / f"{layout}.safetensors"
    save_file({k: v.contiguous() for k, v in layouts.to_original(layout, model.state_dict())
               .items()}, str(path))
    loaded = layouts.load_original_transformer(type(model), path, config=tmp_path / "model")
    assert _equal_state(loaded.state_dict(), model.state_dict())
    if layout.startswith("sd3"):
        # diffusers reads SD 3 files of any width by itself, the all-in-one prefix too
        direct = type(model).from_single_file(str(path), config=str(tmp_path / "model"),
                                              subfolder="transformer", local_files_only=True)
        assert _equal_state(direct.state_dict(), model.state_dict())
    # a whole-model checkpoint (SD 3.5's all-in-one file): the transformer under
    # 'model.diffusion_model.', beside text encoders and VAE that are left unread
    whole = {layouts.CHECKPOINT_PREFIX + k: v.contiguous()
             for k, v in layouts.to_original(layout, model.state_dict()).items()}
    whole.update({"text_encoders.clip_l.transformer.x.weight": torch.ones(2),
                  "first_stage_model.decoder.y.weight": torch.ones(2)})
    save_file(whole, str(tmp_path / "whole.safetensors"))
    loaded = layouts.load_original_transformer(type(model), tmp_path / "whole.safetensors",
                                               config=tmp_path / "model")
    assert _equal_state(loaded.state_dict(), model.state_dict())


def test_a_file_of_another_family_is_refused_naming_what_it_is(tiny, tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in layouts.to_original(
        "flux", tiny["flux-dev"].state_dict()).items()}, str(path))
    with pytest.raises(ModelLoadError, match="'flux.safetensors' holds a Flux.1 dev"):
        layouts.load_original_transformer(SD3Transformer2DModel, path, config=tmp_path)
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="'broken.safetensors' is not a readable"):
        layouts.load_original_transformer(FluxTransformer2DModel, tmp_path / "broken.safetensors",
                                          config=tmp_path)
    keys = list(layouts.to_original("sd35", tiny["sd35"].state_dict()))
    with pytest.raises(ModelLoadError, match="Stable Diffusion 3.5 transformer, not a model of "
                                             "type STABLE_DIFFUSION_3: choose model type "
                                             "STABLE_DIFFUSION_35"):
        layouts.check_original_layout("STABLE_DIFFUSION_3", keys, "sd35.safetensors")
    assert layouts.check_original_layout("FLUX_DEV_1", layouts.to_original(
        "flux", tiny["flux-schnell"].state_dict()), "s.safetensors") == "flux-schnell"
    with pytest.raises(ModelLoadError, match="'unet.safetensors' holds no transformer"):
        layouts.check_original_layout("FLUX_DEV_1", ["model.diffusion_model.input_blocks.0.0"
                                                     ".weight"], "unet.safetensors")


def test_the_detector_knows_only_original_layouts(tiny):
    flux = layouts.to_original("flux", tiny["flux-dev"].state_dict())
    assert layouts.original_layout_family(["model.diffusion_model." + k for k in flux]) \
        == "flux-dev"
    assert layouts.original_layout_family(tiny["flux-dev"].state_dict()) is None  # diffusers'
    # Flux.2 has double/single blocks too, but one shared modulation instead of img_mod
    assert layouts.original_layout_family(
        [k for k in flux if "_mod." not in k] + ["double_stream_modulation_img.lin.weight"]) is None


def test_to_original_never_drops_or_half_writes_a_weight(tiny):
    state = dict(tiny["flux-dev"].state_dict())
    with pytest.raises(ValueError, match="no place in the original flux layout: extra.weight"):
        layouts.to_original("flux", {**state, "extra.weight": torch.zeros(1)})
    del state["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(ValueError, match="double_blocks.0.img_attn.qkv: the weights "
                                         "transformer_blocks.0.attn.to_k.weight are missing"):
        layouts.to_original("flux", state)


# --- LoRA names -------------------------------------------------------------------------------

def _loras(shapes, modules, rank=2, alpha=3.0, seed=0, in_features=None):
    """Random LoRAs on `modules`; `in_features` replaces the layers' input width (the names and
    the fusion depend only on the output rows; a narrow input keeps the deltas small)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for i, module in enumerate(modules):
        rows, *inputs = shapes[f"{module}.weight"]
        inputs = [in_features] if in_features else inputs
        down = torch.randn(rank, *inputs, generator=generator) * 0.1
        up = torch.randn(rows, rank, *(1 for _ in inputs[1:]), generator=generator) * 0.1
        out[module] = names.LoraWeights(down, up, alpha + (i % 3))  # unequal scales too
    return out


def _file_deltas(tensors: dict) -> dict[str, torch.Tensor]:
    deltas = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            deltas[name] = names.LoraWeights(tensors[key], tensors[f"{name}.lora_up.weight"],
                                             float(tensors[f"{name}.alpha"])).delta()
    return deltas


@pytest.fixture(scope="module")
def real_flux_shapes():
    # diffusers' kohya reader splits single blocks' linear1 at Flux.1's 3072 / 12288 rows, so
    # its test needs real widths: shapes from a model on the meta device (no memory)
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=2, guidance_embeds=True)
    return layouts.module_shapes(model)


FLUX_TRAINED = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_q_proj",  # q only
    "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff_context.net.2",
    "transformer_blocks.0.norm1.linear",
    "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.1.attn.to_v", "single_transformer_blocks.1.proj_mlp",
    "single_transformer_blocks.1.proj_out", "single_transformer_blocks.1.norm.linear",
    "x_embedder", "time_text_embed.guidance_embedder.linear_1", "proj_out", "norm_out.linear"]


@pytest.mark.parametrize("writer", ["kohya_lora", "comfy_lora"])
def test_diffusers_reads_our_flux_file_as_the_trained_deltas(real_flux_shapes, writer):
    from diffusers import FluxPipeline

    loras = _loras(real_flux_shapes, FLUX_TRAINED, rank=4, in_features=16)
    tensors = getattr(names, writer)("flux", real_flux_shapes, loras)
    prefix = "lora_unet_" if writer == "kohya_lora" else "diffusion_model."
    sep = "_" if writer == "kohya_lora" else "."
    qkv = f"{prefix}double_blocks{sep}0{sep}img_attn{sep}qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (12, 16)  # q, k, v: rank 3 x 4
    assert tensors[f"{qkv}.lora_up.weight"].shape == (3 * 3072, 12)
    assert tensors[f"{prefix}single_blocks{sep}1{sep}linear1.lora_up.weight"].shape == (21504, 8)

    converted = FluxPipeline.lora_state_dict(dict(tensors))  # alpha already applied
    read = {}
    for key, down in converted.items():
        if key.endswith(".lora_A.weight"):
            # diffusers 0.42.1 names the layers outside the blocks (x_embedder, proj_out, ...)
            # without 'transformer.'; its pipeline loader then skips them
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            read[module] = converted[key.replace("lora_A", "lora_B")].float() @ down.float()
    untrained_parts = {"transformer_blocks.0.attn.add_k_proj",
                       "transformer_blocks.0.attn.add_v_proj",
                       "single_transformer_blocks.1.attn.to_q",
                       "single_transformer_blocks.1.attn.to_k"}
    assert set(read) == set(loras) | untrained_parts
    for module, delta in read.items():
        if module in untrained_parts:
            assert torch.count_nonzero(delta) == 0, module
        else:
            torch.testing.assert_close(delta, loras[module].delta(), atol=1e-6, rtol=0)
    back = names.read_flow_lora("flux", real_flux_shapes, tensors,
                                ranks={m: 4 for m in loras})
    assert set(back) == set(loras)


@pytest.mark.parametrize("layout", list(TINY))
def test_fused_file_layers_are_the_original_layout_of_the_module_deltas(tiny, layout):
    shapes = layouts.module_shapes(tiny[layout])
    trainable = [p for layer in layouts.layers(layout, shapes) if layer.takes_lora
                 for p in layer.parts]
    # leave some parts of fused layers untrained: they must get zero rows
    trained = [m for m in trainable if not m.endswith(("to_k", "add_v_proj"))]
    loras = _loras(shapes, trained)
    tensors = names.kohya_lora(layout, shapes, loras)
    deltas = {f"{m}.weight": loras[m].delta() if m in loras else
              torch.zeros(shapes[f"{m}.weight"]) for m in trainable}
    expected = layouts.to_original(layout, deltas)
    got = _file_deltas(tensors)
    assert set(got) == {"lora_unet_" + k.removesuffix(".weight").replace(".", "_")
                        for k in expected}
    for key, delta in expected.items():
        torch.testing.assert_close(got["lora_unet_" + key.removesuffix(".weight").replace(
            ".", "_")], delta, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["flux-dev", "chroma", "sd35"])
@pytest.mark.parametrize("writer", ["kohya_lora", "comfy_lora"])
def test_our_reader_gives_back_each_modules_lora(tiny, layout, writer):
    shapes = layouts.module_shapes(tiny[layout])
    trainable = [p for layer in layouts.layers(layout, shapes) if layer.takes_lora
                 for p in layer.parts]
    trained = [m for m in trainable if not m.endswith("to_k")]
    loras = _loras(shapes, trained, rank=3, alpha=1.0)
    for module in trained:  # one scale in each fused layer: written and read back bit-exact
        loras[module] = names.LoraWeights(loras[module].down, loras[module].up, 1.5)
    tensors = getattr(names, writer)(layout, shapes, loras)

    back = names.read_flow_lora(layout, shapes, tensors, ranks={m: 3 for m in trained})
    assert set(back) == set(trained)
    for module, lora in loras.items():
        if module in ("proj_out", "norm_out.linear") and layout != "sd35":
            # final_layer: alpha / rank folded into up (diffusers reads it without alpha)
            torch.testing.assert_close(back[module].delta(), lora.delta(), atol=1e-6, rtol=0)
            continue
        assert torch.equal(back[module].down, lora.down), module
        assert torch.equal(back[module].up, lora.up), module
        assert back[module].alpha == pytest.approx(lora.alpha, rel=1e-6)

    shared = names.read_flow_lora(layout, shapes, tensors)  # no ranks: shared down, exact
    assert set(shared) == set(trainable)
    for module in trainable:
        want = loras[module].delta() if module in loras else None
        if want is None:
            assert torch.count_nonzero(shared[module].delta()) == 0
        else:
            torch.testing.assert_close(shared[module].delta(), want, atol=1e-6, rtol=0)


def test_module_shapes_of_a_model_with_adapters_are_its_plain_shapes():
    from peft import LoraConfig

    model = FluxTransformer2DModel(**TINY["flux-schnell"][1])
    plain = layouts.module_shapes(model)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "proj_mlp", "norm.linear"]))
    assert any(".base_layer." in k for k in model.state_dict())
    assert layouts.module_shapes(model) == plain


def test_names_are_the_ones_kohya_and_comfyui_use(tiny):
    shapes = layouts.module_shapes(tiny["sd35"])
    loras = _loras(shapes, ["transformer_blocks.0.attn2.to_q", "transformer_blocks.1.norm1_context"
                            ".linear", "pos_embed.proj"])
    kohya = names.kohya_lora("STABLE_DIFFUSION_35", shapes, loras)
    assert {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0]
            for k in kohya} == {"lora_unet_joint_blocks_0_x_block_attn2_qkv",
                                "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
                                "lora_unet_x_embedder_proj"}
    comfy = names.comfy_lora("sd35", shapes, loras)
    assert "diffusion_model.x_embedder.proj.lora_down.weight" in comfy  # a conv LoRA, renamed
    assert comfy["diffusion_model.x_embedder.proj.lora_down.weight"].dim() == 4
    flux = names.kohya_lora("flux", layouts.module_shapes(tiny["flux-dev"]), _loras(
        layouts.module_shapes(tiny["flux-dev"]), ["single_transformer_blocks.0.proj_mlp"]))
    assert set(flux) == {"lora_unet_single_blocks_0_linear1.lora_down.weight",
                         "lora_unet_single_blocks_0_linear1.lora_up.weight",
                         "lora_unet_single_blocks_0_linear1.alpha"}


def test_reader_refuses_what_it_cannot_place_or_split(tiny):
    shapes = layouts.module_shapes(tiny["flux-dev"])
    loras = _loras(shapes, ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"])
    tensors = names.kohya_lora("flux", shapes, loras)
    with pytest.raises(ConfigError, match="'lora_unet_double_blocks_7_img_attn_qkv' is not a "
                                          "layer of the flux transformer"):
        names.read_flow_lora("flux", shapes, {k.replace("_0_", "_7_"): v
                                              for k, v in tensors.items()})
    with pytest.raises(ConfigError, match="has rank 4, not the sum of the ranks"):
        names.read_flow_lora("flux", shapes, tensors,
                             ranks={"transformer_blocks.0.attn.to_q": 2})
    dense = dict(tensors)
    dense["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.ones(96, 4)
    with pytest.raises(ConfigError, match="does not split into separate LoRAs"):
        names.read_flow_lora("flux", shapes, dense, ranks={"transformer_blocks.0.attn.to_q": 2,
                                                          "transformer_blocks.0.attn.to_v": 2})
    with pytest.raises(ValueError, match="no layer for the LoRA modules transformer_blocks.0.norm"):
        names.kohya_lora("flux", shapes, {"transformer_blocks.0.norm": loras[
            "transformer_blocks.0.attn.to_q"]})
