"""Every output format OneTrainer offers for SD 1.5 and SDXL, written from one real training
per family: the key layout of each LoRA format (a known layer, alpha; SDXL's KOHYA_LORA under
the original SGM UNet names, its LEGACY_LORA under the diffusers ones), reloads in diffusers
and in the project's own reader that reproduce the trained model's outputs, COMFY_LORA's
names against the single-file checkpoint the repo writes, the legacy full-model file, and
formats refused for the wrong training method."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import finetune, lora_formats
from trainer.config import ModelFormat, check_supported, config_from_dict
from trainer.errors import ConfigError
from trainer.loop import train

from helpers import outputs, sdxl_config, tiny_config

LORA_FORMATS = ["KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA", "DIFFUSERS_LORA"]
ALPHA, RANK = 2.0, 4  # helpers.tiny_config: alpha / rank = 0.5, so a lost alpha shows

# One known layer per family, as each format names it. The tiny SDXL has one resnet per down
# block and no attention in the first: down_blocks.1.attentions.0 is SGM's input_blocks.3.1.
KNOWN = {
    "sd15": {
        "KOHYA_LORA": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "LEGACY_LORA": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "COMFY_LORA": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "DIFFUSERS_LORA": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "te_KOHYA_LORA": "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "te_LEGACY_LORA": "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "te_COMFY_LORA": "text_encoders.clip_l.transformer.text_model.encoder.layers.0."
                         "self_attn.q_proj",
        "te_DIFFUSERS_LORA": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    },
    "sdxl": {
        "KOHYA_LORA": "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
        "LEGACY_LORA": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "COMFY_LORA": "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q",
        "DIFFUSERS_LORA": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "te_KOHYA_LORA": "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
        "te_LEGACY_LORA": "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
        "te_COMFY_LORA": "text_encoders.clip_g.transformer.text_model.encoder.layers.0."
                         "self_attn.q_proj",
        "te_DIFFUSERS_LORA": "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
    },
}


def pipeline_of(family, model_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if family == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)


def parts_of(pipe) -> list:
    return [pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request, tiny_sd15_dir, tiny_sdxl_dir, tmp_path_factory):
    """One short LoRA training per family (every part trained, attn-mlp layers), written as
    DIFFUSERS_LORA by the loop itself; at that save the same trained adapters are also written
    in every other LoRA format, and the trained model's outputs are recorded."""
    family_name = request.param
    model_dir = tiny_sdxl_dir if family_name == "sdxl" else tiny_sd15_dir
    tmp = tmp_path_factory.mktemp(f"formats-{family_name}")
    make = sdxl_config if family_name == "sdxl" else tiny_config
    config = make(model_dir, tmp, epochs=1, lora_layer_preset="attn-mlp",
                  output_model_format="DIFFUSERS_LORA")
    files, reference = {}, {}
    real_save = finetune.save_output

    def save_and_write_the_others(path, family, parts, config, **kwargs):
        real_save(path, family, parts, config, **kwargs)
        for fmt in LORA_FORMATS:
            files[fmt] = tmp / f"{fmt}.safetensors"
            as_fmt = config.model_copy(update={"output_model_format": ModelFormat(fmt)})
            lora_formats.save_lora(str(files[fmt]), family, parts, as_fmt, **kwargs)
        reference["outputs"] = outputs(*[family.parts.get(p) for p in
                                         ("unet", "text_encoder", "text_encoder_2")])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "save_output", save_and_write_the_others)
        result = train(config)
    return family_name, model_dir, result, files, reference["outputs"], config


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_layers(family, fmt) -> list[tuple[str, str]]:
    """(the known UNet layer, the known text-encoder layer) in `fmt` and in kohya's names."""
    known = KNOWN[family]
    return [(known[fmt], known["KOHYA_LORA"]), (known[f"te_{fmt}"], known["te_KOHYA_LORA"])]


# --- Key layouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["KOHYA_LORA", "LEGACY_LORA"])
def test_kohya_and_legacy_lora_have_the_kohya_layout(trained, fmt):
    family, _, _, files, _, _ = trained
    file = tensors(files[fmt])
    for layer in (KNOWN[family][fmt], KNOWN[family][f"te_{fmt}"]):
        assert {f"{layer}.lora_down.weight", f"{layer}.lora_up.weight",
                f"{layer}.alpha"} <= file.keys()
    prefixes = {"lora_unet_", "lora_te_"} if family == "sd15" else {"lora_unet_", "lora_te1_",
                                                                     "lora_te2_"}
    assert {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] + "_" for k in file} == prefixes
    assert {v.item() for k, v in file.items() if k.endswith(".alpha")} == {ALPHA}


