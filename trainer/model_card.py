"""The README.md model card of a published output: front matter in the Hub's conventions for
LoRAs (`base_model`, `tags`, `instance_prompt`, a `widget` of the samples) written by
huggingface_hub's own `ModelCardData`, then the training settings that matter and how to load
the file in diffusers, ComfyUI and A1111/Forge.

It reads the run's config and the facts `trainer/publish.py` gathered; it writes nothing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from huggingface_hub import ModelCard, ModelCardData

from trainer.config import ModelFormat, TrainConfig, TrainingMethod

# Who loads each output format (README's table); the card only shows the recipes that work.
LOADERS: dict[ModelFormat, tuple[str, ...]] = {
    ModelFormat.KOHYA_LORA: ("diffusers", "comfyui", "a1111"),
    ModelFormat.LEGACY_LORA: ("diffusers", "comfyui", "a1111"),
    ModelFormat.COMFY_LORA: ("comfyui",),
    ModelFormat.DIFFUSERS_LORA: ("diffusers",),
    ModelFormat.ORIGINAL_SINGLE_FILE: ("diffusers", "comfyui", "a1111"),
    ModelFormat.LEGACY_SAFETENSORS: ("diffusers", "comfyui", "a1111"),
    ModelFormat.DIFFUSERS: ("diffusers", "comfyui"),
}


@dataclass(frozen=True)
class CardSample:
    """A sample image in the upload folder (`path` relative to it) and what drew it."""
    path: str
    prompt: str
    negative_prompt: str = ""


@dataclass(frozen=True)
class CardEmbedding:
    """A trained embedding in the repo: its placeholder and its own file."""
    placeholder: str
    file: str


@dataclass(frozen=True)
class CardFacts:
    """What the card says beyond the config: where things are in the repo and what the
    output's header records."""
    repo_id: str
    weights: str                 # the weights file in the repo ("" for a diffusers folder)
    config_file: str             # the config JSON in the repo
    base_model: str | None       # a hub id, or None when the run used a local model
    base_model_label: str        # what the config names (a hub id or a local path)
    instance_prompt: str | None
    samples: tuple[CardSample, ...]
    steps: int | None
    epochs: int | None
    embeddings: tuple[CardEmbedding, ...] = ()


def build_model_card(config: TrainConfig, facts: CardFacts) -> ModelCard:
    data = ModelCardData(
        base_model=facts.base_model,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=card_tags(config),
        instance_prompt=facts.instance_prompt or None,
        widget=[_widget_entry(s) for s in facts.samples] or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(config, facts)}")


def is_lora(config: TrainConfig) -> bool:
    return config.training_method == TrainingMethod.LORA


def is_embedding(config: TrainConfig) -> bool:
    return config.training_method == TrainingMethod.EMBEDDING


def method_name(config: TrainConfig) -> str:
    if is_lora(config):
        return adapter_name(config)
    return "textual inversion embedding" if is_embedding(config) else "full fine-tune"


def adapter_name(config: TrainConfig) -> str:
    """LoRA, DoRA, LoHa or LoKr (`peft_type` and `lora_decompose`, read with getattr: the
    adapter types are new in the config, and a config without them trained a plain LoRA)."""
    peft_type = getattr(getattr(config, "peft_type", None), "value", "LORA")
    if peft_type != "LORA":
        return {"LOHA": "LoHa", "LOKR": "LoKr"}.get(peft_type, peft_type)
    return "LoRA (DoRA)" if getattr(config, "lora_decompose", False) else "LoRA"


def loaders(config: TrainConfig) -> tuple[str, ...]:
    """Who loads the output: its format's loaders, less diffusers for LoHa/LoKr (diffusers
    loads no LoHa/LoKr for SD 1.5 / SDXL)."""
    if is_embedding(config):  # SAFETENSORS, the embedding layout all three read
        return ("diffusers", "comfyui", "a1111")
    found = LOADERS.get(config.output_model_format, ())
    if is_lora(config) and adapter_name(config) in ("LoHa", "LoKr"):
        found = tuple(n for n in found if n != "diffusers")
    return found


