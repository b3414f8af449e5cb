"""One job: read any LoRA file into its layers (factors, alpha, the weight delta each gives),
and write plain LoRA layers back in a file's layout. The tools share it; none needs a model
to read a file, only to know which model weight a layer changes (merge_into.py, targets.py).

Layouts read (the names decide; a file may mix them):
- kohya / LyCORIS: `lora_unet_…`, `lora_te_…` / `lora_te1_…` / `lora_te2_…` with
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`, or LyCORIS's `.hada_*` (LoHa), `.lokr_*`
  (LoKr), `.dora_scale`; what kohya's sd-scripts, OneTrainer, LyCORIS and Atelier's KOHYA_LORA
  / LEGACY_LORA write.
- ComfyUI: `diffusion_model.…` and `text_encoders.clip_l.transformer.…` with `.lora_A.weight`,
  `.lora_B.weight` (and the LyCORIS suffixes).
- diffusers / peft: `unet.…`, `text_encoder.…`, `transformer.…` with `.lora_A.weight`,
  `.lora_B.weight` and peft's DoRA `.lora_magnitude_vector`; no alpha (scale 1).
A missing `.alpha` means alpha = rank (kohya's default, and diffusers' scale 1).

What a layer does to its weight W (ComfyUI's rule, which A1111/Forge share; trainer/lora.py's
module note has the derivations): LoRA dW = alpha/rank * up @ down; LoHa (w1_a w1_b) ⊙ (w2_a w2_b)
* alpha/rank; LoKr kron(w1, w2) * alpha/rank (1 when both factors are whole). DoRA: a kohya
`dora_scale` s on the output axis gives s * (W + dW) / ||W|| (row norms of the base weight), on
the input axis s * (W + dW) / ||W + dW|| (column norms); peft's magnitude m (diffusers files)
gives m * (W + dW) / ||W + dW|| (rows), as diffusers' own loader applies it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.embedding_files import BUNDLE_PREFIX, bundled_embeddings
from trainer.errors import ConfigError

# Every suffix a layer's tensor may have, longest first so that '.lora_A.weight' is not read as
# '.weight'. The two spellings of one factor map to one name.
SUFFIXES = {
    "lora_down.weight": "down", "lora_up.weight": "up",
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora_magnitude_vector.weight": "magnitude", "lora_magnitude_vector": "magnitude",
    "dora_scale": "dora_scale", "alpha": "alpha",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a",
    "hada_w2_b": "hada_w2_b", "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b", "lokr_w2_a": "lokr_w2_a",
    "lokr_w2_b": "lokr_w2_b", "lokr_w1": "lokr_w1", "lokr_w2": "lokr_w2", "lokr_t2": "lokr_t2",
}
# Suffixes of layer types that exist but that the tools do not compute (named in the refusal).
UNREAD = {"lora_mid.weight": "a LoCon Tucker layer (lora_mid)", "diff": "a full-weight layer",
          "diff_b": "a full-bias layer", "on_input": "an (IA)³ layer", "w_norm": "a norm layer",
          "b_norm": "a norm layer", "weight": "a full-weight layer", "bias": "a bias layer"}
KOHYA_PARTS = (("lora_unet_", "denoiser"), ("lora_te1_", "text_encoder"),
               ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3"),
               ("lora_te_", "text_encoder"))
COMFY_PARTS = (("diffusion_model.", "denoiser"), ("text_encoders.clip_l.", "text_encoder"),
               ("text_encoders.clip_g.", "text_encoder_2"), ("text_encoders.t5xxl.", "T5"))
DIFFUSERS_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class Layer:
    """One layer of a LoRA file: its tensors by normalised name ('down', 'up', 'hada_w1_a', …,
    'lokr_w1', …; 'dora_scale' or 'magnitude' for DoRA), float32, and its alpha."""
    name: str                                   # as the file spells it, without the suffix
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None                  # None: not in the file (alpha = rank)
    dtype: torch.dtype = torch.float32          # the file's dtype of the factors
    suffixes: dict[str, str] = field(default_factory=dict)  # normalised name -> file suffix

    @property
    def kind(self) -> str:
        """'lora', 'loha' or 'lokr' (DoRA is a LoRA with `dora`)."""
        if any(k.startswith("hada_") for k in self.tensors):
            return "loha"
        if any(k.startswith("lokr_") for k in self.tensors):
            return "lokr"
        return "lora"

    @property
    def dora(self) -> str:
        """'' (no DoRA), 'scale' (kohya's / LyCORIS's dora_scale) or 'magnitude' (peft's)."""
        return ("scale" if "dora_scale" in self.tensors
                else "magnitude" if "magnitude" in self.tensors else "")

    @property
    def rank(self) -> int:
        """The rank its scale divides by (LoKr with whole factors: its w1's smaller side)."""
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        for name in ("lokr_w2_b", "lokr_w1_b"):
            if name in t:
                return t[name].shape[0]
        return min(t["lokr_w1"].shape[:2])

    @property
    def scale(self) -> float:
        if self.kind == "lokr" and "lokr_w1_b" not in self.tensors \
                and "lokr_w2_b" not in self.tensors:
            return 1.0  # both factors whole: loaders apply no alpha
        alpha = self.alpha if self.alpha is not None else float(self.rank)
        return alpha / self.rank

    @property
    def delta_shape(self) -> torch.Size:
        """The shape `delta` has, without computing it (plain LoRA layers)."""
        up, down = self.tensors["up"], self.tensors["down"]
        if down.dim() == 4:
            return torch.Size((up.shape[0], *down.shape[1:]))
        return torch.Size((up.shape[0], down.flatten(1).shape[1]))

    def delta(self) -> torch.Tensor:
        """dW in float32 (DoRA's renormalisation not included: see `apply`). A LoRA's conv
        delta is [out, in, k, k]; LoHa/LoKr factors of a conv may be flat [out, in*k*k]."""
        t, kind = self.tensors, self.kind
        if kind == "lora":
            up, down = t["up"], t["down"]
            product = up.flatten(1) @ down.flatten(1)
            shape = (up.shape[0], *down.shape[1:]) if down.dim() == 4 else product.shape
            return self.scale * product.reshape(shape)
        if kind == "loha":
            return self.scale * (_hada_factor(t, "1") * _hada_factor(t, "2"))
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"],
                              t["lokr_w2_a"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return self.scale * torch.kron(w1, w2)

    def delta_for(self, weight_shape: torch.Size) -> torch.Tensor:
        """dW shaped as the weight it changes; ConfigError when it cannot be."""
        delta = self.delta()
        if delta.numel() != torch.Size(weight_shape).numel():
            raise ConfigError(f"layer {self.name} changes a weight of shape "
                              f"{tuple(delta.shape)}, but the model's is {tuple(weight_shape)} "
                              "(a LoRA of another model?).")
        return delta.reshape(weight_shape)

    @torch.no_grad()
    def applied(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """The weight with this layer applied at `strength`, in float32."""
        base = weight.float()
        if not self.dora:
            return base + strength * self.delta_for(base.shape).to(base.device)
        delta = self.delta_for(base.shape).to(base.device)
        if self.dora == "magnitude":
            # peft / diffusers: the strength scales dW inside the normalisation
            merged = base + strength * delta
            m = self.tensors["magnitude"].to(base.device).reshape(-1)
            if m.numel() != base.shape[0]:
                raise ConfigError(f"layer {self.name}: its DoRA magnitude has {m.numel()} "
                                  f"values, the weight {base.shape[0]} output channels.")
            return merged * (m / _row_norms(merged)).reshape(-1, *[1] * (base.dim() - 1))
        # ComfyUI's weight_decompose: the whole DoRA weight, then blended by the strength
        scale = self.tensors["dora_scale"].to(base.device)
        merged = base + delta
        if scale.shape[0] == base.shape[0]:
            norm = _row_norms(base).reshape(-1, *[1] * (base.dim() - 1))
        else:
            norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
                    .reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1))
        dora = merged * (scale / (norm + torch.finfo(base.dtype).eps))
        return base + strength * (dora - base)


def _hada_factor(t: dict[str, torch.Tensor], i: str) -> torch.Tensor:
    if f"hada_t{i}" in t:  # Tucker: a core [r, r, k, k] between the two factors
        return torch.einsum("i j k l, j r, i p -> p r k l", t[f"hada_t{i}"], t[f"hada_w{i}_b"],
                            t[f"hada_w{i}_a"])
    return t[f"hada_w{i}_a"] @ t[f"hada_w{i}_b"]


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1).norm(dim=1)