def unet_blocks(file) -> set[str]:
    """The UNet block names a kohya file uses: 'down_blocks', 'input_blocks', ..."""
    return {k.removeprefix("lora_unet_").split("_")[0] + "_" + k.removeprefix("lora_unet_")
            .split("_")[1] for k in file if k.startswith("lora_unet_")}


def test_sd15_kohya_and_legacy_lora_are_the_same_bytes_with_diffusers_unet_names(trained):
    family, _, _, files, _, _ = trained
    if family != "sd15":
        pytest.skip("SDXL's two layouts differ (next test)")
    kohya, legacy = tensors(files["KOHYA_LORA"]), tensors(files["LEGACY_LORA"])
    assert kohya.keys() == legacy.keys()
    assert all(torch.equal(kohya[k], legacy[k]) for k in kohya)
    assert unet_blocks(kohya) == {"down_blocks", "mid_block", "up_blocks"}


def test_sdxl_kohya_lora_names_the_unet_by_sgm_and_legacy_by_diffusers(trained):
    """SDXL: KOHYA_LORA's UNet layers carry the original SGM names (kohya's sd-scripts and
    OneTrainer's KOHYA_LORA), LEGACY_LORA's the diffusers ones, the text encoders' are the
    same. diffusers' reader of kohya's files (SGM block renaming included) turns both into
    the same adapters: the same peft names, tensors and alphas."""
    from diffusers import StableDiffusionXLPipeline
    family, model_dir, _, files, _, _ = trained
    if family != "sdxl":
        pytest.skip("SD 1.5's two layouts are the same (test above)")
    kohya, legacy = tensors(files["KOHYA_LORA"]), tensors(files["LEGACY_LORA"])
    assert unet_blocks(kohya) == {"input_blocks", "middle_block", "output_blocks"}
    assert unet_blocks(legacy) == {"down_blocks", "mid_block", "up_blocks"}
    te = {k for k in kohya if k.startswith("lora_te")}
    assert te and te == {k for k in legacy if k.startswith("lora_te")}
    unet_config = pipeline_of(family, model_dir).unet.config
    read = [StableDiffusionXLPipeline.lora_state_dict(file, unet_config=unet_config)
            for file in (kohya, legacy)]
    (from_kohya, kohya_alphas), (from_legacy, legacy_alphas) = read
    assert from_kohya.keys() == from_legacy.keys() and kohya_alphas == legacy_alphas
    assert all(torch.equal(from_kohya[k], from_legacy[k]) for k in from_legacy)


