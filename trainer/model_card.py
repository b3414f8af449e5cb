"""The README.md model card of a published output: front matter in the Hub's conventions for
LoRAs (`base_model`, `tags`, `instance_prompt`, a `widget` of the samples) written by
huggingface_hub's own `ModelCardData`, then the training settings that matter and how to load
the file in diffusers, ComfyUI and A1111/Forge.

It reads the run's config and the facts `trainer/publish.py` gathered; it writes nothing. What
differs between model families (their Hub tags, diffusers classes, who loads which format) is
one `FamilyCard` in each family's module (`card`); the rest of the card is the same code for
every family.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from huggingface_hub import ModelCard, ModelCardData

from trainer.advice import comfyui_loads_part
from trainer.config import ModelFormat, TrainConfig, TrainingMethod
from trainer.models import registry

# Who loads each output format of SD 1.5 / SDXL (README's table); the card only shows the
# recipes that work.
LOADERS: dict[ModelFormat, tuple[str, ...]] = {
    ModelFormat.KOHYA_LORA: ("diffusers", "comfyui", "a1111"),
    ModelFormat.LEGACY_LORA: ("diffusers", "comfyui", "a1111"),
    ModelFormat.COMFY_LORA: ("comfyui",),
    ModelFormat.DIFFUSERS_LORA: ("diffusers",),
    ModelFormat.ORIGINAL_SINGLE_FILE: ("diffusers", "comfyui", "a1111"),
    ModelFormat.LEGACY_SAFETENSORS: ("diffusers", "comfyui", "a1111"),
    ModelFormat.DIFFUSERS: ("diffusers", "comfyui"),
}
# ... of Flux.1 and Chroma: diffusers' Flux LoRA loader (ChromaPipeline's too) converts kohya's
# `lora_unet_double_blocks_…` and ComfyUI's `diffusion_model.…` names itself; ComfyUI maps
# diffusers' `transformer.…` LoRA names onto its Flux model (comfy/lora.py). The single file is
# the transformer alone, for ComfyUI's Load Diffusion Model and `from_single_file`; ComfyUI's
# DiffusersLoader reads a folder's `transformer/` as it reads `unet/`.
FLUX_LOADERS: dict[ModelFormat, tuple[str, ...]] = {
    ModelFormat.DIFFUSERS_LORA: ("diffusers", "comfyui"),
    ModelFormat.KOHYA_LORA: ("diffusers", "comfyui"),
    ModelFormat.COMFY_LORA: ("diffusers", "comfyui"),
    ModelFormat.ORIGINAL_SINGLE_FILE: ("diffusers", "comfyui"),
    ModelFormat.DIFFUSERS: ("diffusers", "comfyui"),
}
# ... of SD 3 / 3.5: diffusers' SD 3 loader reads only its own (peft) names.
SD3_LOADERS: dict[ModelFormat, tuple[str, ...]] = {
    **FLUX_LOADERS,
    ModelFormat.KOHYA_LORA: ("comfyui",),
    ModelFormat.COMFY_LORA: ("comfyui",),
}
TOOL_NAMES = {"diffusers": "diffusers", "comfyui": "ComfyUI", "a1111": "A1111/Forge"}


@dataclass(frozen=True)
class FamilyCard:
    """What a model card says differently for one family (and its inpainting model)."""
    hub_tags: tuple[str, ...]          # the Hub's tags for models of the family
    pipeline: str                      # diffusers class for from_pretrained (base + LoRA, folder)
    single_file: str                   # diffusers class reading ORIGINAL_SINGLE_FILE
    loaders: dict[ModelFormat, tuple[str, ...]] = field(default_factory=lambda: LOADERS)
    # The programs the card speaks of: a missing one is said not to load the file.
    tools: tuple[str, ...] = ("diffusers", "comfyui", "a1111")
    inpaint_pipeline: str = ""
    inpaint_single_file: str = ""
    torch_dtype: str = "float16"       # what the recipe runs it in on a GPU
    # The single file holds the transformer alone (not a whole checkpoint): loaded with
    # `single_file`'s from_single_file and handed to `pipeline` with the base model's rest;
    # in ComfyUI with these nodes for the text encoders.
    transformer_only: bool = False
    comfy_text_encoders: str = ""
    # diffusers' textual inversion per text encoder: (key in the file, encoder, tokenizer);
    # empty: one call, the file read as it is.
    embedding_encoders: tuple[tuple[str, str, str], ...] = ()
    # The recipe draws the run's first sample prompt with its settings (size, steps, guidance,
    # seed, T5 length): these pipelines' defaults (28 steps, guidance 3.5, 512 T5 tokens for
    # Flux.1) are not what the run sampled with.
    sample_settings: bool = False
    # The pipeline's guidance argument, and whether it guides only on a negative prompt (the
    # empty one when the sample has none): Qwen-Image's true classifier-free guidance.
    guidance_argument: str = "guidance_scale"
    empty_negative_prompt: bool = False


# What a transformer family's card shares (each family module holds its own FamilyCard).
FLOW_CARD = dict(loaders=FLUX_LOADERS, tools=("diffusers", "comfyui"), torch_dtype="bfloat16",
                 transformer_only=True, sample_settings=True)


def family_card(model_type) -> FamilyCard:
    """The card facts of a model type (`ModelType` or its value): its family module's."""
    return registry.family_class(model_type).card(registry.facts(model_type).plain_type)