def card_tags(config: TrainConfig) -> list[str]:
    family = "stable-diffusion-xl" if config.model_type.is_sdxl else "stable-diffusion"
    tags = ["text-to-image", family, "diffusers"]
    if is_lora(config):
        # template:sd-lora: the Hub's LoRA page layout (the widget's gallery, trigger words)
        tags[1:1] = ["lora", "template:sd-lora"]
    if is_embedding(config) or config.additional_embeddings:
        tags.append("textual_inversion")
    if config.model_type.is_inpainting:
        tags.append("inpainting")
    return tags + ["atelier"]


def _widget_entry(sample: CardSample) -> dict:
    entry: dict = {"text": sample.prompt, "output": {"url": sample.path}}
    if sample.negative_prompt:
        entry["parameters"] = {"negative_prompt": sample.negative_prompt}
    return entry


def _family_name(config: TrainConfig) -> str:
    name = "SDXL" if config.model_type.is_sdxl else "Stable Diffusion 1.5"
    return name + (" inpainting" if config.model_type.is_inpainting else "")


def _body(config: TrainConfig, facts: CardFacts) -> str:
    name = facts.repo_id.split("/", 1)[1]
    what = method_name(config)
    base = (f"[{facts.base_model}](https://huggingface.co/{facts.base_model})" if facts.base_model
            else f"a local model (`{facts.base_model_label}`)")
    parts = [f"# {name}", "",
             f"A {what} of {_family_name(config)} ({base}), trained with Atelier.", ""]
    if facts.instance_prompt:
        parts += ["## Trigger words", "",
                  f"Use `{facts.instance_prompt}` in the prompt.", ""]
    if facts.samples:
        # The Hub draws the widget's images here (the sd-lora template's gallery).
        parts += ["## Samples", "", "<Gallery />", "",
                  "Drawn during training, at its last sampling step, with the prompts shown.",
                  ""]
    parts += ["## Training settings", "", "| Setting | Value |", "|---|---|"]
    parts += [f"| {key} | {_cell(value)} |" for key, value in training_settings(config, facts)]
    parts += ["", f"The exact config is `{facts.config_file}`: "
              f"`python -m trainer train --config {facts.config_file}` trains it again "
              "(its paths are the training machine's).", ""]
    parts += _usage(config, facts)
    return "\n".join(parts).rstrip() + "\n"


