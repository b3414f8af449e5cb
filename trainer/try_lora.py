"""Try a trained LoRA: one prompt drawn without and with it, side by side.

The LoRA file says what it was trained on: Atelier writes its config into the header
(`atelier_config`), other trainers write kohya's `ss_sd_model_name` / `ss_base_model_version`
and `modelspec.architecture`; a file that says nothing is recognised by its layer names where
they name a family (Flux.1's `double_blocks`, SD 3's `joint_blocks`). The base model is loaded
by the engine's own loader (trainer.models.family.load_family, whatever the family), drawn by
the family's pipeline with its sampling inputs (trainer.sampling.draw, the seed rules of the
training samples), and the LoRA is loaded by diffusers' `load_lora_weights` — what a user of
the file will do — with its strength as the adapter's weight. One pipeline is kept between
calls (loading a base model takes long); `release` gives its memory back before a training job
starts.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from trainer.config import ModelFormat
from trainer.embedding_files import BUNDLE_PREFIX, bundled_embeddings
from trainer.errors import ConfigError, ModelLoadError
from trainer.model_card import format_loaders
from trainer.models import registry

ADAPTER = "try"
# kohya's ss_base_model_version values that name SDXL (its LoRAs have two text encoders).
SDXL_VERSIONS = ("sdxl_base_v1-0", "sdxl_base_v0-9")
# ... and the other families (kohya's sd-scripts and Atelier's families write these). Any
# other value (sd_v1, sd_v2, ...) is read as SD 1.5, as before.
BASE_MODEL_VERSIONS = {**{v: "STABLE_DIFFUSION_XL_10_BASE" for v in SDXL_VERSIONS},
                       "flux1": "FLUX_DEV_1", "chroma": "CHROMA_1", "z_image": "Z_IMAGE",
                       "qwen_image": "QWEN", "flux2": "FLUX_2"}
# modelspec.architecture prefixes (the SAI model spec kohya and Atelier write), most specific
# first: "flux-1-dev/lora", "stable-diffusion-3-5-large/lora", ...
ARCHITECTURES = (("stable-diffusion-xl", "STABLE_DIFFUSION_XL_10_BASE"),
                 ("stable-diffusion-v1", "STABLE_DIFFUSION_15"),
                 ("flux-1", "FLUX_DEV_1"), ("chroma", "CHROMA_1"),
                 ("stable-diffusion-3-5", "STABLE_DIFFUSION_35"),
                 ("stable-diffusion-3.5", "STABLE_DIFFUSION_35"),
                 ("stable-diffusion-3", "STABLE_DIFFUSION_3"),
                 ("Z-Image", "Z_IMAGE"), ("Qwen-Image", "QWEN"), ("Flux.2", "FLUX_2"))
# Layer names that only the transformer families have, in each LoRA layout (kohya's, ComfyUI's,
# diffusers'), and the families whose model has them: Chroma has Flux.1's blocks, SD 3.5 SD 3's.
# For a file that names no model type; the page's model type picks among them.
LAYER_FAMILIES = (
    (("lora_unet_double_blocks_", "lora_unet_single_blocks_", "diffusion_model.double_blocks.",
      "diffusion_model.single_blocks.", "transformer.single_transformer_blocks."),
     ("FLUX_DEV_1", "CHROMA_1")),
    (("lora_unet_joint_blocks_", "diffusion_model.joint_blocks."),
     ("STABLE_DIFFUSION_35", "STABLE_DIFFUSION_3")),
    # Qwen-Image's blocks have SD 3's diffusers name; ComfyUI's name is its own
    (("diffusion_model.transformer_blocks.",), ("QWEN",)),
    (("transformer.transformer_blocks.",), ("STABLE_DIFFUSION_35", "STABLE_DIFFUSION_3", "QWEN")),
    (("diffusion_model.layers.", "transformer.layers."), ("Z_IMAGE",)),
)

# Parts of layer names only Qwen-Image's transformer_blocks have (its image and text streams'
# MLPs and modulations; SD 3's are ff / ff_context / norm1). Flux.1's double_blocks use the same
# words in ComfyUI's names, so the block prefix is part of the mark.
QWEN_BLOCKS = ("diffusion_model.transformer_blocks.", "transformer.transformer_blocks.")
QWEN_ONLY_LAYERS = (".img_mlp.", ".txt_mlp.", ".img_mod.", ".txt_mod.")


@dataclass(frozen=True)
class LoraFile:
    path: Path
    base_model_name: str      # "" when the file does not say
    model_type: str           # ModelType value; "" when the file does not say
    vae_model_name: str
    resolution: int           # the training size, for the default image size; 0 unknown
    # The run's settings that decide the model and its samples beyond the base model (a T5's
    # sequence length, a transformer in its own file), as config keys.
    settings: dict = field(default_factory=dict)
    # For a file that names no model type: the families its layer names fit, the likeliest
    # first; () when they tell nothing.
    fits: tuple[str, ...] = ()


def _header(path: Path) -> tuple[dict[str, str], list[str]]:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, list(f.keys())
    except Exception as error:  # safetensors raises its own error types for a bad file
        raise ConfigError(f"'{path.name}' is not a readable .safetensors file ({error}).") \
            from None


def is_lora_file(path: Path) -> bool:
    """A LoRA (or LyCORIS) file by its header, not a whole checkpoint or a backup."""
    try:
        metadata, keys = _header(path)
    except ConfigError:
        return False
    if "ss_network_module" in metadata:
        return True
    config = metadata.get("atelier_config")
    if config:
        try:
            return json.loads(config).get("training_method") == "LORA"
        except ValueError:
            return False
    return any(k.startswith(("lora_unet_", "lora_te", "unet.", "transformer.",
                             "diffusion_model.")) and ".lora" in k for k in keys[:50])


def read_lora(path: Path | str) -> LoraFile:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"The LoRA '{path}' does not exist (moved or deleted?); refresh "
                          "the list.")
    metadata, keys = _header(path)
    config: dict = {}
    if metadata.get("atelier_config"):
        try:
            config = json.loads(metadata["atelier_config"])
        except ValueError:
            config = {}
    model_type = _named_model_type(config, metadata)
    if model_type and model_type not in registry.FAMILIES:
        raise ConfigError(f"'{path.name}' was trained on model type {model_type}, which this "
                          "version of Atelier does not know.")
    fits = () if model_type else _fitting_families(keys)
    family = model_type or (fits[0] if fits else "")
    label = registry.facts(family).label if family else "SD 1.5/SDXL"
    if metadata.get("ss_network_module") == "lycoris.kohya":
        algo = json.loads(metadata.get("ss_network_args") or "{}").get("algo", "LyCORIS")
        # Where SD's LyCORIS files load was checked (DESIGN.md); the other families' was not.
        sd = not family or not registry.facts(family).flow_matching
        raise ConfigError(f"'{path.name}' is a {algo.upper()} (LyCORIS) file, which diffusers "
                          f"does not load for {label}"
                          + ("; ComfyUI and A1111/Forge do." if sd
                             else ", so Try it cannot draw it."))
    _check_diffusers_reads(path, keys, family, label)
    if family and registry.facts(family).inpainting:
        raise ConfigError(f"'{path.name}' was trained on an inpainting model; Try it draws "
                          "from a prompt alone. Load it in an inpainting pipeline instead.")
    resolution = 0
    try:
        from trainer.config import parse_resolution
        resolution = parse_resolution(config.get("resolution") or
                                      metadata.get("ss_resolution", ""))[0].width
    except (ValueError, IndexError):
        pass
    return LoraFile(path, config.get("base_model_name") or metadata.get("ss_sd_model_name", ""),
                    model_type, config.get("vae_model_name", ""), resolution,
                    settings=_model_settings(config, model_type), fits=fits)


def _named_model_type(config: dict, metadata: dict[str, str]) -> str:
    """The model type the header names: Atelier's config, else kohya's base model version or
    the model spec's architecture; "" when it names none."""
    if config.get("model_type"):
        return str(config["model_type"])
    version = metadata.get("ss_base_model_version", "")
    if version in BASE_MODEL_VERSIONS:
        return BASE_MODEL_VERSIONS[version]
    architecture = metadata.get("modelspec.architecture", "")
    for prefix, model_type in ARCHITECTURES:
        if architecture.startswith(prefix):
            return model_type
    return "STABLE_DIFFUSION_15" if version else ""