def format_loaders(model_type, output_format: ModelFormat) -> tuple[str, ...]:
    """Who loads a file of `output_format` written for `model_type`."""
    return family_card(model_type).loaders.get(ModelFormat(output_format), ())


@dataclass(frozen=True)
class CardSample:
    """A sample image in the upload folder (`path` relative to it) and what drew it."""
    path: str
    prompt: str
    negative_prompt: str = ""
    # Its settings (trainer.config.SampleConfig); None when unknown.
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int | None = None


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
    # modelspec.architecture of the output's header ("flux-1-schnell/lora", ...); "" unknown.
    architecture: str = ""


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
    """Who loads the output: its format's loaders for its family, less diffusers for LoHa/LoKr
    (diffusers loads no LoHa/LoKr for any family here)."""
    if is_embedding(config):  # SAFETENSORS, the embedding layout all three read
        return ("diffusers", "comfyui", "a1111")
    found = format_loaders(config.model_type, config.output_model_format)
    if is_lora(config) and adapter_name(config) in ("LoHa", "LoKr"):
        found = tuple(n for n in found if n != "diffusers")
    if is_lora(config) and comfyui_loads_part(config):
        # ComfyUI reads only part of it (docs/comfyui_results.md): no recipe for it
        found = tuple(n for n in found if n != "comfyui")
    return found


def card_tags(config: TrainConfig) -> list[str]:
    tags = ["text-to-image", *family_card(config.model_type).hub_tags, "diffusers"]
    if is_lora(config):
        # template:sd-lora: the Hub's LoRA page layout (the widget's gallery, trigger words)
        tags[1:1] = ["lora", "template:sd-lora"]
    if is_embedding(config) or config.additional_embeddings:
        tags.append("textual_inversion")
    if registry.facts(config.model_type).inpainting:
        tags.append("inpainting")
    return tags + ["atelier"]


def _widget_entry(sample: CardSample) -> dict:
    entry: dict = {"text": sample.prompt, "output": {"url": sample.path}}
    if sample.negative_prompt:
        entry["parameters"] = {"negative_prompt": sample.negative_prompt}
    return entry


def _family_name(config: TrainConfig) -> str:
    return registry.facts(config.model_type).label


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
        if family_card(config.model_type).sample_settings:
            parts += _sample_table(facts.samples)
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
    family = registry.facts(config.model_type)
    trained = [p for p in (family.denoiser, *family.text_encoders) if _trains(config, p)]
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
    if family.flow_matching:
        rows += _flow_settings(config, facts)
    if config.ema.value != "OFF":
        rows.append(("EMA decay", f"{config.ema_decay:g}"))
    if config.masked_training:
        rows.append(("Masked training", f"unmasked weight {config.unmasked_weight:g}"))
    rows.append(("Seed", str(config.seed)))
    return rows


