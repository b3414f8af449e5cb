"""Text-prompted segmentation with CLIPSeg (transformers), for automatic masks.

Offline (HF_HUB_OFFLINE, as the app and tests run) the model comes from a local folder, or
from the Hugging Face cache when a hub id was downloaded before. torch and transformers are
imported on first use, so the command line's parser stays light. It is loaded once per model and device and
kept, so a preview followed by a run over the folder loads it once.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.errors import MaskError

DEFAULT_CLIPSEG_MODEL = "CIDAS/clipseg-rd64-refined"

HOW_TO_PROVIDE = (
    "To provide it: on a machine with internet, run "
    f"`hf download {DEFAULT_CLIPSEG_MODEL} --local-dir DIR` (older huggingface_hub: "
    f"`huggingface-cli download {DEFAULT_CLIPSEG_MODEL} --local-dir DIR`), copy DIR to this "
    "machine and give its path as --model (in the page: the Model field)."
)

def _offline() -> bool:
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(model: str) -> bool:
    """A hub id is exactly `owner/name`; anything else (absolute, ./x, ~/x, a/b/c) is a path."""
    return (os.path.isabs(model) or model.startswith((".", "~")) or "\\" in model
            or model.count("/") != 1)


def resolve_model(model: str) -> str:
    """A local folder as an absolute path, or the hub id as given; MaskError when a path is
    given that is not a folder."""
    model = str(model).strip()
    if not model:
        raise MaskError("model: empty; give a CLIPSeg model folder or hub id. " + HOW_TO_PROVIDE)
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise MaskError(f"CLIPSeg model '{model}' is a file, not a model folder. " + HOW_TO_PROVIDE)
    if _looks_like_path(model):
        raise MaskError(f"CLIPSeg model folder '{model}' does not exist. " + HOW_TO_PROVIDE)
    return model


def _short(error: Exception) -> str:
    """The first sentence of an error (transformers' run to a paragraph)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 200 else text[:197] + "..."


class ClipSegmenter:
    """A loaded CLIPSeg model and processor: `segmenter(image, prompt)` -> H x W focus map."""

    def __init__(self, model, processor, device):
        self.model = model
        self.processor = processor
        self.device = device

    def __call__(self, image: Image.Image, prompt: str) -> np.ndarray:
        """Sigmoid of CLIPSeg's logits for `prompt`, resized (bilinear) to the image's size."""
        import torch

        inputs = self.processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt",
                                padding=True, truncation=True)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with torch.no_grad():
            logits = self.model(**inputs).logits
        # One image: (1, h, w); older transformers squeeze a batch of one to (h, w).
        logits = logits.reshape(-1, *logits.shape[-2:])[:1, None].float()
        width, height = image.size
        resized = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                                  align_corners=False)
        return torch.sigmoid(resized)[0, 0].cpu().numpy()


_lock = threading.Lock()
_loaded: dict[tuple[str, str], ClipSegmenter] = {}


def load_clipseg(model: str) -> ClipSegmenter:
    """The CLIPSeg model at `model` (folder or hub id), loaded once and kept (one at a time:
    the real one is ~600 MB). Runs on CUDA when available. Raises MaskError saying how to
    provide the model when it cannot be loaded."""
    import torch

    name = resolve_model(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = (name, str(device))
    with _lock:
        if key in _loaded:
            return _loaded[key]
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        is_folder = os.path.isdir(name)
        if is_folder and not os.path.isfile(os.path.join(name, "config.json")):
            raise MaskError(f"'{model}' is not a CLIPSeg model folder: it holds no config.json. "
                            + HOW_TO_PROVIDE)
        offline = _offline()
        try:
            processor = CLIPSegProcessor.from_pretrained(name, local_files_only=offline)
            # use_safetensors: never a pickled .bin (SPEC §7: no pickle is loaded)
            net = CLIPSegForImageSegmentation.from_pretrained(name, local_files_only=offline,
                                                              use_safetensors=True)
        except Exception as error:  # noqa: BLE001 - missing files, no cache, a broken folder ...
            if is_folder:
                reason = _short(error)
            elif offline:
                reason = "it is not in the local Hugging Face cache, and downloads are off (HF_HUB_OFFLINE)"
            else:
                reason = f"it could not be downloaded ({_short(error)})"
            raise MaskError(f"Cannot load the CLIPSeg model '{model}': {reason}. "
                            + HOW_TO_PROVIDE) from None
        _loaded.clear()  # keep one model in memory
        _loaded[key] = ClipSegmenter(net.to(device).eval(), processor, device)
        return _loaded[key]


def forget_loaded_models() -> None:
    """Drop the kept model (frees its memory; the next use loads it again)."""
    with _lock:
        _loaded.clear()