# Parts of layer names only Flux.2's transformer has (its MLPs' and fused single-block layers'
# diffusers names, its global modulations in either layout).
FLUX2_ONLY_LAYERS = (".ff.linear_in", ".ff.linear_out", ".ff_context.linear_in",
                     ".ff_context.linear_out", ".attn.to_qkv_mlp_proj", "stream_modulation")


def _fitting_families(keys: list[str]) -> tuple[str, ...]:
    if any(mark in k for k in keys for mark in FLUX2_ONLY_LAYERS):
        return ("FLUX_2",)
    if any(k.startswith(QWEN_BLOCKS) and mark in k for k in keys for mark in QWEN_ONLY_LAYERS):
        return ("QWEN",)
    for prefixes, families in LAYER_FAMILIES:
        if any(k.startswith(prefixes) for k in keys):
            return families
    return ()


def _file_format(keys: list[str]) -> ModelFormat | None:
    """The LoRA layout of the file's names (KOHYA_LORA stands for kohya's and the legacy
    names alike: diffusers reads both or neither)."""
    if any(k.startswith("diffusion_model.") for k in keys):
        return ModelFormat.COMFY_LORA
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return ModelFormat.KOHYA_LORA
    if any(k.startswith(("transformer.", "unet.", "text_encoder")) for k in keys):
        return ModelFormat.DIFFUSERS_LORA
    return None


