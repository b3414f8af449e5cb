"""Stable Diffusion 3 and 3.5 (Medium, Large): SD3Transformer2DModel conditioned on CLIP-L
(text_encoder), OpenCLIP bigG (text_encoder_2), both with their projections, and T5-XXL
(text_encoder_3), trained by flow matching, as OneTrainer trains STABLE_DIFFUSION_3 / _35.

What is SD 3 about it:
- Text: each CLIP's hidden states of the penultimate layer (clip skip counts further back from
  there, per encoder, as OneTrainer's layer skip does), unnormalised; their pooled projections
  side by side are the pooled input. T5 reads the caption at 77 tokens (OneTrainer tokenizes
  all three at CLIP's length; it has no key for it) and gives its last hidden states. As the
  pipeline joins them: the CLIPs' states side by side, zero-padded to T5's width, then T5's
  tokens after them. With `transformer.attention_mask` each encoder's states after its end
  token are zeroed (OneTrainer's Force Attention Mask). Caption dropout zeroes one encoder's
  outputs at a time, so the conditioning keeps them apart until `predict` joins them.
- A model without T5 (a single file without it) reads zeros in T5's place, as the pipeline
  and OneTrainer do.
- The transformer patchifies 2x2 latent pixels itself: latents go in unpacked. Its time input
  is the drawn timestep t in [0, N) unscaled (σ·1000 at sampling), as OneTrainer feeds it.
- Timestep shift is the config's; OneTrainer ignores `dynamic_timestep_shifting` for SD 3.
- Single files: SD 3 / 3.5 all-in-one checkpoints (the transformer under
  `model.diffusion_model.`, the VAE under `first_stage_model.`, the encoders under
  `text_encoders.clip_l|clip_g|t5xxl.transformer.`, T5 optional), read offline with the
  configs in configs/sd35 (the README there says what they are).
- kohya's ids (sd-scripts' sd3 training): ss_base_model_version "medium" (SD 3, no q/k norm),
  "5-large" or "5-medium" (SD 3.5: q/k RMS norm; Medium also has a second attention), and
  modelspec.architecture "stable-diffusion-3-<that>"; read from the model, whichever of the two
  model types loads it (OneTrainer trains both with the same code).
"""
from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from trainer.errors import ModelLoadError
from trainer.models import loading
from trainer.models.family import compute_dtype_of, hidden_states_before_last, tokenize
from trainer.models.flow_family import FlowFamily, FlowSpec
from trainer.models.loading import BASE_FIELD
from trainer.quantized_cache import cached_or
from trainer.models.transformer_layouts import SD3

SD3_SPEC = FlowSpec(
    name="Stable Diffusion 3 / 3.5",
    pipeline_class=StableDiffusion3Pipeline,
    pipeline_names=("StableDiffusion3Pipeline",),
    transformer_class=SD3Transformer2DModel,
    text_encoders={"text_encoder": CLIPTextModelWithProjection,
                   "text_encoder_2": CLIPTextModelWithProjection,
                   "text_encoder_3": T5EncoderModel},
    tokenizers={"tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer,
                "tokenizer_3": T5TokenizerFast},
    layout=SD3,
)

CLIPS = ("text_encoder", "text_encoder_2")
T5 = "text_encoder_3"


def hidden_key(part: str) -> str:
    return f"{part}_hidden_states"


def pooled_key(part: str) -> str:
    return f"{part}_pooled"


# --- Text encoding (training, and samples through EncodingSD3Pipeline) -------------------------

def up_to_end_token(ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """[B, L] 0/1: the tokens up to and including each caption's first end token (what the
    tokenizer's attention mask marks). A CLIP pads with its end token, so `ids != pad` would
    also drop the real end token; T5 pads with <pad> after its </s>."""
    is_end = ids == end_id
    last = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1),
                       torch.full_like(ids[:, 0], ids.shape[1] - 1))
    return (torch.arange(ids.shape[1], device=ids.device)[None] <= last[:, None])


