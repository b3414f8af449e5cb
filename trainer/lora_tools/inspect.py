"""`lora inspect`: what a LoRA file is — its family, adapter type, layout, layers with their rank
and alpha, the trigger words and training settings its header records, and the embeddings it
bundles — for any file a user drops (Atelier's, kohya's sd-scripts', OneTrainer's, diffusers').

The family comes from the header when it names one (Atelier's config, kohya's
`ss_base_model_version`, the model spec's `modelspec.architecture`), else from the layer names
(a second text encoder: SDXL; Flux's double blocks; SD 3's joint blocks), said as a guess.
Trigger words: Atelier's concept prompts where it has them, the model spec's `trigger_phrase`,
else the most frequent tags of kohya's `ss_tag_frequency`.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from trainer.lora_tools.layers import LoraContents, layout_of, part_of, read_lora
from trainer.models import registry

# kohya / Atelier header fields that describe the training, in the order shown
SETTINGS = (("ss_network_module", "network"), ("ss_network_args", "network args"),
            ("ss_network_dim", "rank"), ("ss_network_alpha", "alpha"),
            ("ss_learning_rate", "learning rate"), ("ss_unet_lr", "UNet learning rate"),
            ("ss_text_encoder_lr", "text encoder learning rate"),
            ("ss_optimizer", "optimizer"), ("ss_lr_scheduler", "scheduler"),
            ("ss_num_epochs", "epochs"), ("ss_steps", "steps"),
            ("ss_max_train_steps", "max steps"), ("ss_num_train_images", "images"),
            ("ss_batch_size_per_device", "batch size"), ("ss_resolution", "resolution"),
            ("ss_mixed_precision", "precision"), ("ss_seed", "seed"),
            ("ss_clip_skip", "clip skip"), ("ss_noise_offset", "noise offset"),
            ("ss_min_snr_gamma", "min-SNR gamma"), ("ss_sd_model_name", "base model"),
            ("ss_output_name", "name"), ("ss_training_comment", "comment"),
            ("modelspec.title", "title"), ("modelspec.date", "date"))
TOP_TAGS = 10
# layer names that only some families have (for files whose header names none)
LAYER_HINTS = (("lora_te2_", "STABLE_DIFFUSION_XL_10_BASE"),
               ("text_encoder_2.", "STABLE_DIFFUSION_XL_10_BASE"),
               ("text_encoders.clip_g.", "STABLE_DIFFUSION_XL_10_BASE"),
               ("input_blocks_7_1_", "STABLE_DIFFUSION_XL_10_BASE"))


@dataclass
class Inspection:
    contents: LoraContents
    model_type: str
    model_type_source: str      # "header", "layer names (a guess)" or "" (unknown)
    adapter_types: dict[str, int]
    parts: dict[str, int]
    layers: list[dict]
    triggers: list[str]
    settings: dict[str, str]
    embeddings: dict[str, list[int]]  # placeholder -> [vectors, width] per encoder

    def to_dict(self) -> dict:
        c = self.contents
        return {"file": c.path.name, "sha256": c.sha256, "size_bytes": c.path.stat().st_size,
                "model_type": self.model_type, "model_type_source": self.model_type_source,
                "family": registry.facts(self.model_type).label if self.model_type else "",
                "layouts": c.layouts, "adapter_types": self.adapter_types,
                "parts": self.parts, "ranks": sorted({l["rank"] for l in self.layers}),
                "alphas": sorted({l["alpha"] for l in self.layers}),
                "layer_count": len(self.layers), "layers": self.layers,
                "trigger_words": self.triggers, "settings": self.settings,
                "embeddings": self.embeddings,
                "tool_record": json.loads(c.metadata.get("atelier_lora_tool") or "null")}

    def text(self) -> str:
        d = self.to_dict()
        family = d["family"] or "unknown family"
        if self.model_type_source.startswith("layer"):
            family += " (guessed from the layer names)"
        kinds = ", ".join(f"{n} {k}" for k, n in self.adapter_types.items())
        ranks = d["ranks"]
        lines = [f"{d['file']}: {family}; {len(self.layers)} layers ({kinds}); layout "
                 f"{'/'.join(d['layouts'])}",
                 "rank " + (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}")
                 + ", alpha " + ", ".join(f"{a:g}" for a in d["alphas"][:6]),
                 "parts: " + ", ".join(f"{p} {n}" for p, n in self.parts.items())]
        if self.triggers:
            lines.append("trigger words: " + ", ".join(self.triggers))
        if self.embeddings:
            lines.append("embeddings: " + ", ".join(self.embeddings))
        for key, value in self.settings.items():
            lines.append(f"{key}: {value}")
        lines.append(f"sha256: {d['sha256']}")
        return "\n".join(lines)


def inspect(path: str | Path, field_name: str = "FILE") -> Inspection:
    contents = read_lora(path, field_name)
    model_type, source = _model_type(contents)
    denoiser = registry.facts(model_type).denoiser if model_type else "unet/transformer"
    layers, kinds, parts = [], Counter(), Counter()
    for name, layer in contents.layers.items():
        kind = layer.kind + (" (DoRA)" if layer.dora else "")
        part = part_of(name).replace("denoiser", denoiser) or "unknown"
        kinds[kind] += 1
        parts[part] += 1
        layers.append({"name": name, "part": part, "type": kind, "rank": layer.rank,
                       "alpha": layer.alpha if layer.alpha is not None else float(layer.rank),
                       "layout": layout_of(name)})
    return Inspection(contents, model_type, source, dict(kinds), dict(parts), layers,
                      _triggers(contents), _settings(contents),
                      {p: [list(t.shape) for t in e.values()]
                       for p, e in contents.embeddings.items()})


def _model_type(contents: LoraContents) -> tuple[str, str]:
    from trainer.lora_tools.targets import named_model_type
    from trainer.try_lora import LAYER_FAMILIES
    named = named_model_type(contents.metadata)
    if named:
        return named, "header"
    names = list(contents.layers)
    for marker, model_type in LAYER_HINTS:
        if any(marker in n for n in names):
            return model_type, "layer names (a guess)"
    for prefixes, families in LAYER_FAMILIES:
        if any(n.startswith(prefixes) or (n + ".").startswith(prefixes) for n in names):
            return families[0], "layer names (a guess)"
    if any(n.startswith(("lora_unet_", "lora_te_", "unet.", "diffusion_model.")) for n in names):
        return "STABLE_DIFFUSION_15", "layer names (a guess)"
    return "", ""


def _triggers(contents: LoraContents) -> list[str]:
    config = contents.config()
    found = []
    for concept in config.get("concepts") or []:
        text = (concept.get("text") or {}) if isinstance(concept, dict) else {}
        for key in ("prompt", "trigger"):
            if isinstance(text, dict) and text.get(key):
                found.append(str(text[key]))
    phrase = contents.metadata.get("modelspec.trigger_phrase")
    if phrase:
        found += [p.strip() for p in phrase.split(",") if p.strip()]
    if not found:
        try:
            frequency = json.loads(contents.metadata.get("ss_tag_frequency") or "{}")
        except ValueError:
            frequency = {}
        counts: Counter = Counter()
        for tags in frequency.values() if isinstance(frequency, dict) else []:
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    counts[tag.strip()] += int(n) if str(n).isdigit() else 0
        found = [tag for tag, _ in counts.most_common(TOP_TAGS) if tag]
    return list(dict.fromkeys(found))


def _settings(contents: LoraContents) -> dict[str, str]:
    meta = contents.metadata
    settings = {label: meta[key] for key, label in SETTINGS if meta.get(key)}
    config = contents.config()
    for key in ("model_type", "peft_type", "lora_rank", "lora_alpha", "learning_rate",
                "optimizer", "epochs", "batch_size", "resolution", "base_model_name"):
        value = config.get(key)
        if isinstance(value, dict):  # optimizer: its name
            value = value.get("optimizer")
        if value not in (None, "", {}):
            settings.setdefault(f"atelier {key}", str(value))
    return settings