@dataclass
class LoraContents:
    """A LoRA file read whole."""
    path: Path
    sha256: str
    metadata: dict[str, str]
    layers: dict[str, Layer]
    embeddings: dict[str, dict[str, torch.Tensor]]  # bundled: placeholder -> {clip_l: …}

    @property
    def layouts(self) -> list[str]:
        return sorted({layout_of(n) for n in self.layers})

    def config(self) -> dict:
        """Atelier's own training config from the header ({} when absent or unreadable)."""
        try:
            return json.loads(self.metadata.get("atelier_config") or "{}")
        except ValueError:
            return {}


def layout_of(name: str) -> str:
    """'kohya', 'comfy' or 'diffusers' by a layer's name."""
    if name.startswith(("lora_unet_", "lora_te")):
        return "kohya"
    if name.startswith(("diffusion_model.", "text_encoders.")):
        return "comfy"
    return "diffusers"


def part_of(name: str) -> str:
    """The model part a layer name belongs to: 'denoiser' (UNet or transformer),
    'text_encoder', 'text_encoder_2', …; '' when the name says none."""
    for prefix, part in KOHYA_PARTS + COMFY_PARTS:
        if name.startswith(prefix):
            return part
    first = name.split(".", 1)[0]
    if first in DIFFUSERS_PARTS:
        return "denoiser" if first in ("unet", "transformer") else first
    return ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_key(key: str) -> tuple[str, str]:
    """('layer name', 'file suffix') of a tensor key; ConfigError for a suffix no tool reads."""
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    for suffix, what in UNREAD.items():
        if key.endswith("." + suffix):
            raise ConfigError(f"its tensor {key} is {what}, which the LoRA tools do not read.")
    raise ConfigError(f"its tensor {key} is not part of a LoRA layer (a whole checkpoint, or a "
                      "layout the LoRA tools do not know?).")