def training_settings(config: TrainConfig, facts: CardFacts) -> list[tuple[str, str]]:
    """The settings that decide what was learned, as (setting, value) rows."""
    rows = [("Method", method_name(config)),
            ("Base model", facts.base_model or f"`{facts.base_model_label}` (local)"),
            ("Model type", config.model_type.value),
            ("Output format", config.output_model_format.value)]
    if is_lora(config):
        rows += [("LoRA rank / alpha", f"{config.lora_rank} / {config.lora_alpha:g}"),
                 ("LoRA layers", config.lora_layer_preset.value)]
        if config.lora_dropout:
            rows.append(("LoRA dropout", f"{config.lora_dropout:g}"))
    if config.additional_embeddings:
        rows.append(("Embeddings", ", ".join(f"`{e.placeholder}` ({e.token_count} vectors)"
                                             for e in config.additional_embeddings)))
    trained = [p for p in ("unet", "text_encoder", "text_encoder_2")
               if _trains(config, p)]
    rows.append(("Trained parts", ", ".join(trained) or "none"))
    rows.append(("Learning rate", ", ".join(
        f"{p} {config.part_learning_rate(p):g}" for p in trained) or f"{config.learning_rate:g}"))
    optimizer = config.optimizer.optimizer.value
    options = {k: v for k, v in config.optimizer.model_dump(mode="json").items()
               if k != "optimizer" and v is not None}
    if options:
        optimizer += " (" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"
    rows.append(("Optimizer", optimizer))
    scheduler = config.learning_rate_scheduler.value
    if config.learning_rate_warmup_steps:
        scheduler += f", warmup {config.learning_rate_warmup_steps:g}"
    rows.append(("LR scheduler", scheduler))
    if facts.steps is not None:
        rows.append(("Steps", str(facts.steps)))
    rows.append(("Epochs", str(facts.epochs if facts.epochs is not None else config.epochs)))
    rows.append(("Batch size", f"{config.batch_size}"
                 + (f" × {config.gradient_accumulation_steps} accumulated"
                    if config.gradient_accumulation_steps > 1 else "")))
    rows.append(("Resolution", config.resolution))
    rows.append(("Training precision", config.train_dtype.value))
    if config.min_snr_gamma:
        rows.append(("Min-SNR gamma", f"{config.min_snr_gamma:g}"))
    if config.offset_noise_weight:
        rows.append(("Offset noise", f"{config.offset_noise_weight:g}"))
    if config.ema.value != "OFF":
        rows.append(("EMA decay", f"{config.ema_decay:g}"))
    if config.masked_training:
        rows.append(("Masked training", f"unmasked weight {config.unmasked_weight:g}"))
    rows.append(("Seed", str(config.seed)))
    return rows


def _cell(value: str) -> str:
    return value.replace("|", "\\|")  # a path or prompt must not split the table's row


def _py(text: str) -> str:
    """A Python string literal (JSON's escapes are Python's), in double quotes."""
    return json.dumps(text, ensure_ascii=False)


def _trains(config: TrainConfig, part: str) -> bool:
    if is_embedding(config):  # only the new vectors train; the model stays frozen
        return False
    if part == "text_encoder_2" and not config.model_type.is_sdxl:
        return False
    return getattr(config, part).train


def _usage(config: TrainConfig, facts: CardFacts) -> list[str]:
    found = loaders(config)
    lines = ["## How to use", ""]
    if "diffusers" in found:
        lines += ["### diffusers", "", "```python", *_diffusers_code(config, facts), "```", ""]
    if "comfyui" in found:
        lines += ["### ComfyUI", ""]
        if is_embedding(config):
            lines.append(f"Put `{facts.weights}` in `ComfyUI/models/embeddings/` and write "
                         f"`embedding:{facts.weights.rsplit('.', 1)[0]}` in the prompt.")
        elif config.output_model_format == ModelFormat.DIFFUSERS:
            lines.append("Download the repository into `ComfyUI/models/diffusers/` and load it "
                         "with the *DiffusersLoader* node.")
        elif is_lora(config):
            lines.append(f"Put `{facts.weights}` in `ComfyUI/models/loras/`, then add a "
                         "*Load LoRA* node between *Load Checkpoint* and the sampler (strength "
                         "1.0 for model and clip).")
        else:
            lines.append(f"Put `{facts.weights}` in `ComfyUI/models/checkpoints/` and pick it "
                         "in the *Load Checkpoint* node.")
        lines.append("")
    if "a1111" in found:
        lines += ["### AUTOMATIC1111 / Forge", ""]
        if is_embedding(config):
            lines.append(f"Put `{facts.weights}` in `stable-diffusion-webui/embeddings/` and "
                         f"write `{facts.weights.rsplit('.', 1)[0]}` in the prompt.")
        elif is_lora(config):
            stem = facts.weights.rsplit(".", 1)[0]
            lines.append(f"Put `{facts.weights}` in `stable-diffusion-webui/models/Lora/` and "
                         f"write `<lora:{stem}:1>` in the prompt.")
        else:
            lines.append(f"Put `{facts.weights}` in `stable-diffusion-webui/models/"
                         "Stable-diffusion/` and pick it as the checkpoint.")
        lines.append("")
    bundled = [e for e in facts.embeddings if e.file != facts.weights]
    if bundled and is_lora(config):
        lines += ["### Its embeddings", "",
                  "The LoRA carries its trained embeddings (A1111/Forge and ComfyUI read them "
                  "from it); each is also in its own file, for diffusers' "
                  "`load_textual_inversion` (as in the recipe above) or an embeddings folder: "
                  + ", ".join(f"`{e.placeholder}` in `{e.file}`" for e in bundled) + ".", ""]
    missing = [n for n in ("diffusers", "comfyui", "a1111") if n not in found]
    if missing:
        names = {"diffusers": "diffusers", "comfyui": "ComfyUI", "a1111": "A1111/Forge"}
        lines += [f"{' and '.join(names[n] for n in missing)} do not load this file (a "
                  f"{adapter_name(config) if is_lora(config) else 'model'} in the "
                  f"`{config.output_model_format.value}` layout).", ""]
    return lines