def clip_outputs(encoder, ids: torch.Tensor, clip_skip: int, part: str, mask_padding: bool,
                 end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states `clip_skip` layers before the penultimate one, pooled projection)."""
    out = encoder(ids, output_hidden_states=True)
    hidden = hidden_states_before_last(out, clip_skip, 1, part)
    if mask_padding:
        hidden = hidden * up_to_end_token(ids, end_id).to(hidden.dtype)[:, :, None]
    return hidden, out.text_embeds


def t5_outputs(encoder, ids: torch.Tensor, mask_padding: bool, end_id: int) -> torch.Tensor:
    """T5's last hidden states (read without a mask, as OneTrainer and the pipeline do)."""
    hidden = encoder(ids)[0]
    if mask_padding:
        hidden = hidden * up_to_end_token(ids, end_id).to(hidden.dtype)[:, :, None]
    return hidden


def join_text(clip_l: torch.Tensor, clip_g: torch.Tensor, t5: torch.Tensor) -> torch.Tensor:
    """The transformer's text tokens, as StableDiffusion3Pipeline.encode_prompt joins them."""
    clips = torch.cat([clip_l, clip_g], dim=-1)
    clips = torch.nn.functional.pad(clips, (0, t5.shape[-1] - clips.shape[-1]))
    return torch.cat([clips, t5], dim=-2)


class EncodingSD3Pipeline(StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline that encodes prompts and negative prompts as the run trains:
    each CLIP's own clip skip and the attention mask (as OneTrainer's SD 3 sampler does). Used
    for samples only when those settings are not the defaults (the plain pipeline encodes the
    same then); `clip_skips` and `mask_padding` are set on the instance."""

    clip_skips: tuple[int, int] = (0, 0)
    mask_padding: bool = False

    def _get_clip_prompt_embeds(self, prompt, num_images_per_prompt=1, device=None,
                                clip_skip=None, clip_model_index=0):
        device = device or self._execution_device
        tokenizer = (self.tokenizer, self.tokenizer_2)[clip_model_index]
        encoder = (self.text_encoder, self.text_encoder_2)[clip_model_index]
        prompt = [prompt] if isinstance(prompt, str) else prompt
        ids = tokenizer(prompt, padding="max_length", max_length=self.tokenizer_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        hidden, pooled = clip_outputs(encoder, ids, self.clip_skips[clip_model_index],
                                      CLIPS[clip_model_index], self.mask_padding,
                                      tokenizer.eos_token_id)
        hidden = hidden.to(dtype=self.text_encoder.dtype, device=device)
        return (hidden.repeat_interleave(num_images_per_prompt, dim=0),
                pooled.repeat_interleave(num_images_per_prompt, dim=0))

    def _get_t5_prompt_embeds(self, prompt=None, num_images_per_prompt=1,
                              max_sequence_length=256, device=None, dtype=None):
        if self.text_encoder_3 is None:
            return super()._get_t5_prompt_embeds(prompt, num_images_per_prompt,
                                                 max_sequence_length, device, dtype)
        device = device or self._execution_device
        prompt = [prompt] if isinstance(prompt, str) else prompt
        ids = self.tokenizer_3(prompt, padding="max_length", max_length=max_sequence_length,
                               truncation=True, add_special_tokens=True,
                               return_tensors="pt").input_ids.to(device)
        hidden = t5_outputs(self.text_encoder_3, ids, self.mask_padding,
                            self.tokenizer_3.eos_token_id)
        hidden = hidden.to(dtype=self.text_encoder_3.dtype, device=device)
        return hidden.repeat_interleave(num_images_per_prompt, dim=0)


# --- Model versions (kohya's ids) -----------------------------------------------------------

def kohya_version(transformer_config) -> str:
    """kohya's sd-scripts' name of the SD 3 model (its ss_base_model_version): "medium" for SD 3
    (no q/k norm), "5-medium" for SD 3.5 Medium (a second attention, MMDiT-X), "5-large"."""
    if not transformer_config.qk_norm:
        return "medium"
    return "5-medium" if transformer_config.dual_attention_layers else "5-large"


# --- All-in-one single files ----------------------------------------------------------------

CONFIG_ROOT = pathlib.Path(__file__).parent / "configs" / "sd35"
# Shipped configs (JSON only) of the SD 3 models whose all-in-one files people download, and
# the tiny SD 3.5 (tests, the demo). The real ones share the CLIP tokenizers of configs/sdxl
# (the same CLIP-L and bigG tokenizers, bigG padding with "!").
SINGLE_FILE_CONFIGS = {
    "SD 3.5 Large": CONFIG_ROOT / "large",
    "SD 3.5 Medium": CONFIG_ROOT / "medium",
    "SD 3 Medium": CONFIG_ROOT / "sd3-medium",
    "tiny SD 3.5": CONFIG_ROOT / "tiny",
}
REAL_TOKENIZERS = CONFIG_ROOT.parent / "sdxl"

# Stability AI's prefixes in an all-in-one file (ComfyUI writes and reads the same).
TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
ENCODER_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.",
                    "text_encoder_2": "text_encoders.clip_g.transformer.",
                    "text_encoder_3": "text_encoders.t5xxl.transformer."}
ENCODER_NAMES = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G (OpenCLIP bigG)",
                 "text_encoder_3": "T5-XXL"}


@dataclass
class _SingleFile:
    path: pathlib.Path
    shapes: dict[str, tuple[int, ...]]

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.shapes)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The file's tensors under `prefix` (keys kept whole): one part read at a time, so a
        file holding T5-XXL is never in memory all at once."""
        from safetensors import safe_open
        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in self.shapes if k.startswith(prefix)}