def read_lora(path: str | Path, field_name: str = "") -> LoraContents:
    """Every layer of the LoRA file at `path`. ConfigError naming the file (and `field_name`,
    the flag or field it came from) with the reason when it cannot be read."""
    from safetensors import safe_open
    path = Path(path)
    where = f"{field_name}: " if field_name else ""
    if not path.is_file():
        raise ConfigError(f"{where}'{path}' does not exist or is not a file.")
    try:
        with safe_open(str(path), "pt") as file:
            metadata = dict(file.metadata() or {})
            tensors = {k: file.get_tensor(k) for k in file.keys()}
    except Exception as error:  # safetensors raises its own error types for a bad file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{where}'{path.name}' is not a readable .safetensors file "
                          f"({reason}).") from None
    try:
        layers = _layers(tensors)
    except ConfigError as error:
        raise ConfigError(f"{where}'{path.name}': {error}") from None
    embeddings = bundled_embeddings(tensors)
    if not layers:
        raise ConfigError(f"{where}'{path.name}' holds no LoRA layers"
                          + (" (only embeddings)." if embeddings else "."))
    return LoraContents(path, file_sha256(path), metadata, layers, embeddings)


def _layers(tensors: dict[str, torch.Tensor]) -> dict[str, Layer]:
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            continue
        name, suffix = split_key(key)
        grouped.setdefault(name, {})[SUFFIXES[suffix]] = (suffix, tensor)
    layers = {}
    for name, found in grouped.items():
        alpha = found.pop("alpha", None)
        dtypes = [t.dtype for _, t in found.values()]
        layer = Layer(name, {k: t.float() for k, (_, t) in found.items()},
                      float(alpha[1].float().item()) if alpha is not None else None,
                      dtypes[0] if dtypes else torch.float32,
                      {k: s for k, (s, _) in found.items()})
        _check_complete(layer)
        layers[name] = layer
    return layers