@pytest.mark.parametrize("module, sgm", [
    # kohya's sd-scripts trains SDXL on its SGM UNet (library/sdxl_original_unet.py) and names
    # its layers by it; OneTrainer's KOHYA_LORA derives the same names (input_blocks 3i+j+1,
    # output_blocks 3i+j, resnets in_layers.2 / emb_layers.1 / out_layers.3 / skip_connection)
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
     "input_blocks_8_1_transformer_blocks_9_ff_net_2"),
    ("mid_block.attentions.0.proj_in", "middle_block_1_proj_in"),
    ("up_blocks.0.attentions.2.transformer_blocks.3.attn2.to_out.0",
     "output_blocks_2_1_transformer_blocks_3_attn2_to_out_0"),
    ("up_blocks.1.attentions.0.proj_out", "output_blocks_3_1_proj_out"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks_3_0_op"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks_5_2_conv"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks_2_0_in_layers_2"),
    ("down_blocks.2.resnets.0.time_emb_proj", "input_blocks_7_0_emb_layers_1"),
    ("mid_block.resnets.1.conv2", "middle_block_2_out_layers_3"),
    ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks_8_0_skip_connection"),
    ("conv_in", "input_blocks_0_0"), ("conv_out", "out_2"),
    ("time_embedding.linear_1", "time_embed_0"), ("add_embedding.linear_2", "label_emb_0_2"),
])
def test_sdxl_kohya_names_on_the_real_sdxl_unet_are_kohyas(module, sgm):
    """The names come from the model's own block layout: on SDXL 1.0's UNet (its shipped
    config, built without weights) they are the names of kohya's SDXL LoRAs."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from trainer.models.sdxl import SDXL_CONFIG_DIR
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(str(SDXL_CONFIG_DIR / "unet")))
    names = lora_formats.kohya_layer_names(unet, "unet", [module], "lora_unet_", sgm=True)
    assert names == {module: "lora_unet_" + sgm}


def test_comfy_lora_has_comfy_names_lora_a_b_and_alpha(trained):
    family, _, _, files, _, _ = trained
    comfy, kohya = tensors(files["COMFY_LORA"]), tensors(files["KOHYA_LORA"])
    assert len(comfy) == len(kohya)  # every adapter, three tensors each
    for layer, kohya_layer in same_layers(family, "COMFY_LORA"):
        assert torch.equal(comfy[f"{layer}.lora_A.weight"],
                           kohya[f"{kohya_layer}.lora_down.weight"])
        assert torch.equal(comfy[f"{layer}.lora_B.weight"], kohya[f"{kohya_layer}.lora_up.weight"])
        assert comfy[f"{layer}.alpha"].item() == ALPHA
    assert all(k.startswith(("diffusion_model.", "text_encoders.clip_l.transformer.",
                             "text_encoders.clip_g.transformer.")) for k in comfy)
    assert any(k.startswith("text_encoders.clip_g.") for k in comfy) == (family == "sdxl")


def test_diffusers_lora_has_peft_keys_with_alpha_folded_in(trained):
    family, _, result, files, _, _ = trained
    written = tensors(result.output_path)  # the loop's own save, through save_output
    assert written.keys() == tensors(files["DIFFUSERS_LORA"]).keys()
    kohya = tensors(files["KOHYA_LORA"])
    assert not [k for k in written if "alpha" in k]
    parts = {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert {k.split(".", 1)[0] for k in written} == parts
    for layer, kohya_layer in same_layers(family, "DIFFUSERS_LORA"):
        assert torch.equal(written[f"{layer}.lora_A.weight"],
                           kohya[f"{kohya_layer}.lora_down.weight"])
        torch.testing.assert_close(written[f"{layer}.lora_B.weight"],
                                   kohya[f"{kohya_layer}.lora_up.weight"] * (ALPHA / RANK))


def test_every_lora_format_carries_the_metadata(trained):
    _, _, _, files, _, _ = trained
    for fmt, path in files.items():
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        assert metadata["ss_network_alpha"] == str(ALPHA) and "modelspec.architecture" in metadata
        assert '"output_model_format"' in metadata["atelier_config"], fmt


# --- Reloading in diffusers ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["KOHYA_LORA", "LEGACY_LORA", "DIFFUSERS_LORA"])
def test_lora_reloads_in_diffusers_and_changes_the_model_as_training_did(trained, fmt):
    family, model_dir, _, files, reference, _ = trained
    pipe = pipeline_of(family, model_dir)
    base = outputs(*parts_of(pipe))
    # the LoRA changes every output clearly: a reload that lost a part or the alpha shows
    assert all((r - b).abs().max() > 1e-2 for r, b in zip(reference, base))
    pipe.load_lora_weights(str(files[fmt]))
    for got, want in zip(outputs(*parts_of(pipe)), reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for got, want in zip(outputs(*parts_of(pipe)), reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["KOHYA_LORA", "LEGACY_LORA"])
def test_both_kohya_layouts_read_back_into_fresh_adapters_with_the_trained_outputs(trained, fmt):
    """trainer/lora_reader.py (resume, continue) reads either UNet naming: the adapters built
    on a fresh base model give the trained model's outputs."""
    from trainer import lora
    from trainer.lora_reader import load_lora_file
    from trainer.models.family import load_family
    _, _, _, files, reference, config = trained
    family = load_family(config)
    parts = [p for p in ("unet", "text_encoder", "text_encoder_2") if p in family.parts]
    for part in parts:
        lora.add_lora(family.parts[part], config, part)
    load_lora_file(files[fmt], {p: family.parts[p] for p in parts}, family.kohya_prefixes)
    for module in family.parts.values():
        module.eval()
    got = outputs(*[family.parts.get(p) for p in ("unet", "text_encoder", "text_encoder_2")])
    for mine, want in zip(got, reference):
        torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-5)


# --- COMFY_LORA against the single-file checkpoint -------------------------------------------