def _check_diffusers_reads(path: Path, keys: list[str], family: str, label: str) -> None:
    """ConfigError when diffusers' LoRA loader does not read this file's layout for its family
    (ComfyUI's own names of SD 1.5 / SDXL and SD 3, kohya's of SD 3), naming the formats it
    does read."""
    from trainer.config import TrainingMethod, output_formats
    found = _file_format(keys)
    if found is None:
        return
    if family:
        if "diffusers" in format_loaders(family, found):
            return
        readable = [f for f in output_formats(family, TrainingMethod.LORA)
                    if "diffusers" in format_loaders(family, f)]
    elif found == ModelFormat.COMFY_LORA:
        readable = ["KOHYA_LORA", "DIFFUSERS_LORA"]  # SD 1.5 / SDXL, the families before
    else:
        return
    what = ("a COMFY_LORA file (ComfyUI's own key names)" if found == ModelFormat.COMFY_LORA
            else f"a {found.value} file")
    choices = ", ".join(readable[:-1]) + f" or {readable[-1]}" if len(readable) > 1 \
        else readable[0]
    raise ConfigError(f"'{path.name}' is {what}, which diffusers does not read for {label}; "
                      f"train with {choices} to try it here.")


def _model_settings(config: dict, model_type: str) -> dict:
    """The keys of a LoRA's config that decide the model Try it loads and how it samples,
    beyond the base model, where the family has them: a T5's sequence length (samples encode
    the prompt at the trained length) and the transformer's own file and text mask."""
    if not model_type:
        return {}
    from trainer.config import TrainConfig
    fields = TrainConfig.model_fields
    facts = registry.facts(model_type)
    settings = {}
    for part, kind in registry.text_encoder_kinds(model_type).items():
        key = f"{part}_sequence_length"
        if kind == "T5" and key in fields and key in config:
            settings[key] = config[key]
    transformer = config.get("transformer") if facts.denoiser == "transformer" else None
    if isinstance(transformer, dict):
        known = fields["transformer"].annotation.model_fields
        kept = {k: transformer[k] for k in ("model_name", "attention_mask")
                if k in transformer and k in known}
        if kept:
            settings["transformer"] = kept
    return settings