REQUIRED = {"lora": ("down", "up"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


def _check_complete(layer: Layer) -> None:
    t = layer.tensors
    if layer.kind == "lokr":
        w1 = "lokr_w1" in t or {"lokr_w1_a", "lokr_w1_b"} <= set(t)
        w2 = "lokr_w2" in t or {"lokr_w2_a", "lokr_w2_b"} <= set(t)
        missing = [] if w1 and w2 else ["lokr_w1" if not w1 else "lokr_w2"]
    else:
        missing = [n for n in REQUIRED[layer.kind] if n not in t]
    if missing:
        raise ConfigError(f"layer {layer.name} lacks its {missing[0]} tensor (a truncated or "
                          "edited file?).")


# --- writing --------------------------------------------------------------------------------

def plain_layer_tensors(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float,
                        layout: str, dtype: torch.dtype,
                        dora: tuple[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One plain LoRA layer's tensors in `layout` ('kohya', 'comfy' or 'diffusers'; diffusers
    keeps no alpha, so alpha / rank is folded into up). `dora`: (file suffix, tensor) kept."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu", dtype).contiguous()
    if layout == "diffusers":
        out = {f"{name}.lora_A.weight": cast(down),
               f"{name}.lora_B.weight": cast(up * (alpha / down.shape[0]))}
    else:
        names = (("lora_down.weight", "lora_up.weight") if layout == "kohya"
                 else ("lora_A.weight", "lora_B.weight"))
        out = {f"{name}.{names[0]}": cast(down), f"{name}.{names[1]}": cast(up),
               f"{name}.alpha": torch.tensor(float(alpha))}
    if dora is not None:
        out[f"{name}.{dora[0]}"] = cast(dora[1])
    return out


def dora_of(layer: Layer) -> tuple[str, torch.Tensor] | None:
    """A DoRA layer's (file suffix, tensor), to carry into a rewritten layer."""
    if not layer.dora:
        return None
    key = "dora_scale" if layer.dora == "scale" else "magnitude"
    return layer.suffixes[key], layer.tensors[key]


def tool_metadata(tool: str, record: dict, base: dict[str, str] | None = None) -> dict[str, str]:
    """A written file's header: `base` (the source's own fields, kept) and `atelier_lora_tool`,
    a JSON record of what was done (the tool, its sources' names, SHA-256 and strengths, the
    ranks)."""
    out = dict(base or {})
    out["atelier_lora_tool"] = json.dumps({"tool": tool, **record}, sort_keys=True)
    return out


def source_record(contents: LoraContents, strength: float | None = None) -> dict:
    record = {"file": contents.path.name, "sha256": contents.sha256}
    if strength is not None:
        record["strength"] = strength
    return record


def embedding_tensors(contents: LoraContents) -> dict[str, torch.Tensor]:
    """The file's bundled embeddings under the keys they had, to carry into a new file."""
    from safetensors import safe_open
    if not contents.embeddings:
        return {}
    with safe_open(str(contents.path), "pt") as file:
        return {k: file.get_tensor(k) for k in file.keys() if k.startswith(BUNDLE_PREFIX)}