def _flow_settings(config: TrainConfig, facts: CardFacts) -> list[tuple[str, str]]:
    """The flow-matching settings that shape what was learned: the timesteps drawn, the loss
    weight, the guidance input, T5's length, the transformer's own file."""
    rows = []
    timesteps = config.timestep_distribution.value
    if config.noising_weight or config.noising_bias:
        timesteps += f" (weight {config.noising_weight:g}, bias {config.noising_bias:g})"
    if config.dynamic_timestep_shifting:
        timesteps += ", shift by image size"
    elif config.timestep_shift != 1:
        timesteps += f", shift {config.timestep_shift:g}"
    if config.min_noising_strength or config.max_noising_strength != 1:
        timesteps += (f", strength {config.min_noising_strength:g} to "
                      f"{config.max_noising_strength:g}")
    rows.append(("Timesteps", timesteps))
    if config.loss_weight_fn.value != "CONSTANT":
        rows.append(("Loss weight", config.loss_weight_fn.value))
    # A model without a guidance embedding (Flux.1 schnell) never read it.
    if (registry.reads_switch(config.model_type, "transformer.guidance_scale")
            and "schnell" not in facts.architecture):
        rows.append(("Guidance input (training)", f"{config.transformer.guidance_scale:g}"))
    if (registry.reads_switch(config.model_type, "transformer.attention_mask")
            and config.transformer.attention_mask):
        rows.append(("Attention mask", "T5's padding masked"))
    for part in _t5_parts(config):
        length = getattr(config, f"{part}_sequence_length", None)
        rows.append(("T5 sequence length", str(length) if length else "the tokenizer's"))
    transformer_file = getattr(config.transformer, "model_name", "") or ""
    if transformer_file:
        rows.append(("Transformer file", f"`{transformer_file}`"))
    return rows


def _t5_parts(config: TrainConfig) -> list[str]:
    return [part for part, kind in registry.text_encoder_kinds(config.model_type).items()
            if kind == "T5"]


def _t5_length(config: TrainConfig) -> int | None:
    """The T5 length the run encoded (and sampled) with; None: the tokenizer's own."""
    for part in _t5_parts(config):
        return getattr(config, f"{part}_sequence_length", None)
    return None


def _sample_table(samples) -> list[str]:
    """Each gallery image's settings (a flow model's pipeline defaults are not the run's)."""
    known = [s for s in samples if s.steps is not None]
    if not known:
        return []
    lines = ["| Prompt | Size | Steps | Guidance | Seed |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(s.prompt)} | {s.width}×{s.height} | {s.steps} | {s.cfg_scale:g} | "
              f"{s.seed} |" for s in known]
    return lines + [""]


def _cell(value: str) -> str:
    return value.replace("|", "\\|")  # a path or prompt must not split the table's row


def _py(text: str) -> str:
    """A Python string literal (JSON's escapes are Python's), in double quotes."""
    return json.dumps(text, ensure_ascii=False)


def _trains(config: TrainConfig, part: str) -> bool:
    if is_embedding(config):  # only the new vectors train; the model stays frozen
        return False
    if part not in registry.facts(config.model_type).parts:
        return False
    return getattr(config, part).train