def single_file_keys(family, model_dir, tmp_path) -> set[str]:
    from trainer.models.single_file import save_sd15_single_file, save_sdxl_single_file
    save = save_sdxl_single_file if family == "sdxl" else save_sd15_single_file
    path = save(pipeline_of(family, model_dir), tmp_path / "model.safetensors")
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_comfy_lora_names_are_the_single_file_checkpoints_weights(trained, tmp_path):
    """ComfyUI's generic LoRA names are its model's keys: the checkpoint's UNet keys without
    'model.', its CLIP-L keys under clip_l (TE2: ComfyUI holds OpenCLIP-G in the transformers
    layout, so its keys are those of diffusers' text_encoder_2)."""
    family, model_dir, _, files, _, _ = trained
    checkpoint = single_file_keys(family, model_dir, tmp_path)
    clip_l = ("conditioner.embedders.0.transformer." if family == "sdxl"
              else "cond_stage_model.transformer.")
    pipe = pipeline_of(family, model_dir)
    te2_keys = set(pipe.text_encoder_2.state_dict()) if family == "sdxl" else set()
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
               for k in tensors(files["COMFY_LORA"])}
    for module in modules:
        if module.startswith("diffusion_model."):
            assert f"model.{module}.weight" in checkpoint, module
        elif module.startswith("text_encoders.clip_l.transformer."):
            name = module.removeprefix("text_encoders.clip_l.transformer.")
            assert f"{clip_l}{name}.weight" in checkpoint, module
        else:
            name = module.removeprefix("text_encoders.clip_g.transformer.")
            assert f"{name}.weight" in te2_keys, module


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_comfy_names_cover_every_layer_the_full_preset_adapts(family, tiny_sd15_dir,
                                                            tiny_sdxl_dir, tmp_path):
    """Resnets, samplers, conv_in/out, time embeddings: LDM renames these (not only the
    attention blocks), and each must land on a checkpoint weight."""
    from trainer import lora
    model_dir = tiny_sdxl_dir if family == "sdxl" else tiny_sd15_dir
    checkpoint = single_file_keys(family, model_dir, tmp_path)
    unet = pipeline_of(family, model_dir).unet
    make = sdxl_config if family == "sdxl" else tiny_config
    lora.add_lora(unet, make(model_dir, tmp_path, lora_layer_preset="full"), "unet")
    modules = list(lora.trained_adapters(unet, "unet"))
    assert any(".resnets." in m for m in modules) and any("conv_in" in m for m in modules)
    names = lora_formats.ldm_unet_names(unet, modules)
    assert all(f"model.diffusion_model.{names[m]}.weight" in checkpoint for m in modules)


def test_comfy_lora_is_not_read_by_diffusers(trained):
    """ComfyUI's names are its own: diffusers refuses the file rather than loading it wrong."""
    family, model_dir, _, files, _, _ = trained
    with pytest.raises(ValueError):
        pipeline_of(family, model_dir).load_lora_weights(str(files["COMFY_LORA"]))


# --- Full models -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_legacy_safetensors_is_the_original_single_file(family, tiny_sd15_dir, tiny_sdxl_dir,
                                                        tmp_path):
    model_dir = tiny_sdxl_dir if family == "sdxl" else tiny_sd15_dir
    make = sdxl_config if family == "sdxl" else tiny_config
    config = make(model_dir, tmp_path, training_method="FINE_TUNE", epochs=1, batch_size=5,
                  learning_rate=1e-3, text_encoder={"train": False},
                  text_encoder_2={"train": False}, output_model_format="LEGACY_SAFETENSORS")
    result = train(config)
    assert result.output_path.endswith(".safetensors")
    assert single_file_keys(family, model_dir, tmp_path) == set(tensors(result.output_path))
    pipe_class = type(pipeline_of(family, model_dir))
    extra = {"add_watermarker": False} if family == "sdxl" else {"safety_checker": None}
    loaded = pipe_class.from_single_file(result.output_path, config=str(model_dir),
                                         local_files_only=True, **extra)
    base = pipeline_of(family, model_dir).unet.state_dict()
    trained_unet = loaded.unet.state_dict()
    assert trained_unet.keys() == base.keys()
    assert any(not torch.equal(trained_unet[k], base[k]) for k in base)  # the fine-tune in it


