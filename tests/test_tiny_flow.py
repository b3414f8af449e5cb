"""The tiny flow-matching models (Flux.1 dev/schnell, Chroma, SD 3/3.5): each is a diffusers
folder its own pipeline loads offline and samples from, with the real model's distinguishing
parts (guidance embedding, scheduler config, VAE factors, SD 3.5's attention) and a T5 tokenizer
built in code; building is deterministic; the CLI writes them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import ChromaPipeline, FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file
from transformers import AutoTokenizer, T5TokenizerFast

from trainer.cli import _parser
from trainer.demo import DEMO_DATASET_DIR
from trainer.models.tiny_flow import (
    CHROMA_POS_EMBED_WARNING,
    TINY_FLOW_KINDS,
    build_tiny_flow_model,
    build_tiny_t5_tokenizer,
    tiny_flow_model,
)

ROOT = Path(__file__).resolve().parents[1]

# Loading Chroma runs diffusers' own deprecated alias (see tiny_flow.CHROMA_POS_EMBED_WARNING).
pytestmark = pytest.mark.filterwarnings(f"ignore:{CHROMA_POS_EMBED_WARNING}:FutureWarning")

PIPELINES = {"flux": FluxPipeline, "flux-schnell": FluxPipeline, "chroma": ChromaPipeline,
             "sd3": StableDiffusion3Pipeline, "sd35": StableDiffusion3Pipeline}
TRANSFORMERS = {"flux": "FluxTransformer2DModel", "flux-schnell": "FluxTransformer2DModel",
                "chroma": "ChromaTransformer2DModel", "sd3": "SD3Transformer2DModel",
                "sd35": "SD3Transformer2DModel"}
# Where each family keeps its T5 tokenizer in the folder.
T5_TOKENIZER = {"flux": "tokenizer_2", "flux-schnell": "tokenizer_2", "chroma": "tokenizer",
                "sd3": "tokenizer_3", "sd35": "tokenizer_3"}


def load(kind, folder=None):
    return PIPELINES[kind].from_pretrained(folder or tiny_flow_model(kind), local_files_only=True)


def weights(folder) -> dict[str, dict[str, torch.Tensor]]:
    return {str(f.relative_to(folder)): load_file(f)
            for f in sorted(Path(folder).rglob("*.safetensors"))}


def weight_bytes(folder) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes()
            for f in sorted(Path(folder).rglob("*.safetensors"))}


def demo_captions() -> list[str]:
    return [p.read_text(encoding="utf-8").strip() for p in sorted(DEMO_DATASET_DIR.glob("*.txt"))]


@pytest.mark.parametrize("kind", TINY_FLOW_KINDS)
def test_the_family_pipeline_loads_the_folder_offline_and_samples_the_asked_size(kind):
    pipe = load(kind)
    assert type(pipe.transformer).__name__ == TRANSFORMERS[kind]
    image = pipe("a photo of a cat", height=64, width=96, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (96, 64)
    # Random weights, but a real decode: not one flat colour.
    assert len(set(image.get_flattened_data())) > 1


def test_flux_dev_has_a_guidance_embedder_and_schnell_has_none():
    dev, schnell = weights(tiny_flow_model("flux")), weights(tiny_flow_model("flux-schnell"))
    dev_keys = dev["transformer/diffusion_pytorch_model.safetensors"].keys()
    schnell_keys = schnell["transformer/diffusion_pytorch_model.safetensors"].keys()
    assert any(k.startswith("time_text_embed.guidance_embedder.") for k in dev_keys)
    assert not any("guidance" in k for k in schnell_keys)
    # Everything else is the same architecture.
    assert {k for k in dev_keys if "guidance" not in k} == set(schnell_keys)


def test_each_family_has_its_real_scheduler_and_vae_factors():
    dev, schnell, chroma, sd3 = (load(k) for k in ("flux", "flux-schnell", "chroma", "sd3"))
    assert dev.scheduler.config.use_dynamic_shifting and dev.scheduler.config.shift == 3.0
    assert (dev.scheduler.config.base_shift, dev.scheduler.config.max_shift) == (0.5, 1.15)
    assert (dev.scheduler.config.base_image_seq_len,
            dev.scheduler.config.max_image_seq_len) == (256, 4096)
    assert not schnell.scheduler.config.use_dynamic_shifting
    assert schnell.scheduler.config.shift == 1.0
    assert not sd3.scheduler.config.use_dynamic_shifting and sd3.scheduler.config.shift == 3.0
    for pipe in (dev, schnell, chroma):
        assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
        # 2x2 latent patches packed into the transformer's channels.
        assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert (sd3.vae.config.scaling_factor, sd3.vae.config.shift_factor) == (1.5305, 0.0609)
    assert sd3.transformer.config.in_channels == sd3.vae.config.latent_channels


def test_sd35_has_rms_qk_norm_and_a_dual_attention_block_and_sd3_neither():
    sd3, sd35 = load("sd3").transformer, load("sd35").transformer
    assert sd35.config.qk_norm == "rms_norm" and sd3.config.qk_norm is None
    assert sd35.transformer_blocks[0].attn2 is not None  # MMDiT-X block
    assert sd35.transformer_blocks[1].attn2 is None
    assert all(block.attn2 is None for block in sd3.transformer_blocks)


@pytest.mark.parametrize("kind", ["flux", "chroma", "sd35"])
def test_the_saved_t5_tokenizer_knows_the_demo_captions_and_pads_like_t5(kind):
    folder = tiny_flow_model(kind) / T5_TOKENIZER[kind]
    tokenizer = T5TokenizerFast.from_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder)("a photo").input_ids == \
        tokenizer("a photo").input_ids
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    for caption in demo_captions():
        ids = tokenizer(caption, padding="max_length", max_length=32).input_ids
        words = len(caption.split())
        assert tokenizer.unk_token_id not in ids, caption
        # One piece per known word, then T5's end-of-sequence, then padding to the length.
        assert ids[words] == 1 and ids[words + 1:] == [0] * (31 - words), caption
        assert len(ids) == 32
    assert tokenizer.decode(tokenizer("a photo of a cat").input_ids,
                            skip_special_tokens=True) == "a photo of a cat"


def test_a_word_outside_the_t5_vocabulary_is_spelled_out_not_unknown():
    tokenizer = build_tiny_t5_tokenizer()
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("zebra").input_ids)
    assert pieces == ["▁", "z", "e", "b", "r", "a", "</s>"]
    # A character outside the vocabulary is T5's unknown token (id 2).
    assert tokenizer("a ☃").input_ids == [tokenizer.convert_tokens_to_ids("▁a"), 3, 2, 1]


@pytest.mark.parametrize("kind", TINY_FLOW_KINDS)
def test_building_again_writes_byte_identical_weights_and_the_seed_changes_them(kind, tmp_path):
    torch.manual_seed(1234)
    torch.rand(17)  # global random draws before the build must not matter
    again = build_tiny_flow_model(kind, tmp_path / "again")
    assert weight_bytes(again) == weight_bytes(tiny_flow_model(kind))
    other_seed = weights(build_tiny_flow_model(kind, tmp_path / "seed1", seed=1))
    cached = weights(tiny_flow_model(kind))
    part = "transformer/diffusion_pytorch_model.safetensors"
    assert not all(torch.equal(cached[part][k], other_seed[part][k]) for k in cached[part])


def test_an_unknown_kind_is_refused_in_one_sentence_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"^tiny model kind 'flux2': choose one of flux, "
                                         r"flux-schnell, chroma, sd3, sd35$"):
        build_tiny_flow_model("flux2", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_cache_builds_each_kind_once_per_process():
    first = tiny_flow_model("chroma")
    assert tiny_flow_model("chroma") == first
    assert (first / "model_index.json").is_file()


def test_the_cli_accepts_every_tiny_flow_kind():
    for kind in TINY_FLOW_KINDS:
        assert _parser().parse_args(["make-tiny-model", kind, "out"]).family == kind


def test_make_tiny_model_on_the_command_line_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "tiny-sd35"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    done = subprocess.run([sys.executable, "-m", "trainer", "make-tiny-model", "sd35", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"Wrote a tiny SD 3.5 model to {out}" in done.stdout
    pipe = load("sd35", out)
    assert pipe.transformer.config.qk_norm == "rms_norm"
    assert weight_bytes(out) == weight_bytes(tiny_flow_model("sd35"))