def find_loras(folder: Path | str) -> list[Path]:
    """The LoRA files under `folder` (not in hidden folders or backups), newest first: the
    last run's comes first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.rglob("*.safetensors"):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") or part == "backup" for part in relative[:-1]):
            continue
        if path.is_file() and not path.is_symlink() and is_lora_file(path):
            found.append(path)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


BUNDLE = BUNDLE_PREFIX  # a LoRA file's bundled embeddings (trainer/embedding_files.py)


def check_try_request(spec, *, max_size: int | None = None,
                      max_steps: int | None = None) -> None:
    """A shared server's limits on one try (None: no limit): the image's width and height,
    and its diffusion steps. ConfigError naming the field, the limit and its option; checked
    before anything is loaded."""
    from trainer.limits import refuse_over
    refuse_over(spec.width, max_size, "Try it: width", "try_max_size")
    refuse_over(spec.height, max_size, "Try it: height", "try_max_size")
    refuse_over(spec.diffusion_steps, max_steps, "Try it: steps", "try_max_steps")


def check_try_paths(lora: "LoraFile", access, base_model_name: str = "") -> None:
    """Every file a try reads — the LoRA, and the base model, VAE and transformer file its
    header (or the page) names — must be `access`'s to read (trainer/ownership.py); hub ids
    pass."""
    from trainer.security import check_path, names_local_path
    check_path(access, "lora", str(lora.path))
    transformer_file = lora.settings.get("transformer", {}).get("model_name", "")
    for key, value in (("base_model_name", lora.base_model_name or base_model_name),
                       ("vae_model_name", lora.vae_model_name),
                       ("transformer.model_name", transformer_file)):
        if value and names_local_path(value):
            check_path(access, key, value, purpose="models are read from the workspace or "
                                                   "the Hugging Face hub")


class TryModel:
    """The base model's pipeline, kept between tries, with at most one LoRA loaded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pipeline = None
        self._family = None
        self._base_key: tuple | None = None
        self._lora_key: tuple | None = None
        self._embedded = False  # the loaded file's bundled embeddings are in the tokenizers
        self._hooks: list = []

    @staticmethod
    def device() -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def release(self) -> None:
        """Drop the pipeline (before training: it holds the GPU's memory)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._pipeline = self._family = self._base_key = self._lora_key = None
        self._hooks, self._embedded = [], False
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load_base(self, lora: LoraFile, base_model_name: str, model_type: str):
        from trainer.config import config_from_dict
        from trainer.models.family import load_family
        from trainer.sampling import _pipeline_modules, inputs_in_own_dtype
        key = (model_type, base_model_name, lora.vae_model_name,
               json.dumps(lora.settings, sort_keys=True))
        if self._base_key == key:
            return
        self._drop()
        config = config_from_dict({"model_type": model_type, "base_model_name": base_model_name,
                                   "vae_model_name": lora.vae_model_name, **lora.settings},
                                  warn=lambda m: None)
        family = load_family(config)
        device = self.device()
        # On a GPU: float16 for SD (the VAE in float32: SDXL's overflows in float16), bfloat16
        # for the flow-matching transformers (Flux.1's activations overflow float16). float32
        # on a CPU.
        half = torch.float32
        if device.type == "cuda":
            half = torch.bfloat16 if registry.facts(model_type).flow_matching else torch.float16
        for module in family.parts.values():
            module.to(device, half).eval()
        family.vae.to(device, torch.float32).eval()
        self._family, self._pipeline = family, family.pipeline()
        self._pipeline.set_progress_bar_config(disable=True)
        self._hooks = inputs_in_own_dtype(_pipeline_modules(family))
        self._base_key = key

    def _load_lora(self, lora: LoraFile) -> None:
        key = (str(lora.path), lora.path.stat().st_mtime_ns)
        if self._lora_key == key:
            return
        pipeline = self._pipeline
        if self._lora_key is not None:
            pipeline.unload_lora_weights()
            if self._embedded:
                pipeline.unload_textual_inversion()
            self._lora_key, self._embedded = None, False
        from safetensors.torch import load_file
        tensors = load_file(str(lora.path))
        adapters = {k: v for k, v in tensors.items() if not k.startswith(BUNDLE)}
        try:
            # Embeddings bundled in the file (pivotal tuning) are not LoRA keys: diffusers
            # loads them as textual inversions, under their placeholders.
            embedded = bundled_embeddings(tensors)
            self._embedded = bool(embedded)
            for placeholder, vectors in embedded.items():
                for part, tokenizer, key in (("text_encoder", "tokenizer", "clip_l"),
                                             ("text_encoder_2", "tokenizer_2", "clip_g")):
                    if key in vectors and getattr(pipeline, part, None) is not None:
                        pipeline.load_textual_inversion(
                            vectors[key], token=placeholder, text_encoder=getattr(pipeline, part),
                            tokenizer=getattr(pipeline, tokenizer))
            pipeline.load_lora_weights(adapters, adapter_name=ADAPTER)
        except (ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(f"'{lora.path.name}' does not load on "
                                 f"{self._base_key[1]} ({error}).") from None
        self._lora_key = key

    def images(self, lora: LoraFile, spec, strength: float, *, base_model_name: str = "",
               model_type: str = "", max_size: int | None = None,
               max_steps: int | None = None, access=None):
        """(without, with): `spec` (trainer.config.SampleConfig) drawn on the base model, then
        with the LoRA at `strength`. The file's own base model and type come first; the
        arguments are for a file that does not name them.

        A shared server passes its limits (`max_size`, `max_steps`: ConfigError naming the
        limit and its option) and the caller's `access`: the LoRA, base model and VAE must be
        theirs to read. Both are checked before anything is loaded."""
        from trainer.sampling import draw
        check_try_request(spec, max_size=max_size, max_steps=max_steps)
        if access is not None:
            check_try_paths(lora, access, base_model_name)
        base = lora.base_model_name or base_model_name
        kind = lora.model_type or _fitting(model_type, lora.fits)
        if not base or not kind:
            raise ConfigError(f"'{lora.path.name}' does not say which base model it was "
                              "trained on: set the base model and model type in the page.")
        with self._lock:
            self._load_base(lora, base, kind)
            self._load_lora(lora)
            pipeline, device = self._pipeline, self.device()
            inputs = self._family.sample_inputs()  # e.g. a T5's sequence length
            pipeline.disable_lora()
            try:
                without = draw(pipeline, spec, device, **inputs)
            finally:
                pipeline.enable_lora()
            pipeline.set_adapters([ADAPTER], adapter_weights=[float(strength)])
            return without, draw(pipeline, spec, device, **inputs)


def _fitting(model_type: str, fits: tuple[str, ...]) -> str:
    """The page's model type for a file that names none, unless the file's layer names say
    it is another family's (then the likeliest of those)."""
    if not fits or model_type in fits:
        return model_type
    return fits[0]
