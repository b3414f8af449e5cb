"""Captioning models from transformers: Florence-2 (`Florence2ForConditionalGeneration`, native
in transformers 5) and BLIP (`BlipForConditionalGeneration`). Which one a folder holds is read
from its config.json (`model_type`), so any checkpoint of either family works.

Where the model comes from: a local folder always; a hub id is downloaded only where that is
allowed (on a Hugging Face Space, or when the user asked with --online / the page's online
start) and otherwise loaded from the local Hugging Face cache if it was downloaded before. torch
and transformers are imported on first use, so the command line's parser stays light. One model
is kept loaded (per device), so a preview followed by a run over the folder loads it once.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from trainer.errors import CaptionError

DEFAULT_CAPTION_MODEL = "florence-community/Florence-2-base"
BLIP_MODEL = "Salesforce/blip-image-captioning-base"

FLORENCE2 = "florence2"
BLIP = "blip"
FAMILIES = {FLORENCE2: "Florence-2", BLIP: "BLIP"}

STYLES = ("short", "detailed")
# Florence-2 is prompted with a task token; these two are its captioning tasks
# (<MORE_DETAILED_CAPTION> writes a paragraph, longer than a training caption wants).
FLORENCE_TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>"}
# Tokens generated at most, when the user gives no --max-length: a short caption is one
# phrase; a detailed one a few sentences (CLIP reads 77 tokens; longer text is still kept).
DEFAULT_MAX_LENGTH = {"short": 40, "detailed": 120}

HOW_TO_PROVIDE = (
    "To provide one: on a machine with internet, run "
    f"`hf download {DEFAULT_CAPTION_MODEL} --local-dir DIR` (or {BLIP_MODEL}; older "
    "huggingface_hub: `huggingface-cli download ... --local-dir DIR`), copy DIR to this machine "
    "and give its path as --model (in the page: the captioning Model field). DIR holds "
    "config.json, the weights (*.safetensors) and the processor files. Or allow downloads: "
    "--online on the command line (a Space downloads by itself)."
)


def _env_on(*names: str) -> bool:
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in names)


def downloads_allowed(online: bool = False) -> bool:
    """True when a hub id may be downloaded: on a Space (SPACE_ID is set) or when the user
    asked (`online`), and never when the hub is switched off (HF_HUB_OFFLINE, which
    huggingface_hub reads once at import, so it wins over a late --online)."""
    if _env_on("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        return False
    return bool(online or os.environ.get("SPACE_ID"))


def _looks_like_path(model: str) -> bool:
    """A hub id is exactly `owner/name`; anything else (absolute, ./x, ~/x, a/b/c) is a path."""
    return (os.path.isabs(model) or model.startswith((".", "~")) or "\\" in model
            or model.count("/") != 1)


def _short(error: Exception) -> str:
    """The first sentence of an error (transformers' run to a paragraph)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 200 else text[:197] + "..."


def resolve_model(model: str) -> str:
    """A local folder as an absolute path, or the hub id as given; CaptionError when a path
    is given that is not a folder."""
    model = str(model or "").strip()
    if not model:
        raise CaptionError("model: empty; give a captioning model folder or hub id. "
                           + HOW_TO_PROVIDE)
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise CaptionError(f"Captioning model '{model}' is a file, not a model folder. "
                           + HOW_TO_PROVIDE)
    if _looks_like_path(model):
        raise CaptionError(f"Captioning model folder '{model}' does not exist. " + HOW_TO_PROVIDE)
    return model


def family_of(config: dict, model: str = "") -> str:
    """FLORENCE2 or BLIP from a model's config.json contents; CaptionError for anything else."""
    model_type = str(config.get("model_type", "")).strip().lower()
    if model_type == "florence2":
        text_type = str((config.get("text_config") or {}).get("model_type", ""))
        if config.get("auto_map") or text_type == "florence2_language":
            # Microsoft's first release (and fine-tunes of it) ships its own modeling code
            # for trust_remote_code; transformers' native Florence-2 cannot read its config.
            raise CaptionError(
                f"'{model}' is Florence-2 in its original remote-code layout (microsoft/"
                "Florence-2-*), which transformers' native Florence-2 does not load; use the "
                f"converted {DEFAULT_CAPTION_MODEL} (or florence-community/Florence-2-large).")
        return FLORENCE2
    if model_type == "blip":
        return BLIP
    what = f"a '{model_type}' model" if model_type else "a model of unknown type (no model_type)"
    hint = " (BLIP-2 is a different, much larger model)" if model_type.startswith("blip") else ""
    raise CaptionError(f"'{model}' is {what}{hint}; captioning works with Florence-2 or BLIP, "
                       f"e.g. {DEFAULT_CAPTION_MODEL} or {BLIP_MODEL}.")


def _read_config(name: str, model: str, allow_download: bool) -> dict:
    """config.json of a folder, or of a hub id (from the cache, or downloaded when allowed)."""
    if os.path.isdir(name):
        file = Path(name) / "config.json"
        if not file.is_file():
            raise CaptionError(f"'{model}' is not a captioning model folder: it holds no "
                               "config.json. " + HOW_TO_PROVIDE)
    else:
        from huggingface_hub import hf_hub_download
        try:
            file = Path(hf_hub_download(name, "config.json", local_files_only=not allow_download))
        except Exception as error:  # noqa: BLE001 - not cached, offline, no such repo ...
            if not allow_download:
                reason = ("it is not in the local Hugging Face cache, and downloads are off "
                          "(pass --online to download it)")
            else:
                reason = f"it could not be downloaded ({_short(error)})"
            raise CaptionError(f"Cannot load the captioning model '{model}': {reason}. "
                               + HOW_TO_PROVIDE) from None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CaptionError(f"Cannot read '{file}': {_short(error)}. " + HOW_TO_PROVIDE) from None
    if not isinstance(config, dict):
        raise CaptionError(f"'{file}' is not a model config (not a JSON object).")
    return config


def detect_family(model: str, online: bool = False) -> str:
    """Which family (FLORENCE2 or BLIP) the model folder or hub id holds, from its config."""
    name = resolve_model(model)
    return family_of(_read_config(name, model, downloads_allowed(online)), model)


def check_style(style: str) -> str:
    value = str(style or "").strip().lower()
    if value not in STYLES:
        raise CaptionError(f"style: {style!r} is not one of {', '.join(STYLES)}")
    return value


def generation_options(family: str, style: str, max_length: int) -> dict:
    """What `generate` is asked for: deterministic beam search (the same image gives the same
    caption on every run), at most `max_length` new tokens."""
    options = {"max_new_tokens": max_length, "num_beams": 3, "do_sample": False}
    if family == BLIP and style == "detailed":
        # BLIP has no detailed-caption task: it is asked for a longer caption instead, and kept
        # from looping on one phrase, which beam search on a longer output otherwise does.
        options.update(min_new_tokens=min(20, max_length), no_repeat_ngram_size=3,
                       repetition_penalty=1.3)
    return options


def tidy(text: str) -> str:
    """One line (in a caption file, each line is an alternative caption), single spaces."""
    return " ".join(str(text).split())


@dataclass
class Captioner:
    """A loaded captioning model: `captioner(image, style, max_length)` -> the caption."""

    family: str
    model: object
    processor: object
    device: object
    dtype: object

    def prompt(self, style: str) -> str | None:
        """The text the model is prompted with: Florence-2's task token; BLIP needs none."""
        return FLORENCE_TASKS[check_style(style)] if self.family == FLORENCE2 else None

    def __call__(self, image: Image.Image, style: str = "short",
                 max_length: int | None = None) -> str:
        import torch

        style = check_style(style)
        max_length = int(max_length or DEFAULT_MAX_LENGTH[style])
        rgb = image.convert("RGB")
        prompt = self.prompt(style)
        if prompt is None:
            inputs = self.processor(images=rgb, return_tensors="pt")
        else:
            inputs = self.processor(text=prompt, images=rgb, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.no_grad():
            generated = self.model.generate(
                **inputs, **generation_options(self.family, style, max_length))
        # Florence-2's post-processing of its caption tasks ("pure_text") only removes the
        # <s> and </s> markers, which skipping special tokens does for both families.
        return tidy(self.processor.batch_decode(generated, skip_special_tokens=True)[0])


_lock = threading.Lock()
_loaded: dict[tuple[str, str], Captioner] = {}


def _classes(family: str):
    if family == FLORENCE2:
        from transformers import AutoProcessor, Florence2ForConditionalGeneration
        return Florence2ForConditionalGeneration, AutoProcessor
    from transformers import BlipForConditionalGeneration, BlipProcessor
    return BlipForConditionalGeneration, BlipProcessor


def load_captioner(model: str, online: bool = False) -> Captioner:
    """The Florence-2 or BLIP model at `model` (folder or hub id), loaded once and kept (one
    at a time: real ones are 0.5-1 GB). Runs on CUDA in float16 when available. Raises
    CaptionError saying how to provide the model when it cannot be found or loaded."""
    import torch

    name = resolve_model(model)
    allow = downloads_allowed(online)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = (name, str(device))
    with _lock:
        if key in _loaded:
            return _loaded[key]
        family = family_of(_read_config(name, model, allow), model)
        model_class, processor_class = _classes(family)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            processor = processor_class.from_pretrained(name, local_files_only=not allow)
            # use_safetensors: never a pickled .bin (SPEC §7: no pickle is loaded)
            net = model_class.from_pretrained(name, local_files_only=not allow, dtype=dtype,
                                              use_safetensors=True)
        except Exception as error:  # noqa: BLE001 - missing files, no cache, a broken folder ...
            if os.path.isdir(name):
                reason = _short(error)
            elif not allow:
                reason = ("its weights are not in the local Hugging Face cache, and downloads "
                          "are off (pass --online to download it)")
            else:
                reason = f"it could not be downloaded ({_short(error)})"
            raise CaptionError(f"Cannot load the {FAMILIES[family]} model '{model}': {reason}. "
                               + HOW_TO_PROVIDE) from None
        _loaded.clear()  # keep one model in memory
        _loaded[key] = Captioner(family, net.to(device).eval(), processor, device, dtype)
        return _loaded[key]


def forget_loaded_models() -> None:
    """Drop the kept model (frees its memory; the next use loads it again)."""
    with _lock:
        _loaded.clear()
