"""LoHa, LoKr and DoRA (`peft_type`, `lora_decompose`): each trains a tiny model for real, its
file has exactly the LyCORIS/kohya key layout, and the weights ComfyUI rebuilds from the FILE
(its published formulas, written out below) are the weights of the trained peft layers, layer
by layer. Also: the metadata names the network, DoRA reloads in diffusers, a run resumes from
a backup, and the combinations without a file layout are refused by name. SDXL's KOHYA_LORA
names the UNet's layers by the original SGM UNet, its LEGACY_LORA by the diffusers UNet: the
same tensors under either name."""
import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import finetune, lora, lora_formats
from trainer.backup import list_backups
from trainer.config import ModelFormat, PeftType, check_supported, config_from_dict
from trainer.errors import ConfigError
from trainer.loop import train
from trainer.lora_reader import load_kohya_tensors, load_lora_file

from helpers import outputs, read_metrics, same_trained, sdxl_config, stop_at, tiny_config

ALPHA = 2.0  # helpers.tiny_config; with rank 4 (or 2) a lost or doubled alpha shows

# name -> (family, settings). "full" puts adapters on conv layers too (conv_in, resnets).
# LoKr at rank 4 keeps both Kronecker factors whole on the tiny model's 32-wide layers
# (peft factorises w2 only when rank < half its size); at rank 2 w2 is stored as w2_a @ w2_b.
# The SD 1.5 runs are long enough for their loss to fall (LOSS_FALLS_EPOCHS); the SDXL ones
# check the layout and take one epoch.
LOSS_FALLS_EPOCHS = 10
VARIANTS = {
    "loha": ("sd15", {"peft_type": "LOHA", "epochs": LOSS_FALLS_EPOCHS}),
    "lokr": ("sd15", {"peft_type": "LOKR", "epochs": LOSS_FALLS_EPOCHS}),
    "lokr-factored": ("sd15", {"peft_type": "LOKR", "lora_rank": 2,
                               "epochs": LOSS_FALLS_EPOCHS}),
    "dora": ("sd15", {"lora_decompose": True, "epochs": LOSS_FALLS_EPOCHS}),
    "dora-sdxl": ("sdxl", {"lora_decompose": True}),
    "loha-sdxl": ("sdxl", {"peft_type": "LOHA"}),
}
# Their KOHYA_LORA names: SDXL's down_blocks.1.attentions.0 and down_blocks.0.resnets.0.conv1
# are SGM's input_blocks.3.1 and input_blocks.1.0.in_layers.2 on the tiny model.
KNOWN_LINEAR = {"sd15": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "sdxl": "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"}
KNOWN_CONV = {"sd15": "lora_unet_down_blocks_0_resnets_0_conv1",  # 32 -> 32 channels, 3x3
              "sdxl": "lora_unet_input_blocks_1_0_in_layers_2"}