def _usage(config: TrainConfig, facts: CardFacts) -> list[str]:
    card = family_card(config.model_type)
    found = loaders(config)
    lines = ["## How to use", ""]
    if "diffusers" in found:
        lines += ["### diffusers", "", "```python", *_diffusers_code(config, facts), "```", ""]
        if (is_lora(config) and card.transformer_only and config.output_model_format in
                (ModelFormat.KOHYA_LORA, ModelFormat.COMFY_LORA)):
            lines += ["`load_lora_weights` reads the file's original layer names "
                      "(kohya's `lora_unet_…`, ComfyUI's `diffusion_model.…`) and converts "
                      "them to diffusers' itself.", ""]
    if "comfyui" in found:
        lines += ["### ComfyUI", ""]
        if is_embedding(config):
            lines.append(f"Put `{facts.weights}` in `ComfyUI/models/embeddings/` and write "
                         f"`embedding:{facts.weights.rsplit('.', 1)[0]}` in the prompt.")
        elif config.output_model_format == ModelFormat.DIFFUSERS:
            lines.append("Download the repository into `ComfyUI/models/diffusers/` and load it "
                         "with the *DiffusersLoader* node.")
        elif is_lora(config) and card.transformer_only:
            lines.append(_comfy_transformer_lora(config, facts))
        elif is_lora(config):
            lines.append(f"Put `{facts.weights}` in `ComfyUI/models/loras/`, then add a "
                         "*Load LoRA* node between *Load Checkpoint* and the sampler (strength "
                         "1.0 for model and clip).")
        elif card.transformer_only:
            lines.append(f"Put `{facts.weights}` in `ComfyUI/models/diffusion_models/` and load "
                         "it with the *Load Diffusion Model* node (UNETLoader). It holds the "
                         f"{_family_name(config)} transformer alone: load the text encoders "
                         f"with {card.comfy_text_encoders} and the VAE with *Load VAE*, as for "
                         "the base model.")
        else:
            lines.append(f"Put `{facts.weights}` in `ComfyUI/models/checkpoints/` and pick it "
                         "in the *Load Checkpoint* node.")
        lines.append("")
    if "a1111" in found:
        lines += ["### AUTOMATIC1111 / Forge", ""]
        if is_embedding(config):
            # Forge registers an embedding under its file name (tools/forge_check.py,
            # docs/forge_results.md); A1111's own code was not run.
            lines.append(f"Forge: put `{facts.weights}` in its `embeddings/` folder and write "
                         f"`{facts.weights.rsplit('.', 1)[0]}` (the file name, not the "
                         "placeholder) in the prompt where the placeholder goes. AUTOMATIC1111 "
                         "was not checked.")
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
        # ComfyUI's LoRA loader skips bundle_emb keys; its embedding reader takes them from
        # the file in models/embeddings, all placeholders as one (tools/comfyui_check.py).
        comfy = (f" In ComfyUI the *Load LoRA* node skips them: put `{facts.weights}` (or an "
                 "embedding's own file) in `ComfyUI/models/embeddings/` too and write "
                 f"`embedding:{facts.weights.rsplit('.', 1)[0]}` in the prompt where the "
                 "placeholder goes (all the LoRA's bundled placeholders become that one "
                 "embedding; an own file holds one placeholder)."
                 if "comfyui" in found else "")
        # Forge's LoRA loader leaves bundle_emb keys unmatched; its embeddings folder takes the
        # own files, each under its file name (tools/forge_check.py, docs/forge_results.md).
        first = bundled[0].file.rsplit(".", 1)[0]
        forge = (" In Forge put an embedding's own file in its `embeddings/` folder and write "
                 f"the file name without `.safetensors` (`{first}`) in the prompt where the "
                 "placeholder goes; Forge does not use the copies inside the LoRA. AUTOMATIC1111 "
                 "was not checked." if "a1111" in found else "")
        in_lora = getattr(config, "bundle_additional_embeddings", True)
        keys = len(bundled) * (2 if config.model_type.is_sdxl else 1)
        if in_lora and forge and keys > 12:
            # Forge's load_lora_for_models drops a LoRA with more than 12 unmatched keys
            forge += (f" Forge applies none of this LoRA: its {keys} bundled keys match no "
                      "layer, more than the 12 Forge's code tolerates.")
        carries = ("The LoRA file also carries its trained embeddings (`bundle_emb.*` keys); "
                   if in_lora else "The trained embeddings are not in the LoRA file; ")
        lines += ["### Its embeddings", "",
                  carries + "each is in its own file, for diffusers' "
                  "`load_textual_inversion` (as in the recipe above) or an embeddings folder: "
                  + ", ".join(f"`{e.placeholder}` in `{e.file}`" for e in bundled) + "."
                  + comfy + forge, ""]
    missing = [n for n in card.tools if n not in found]
    if missing:
        lines += [f"{' and '.join(TOOL_NAMES[n] for n in missing)} do not load this file (a "
                  f"{adapter_name(config) if is_lora(config) else 'model'} in the "
                  f"`{config.output_model_format.value}` layout).", ""]
    return lines


def _comfy_transformer_lora(config: TrainConfig, facts: CardFacts) -> str:
    """ComfyUI's LoRA node for a transformer family: the model-only one unless a text
    encoder was trained too."""
    text_encoders = [p for p in registry.facts(config.model_type).text_encoders
                     if _trains(config, p)]
    where = (f"Put `{facts.weights}` in `ComfyUI/models/loras/`, then add a ")
    if text_encoders:
        return (where + "*Load LoRA (Model and CLIP)* node (LoraLoader) after the *Load "
                "Diffusion Model* and text encoder loaders, before the sampler (strength 1.0 "
                "for model and clip: the LoRA trained a text encoder too).")
    return (where + "*Load LoRA* node (LoraLoaderModelOnly) after the *Load Diffusion Model* "
            "node, before the sampler (strength 1.0; the LoRA trained the transformer alone).")