@functools.lru_cache(maxsize=None)
def _transformer_shapes(config_folder: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """The original-layout names and shapes of the transformer `config_folder` describes,
    built on the meta device (no memory; its position table too, which takes seconds to
    compute for SD 3.5 Large on the CPU)."""
    from trainer.models.transformer_layouts import to_original
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(
            SD3Transformer2DModel.load_config(config_folder, subfolder="transformer"))
    return {TRANSFORMER_PREFIX + k: tuple(v.shape)
            for k, v in to_original(SD3, model.state_dict()).items()}


def _config_for(file: _SingleFile) -> pathlib.Path:
    """The shipped config folder whose transformer has exactly the file's weights."""
    found = {k: v for k, v in file.shapes.items() if k.startswith(TRANSFORMER_PREFIX)}
    for folder in SINGLE_FILE_CONFIGS.values():
        if _transformer_shapes(folder) == found:
            return folder
    blocks = len({k.split(".")[3] for k in found if k.startswith(TRANSFORMER_PREFIX + "joint_")})
    width = found.get(TRANSFORMER_PREFIX + "x_embedder.proj.weight", ("?",))[0]
    raise ModelLoadError(
        f"{BASE_FIELD}: '{file.path.name}' holds an SD 3 transformer of {blocks} blocks, "
        f"{width} wide, that is none of {', '.join(SINGLE_FILE_CONFIGS)}; give the model's "
        "diffusers folder instead.")


def _check_single_file(file: _SingleFile, need_vae: bool) -> None:
    from trainer.models.transformer_layouts import (LAYOUT_LABELS, MODEL_TYPE_OF_LAYOUT,
                                                    family_of, original_layout_family)
    keys = list(file.shapes)
    name = file.path.name
    if any(k.startswith("lora_") or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise ModelLoadError(f"{BASE_FIELD}: '{name}' is a LoRA, not a base model.")
    found = original_layout_family(keys)
    if found is None:
        raise ModelLoadError(f"{BASE_FIELD}: '{name}' holds no SD 3 / 3.5 transformer "
                             "(joint_blocks.*); choose the model type of the checkpoint.")
    # SD 3 and 3.5 load under either model type (OneTrainer trains them alike).
    if family_of(found) != SD3:
        raise ModelLoadError(f"{BASE_FIELD}: '{name}' holds a {LAYOUT_LABELS[found]} "
                             f"transformer: choose model type {MODEL_TYPE_OF_LAYOUT[found]}.")
    if not file.has(TRANSFORMER_PREFIX):
        raise ModelLoadError(
            f"{BASE_FIELD}: '{name}' is an SD 3 transformer alone; give the model's diffusers "
            "folder (or hub id) as base_model_name and this file as transformer.model_name.")
    for part in CLIPS:
        if not file.has(ENCODER_PREFIXES[part]):
            raise ModelLoadError(
                f"{BASE_FIELD}: '{name}' has no {ENCODER_NAMES[part]} weights "
                f"('{ENCODER_PREFIXES[part]}*'); give the model's diffusers folder (or hub id) "
                "as base_model_name and this file as transformer.model_name.")
    if need_vae and not file.has(VAE_PREFIX):
        raise ModelLoadError(f"{BASE_FIELD}: '{name}' holds no VAE weights; give a VAE in "
                             "vae_model_name.")


def _tokenizers(folder: pathlib.Path, with_t5: bool, file_name: str) -> dict[str, Any]:
    own = (folder / "tokenizer").is_dir()  # the tiny model ships its own; the real ones share
    clip_folder = folder if own else REAL_TOKENIZERS
    out: dict[str, Any] = {"tokenizer": CLIPTokenizer.from_pretrained(clip_folder,
                                                                      subfolder="tokenizer"),
                           "tokenizer_2": CLIPTokenizer.from_pretrained(clip_folder,
                                                                        subfolder="tokenizer_2"),
                           "tokenizer_3": None}
    if with_t5:
        t5_folder = folder if (folder / "tokenizer_3").is_dir() else CONFIG_ROOT
        if not (t5_folder / "tokenizer_3").is_dir():
            raise ModelLoadError(
                f"{BASE_FIELD}: '{file_name}' holds T5-XXL, whose tokenizer does not ship with "
                "Atelier (configs/sd35/tokenizer_3 is missing); give the model's diffusers "
                "folder (or hub id) as base_model_name, or a file without T5.")
        out["tokenizer_3"] = T5TokenizerFast.from_pretrained(t5_folder, subfolder="tokenizer_3")
    return out


def _loaded(model: torch.nn.Module, part: str, file_name: str) -> torch.nn.Module:
    # diffusers builds on the meta device and fills in what the file has: a weight it lacked
    # would stay empty and fail at the first step.
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ModelLoadError(f"{BASE_FIELD}: '{file_name}' is missing {len(empty)} {part} "
                             f"weights (e.g. '{empty[0]}').")
    return model.eval()


def _t5_from_file(file: "_SingleFile", common: dict) -> T5EncoderModel:
    from diffusers.loaders.single_file_utils import create_diffusers_t5_model_from_checkpoint
    t5 = create_diffusers_t5_model_from_checkpoint(
        T5EncoderModel, file.tensors(ENCODER_PREFIXES[T5]), subfolder=T5, **common)
    # T5's encoder reads the shared token table; files hold it once (`shared.weight`), and
    # loading it replaced the tied parameter: tie it again.
    t5.set_input_embeddings(t5.shared)
    return t5


def load_single_file(path: str, vae_name: str | None = None, *,
                     dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The parts of an SD 3 / 3.5 all-in-one file, as `load_flow_components` returns them for
    a folder; `text_encoder_3` and `tokenizer_3` are None for a file without T5.

    Each part is converted by diffusers' own single-file code. One difference: CLIP-L's
    projection becomes the identity, as diffusers makes it (SAI's files and ComfyUI use
    CLIP-L's pooled output unprojected)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    from trainer.models.transformer_layouts import load_original_transformer
    file = _SingleFile(pathlib.Path(path), loading.checkpoint_shapes(pathlib.Path(path),
                                                                     BASE_FIELD))
    _check_single_file(file, need_vae=not vae_name)
    folder = _config_for(file)
    with_t5 = file.has(ENCODER_PREFIXES[T5])
    name = file.path.name
    parts = _tokenizers(folder, with_t5, name)
    common = dict(config=str(folder), torch_dtype=dtype, local_files_only=True)
    try:
        parts["transformer"] = cached_or("transformer", lambda: load_original_transformer(
            SD3Transformer2DModel, file.tensors(TRANSFORMER_PREFIX), config=folder,
            subfolder="transformer", torch_dtype=dtype))
        for part in CLIPS:
            parts[part] = cached_or(part, lambda: create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, file.tensors(ENCODER_PREFIXES[part]),
                subfolder=part, **common))
        parts[T5] = cached_or(T5, lambda: _t5_from_file(file, common)) if with_t5 else None
        if not vae_name:
            parts["vae"] = AutoencoderKL.from_single_file(file.tensors(VAE_PREFIX),
                                                          subfolder="vae", **common)
        parts["noise_scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(
            folder, subfolder="scheduler")
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - any library failure is a load failure here
        raise loading.load_error(BASE_FIELD, name, err) from err
    if vae_name:
        parts["vae"] = loading.load_vae(vae_name, _vae_config(folder), dtype=dtype)
    for part in ("transformer", "vae", *CLIPS, *([T5] if with_t5 else [])):
        _loaded(parts[part], part, name)
    return parts


def _vae_config(folder: pathlib.Path) -> dict:
    return json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))


# --- The family -----------------------------------------------------------------------------

class SD3Family(FlowFamily):
    SPEC = SD3_SPEC
    # Caption dropout zeroes one encoder's outputs at a time (OneTrainer's per-encoder dropout).
    DROPOUT_KEYS = {"text_encoder": (hidden_key("text_encoder"), pooled_key("text_encoder")),
                    "text_encoder_2": (hidden_key("text_encoder_2"),
                                       pooled_key("text_encoder_2")),
                    "text_encoder_3": (hidden_key(T5),)}
    # OneTrainer's BaseStableDiffusion3Setup presets ("attn" also matches SD 3.5 Medium's
    # attn2; "transformer_block" every layer of the joint blocks).
    LAYER_PRESETS = {"attn-only": ["attn"], "blocks": ["transformer_block"], "full": []}
    LAYER_NAME_EXAMPLE = "transformer_blocks.0.attn.to_q, transformer_blocks.0.ff.net.2"
    PACKING = 2             # the transformer's patch size: one token per 2x2 latent pixels

    @classmethod
    def load_components(cls, config) -> dict[str, Any]:
        """A diffusers folder or hub id (FlowFamily's), or an all-in-one single file."""
        source = loading.resolve_source(config.base_model_name, BASE_FIELD, None,
                                        hub_probe="model_index.json")
        if source.kind == "single_file":
            return load_single_file(source.location,
                                    config.vae_model_name or None)
        return super().load_components(config)

    @classmethod
    def card(cls, model_type):
        """diffusers' SD 3 loader reads only its own (peft) LoRA names."""
        from trainer.model_card import FLOW_CARD, SD3_LOADERS, FamilyCard
        tags = ("sd3", "sd3.5") if model_type == "STABLE_DIFFUSION_35" else ("sd3",)
        return FamilyCard(tags, "StableDiffusion3Pipeline", "SD3Transformer2DModel",
                          comfy_text_encoders="a *TripleCLIPLoader* (clip_l, clip_g and t5xxl)",
                          **dict(FLOW_CARD, loaders=SD3_LOADERS))

    @classmethod
    def load(cls, config):
        parts = cls.load_components(config)
        version = kohya_version(parts["transformer"].config)
        trained = {p: parts[p] for p in (*CLIPS, T5, "transformer") if parts.get(p) is not None}
        return cls(
            components=SimpleNamespace(**parts), vae=parts["vae"],
            noise_scheduler=parts["noise_scheduler"], parts=trained,
            # kohya's sd-scripts (networks/lora_sd3.py); OneTrainer's KOHYA_LORA the same
            kohya_prefixes={"transformer": "lora_unet_", "text_encoder": "lora_te1_",
                            "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
            base_model_version=version,
            lora_architecture=f"stable-diffusion-3-{version}/lora",
            config=config,
            text_cache_keys=(*(k for part in CLIPS for k in (hidden_key(part), pooled_key(part))),
                             hidden_key(T5)),
            objective=cls.objective_for(parts["noise_scheduler"], config))

    @property
    def has_t5(self) -> bool:
        return T5 in self.parts

    @property
    def mask_padding(self) -> bool:
        return bool(self._setting("transformer", "attention_mask", False))

    def clip_skips(self, clip_skip: int | None = None) -> tuple[int, int]:
        first = self._setting("text_encoder", "clip_skip", 0) if clip_skip is None else clip_skip
        return int(first), int(self._setting("text_encoder_2", "clip_skip", 0))

    def sequence_length(self, part: str) -> int:
        """T5's token count: CLIP-L's (77), as OneTrainer tokenizes all three encoders."""
        return int(self.components.tokenizer.model_max_length)

    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        """Each encoder's outputs under its own keys (see the module's docstring); `clip_skip`
        is CLIP-L's (the loop's), CLIP-G's comes from `config.text_encoder_2`."""
        c = self.components
        out: dict[str, torch.Tensor] = {}
        for part, tokenizer, skip in zip(CLIPS, (c.tokenizer, c.tokenizer_2),
                                         self.clip_skips(clip_skip)):
            ids = tokenize(tokenizer, captions, device)
            with torch.set_grad_enabled(grad.get(part, False)):
                out[hidden_key(part)], out[pooled_key(part)] = clip_outputs(
                    self.module(part), ids, skip, part, self.mask_padding, tokenizer.eos_token_id)
        length = self.sequence_length(T5)
        if self.has_t5:
            ids = tokenize(c.tokenizer_3, captions, device, max_length=length)
            with torch.set_grad_enabled(grad.get(T5, False)):
                out[hidden_key(T5)] = t5_outputs(self.module(T5), ids, self.mask_padding,
                                                 c.tokenizer_3.eos_token_id)
        else:
            clip_l = out[hidden_key("text_encoder")]
            width = self.parts["transformer"].config.joint_attention_dim
            out[hidden_key(T5)] = clip_l.new_zeros(len(captions), length, width)
        return out

    def text_cache_identity(self) -> list:
        from trainer.data.cache import source_fingerprint
        config = self.config
        return [source_fingerprint(config.base_model_name, T5), self.has_t5,
                config.text_encoder_3.weight_dtype.value, self.sequence_length(T5),
                self.mask_padding]

    def predict(self, noisy, timesteps, conditioning):
        transformer = self.module("transformer")
        dtype = compute_dtype_of(self.parts["transformer"])
        text = join_text(*(conditioning[hidden_key(p)] for p in (*CLIPS, T5)))
        pooled = torch.cat([conditioning[pooled_key(p)] for p in CLIPS], dim=-1)
        return transformer(hidden_states=noisy.to(dtype), timestep=timesteps.float(),
                           encoder_hidden_states=text.to(dtype),
                           pooled_projections=pooled.to(dtype), return_dict=False)[0]

    def _pipeline(self, cls):
        c = self.components
        pipe = cls(
            transformer=self.parts["transformer"],
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            vae=self.vae, text_encoder=self.parts["text_encoder"], tokenizer=c.tokenizer,
            text_encoder_2=self.parts["text_encoder_2"], tokenizer_2=c.tokenizer_2,
            text_encoder_3=self.parts.get(T5), tokenizer_3=c.tokenizer_3)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self):
        """The plain pipeline where it encodes prompts as training does (no clip skip, no
        mask); else EncodingSD3Pipeline with the run's settings."""
        skips = self.clip_skips()
        if skips == (0, 0) and not self.mask_padding:
            return self._pipeline(StableDiffusion3Pipeline)
        pipe = self._pipeline(EncodingSD3Pipeline)
        pipe.clip_skips, pipe.mask_padding = skips, self.mask_padding
        return pipe

    def export_pipeline(self):
        return self._pipeline(StableDiffusion3Pipeline)  # model_index.json names the plain one

    def sample_inputs(self):
        return {"max_sequence_length": self.sequence_length(T5)}