@pytest.mark.parametrize("method, fmt, written", [
    ("LORA", "KOHYA_LORA", "ws/output/lora.safetensors"),
    ("LORA", "COMFY_LORA", "ws/output/lora.safetensors"),
    ("LORA", "DIFFUSERS_LORA", "ws/output/lora.safetensors"),
    ("FINE_TUNE", "ORIGINAL_SINGLE_FILE", "ws/output/model.safetensors"),
    ("FINE_TUNE", "LEGACY_SAFETENSORS", "ws/output/model.safetensors"),
    ("FINE_TUNE", "DIFFUSERS", "ws/output/model"),
])
def test_each_format_is_a_file_but_diffusers_a_folder(method, fmt, written):
    import pathlib
    config = config_from_dict({"training_method": method, "output_model_format": fmt,
                               "workspace_dir": "ws"})
    check_supported(config)
    assert finetune.output_path(config) == pathlib.Path(written)


# --- Formats and methods ----------------------------------------------------------------------

@pytest.mark.parametrize("method, fmt", [
    ("FINE_TUNE", "KOHYA_LORA"), ("FINE_TUNE", "COMFY_LORA"), ("FINE_TUNE", "DIFFUSERS_LORA"),
    ("LORA", "ORIGINAL_SINGLE_FILE"), ("LORA", "DIFFUSERS"), ("LORA", "LEGACY_SAFETENSORS"),
])
def test_a_format_of_the_other_method_is_refused_by_name(method, fmt):
    config = config_from_dict({"training_method": method, "output_model_format": fmt})
    with pytest.raises(ConfigError) as error:
        check_supported(config)
    message = str(error.value)
    assert "output_model_format" in message and fmt in message
    fitting = ("ORIGINAL_SINGLE_FILE", "DIFFUSERS") if method == "FINE_TUNE" else ("KOHYA_LORA",)
    assert all(name in message for name in fitting)


@pytest.mark.parametrize("method, default", [("LORA", "KOHYA_LORA"),
                                             ("FINE_TUNE", "ORIGINAL_SINGLE_FILE")])
def test_a_new_config_gets_its_methods_default_and_safetensors_its_current_name(method, default):
    assert config_from_dict({"training_method": method}).output_model_format.value == default
    older = config_from_dict({"training_method": method, "output_model_format": "SAFETENSORS"})
    assert older.output_model_format.value == default


def test_onetrainers_formats_for_other_families_are_refused_by_name():
    with pytest.raises(ConfigError, match="output_model_format: ORIGINAL_LORA"):
        config_from_dict({"output_model_format": "ORIGINAL_LORA"})


# --- Embedding keys (OneTrainer's, written: tests/test_embeddings.py; read here) ------------

def test_bundled_embeddings_read_in_the_new_and_the_earlier_spelling():
    """Try it (and anything reading a LoRA's bundle) takes OneTrainer's keys and the SD 1.5
    `string_to_param.*` keys Atelier wrote before; adapter keys are not embeddings."""
    from trainer.embedding_files import bundled_embeddings
    a, b, c = torch.ones(2, 8), torch.zeros(1, 8), torch.full((1, 16), 2.0)
    found = bundled_embeddings({"bundle_emb.<old>.string_to_param.*": a,
                                "bundle_emb.<new>.clip_l": b, "bundle_emb.<new>.clip_g": c,
                                "bundle_emb.<dot.ted>.clip_l": b,
                                "lora_unet_x.alpha": torch.tensor(1.0)})
    assert found.keys() == {"<old>", "<new>", "<dot.ted>"}
    assert found["<old>"]["clip_l"] is a and found["<old>"].keys() == {"clip_l"}
    assert found["<new>"]["clip_l"] is b and found["<new>"]["clip_g"] is c


@pytest.mark.parametrize("key", ["emb_params", "emp_params", "string_to_param.*"])
def test_standalone_sd15_embeddings_read_under_every_name(key, tmp_path):
    """kohya's `emb_params` (what Atelier writes), OneTrainer's `emp_params`, A1111's
    `string_to_param.*` (beside another tensor, so the one-tensor rule cannot be what finds it)."""
    from safetensors.torch import save_file
    from trainer.embeddings import read_vectors
    vectors = torch.arange(16.0).reshape(2, 8)
    path = tmp_path / "e.safetensors"
    save_file({key: vectors, "other": torch.zeros(3)}, str(path))
    assert torch.equal(read_vectors(str(path), "text_encoder", False, "model_name"), vectors)
    save_file({"something": torch.zeros(3), "else": torch.zeros(3)}, str(path))
    with pytest.raises(ConfigError, match="emb_params, emp_params or string_to_param"):
        read_vectors(str(path), "text_encoder", False, "model_name")