KNOWN_TE = {"sd15": "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "sdxl": "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"}


class Trained:
    """One variant's run: the files written at its save, and what the trained model held."""
    def __init__(self, name, config, result, files):
        self.name, self.config, self.result, self.files = name, config, result, files
        self.layers = {}    # kohya name -> (base weight, peft's effective weight, bias, layer copy)
        self.legacy = {}    # kohya name -> the same layer's LEGACY_LORA name
        self.initial = {}   # adapter parameter name -> its value before training
        self.final = {}     # the same after training
        self.outputs = []   # the trained UNet's and text encoders' outputs (`outputs`)


def kohya_names(family, fmt="KOHYA_LORA") -> dict[str, torch.nn.Module]:
    """The file's layer name -> the peft layer, for every adapted layer of every trained part,
    named as `fmt` names it (SDXL's KOHYA_LORA: the UNet by its SGM names)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    sdxl = "text_encoder_2" in family.kohya_prefixes
    out = {}
    for part, prefix in family.kohya_prefixes.items():
        model = family.parts.get(part)
        if model is None:
            continue
        flattened = part != "unet" and not hasattr(model, "text_model")
        layers = {("text_model." + n) if flattened else n: m for n, m in model.named_modules()
                  if isinstance(m, BaseTunerLayer)}
        sgm = part == "unet" and lora_formats.sgm_unet_names(ModelFormat(fmt), sdxl)
        names = lora_formats.kohya_layer_names(model, part, list(layers), prefix, sgm=sgm)
        out.update((names[n], m) for n, m in layers.items())
    return out


def effective_weight(layer) -> torch.Tensor:
    """The weight the trained peft layer computes with, by peft's own merge (on a copy)."""
    merged = copy.deepcopy(layer)
    merged.merge(safe_merge=True)
    return merged.get_base_layer().weight.detach().float().clone()


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request, tiny_sd15_dir, tiny_sdxl_dir, tmp_path_factory):
    name = request.param
    family_name, settings = VARIANTS[name]
    model_dir = tiny_sdxl_dir if family_name == "sdxl" else tiny_sd15_dir
    make = sdxl_config if family_name == "sdxl" else tiny_config
    tmp = tmp_path_factory.mktemp(f"variant-{name}")
    config = make(model_dir, tmp, **{"epochs": 1, "lora_layer_preset": "full",
                                     "output_dtype": "FLOAT_32", **settings})
    check_supported(config)
    run = Trained(name, config, None, {})
    real_add, real_save = lora.add_lora, finetune.save_output

    def add_and_remember(model, config, part):
        params = real_add(model, config, part)
        for key, p in model.named_parameters():
            if any(p is q for q in params):
                run.initial[f"{part}/{key}"] = p.detach().clone()
        return params

    def save_and_record(path, family, parts, config, **kwargs):
        real_save(path, family, parts, config, **kwargs)
        for fmt in ("KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA"):
            run.files[fmt] = tmp / f"{fmt}.safetensors"
            as_fmt = config.model_copy(update={"output_model_format": ModelFormat(fmt)})
            lora_formats.save_lora(str(run.files[fmt]), family, parts, as_fmt, **kwargs)
        legacy = {id(m): n for n, m in kohya_names(family, "LEGACY_LORA").items()}
        for kohya, layer in kohya_names(family).items():
            run.legacy[kohya] = legacy[id(layer)]
            base = layer.get_base_layer()
            bias = None if base.bias is None else base.bias.detach().clone()
            run.layers[kohya] = (base.weight.detach().float().clone(), effective_weight(layer),
                                 bias, copy.deepcopy(layer))
        for part in parts:
            for key, p in family.parts[part].named_parameters():
                if f"{part}/{key}" in run.initial:
                    run.final[f"{part}/{key}"] = p.detach().clone()
        run.outputs = outputs_in_eval_mode(family)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora, "add_lora", add_and_remember)
        patch.setattr(finetune, "save_output", save_and_record)
        run.result = train(config)
    run.files[config.output_model_format.value] = run.result.output_path
    return run


# --- ComfyUI's reconstruction, from its source (comfy/weight_adapter/{lora,loha,lokr,base}.py)

def comfy_weight_decompose(dora_scale, weight, lora_diff, alpha):
    """base.py weight_decompose at strength 1: a dora_scale as long as the output axis is
    normalised by the BASE weight's row norms; otherwise per input column of W + dW."""
    weight_calc = weight + alpha * lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1)
                .norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    return weight_calc * (dora_scale / norm)