def _diffusers_code(config: TrainConfig, facts: CardFacts) -> list[str]:
    card = family_card(config.model_type)
    inpaint = registry.facts(config.model_type).inpainting
    auto = card.inpaint_pipeline if inpaint else card.pipeline
    prompt = facts.instance_prompt or (facts.samples[0].prompt if facts.samples else "a photo")
    dtype = f"torch_dtype=torch.{card.torch_dtype}"
    fp16 = f"{dtype}).to(\"cuda\")"
    base = facts.base_model or "<the base model: a hub id or a local folder>"
    classes = [auto]
    if config.output_model_format == ModelFormat.DIFFUSERS:
        load = [f"pipe = {auto}.from_pretrained({_py(facts.repo_id)}, {fp16}"]
    elif not is_lora(config) and not is_embedding(config):
        url = f"https://huggingface.co/{facts.repo_id}/blob/main/{facts.weights}"
        if card.transformer_only:
            # The file is the transformer; the base model gives the rest (and, when known,
            # the transformer's config, so a derivative's own sizes are read right).
            config_of = (f", config={_py(base)}, subfolder=\"transformer\""
                         if facts.base_model else "")
            classes.append(card.single_file)
            load = [f"transformer = {card.single_file}.from_single_file({_py(url)}{config_of}, "
                    f"{dtype})",
                    f"pipe = {auto}.from_pretrained({_py(base)}, transformer=transformer, "
                    f"{fp16}"]
        else:
            classes = [card.inpaint_single_file if inpaint else card.single_file]
            load = [f"pipe = {classes[0]}.from_single_file({_py(url)}, {fp16}"]
    else:
        load = [f"pipe = {auto}.from_pretrained({_py(base)}, {fp16}"]
        if is_lora(config):
            load.append(f"pipe.load_lora_weights({_py(facts.repo_id)}, "
                        f"weight_name={_py(facts.weights)})")
        load += _textual_inversion_code(config, facts)
    lines = ["import torch", f"from diffusers import {', '.join(classes)}"]
    if inpaint:
        lines += ["from diffusers.utils import load_image", "", *load,
                  'init_image = load_image("your-image.png")',
                  'mask = load_image("your-mask.png")  # white = repaint',
                  f"image = pipe({_py(prompt)}, image=init_image, mask_image=mask).images[0]"]
    elif card.sample_settings:
        lines += ["", *load, *_sample_call(config, prompt)]
    else:
        lines += ["", *load, f"image = pipe({_py(prompt)}).images[0]"]
    return lines


def _sample_call(config: TrainConfig, prompt: str) -> list[str]:
    """The pipeline call of the run's first sample (prompt, size, steps, guidance, seed, T5
    length), which draws the gallery's first image; without samples, `prompt` with the T5
    length the run used."""
    args = []
    card = family_card(config.model_type)
    if config.samples:
        spec = config.samples[0]
        args.append(_py(spec.prompt))
        if spec.negative_prompt:
            args.append(f"negative_prompt={_py(spec.negative_prompt)}")
        elif card.empty_negative_prompt and spec.cfg_scale > 1:
            args.append('negative_prompt=""')
        args += [f"width={spec.width}, height={spec.height}",
                 f"num_inference_steps={spec.diffusion_steps}",
                 f"{card.guidance_argument}={float(spec.cfg_scale)!r}"]
    else:
        args.append(_py(prompt))
    length = _t5_length(config)
    if length:
        args.append(f"max_sequence_length={length}")
    if config.samples:
        # The seed's noise drawn on the CPU, as the run drew it: the same image on any device.
        args.append(f"generator=torch.Generator(\"cpu\").manual_seed({config.samples[0].seed})")
    if len(args) == 1:
        return [f"image = pipe({args[0]}).images[0]"]
    head = (["# The run's first sample prompt with its settings, as the gallery drew it."]
            if config.samples else [])
    return [*head, "image = pipe(", *[f"    {a}," for a in args], ").images[0]"]


def _textual_inversion_code(config: TrainConfig, facts: CardFacts) -> list[str]:
    """diffusers' loading of each embedding's own file: one call (SD 1.5), or one per text
    encoder with its part of the file (SDXL: `clip_l`, `clip_g`)."""
    encoders = family_card(config.model_type).embedding_encoders
    lines = []
    for embedding in facts.embeddings:
        token = _py(embedding.placeholder)
        if not encoders:
            lines.append(f"pipe.load_textual_inversion({_py(facts.repo_id)}, "
                         f"weight_name={_py(embedding.file)}, token={token})")
            continue
        if not any("load_file" in line for line in lines):
            lines += ["from huggingface_hub import hf_hub_download",
                      "from safetensors.torch import load_file"]
        lines.append(f"vectors = load_file(hf_hub_download({_py(facts.repo_id)}, "
                     f"{_py(embedding.file)}))")
        lines += [f"pipe.load_textual_inversion(vectors[\"{key}\"], token={token}, "
                  f"text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizer})"
                  for key, encoder, tokenizer in encoders]
    return lines
