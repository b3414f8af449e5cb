"""Model loading and saving: the tiny model, diffusers folders, single files, hub ids, VAEs."""
import os
import pathlib

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from trainer.errors import ModelLoadError
from trainer.models import single_file
from trainer.models.sd15 import (
    SD15_CONFIG_DIR,
    SD15Components,
    expected_ldm_shapes,
    load_sd15,
    make_sd15_pipeline,
)
from trainer.models.single_file import save_sd15_single_file, vae_to_ldm
from trainer.models.tiny import build_tiny_sd15, build_tiny_sd15_pipeline, tiny_sd15_configs


def weight_files(folder):
    return sorted(pathlib.Path(folder).rglob("*.safetensors"))


def outputs(components: SD15Components):
    """Each part's output on fixed inputs: what "the same model" means to a user."""
    g = torch.Generator().manual_seed(0)
    ids = components.tokenizer("a photo of a cat", padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        hidden = components.text_encoder(ids).last_hidden_state
        noise_pred = components.unet(latents, 500, hidden).sample
        decoded = components.vae.decode(latents).sample
        encoded = components.vae.encode(image).latent_dist.mean
    return {"text": hidden, "unet": noise_pred, "decoded": decoded, "encoded": encoded}


def assert_same_outputs(a: SD15Components, b: SD15Components):
    out_a, out_b = outputs(a), outputs(b)
    for name in out_a:
        torch.testing.assert_close(out_a[name], out_b[name], rtol=0, atol=1e-6, msg=name)


# --- The tiny model ----------------------------------------------------------------------------

def test_tiny_build_is_deterministic_and_small(tiny_sd15_dir, tmp_path):
    again = build_tiny_sd15(tmp_path / "again", seed=0)
    other = build_tiny_sd15(tmp_path / "other", seed=1)
    files = weight_files(tiny_sd15_dir)
    assert [f.name for f in files] == [f.name for f in weight_files(again)]
    for a, b in zip(files, weight_files(again)):
        assert a.read_bytes() == b.read_bytes(), a
    assert weight_files(other)[0].read_bytes() != files[0].read_bytes()
    total = sum(f.stat().st_size for f in pathlib.Path(tiny_sd15_dir).rglob("*") if f.is_file())
    assert total < 3_500_000


def test_tiny_model_has_sd15_architecture(tiny_sd15_dir):
    model = load_sd15(str(tiny_sd15_dir))
    unet = model.unet.config
    assert "CrossAttnDownBlock2D" in unet.down_block_types and "DownBlock2D" in unet.down_block_types
    assert "CrossAttnUpBlock2D" in unet.up_block_types and "UpBlock2D" in unet.up_block_types
    assert unet.cross_attention_dim == model.text_encoder.config.hidden_size
    names = {n for n, _ in model.unet.named_modules()}
    for leaf in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_k"):
        assert any(n.endswith(leaf) for n in names), leaf
    with torch.no_grad():  # 64 px image -> 8x8 latent, as SD's VAE does 512 -> 64
        latent = model.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latent.shape == (1, 4, 8, 8)
    assert model.tokenizer.model_max_length == 77
    assert len(model.tokenizer) == model.text_encoder.config.vocab_size
    ids = model.tokenizer("a photo of the cat").input_ids
    assert ids[0] == model.tokenizer.bos_token_id and ids[-1] == model.tokenizer.eos_token_id
    assert len(ids) < len("a photo of the cat") + 2  # merges make some tokens span letters


# --- Diffusers folders -------------------------------------------------------------------------

def test_load_from_diffusers_folder(tiny_sd15_dir):
    model = load_sd15(str(tiny_sd15_dir))
    assert isinstance(model.noise_scheduler, DDPMScheduler)
    config = model.noise_scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert config.num_train_timesteps == 1000 and config.prediction_type == "epsilon"
    assert config.clip_sample is False
    for part in (model.unet, model.vae, model.text_encoder):
        assert part.dtype == torch.float32 and not part.training
    assert model.vae.config.scaling_factor == pytest.approx(0.18215)


def test_sampling_pipeline_is_deterministic_for_a_seed(tiny_sd15_dir):
    pipe = make_sd15_pipeline(load_sd15(str(tiny_sd15_dir)))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.safety_checker is None

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return pipe("a cat", num_inference_steps=3, generator=generator, output_type="np").images

    first = draw(7)
    assert first.shape == (1, 64, 64, 3)
    assert (first == draw(7)).all()
    assert not (first == draw(8)).all()


# --- Single-file checkpoints -------------------------------------------------------------------

def test_single_file_round_trip_gives_identical_outputs(tiny_sd15_dir, tmp_path):
    model = load_sd15(str(tiny_sd15_dir))
    path = save_sd15_single_file(model, tmp_path / "tiny.safetensors", metadata={"ss_steps": 12})
    assert os.listdir(tmp_path) == ["tiny.safetensors"]  # no .tmp left behind
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"ss_steps": "12"}
    prefixes = {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."}
    assert all(any(k.startswith(p) for p in prefixes) for k in keys)

    reloaded = load_sd15(str(path), single_file_config=str(tiny_sd15_dir))
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(model, part).state_dict(), getattr(reloaded, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert_same_outputs(model, reloaded)
    assert reloaded.noise_scheduler.config.beta_schedule == "scaled_linear"


def test_single_file_export_handles_other_block_layouts(tmp_path):
    """Three blocks, two layers each (SD's depth), attention in the first two: the LDM
    numbering must follow the model, not SD 1.5's fixed block list."""
    pipe = build_tiny_sd15_pipeline(seed=3)
    configs = tiny_sd15_configs(len(pipe.tokenizer), pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id)
    unet_config = dict(configs["unet"], block_out_channels=(16, 32, 32), layers_per_block=2,
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(3)
    pipe.unet = UNet2DConditionModel(**unet_config).eval()
    pipe.register_modules(unet=pipe.unet)
    folder = tmp_path / "deep"
    pipe.save_pretrained(folder)
    model = load_sd15(str(folder))
    path = save_sd15_single_file(model, tmp_path / "deep.safetensors")
    reloaded = load_sd15(str(path), single_file_config=str(folder))
    assert_same_outputs(model, reloaded)


def test_export_names_match_real_sd15_checkpoints():
    """The shipped SD 1.5 configs, instantiated on the meta device (no memory), exported with
    our names: the well-known keys of real SD 1.5 files, and diffusers' reader maps them back
    onto every weight."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    shapes = expected_ldm_shapes(SD15_CONFIG_DIR)
    assert {k: len(v) for k, v in shapes.items()} == {"unet": 686, "vae": 248, "text_encoder": 196}
    unet, vae = shapes["unet"], shapes["vae"]
    assert unet["model.diffusion_model.input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert unet["model.diffusion_model.input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert unet["model.diffusion_model.output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert unet["model.diffusion_model.output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert unet["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert unet["model.diffusion_model.middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert vae["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert vae["first_stage_model.decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in vae
    assert ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
            in shapes["text_encoder"])

    fake = {k: torch.empty(0) for k in unet}  # the reader only renames: shapes do not matter
    unet_config = UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet")
    with torch.device("meta"):
        expected_unet = UNet2DConditionModel.from_config(unet_config).state_dict().keys()
    assert convert_ldm_unet_checkpoint(fake, unet_config).keys() == expected_unet
    vae_fake = {k: torch.empty((1,) * len(s)) for k, s in vae.items()}
    vae_config = AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae")
    with torch.device("meta"):
        expected_vae = AutoencoderKL.from_config(vae_config).state_dict().keys()
    assert convert_ldm_vae_checkpoint(vae_fake, vae_config).keys() == expected_vae


def test_single_file_of_another_size_needs_its_config(tiny_sd15_dir, tmp_path):
    path = save_sd15_single_file(load_sd15(str(tiny_sd15_dir)), tmp_path / "tiny.safetensors")
    with pytest.raises(ModelLoadError) as err:
        load_sd15(str(path))  # read with the shipped full-size SD 1.5 configs
    message = str(err.value)
    assert message.startswith("base_model_name:") and str(path) in message
    assert "[32, 4, 3, 3]" in message and "single_file_config" in message


def test_failed_save_leaves_nothing_behind(tiny_sd15_dir, tmp_path, monkeypatch):
    def disk_full(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(single_file, "save_file", disk_full)
    with pytest.raises(OSError):
        save_sd15_single_file(load_sd15(str(tiny_sd15_dir)), tmp_path / "out.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("keys, expected", [
    ({"conditioner.embedders.1.model.ln_final.weight": (4,)}, "SDXL"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "is a LoRA"),
    ({"cond_stage_model.model.ln_final.weight": (4,), "model.diffusion_model.out.2.bias": (4,)}, "2.x"),
    ({"something.else": (4,)}, "not a Stable Diffusion checkpoint"),
])
def test_single_files_of_other_kinds_are_named(tmp_path, keys, expected):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(ModelLoadError, match=expected) as err:
        load_sd15(str(path))
    assert str(path) in str(err.value)


def test_truncated_single_file_is_refused(tiny_sd15_dir, tmp_path):
    path = save_sd15_single_file(load_sd15(str(tiny_sd15_dir)), tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="not a readable .safetensors") as err:
        load_sd15(str(path), single_file_config=str(tiny_sd15_dir))
    assert str(path) in str(err.value)


# --- Names that do not load --------------------------------------------------------------------

def test_hub_id_with_downloads_off_says_so():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ModelLoadError) as err:
        load_sd15("atelier-tests/no-such-model")
    message = str(err.value)
    assert "base_model_name" in message and "'atelier-tests/no-such-model'" in message
    assert "not found locally" in message and "HF_HUB_OFFLINE=1" in message


def make_bad_path(kind, tmp_path, tiny_sd15_dir):
    if kind == "missing":
        return tmp_path / "no" / "such" / "model.safetensors"
    if kind == "pickle":
        path = tmp_path / "model.ckpt"
        path.write_bytes(b"\x80\x04not really a pickle")
        return path
    if kind == "folder_without_index":
        return pathlib.Path(tiny_sd15_dir) / "unet"
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    return path


@pytest.mark.parametrize("kind, expected", [
    ("missing", "does not exist"),
    ("pickle", "pickle"),
    ("folder_without_index", "model_index.json"),
    ("other_file", "not a model format"),
])
def test_bad_base_model_paths_are_named(kind, expected, tmp_path, tiny_sd15_dir):
    path = make_bad_path(kind, tmp_path, tiny_sd15_dir)
    with pytest.raises(ModelLoadError, match=expected) as err:
        load_sd15(str(path))
    message = str(err.value)
    assert message.startswith("base_model_name:") and str(path) in message


def test_paths_outside_the_allowed_root_are_refused(tiny_sd15_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="outside the workspace folder"):
        load_sd15(str(tiny_sd15_dir), allowed_root=tmp_path)
    root = pathlib.Path(tiny_sd15_dir).parent
    relative = pathlib.Path(tiny_sd15_dir).name
    assert load_sd15(relative, allowed_root=root).unet is not None


def test_the_run_workspace_does_not_confine_model_paths(tiny_sd15_dir, tmp_path):
    # The loop passes the run's folder; models live elsewhere.
    assert load_sd15(str(tiny_sd15_dir), workspace_dir=str(tmp_path / "ws")).unet is not None


# --- VAE override ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_vae():
    return build_tiny_sd15_pipeline(seed=5).vae


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_vae_override_from_a_diffusers_folder(tiny_sd15_dir, tmp_path, other_vae):
    other_vae.save_pretrained(tmp_path / "vae")
    model = load_sd15(str(tiny_sd15_dir), vae_name=str(tmp_path / "vae"))
    assert_same_weights(model.vae, other_vae)


@pytest.mark.parametrize("prefixed", [False, True])
def test_vae_override_from_a_single_file(tiny_sd15_dir, tmp_path, other_vae, prefixed):
    # Stand-alone VAE files carry bare LDM keys ("encoder.*"); whole checkpoints prefix them.
    tensors = vae_to_ldm(other_vae.state_dict())
    if not prefixed:
        tensors = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in tensors.items()}
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    model = load_sd15(str(tiny_sd15_dir), vae_name=str(path))
    assert_same_weights(model.vae, other_vae)


def test_vae_override_into_a_single_file_base(tiny_sd15_dir, tmp_path, other_vae):
    base = save_sd15_single_file(load_sd15(str(tiny_sd15_dir)), tmp_path / "base.safetensors")
    other_vae.save_pretrained(tmp_path / "vae")
    model = load_sd15(str(base), vae_name=str(tmp_path / "vae"), single_file_config=str(tiny_sd15_dir))
    assert_same_weights(model.vae, other_vae)


@pytest.mark.parametrize("name, expected", [
    ("/no/such/vae", "does not exist"),
    ("atelier-tests/no-such-vae", "not found locally"),
])
def test_bad_vae_names_are_named(tiny_sd15_dir, name, expected):
    with pytest.raises(ModelLoadError, match=expected) as err:
        load_sd15(str(tiny_sd15_dir), vae_name=name)
    assert str(err.value).startswith("vae_model_name:") and name in str(err.value)


def test_vae_of_another_shape_is_refused(tiny_sd15_dir, tmp_path):
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8).save_pretrained(tmp_path / "v")
    with pytest.raises(ModelLoadError, match="does not fit the base model"):
        load_sd15(str(tiny_sd15_dir), vae_name=str(tmp_path / "v"))


# --- The shipped SD 1.5 tokenizer --------------------------------------------------------------

def test_shipped_sd15_tokenizer_is_clips():
    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer")
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407  # SD 1.5 pads with end-of-text


def test_shipped_sd15_pipeline_config_names_its_parts():
    index = StableDiffusionPipeline.load_config(SD15_CONFIG_DIR)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["safety_checker"] == [None, None]


# --- SDXL ---------------------------------------------------------------------------------------

from trainer.models.sdxl import SDXL_CONFIG_DIR, expected_sgm_shapes, load_sdxl  # noqa: E402
from trainer.models.single_file import save_sdxl_single_file  # noqa: E402
from trainer.models.tiny import build_tiny_sdxl_pipeline, tiny_sdxl_configs  # noqa: E402


def sdxl_outputs(components):
    """Each SDXL part's output on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    ids = components.tokenizer("a photo of a cat", padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    ids2 = components.tokenizer_2("a photo of a cat", padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        te1 = components.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        te2 = components.text_encoder_2(ids2, output_hidden_states=True)
        hidden = torch.cat([te1, te2.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        noise_pred = components.unet(latents, 500, hidden, added_cond_kwargs={
            "text_embeds": te2.text_embeds, "time_ids": time_ids}).sample
        decoded = components.vae.decode(latents).sample
    return {"hidden": hidden, "pooled": te2.text_embeds, "unet": noise_pred, "decoded": decoded}


def assert_same_sdxl(a, b):
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    out_a, out_b = sdxl_outputs(a), sdxl_outputs(b)
    for name in out_a:
        # weights are bit-equal; outputs may differ in rounding (memory alignment of loaded
        # tensors picks other vectorised kernels)
        torch.testing.assert_close(out_a[name], out_b[name], rtol=0, atol=1e-6, msg=name)


def test_load_sdxl_from_diffusers_folder(tiny_sdxl_dir):
    model = load_sdxl(str(tiny_sdxl_dir))
    assert isinstance(model.noise_scheduler, DDPMScheduler)
    config = model.noise_scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert model.tokenizer_2.pad_token == "!"
    assert type(model.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    for part in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        assert part.dtype == torch.float32 and not part.training
    assert model.vae.config.scaling_factor == pytest.approx(0.13025) and model.vae.config.force_upcast


def test_sdxl_single_file_round_trip_is_bit_exact(tiny_sdxl_dir, tmp_path):
    model = load_sdxl(str(tiny_sdxl_dir))
    path = save_sdxl_single_file(model, tmp_path / "tiny.safetensors", metadata={"ss_steps": 3})
    assert os.listdir(tmp_path) == ["tiny.safetensors"]
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"ss_steps": "3"}
    prefixes = ("model.diffusion_model.", "first_stage_model.",
                "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    reloaded = load_sdxl(str(path), single_file_config=str(tiny_sdxl_dir))
    assert_same_sdxl(model, reloaded)


def test_sdxl_single_file_export_handles_other_block_layouts(tmp_path):
    """Three blocks of two layers, 1/2/3 transformer layers, a four-layer TE2: the SGM
    numbering follows the model."""
    pipe = build_tiny_sdxl_pipeline(seed=4)
    tok = pipe.tokenizer
    configs = tiny_sdxl_configs(len(tok), tok.bos_token_id, tok.eos_token_id)
    unet_config = dict(configs["unet"], block_out_channels=(16, 32, 32), layers_per_block=2,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 2, 4))
    torch.manual_seed(4)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    pipe.register_modules(
        unet=UNet2DConditionModel(**unet_config).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(
            **dict(configs["text_encoder_2"], num_hidden_layers=4))).eval())
    folder = tmp_path / "deep"
    pipe.save_pretrained(folder)
    model = load_sdxl(str(folder))
    path = save_sdxl_single_file(model, tmp_path / "deep.safetensors")
    assert_same_sdxl(model, load_sdxl(str(path), single_file_config=str(folder)))


def test_sdxl_export_names_match_real_sdxl_checkpoints():
    """SDXL base's configs on the meta device, exported with our names: the key counts and
    well-known keys of sd_xl_base_1.0.safetensors (less its position_ids and logit_scale
    buffers), and diffusers' readers map them back onto every weight."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    shapes = expected_sgm_shapes(SDXL_CONFIG_DIR)
    assert {k: len(v) for k, v in shapes.items()} == {
        "unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 389}
    unet, te2 = shapes["unet"], shapes["text_encoder_2"]
    assert unet["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert unet["model.diffusion_model.input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert unet["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert unet["model.diffusion_model.output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert unet["model.diffusion_model.middle_block.1.proj_in.weight"] == (1280, 1280)
    assert "model.diffusion_model.output_blocks.8.2.conv.weight" not in unet  # no upsampler at the top
    prefix = "conditioner.embedders.1.model."
    assert te2[prefix + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert te2[prefix + "text_projection"] == (1280, 1280)
    assert te2[prefix + "positional_embedding"] == (77, 1280)
    assert ("conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight"
            in shapes["text_encoder"])

    unet_config = UNet2DConditionModel.load_config(SDXL_CONFIG_DIR / "unet")
    with torch.device("meta"):
        expected_unet = UNet2DConditionModel.from_config(unet_config).state_dict().keys()
    fake = {k: torch.empty(0) for k in unet}
    assert convert_ldm_unet_checkpoint(fake, unet_config).keys() == expected_unet
    with init_empty_weights():
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(SDXL_CONFIG_DIR / "text_encoder_2"))
    fake = {k: torch.empty(s, device="meta") for k, s in te2.items()}
    converted = convert_open_clip_checkpoint(text_encoder_2, fake, prefix=prefix)
    expected = {k for k in text_encoder_2.state_dict() if not k.endswith("position_ids")}
    assert converted.keys() == expected
    assert all(tuple(converted[k].shape) == tuple(text_encoder_2.state_dict()[k].shape) for k in expected)


def test_shipped_sdxl_configs_and_tokenizers():
    from diffusers import StableDiffusionXLPipeline
    index = StableDiffusionXLPipeline.load_config(SDXL_CONFIG_DIR)
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    one = CLIPTokenizer.from_pretrained(SDXL_CONFIG_DIR / "tokenizer")
    two = CLIPTokenizer.from_pretrained(SDXL_CONFIG_DIR / "tokenizer_2")
    expected = [49406, 320, 1125, 539, 320, 2368, 49407]
    assert one("a photo of a cat").input_ids == two("a photo of a cat").input_ids == expected
    assert one("a", padding="max_length", max_length=77).input_ids[-1] == 49407
    assert two("a", padding="max_length", max_length=77).input_ids[-1] == 0  # pads with "!"
    vae = AutoencoderKL.load_config(SDXL_CONFIG_DIR / "vae")
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True


def test_tiny_sdxl_single_file_read_with_the_shipped_configs_is_refused(tiny_sdxl_dir, tmp_path):
    path = save_sdxl_single_file(load_sdxl(str(tiny_sdxl_dir)), tmp_path / "tiny.safetensors")
    with pytest.raises(ModelLoadError) as err:
        load_sdxl(str(path))
    message = str(err.value)
    assert message.startswith("base_model_name:") and str(path) in message
    assert "expected SDXL shapes" in message and "single_file_config" in message


_SDXL_UNET = {"model.diffusion_model.out.2.bias": (4,)}


@pytest.mark.parametrize("keys, expected", [
    ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,), **_SDXL_UNET},
     "Stable Diffusion 1.5 checkpoint; choose the STABLE_DIFFUSION_15"),
    ({"cond_stage_model.model.ln_final.weight": (4,), **_SDXL_UNET}, "2.x"),
    ({"conditioner.embedders.0.model.ln_final.weight": (4,), **_SDXL_UNET}, "refiner"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "is a LoRA"),
    ({"conditioner.embedders.0.transformer.text_model.x": (4,), **_SDXL_UNET}, "text encoder 2"),
    ({"something.else": (4,)}, "not a Stable Diffusion checkpoint"),
])
def test_sdxl_single_files_of_other_kinds_are_named(tmp_path, keys, expected):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(ModelLoadError, match=expected) as err:
        load_sdxl(str(path))
    assert str(path) in str(err.value)


def test_sd15_checkpoint_loaded_as_sdxl_is_named(tiny_sd15_dir, tmp_path):
    path = save_sd15_single_file(load_sd15(str(tiny_sd15_dir)), tmp_path / "sd15.safetensors")
    with pytest.raises(ModelLoadError, match="Stable Diffusion 1.5 checkpoint"):
        load_sdxl(str(path))


def test_models_of_the_other_family_are_named(tiny_sdxl_dir, tiny_sd15_dir, tmp_path):
    path = save_sdxl_single_file(load_sdxl(str(tiny_sdxl_dir)), tmp_path / "xl.safetensors")
    with pytest.raises(ModelLoadError, match="SDXL checkpoint; choose the SDXL"):
        load_sd15(str(path))
    with pytest.raises(ModelLoadError, match="is an SDXL model"):
        load_sd15(str(tiny_sdxl_dir))
    with pytest.raises(ModelLoadError, match="not an SDXL model"):
        load_sdxl(str(tiny_sd15_dir))


def test_truncated_sdxl_single_file_is_refused(tiny_sdxl_dir, tmp_path):
    path = save_sdxl_single_file(load_sdxl(str(tiny_sdxl_dir)), tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="not a readable .safetensors") as err:
        load_sdxl(str(path), single_file_config=str(tiny_sdxl_dir))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("kind, expected", [
    ("missing", "does not exist"),
    ("pickle", "pickle"),
    ("folder_without_index", "model_index.json"),
    ("other_file", "not a model format"),
])
def test_bad_sdxl_base_model_paths_are_named(kind, expected, tmp_path, tiny_sdxl_dir):
    path = make_bad_path(kind, tmp_path, tiny_sdxl_dir)
    with pytest.raises(ModelLoadError, match=expected) as err:
        load_sdxl(str(path))
    assert str(err.value).startswith("base_model_name:") and str(path) in str(err.value)


def test_sdxl_hub_id_with_downloads_off_says_so():
    with pytest.raises(ModelLoadError, match="not found locally"):
        load_sdxl("atelier-tests/no-such-sdxl")


def test_sdxl_vae_override_from_a_single_file(tiny_sdxl_dir, tmp_path):
    other = build_tiny_sdxl_pipeline(seed=9).vae
    path = tmp_path / "vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v.contiguous()
               for k, v in vae_to_ldm(other.state_dict()).items()}, str(path))
    model = load_sdxl(str(tiny_sdxl_dir), vae_name=str(path))
    assert_same_weights(model.vae, other)