def comfy_weight(weight, file: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The patched weight ComfyUI computes for layer `name` of a kohya/LyCORIS file."""
    t = {k[len(name) + 1:]: v.float() for k, v in file.items() if k.startswith(name + ".")}
    if "hada_w1_a" in t:  # loha.py
        alpha = t["alpha"].item() / t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"],
                              t["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"],
                              t["hada_w2_a"])
        else:
            m1 = t["hada_w1_a"] @ t["hada_w1_b"]
            m2 = t["hada_w2_a"] @ t["hada_w2_b"]
        return weight + alpha * (m1 * m2).reshape(weight.shape)
    if any(k.startswith("lokr_") for k in t):  # lokr.py
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            dim = t["lokr_w1_b"].shape[0]
            w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None:
            dim = t["lokr_w2_b"].shape[0]
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = t["alpha"].item() / dim if dim is not None else 1.0
        return weight + alpha * torch.kron(w1, w2).reshape(weight.shape)
    up, down = t["lora_up.weight"], t["lora_down.weight"]  # lora.py
    alpha = t["alpha"].item() / down.shape[0]
    diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    if "dora_scale" in t:
        return comfy_weight_decompose(t["dora_scale"], weight, diff, alpha)
    return weight + alpha * diff


def suffixes(file, name):
    return {k[len(name) + 1:]: tuple(v.shape) for k, v in file.items() if k.startswith(name + ".")}


# --- Training ------------------------------------------------------------------------------

def test_each_variant_trains_with_a_finite_loss_and_moves_its_adapters(trained):
    losses = [r["loss"] for r in read_metrics(trained.config)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert trained.initial and trained.initial.keys() == trained.final.keys()
    still = {k for k in trained.initial if torch.equal(trained.initial[k], trained.final[k])}
    # every UNet adapter learned; in the text encoders too, except SDXL's first encoder's last
    # layer, whose output SDXL never uses (it takes the penultimate hidden state)
    assert not {k for k in still if k.startswith("unet/")}
    for part in {k.split("/")[0] for k in trained.initial}:
        assert any(k.startswith(part + "/") and k not in still for k in trained.initial), part
    # the adapter types peft built are the ones asked for
    peft_type = trained.config.peft_type
    names = "".join(trained.initial)
    assert ("hada_w1_a" in names) == (peft_type == PeftType.LOHA)
    assert ("lokr_w1" in names) == (peft_type == PeftType.LOKR)
    assert ("lora_magnitude_vector" in names) == trained.config.lora_decompose
    # and they are trained in float32 whatever the base weights' type
    assert {v.dtype for v in trained.final.values()} == {torch.float32}


def test_each_method_learns_its_loss_falls(trained):
    """LoHa, LoKr (whole and factored) and DoRA train the tiny SD 1.5 for real: 30 steps at
    lr 1e-2 on every layer ("full") bring the loss down by far more than its noise (measured:
    the last ten steps' mean about 0.5 of the first ten's; plain LoRA on attention layers
    alone needs ~150 steps for 0.75, tests/test_engine.py)."""
    if trained.config.epochs != LOSS_FALLS_EPOCHS:
        pytest.skip("the SDXL runs take one epoch: they check the layout")
    losses = [r["loss"] for r in read_metrics(trained.config)]
    assert len(losses) == 3 * LOSS_FALLS_EPOCHS  # 5 images, batch 2
    first, last = losses[:10], losses[-10:]
    assert sum(last) < 0.8 * sum(first), (first, last)


# --- Key layout ----------------------------------------------------------------------------

def expected_layout(name, family):
    """{layer: {suffix: shape}} for the known linear layer (sd15 32 -> 32, sdxl 64 -> 64) and
    conv layer (32 -> 32 channels, 3x3), at rank 4 (lokr-factored: 2)."""
    linear, conv = KNOWN_LINEAR[family], KNOWN_CONV[family]
    n = 64 if family == "sdxl" else 32
    if name.startswith("loha"):
        return {linear: {"hada_w1_a": (n, 4), "hada_w1_b": (4, n), "hada_w2_a": (n, 4),
                         "hada_w2_b": (4, n), "alpha": ()},
                conv: {"hada_w1_a": (32, 4), "hada_w1_b": (4, 32 * 9), "hada_w2_a": (32, 4),
                       "hada_w2_b": (4, 32 * 9), "alpha": ()}}
    if name == "lokr":  # 32 = 4 x 8: w1 (4, 4), w2 (8, 8) both whole at rank 4
        return {linear: {"lokr_w1": (4, 4), "lokr_w2": (8, 8), "alpha": ()},
                conv: {"lokr_w1": (4, 4), "lokr_w2": (8, 8, 3, 3), "alpha": ()}}
    if name == "lokr-factored":
        return {linear: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8),
                         "alpha": ()},
                conv: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8 * 9),
                       "alpha": ()}}
    return {linear: {"lora_down.weight": (4, n), "lora_up.weight": (n, 4), "alpha": (),
                     "dora_scale": (n, 1)},
            conv: {"lora_down.weight": (4, 32, 3, 3), "lora_up.weight": (32, 4, 1, 1),
                   "alpha": (), "dora_scale": (32, 1, 1, 1)}}


def test_the_file_has_exactly_the_lycoris_layout(trained):
    family = VARIANTS[trained.name][0]
    file = load_file(str(trained.files["KOHYA_LORA"]))
    for layer, layout in expected_layout(trained.name, family).items():
        assert suffixes(file, layer) == layout, layer
    te = suffixes(file, KNOWN_TE[family])
    assert te.keys() == next(iter(expected_layout(trained.name, family).values())).keys()
    # every layer of the file has the same key family, and every adapted layer is in it
    families = {frozenset(suffixes(file, k.split(".")[0])) for k in file}
    allowed = {"loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}],
               "lokr": [{"lokr_w1", "lokr_w2", "alpha"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b",
                                                          "alpha"}],
               "dora": [{"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}]}
    kind = trained.name.split("-")[0]
    assert families <= {frozenset(f) for f in allowed[kind]}
    assert {k.split(".")[0] for k in file} == set(trained.layers)
    alphas = {k.split(".")[0]: v.item() for k, v in file.items() if k.endswith(".alpha")}
    if trained.name == "lokr":  # whole factors: alpha / r folded into w1, alpha = rank (scale 1)
        assert alphas[KNOWN_LINEAR[family]] == 4.0
    else:
        assert set(alphas.values()) == {ALPHA}


def test_comfy_lora_holds_the_same_tensors_under_comfyui_names(trained):
    family = VARIANTS[trained.name][0]
    kohya = load_file(str(trained.files["KOHYA_LORA"]))
    comfy = load_file(str(trained.files["COMFY_LORA"]))
    assert len(comfy) == len(kohya)
    known = ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q" if family == "sd15"
             else "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q")
    rename = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    got = {rename.get(k, k): v for k, v in suffixes(comfy, known).items()}
    assert got == suffixes(kohya, KNOWN_LINEAR[family])
    for suffix in suffixes(comfy, known):
        assert torch.equal(comfy[f"{known}.{suffix}"],
                           kohya[f"{KNOWN_LINEAR[family]}.{rename.get(suffix, suffix)}"]), suffix


def test_legacy_lora_holds_the_same_tensors_under_diffusers_unet_names(trained):
    """LEGACY_LORA = KOHYA_LORA with the UNet named by the diffusers UNet: for SD 1.5 the same
    names (the same bytes), for SDXL every UNet layer renamed, nothing else changed."""
    family = VARIANTS[trained.name][0]
    kohya = load_file(str(trained.files["KOHYA_LORA"]))
    legacy = load_file(str(trained.files["LEGACY_LORA"]))
    renamed = {k: trained.legacy[k] for k in trained.legacy if k != trained.legacy[k]}
    assert bool(renamed) == (family == "sdxl")
    assert all(k.startswith("lora_unet_") for k in renamed)
    assert all(v.startswith(("lora_unet_down_blocks", "lora_unet_mid_block",
                             "lora_unet_up_blocks", "lora_unet_conv_", "lora_unet_time_"
                             "embedding", "lora_unet_add_embedding"))
               for v in renamed.values())
    expected = {f"{trained.legacy[k.split('.')[0]]}.{k.split('.', 1)[1]}": v
                for k, v in kohya.items()}
    assert expected.keys() == legacy.keys()
    assert all(torch.equal(expected[k], legacy[k]) for k in legacy)


# --- The real proof: ComfyUI's weights from the file = the trained peft layers' -------------

def test_comfyui_rebuilds_every_trained_layer_from_the_file(trained):
    file = load_file(str(trained.files["KOHYA_LORA"]))
    changed = set()
    for name, (base, effective, _, _) in trained.layers.items():
        rebuilt = comfy_weight(base, file, name)
        torch.testing.assert_close(rebuilt, effective, rtol=1e-5, atol=1e-6, msg=name)
        if not torch.equal(effective, base):
            changed.add(name)
    assert len(trained.layers) > 20
    # every UNet layer really changed (SDXL's first encoder's last layer gets no gradient)
    assert {n for n in trained.layers if n.startswith("lora_unet_")} <= changed
    assert {n.split("_")[1] for n in changed} == {n.split("_")[1] for n in trained.layers}


def test_the_rebuilt_weight_gives_the_trained_layers_outputs(trained):
    """Not only peft's merge: the trained layer's own forward equals a plain linear/conv with
    the weight rebuilt from the file."""
    file = load_file(str(trained.files["KOHYA_LORA"]))
    family = VARIANTS[trained.name][0]
    g = torch.Generator().manual_seed(0)
    for name in (KNOWN_LINEAR[family], KNOWN_CONV[family], KNOWN_TE[family]):
        base, _, bias, layer = trained.layers[name]
        weight = comfy_weight(base, file, name)
        layer.eval()
        with torch.no_grad():
            if weight.dim() == 4:
                x = torch.randn(2, weight.shape[1], 8, 8, generator=g)
                base_conv = layer.get_base_layer()
                expected = torch.nn.functional.conv2d(x, weight, bias, base_conv.stride,
                                                      base_conv.padding)
            else:
                x = torch.randn(3, weight.shape[1], generator=g)
                expected = torch.nn.functional.linear(x, weight, bias)
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5, msg=name)


def test_dora_scale_is_the_magnitude_converted_for_comfyui(trained):
    """dora_scale = peft's magnitude m * ||W|| / ||W + dW|| (rows): ComfyUI divides the
    output-axis scale by the base weight's norm, peft by the merged weight's."""
    family = VARIANTS[trained.name][0]
    file = load_file(str(trained.files["KOHYA_LORA"]))
    if not trained.config.lora_decompose:  # LoHa/LoKr: no magnitude anywhere
        assert not [k for k in file if "dora" in k or "magnitude" in k]
        return
    name = KNOWN_LINEAR[family]
    base, effective, _, layer = trained.layers[name]
    magnitude = layer.lora_magnitude_vector["default"].weight.detach().flatten()
    rows = effective.norm(dim=1)  # W' = m (W+dW)/||W+dW||: its rows have norm m
    torch.testing.assert_close(rows, magnitude, rtol=1e-5, atol=1e-6)
    down, up = file[f"{name}.lora_down.weight"], file[f"{name}.lora_up.weight"]
    merged = base + (file[f"{name}.alpha"] / down.shape[0]) * up @ down
    torch.testing.assert_close(file[f"{name}.dora_scale"].flatten(),
                               magnitude * base.norm(dim=1) / merged.norm(dim=1))


# --- Metadata ------------------------------------------------------------------------------

NETWORK = {
    "loha": ("lycoris.kohya", {"algo": "loha"}),
    "lokr": ("lycoris.kohya", {"algo": "lokr", "factor": "-1"}),
    "dora": ("networks.lora", {"dora_wd": "True", "wd_on_output": "True"}),
}


def test_the_metadata_names_the_network_type(trained):
    import json
    with safe_open(str(trained.result.output_path), "pt") as f:
        meta = f.metadata()
    module, args = NETWORK[trained.name.split("-")[0]]
    assert meta["ss_network_module"] == module
    assert json.loads(meta["ss_network_args"]) == args
    saved = json.loads(meta["atelier_config"])
    assert (saved["peft_type"], saved["lora_decompose"]) == (trained.config.peft_type.value,
                                                             trained.config.lora_decompose)


def test_plain_lora_keeps_its_metadata():
    config = config_from_dict({})
    assert lora.network_args(config) == {"ss_network_module": "networks.lora"}


# --- DoRA in diffusers -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dora_as_diffusers_lora_reloads_in_diffusers_with_the_trained_outputs(
        family, tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    """DIFFUSERS_LORA keeps peft's magnitude: `load_lora_weights` turns DoRA on and the UNet
    and text encoders give what the trained model gave. (diffusers drops the `dora_scale` of
    kohya files for SD 1.5 / SDXL with a warning, so the kohya layout is for ComfyUI/Forge.)"""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    model_dir = tiny_sdxl_dir if family == "sdxl" else tiny_sd15_dir
    make = sdxl_config if family == "sdxl" else tiny_config
    config = make(model_dir, tmp_path, epochs=1, lora_decompose=True, output_dtype="FLOAT_32",
                  output_model_format="DIFFUSERS_LORA")
    reference = {}
    real_save = finetune.save_output

    def save_and_record(path, fam, parts, config, **kwargs):
        real_save(path, fam, parts, config, **kwargs)
        reference["outputs"] = outputs(*[fam.parts.get(p) for p in
                                         ("unet", "text_encoder", "text_encoder_2")])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "save_output", save_and_record)
        result = train(config)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    before = outputs(pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    pipe.load_lora_weights(result.output_path)
    assert pipe.unet.peft_config["default_0"].use_dora
    after = outputs(pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    for got, trained_out, untouched in zip(after, reference["outputs"], before):
        assert not torch.allclose(trained_out, untouched, atol=1e-4)  # the DoRA changed it
        torch.testing.assert_close(got, trained_out, rtol=1e-4, atol=1e-5)


def outputs_in_eval_mode(family) -> list[torch.Tensor]:
    """`outputs` of a family's UNet and text encoders in eval mode (no dropout of any kind),
    their modes restored after."""
    modules = [family.parts.get(p) for p in ("unet", "text_encoder", "text_encoder_2")]
    modes = [(m, m.training) for m in modules if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        return outputs(*modules)
    finally:
        for module, training in modes:
            module.train(training)


# --- LoHa and LoKr (and DoRA) read back into peft --------------------------------------------

def test_the_file_reloads_into_fresh_peft_adapters_with_the_trained_outputs(trained):
    """Where diffusers has no loader (LoHa and LoKr on SD 1.5 / SDXL): the KOHYA_LORA file,
    read back by trainer/lora_reader.py into adapters built with the same config on a fresh
    base model, gives the trained UNet's and text encoders' outputs, and peft's own tensors
    (LoKr's folded alpha unfolded, DoRA's dora_scale turned back into the magnitude)."""
    from trainer.models.family import load_family
    parts = sorted({k.split("/")[0] for k in trained.initial})
    family = load_family(trained.config)
    for part in parts:
        lora.add_lora(family.parts[part], trained.config, part)
    untrained = outputs_in_eval_mode(family)
    load_lora_file(trained.files["KOHYA_LORA"], {p: family.parts[p] for p in parts},
                   family.kohya_prefixes)
    reloaded = outputs_in_eval_mode(family)
    assert len(reloaded) == len(trained.outputs) == (4 if "text_encoder_2" in parts else 2)
    for got, want, base in zip(reloaded, trained.outputs, untrained):
        assert not torch.allclose(want, base, atol=1e-4)  # the adapters changed it
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for part in parts:
        for key, p in family.parts[part].named_parameters():
            if f"{part}/{key}" in trained.final:
                torch.testing.assert_close(p.detach(), trained.final[f"{part}/{key}"],
                                           rtol=1e-5, atol=1e-6, msg=key)


def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Adapters as after some training: every factor nonzero, DoRA's magnitude moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif any(m in name for m in lora.ADAPTER_MARKERS):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return unet.eval()(latents, torch.tensor([300]), states).sample


def adapted_unet(model_dir, **settings):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    config = config_from_dict({"lora_layer_preset": "full", "lora_rank": 4, "lora_alpha": 2.0,
                               **settings})
    lora.add_lora(unet, config, "unet")
    return unet


@pytest.mark.parametrize("settings", [{}, {"lora_decompose": True}, {"peft_type": "LOHA"},
                                      {"peft_type": "LOKR"},
                                      {"peft_type": "LOKR", "lora_rank": 2}],
                         ids=["lora", "dora", "loha", "lokr", "lokr-factored"])
def test_a_file_with_another_alpha_reloads_with_the_files_own_scale(settings, tiny_sd15_dir):
    """The file's alpha (or, for a whole-factor LoKr, its scale of 1) is what its users apply;
    adapters built with another alpha get the ratio folded into one factor, so the model
    computes what the file means."""
    written = adapted_unet(tiny_sd15_dir, **settings)
    randomize_adapters(written)
    file = lora.kohya_state_dict({"unet": written}, {"unet": "lora_unet_"}, 2.0, torch.float32)
    fresh = adapted_unet(tiny_sd15_dir, **{**settings, "lora_alpha": 7.0})
    load_kohya_tensors(file, {"unet": fresh}, {"unet": "lora_unet_"})
    torch.testing.assert_close(unet_output(fresh), unet_output(written), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("written, built, message", [
    ({"peft_type": "LOHA"}, {"peft_type": "LOKR"},
     "is a loha layer in the file, but the config builds lokr adapters"),
    ({}, {"lora_decompose": True}, "DoRA setting"),
    ({}, {"lora_rank": 8}, "another lora_rank"),
    ({}, {"lora_layer_preset": "attn-only"}, "has no adapter here"),
    ({"lora_layer_preset": "attn-only"}, {}, "the file has no layer"),
], ids=["type", "dora", "rank", "more-layers", "fewer-layers"])
def test_a_file_that_does_not_fit_the_adapters_is_refused_untouched(written, built, message,
                                                                    tiny_sd15_dir):
    source = adapted_unet(tiny_sd15_dir, **written)
    randomize_adapters(source)
    file = lora.kohya_state_dict({"unet": source}, {"unet": "lora_unet_"}, 2.0, torch.float32)
    target = adapted_unet(tiny_sd15_dir, **built)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        load_kohya_tensors(file, {"unet": target}, {"unet": "lora_unet_"})
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_only_kohya_layout_files_are_read_back(tiny_sd15_dir, tmp_path):
    unet = adapted_unet(tiny_sd15_dir)
    comfy = lora_formats.comfy_state_dict({"unet": unet}, 2.0, torch.float32)
    from safetensors.torch import save_file
    save_file(comfy, tmp_path / "comfy.safetensors")
    with pytest.raises(ConfigError, match="comfy.safetensors': .* not a kohya-layout layer"):
        load_lora_file(tmp_path / "comfy.safetensors", {"unet": unet}, {"unet": "lora_unet_"})


# --- EMA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{"peft_type": "LOHA"}, {"peft_type": "LOKR"},
                                      {"lora_decompose": True}], ids=["loha", "lokr", "dora"])
def test_ema_averages_every_adapter_tensor_and_the_file_holds_the_average(settings,
                                                                          tiny_sd15_dir,
                                                                          tmp_path):
    """With EMA on, every tensor of the new adapter types (LoHa's and LoKr's factors, DoRA's
    magnitude too) has a float32 shadow; the file is written from the shadows, not from the
    trained weights (which differ), and reads back into peft as the shadows."""
    import trainer.loop as loop_module
    from trainer.ema import WeightEMA
    from trainer.models.family import load_family
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, ema="CPU", ema_decay=0.9,
                         ema_update_step_interval=1, output_dtype="FLOAT_32", **settings)
    made, at_save = [], {}
    real_save = finetune.save_output

    class RecordedEMA(WeightEMA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def save_and_record(path, family, parts, config, **kwargs):
        real_save(path, family, parts, config, **kwargs)
        for part in parts:
            for key, p in family.parts[part].named_parameters():
                if any(m in key for m in lora.ADAPTER_MARKERS):
                    at_save[f"{part}/{key}"] = (p, p.detach().clone())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "WeightEMA", RecordedEMA)
        patch.setattr(finetune, "save_output", save_and_record)
        result = train(config)
    ema = made[0]
    assert len(ema.params) == len(at_save)  # every adapter tensor is averaged
    kinds = {"LOHA": "hada_w2_b", "LOKR": "lokr_w1", "LORA": "lora_magnitude_vector"}
    assert any(kinds[config.peft_type.value] in k for k in at_save)
    shadows = {id(p): s for p, s in zip(ema.params, ema.shadow)}
    moved = 0
    for key, (param, saved) in at_save.items():
        assert torch.equal(saved, shadows[id(param)]), key  # saved under the EMA weights
        moved += not torch.equal(saved, param.detach())  # the live weights are back after
    assert moved > len(at_save) // 2
    family = load_family(config)
    parts = sorted({k.split("/")[0] for k in at_save})
    for part in parts:
        lora.add_lora(family.parts[part], config, part)
    load_lora_file(result.output_path, {p: family.parts[p] for p in parts},
                   family.kohya_prefixes)
    for part in parts:
        for key, p in family.parts[part].named_parameters():
            if f"{part}/{key}" in at_save:
                torch.testing.assert_close(p.detach(), at_save[f"{part}/{key}"][1], rtol=1e-5,
                                           atol=1e-6, msg=key)


# --- The fused backward pass ------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{"peft_type": "LOHA"}, {"peft_type": "LOKR"},
                                      {"lora_decompose": True}], ids=["loha", "lokr", "dora"])
def test_the_fused_pass_trains_the_same_adapters_as_a_plain_step(settings, tiny_sd15_dir,
                                                                  tmp_path):
    """The page offers the fused pass for fine-tunes (where it saves gigabytes), but the
    engine runs it for any parameters: each adapter tensor (DoRA's magnitude too) is updated
    from its own gradient once it is ready, which changes nothing against a plain step."""
    make = lambda where, **extra: tiny_config(  # noqa: E731
        tiny_sd15_dir, tmp_path / where, clip_grad_norm=None, output_dtype="FLOAT_32",
        **settings, **extra)
    plain = load_file(train(make("plain")).output_path)
    fused = load_file(train(make("fused", fused_backward_pass=True)).output_path)
    assert plain.keys() == fused.keys() and plain
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


# --- Resume --------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{"peft_type": "LOKR", "lora_rank": 2},
                                      {"lora_decompose": True}], ids=["lokr", "dora"])
def test_an_interrupted_run_resumes_to_the_same_weights(settings, tiny_sd15_dir, tmp_path):
    make = lambda where: tiny_config(tiny_sd15_dir, tmp_path / where, epochs=3,  # noqa: E731
                                     backup_after_unit="NEVER", lora_dropout=0.25, **settings)
    reference = train(make("whole"))
    parts = make("parts")
    first = train(parts, stop_at(4))
    assert first.stopped_early and first.global_step == 4
    assert [b.name for b in list_backups(tmp_path / "parts" / "ws" / "backup")] == ["step-4"]
    resumed = train(parts.model_copy(update={"continue_last_backup": True}))
    assert resumed.global_step == reference.global_step
    a, b = load_file(reference.output_path), load_file(resumed.output_path)
    assert a.keys() == b.keys() and a
    for key in a:
        assert same_trained(a[key], b[key]), key


def test_a_backup_of_another_adapter_type_cannot_resume(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=1, peft_type="LOHA")
    train(config)
    for change, message in (({"peft_type": PeftType.LORA}, "peft_type: 'LOHA' in the backup, "
                                                           "'LORA' now"),
                            ({"peft_type": PeftType.LORA, "lora_decompose": True},
                             "lora_decompose: False in the backup, True now")):
        changed = config.model_copy(update={"continue_last_backup": True, **change})
        with pytest.raises(ConfigError, match=message):
            train(changed)


# --- Refused combinations --------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"peft_type": "LOHA", "lora_decompose": True},
     "lora_decompose \\(DoRA\\) works only with peft_type LORA, not LOHA"),
    ({"peft_type": "LOKR", "lora_decompose": True},
     "lora_decompose \\(DoRA\\) works only with peft_type LORA, not LOKR"),
    ({"peft_type": "LOHA", "output_model_format": "DIFFUSERS_LORA"},
     "output_model_format = DIFFUSERS_LORA cannot hold peft_type LOHA"),
    ({"peft_type": "LOKR", "output_model_format": "DIFFUSERS_LORA"},
     "output_model_format = DIFFUSERS_LORA cannot hold peft_type LOKR"),
])
def test_combinations_without_a_layout_are_refused_by_name(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_supported(config_from_dict(settings))


@pytest.mark.parametrize("settings", [
    {"peft_type": "LOHA", "output_model_format": "COMFY_LORA"},
    {"peft_type": "LOKR", "output_model_format": "LEGACY_LORA"},
    {"lora_decompose": True, "output_model_format": "DIFFUSERS_LORA"},
    {"lora_decompose": True, "output_model_format": "COMFY_LORA"},
])
def test_the_supported_combinations_pass(settings):
    check_supported(config_from_dict(settings))


def test_an_unknown_adapter_type_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="peft_type"):
        config_from_dict({"peft_type": "OFT"})


@pytest.mark.parametrize("settings", [{"peft_type": "LOHA"}, {"peft_type": "LOKR"},
                                      {"lora_decompose": True}], ids=["loha", "lokr", "dora"])
def test_adapters_on_bfloat16_weights_are_float32(settings, tiny_sd15_dir):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet",
                                                torch_dtype=torch.bfloat16)
    params = lora.add_lora(unet, config_from_dict({"lora_layer_preset": "full", **settings}),
                           "unet")
    assert params and {p.dtype for p in params} == {torch.float32}
    assert all(p.requires_grad for p in params)
    # every adapter parameter peft made is trained (none left out by its name)
    made = [p for n, p in unet.named_parameters() if ".default" in n]
    assert len(made) == len(params)


def test_the_fields_are_in_the_lora_section_where_they_apply():
    from trainer.config import TrainConfig
    peft_type = TrainConfig.model_fields["peft_type"].json_schema_extra
    dora = TrainConfig.model_fields["lora_decompose"].json_schema_extra
    assert peft_type["section"] == dora["section"] == "LoRA"
    assert peft_type["applies_to"] == {"training_method": ["LORA"]}
    assert dora["applies_to"] == {"training_method": ["LORA"], "peft_type": ["LORA"]}
    defaults = config_from_dict({})
    assert (defaults.peft_type, defaults.lora_decompose) == (PeftType.LORA, False)