def _diffusers_code(config: TrainConfig, facts: CardFacts) -> list[str]:
    inpaint = config.model_type.is_inpainting
    auto = "AutoPipelineForInpainting" if inpaint else "AutoPipelineForText2Image"
    prompt = facts.instance_prompt or (facts.samples[0].prompt if facts.samples else "a photo")
    fp16 = "torch_dtype=torch.float16).to(\"cuda\")"
    if config.output_model_format == ModelFormat.DIFFUSERS:
        cls, load = auto, [f"pipe = {auto}.from_pretrained({_py(facts.repo_id)}, {fp16}"]
    elif not is_lora(config) and not is_embedding(config):
        cls = ("StableDiffusionXL" if config.model_type.is_sdxl else "StableDiffusion") + (
            "InpaintPipeline" if inpaint else "Pipeline")
        url = f"https://huggingface.co/{facts.repo_id}/blob/main/{facts.weights}"
        load = [f"pipe = {cls}.from_single_file({_py(url)}, {fp16}"]
    else:
        base = facts.base_model or "<the base model: a hub id or a local folder>"
        cls, load = auto, [f"pipe = {auto}.from_pretrained({_py(base)}, {fp16}"]
        if is_lora(config):
            load.append(f"pipe.load_lora_weights({_py(facts.repo_id)}, "
                        f"weight_name={_py(facts.weights)})")
        load += _textual_inversion_code(config, facts)
    lines = ["import torch", f"from diffusers import {cls}"]
    if inpaint:
        lines += ["from diffusers.utils import load_image", "", *load,
                  'init_image = load_image("your-image.png")',
                  'mask = load_image("your-mask.png")  # white = repaint',
                  f"image = pipe({_py(prompt)}, image=init_image, mask_image=mask).images[0]"]
    else:
        lines += ["", *load, f"image = pipe({_py(prompt)}).images[0]"]
    return lines


def _textual_inversion_code(config: TrainConfig, facts: CardFacts) -> list[str]:
    """diffusers' loading of each embedding's own file: one call (SD 1.5), or one per text
    encoder with its part of the file (SDXL: `clip_l`, `clip_g`)."""
    lines = []
    for embedding in facts.embeddings:
        token = _py(embedding.placeholder)
        if not config.model_type.is_sdxl:
            lines.append(f"pipe.load_textual_inversion({_py(facts.repo_id)}, "
                         f"weight_name={_py(embedding.file)}, token={token})")
            continue
        if not any("load_file" in line for line in lines):
            lines += ["from huggingface_hub import hf_hub_download",
                      "from safetensors.torch import load_file"]
        lines += [f"vectors = load_file(hf_hub_download({_py(facts.repo_id)}, "
                  f"{_py(embedding.file)}))",
                  f"pipe.load_textual_inversion(vectors[\"clip_l\"], token={token}, "
                  "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                  f"pipe.load_textual_inversion(vectors[\"clip_g\"], token={token}, "
                  "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]
    return lines
