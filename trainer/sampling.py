"""Sample images during training, with the weights as they are now (LoRA active)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from trainer.inpainting import sample_image_and_mask, save_sample_input
from trainer.models.family import compute_dtype_of
from trainer.sample_prompts import without_text_encoders


@torch.no_grad()
def render_samples(family, samples, folder: Path, *, step: int, device: torch.device,
                   inpaint_item=None, prompts=None,
                   without_encoders: bool = False) -> Iterator[dict]:
    """Draw each sample prompt; yield {'index', 'prompt', 'path', 'image'} as each is saved.

    An inpainting model inpaints `inpaint_item` (the first training image) at each sample's
    size: its mask file's region, or a centred rectangle (trainer/inpainting.py); the image
    and mask are saved once beside the samples.

    `prompts` (trainer/sample_prompts.py) records each sample's prompt encodings, or replays
    them; `without_encoders`: it holds every sample's, and the pipeline draws without the
    text encoders (they stay dropped or parked).

    The models are in eval mode while sampling (`in_eval_mode`)."""
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = family.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    if without_encoders:
        without_text_encoders(pipeline)
    casts = inputs_in_own_dtype(_pipeline_modules(family))
    try:
        with in_eval_mode(family):
            yield from _render(family, pipeline, samples, folder, step, device, inpaint_item,
                               prompts)
    finally:
        for hook in casts:
            hook.remove()


def _render(family, pipeline, samples, folder, step, device, inpaint_item, prompts):
    for index, spec in enumerate(samples):
        inputs = dict(family.sample_inputs())  # e.g. a T5's sequence length
        if family.inpainting:
            image, mask = sample_image_and_mask(inpaint_item, spec.width, spec.height)
            save_sample_input(folder, index, image, mask)
            inputs = {"image": image, "mask_image": mask, "strength": 1.0}
        with (prompts.serving(pipeline, family, spec) if prompts is not None
              else contextlib.nullcontext()):
            image = draw(pipeline, spec, device, **inputs)
        path = folder / f"step{step:06d}-{index}.png"
        image.save(path)
        yield {"index": index, "prompt": spec.prompt, "path": str(path), "image": image}


@contextlib.contextmanager
def in_eval_mode(family):
    """The models in eval mode (no LoRA or encoder dropout), back in their modes after,
    whatever happens."""
    models = tuple(family.parts.values())
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


class _PromptsEncoded(Exception):
    """The draw reached the denoiser: its prompts are encoded."""


class _DenoiserStandIn:
    """Put in a pipeline in place of its UNet or transformer: the draw stops where it first
    needs more of it than its config (SD's pipelines read the config to decide on CFG before
    they encode), which every pipeline does after encoding its prompts. diffusers' own checks,
    which look for hooks with hasattr, see a plain object."""

    def __init__(self, denoiser: torch.nn.Module):
        self.config = denoiser.config

    def __getattr__(self, name: str):  # anything but the config
        if name.startswith("__"):
            raise AttributeError(name)
        raise _PromptsEncoded

    def __call__(self, *args, **kwargs):
        raise _PromptsEncoded


@torch.no_grad()
def record_sample_prompts(family, samples, prompts, device: torch.device) -> int:
    """Record the prompt encodings of the samples not recorded yet, without drawing them
    (the run does this while the text encoders fill the text cache, before the denoiser comes
    to the GPU: the two are then never there together, not even for the first samples).
    Returns how many samples were recorded."""
    pipeline = family.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    stand_in = _DenoiserStandIn(family.parts[family.denoiser])
    object.__setattr__(pipeline, family.denoiser, stand_in)  # not registered as a component
    recorded = 0
    with in_eval_mode(family):
        for spec in samples:
            if prompts.covers(family, [spec]):
                continue
            try:
                with prompts.serving(pipeline, family, spec, finished_by=(_PromptsEncoded,)):
                    draw(pipeline, spec, device, **family.sample_inputs())
            except _PromptsEncoded:
                recorded += prompts.covers(family, [spec])
    return recorded


@torch.no_grad()
def draw(pipeline, spec, device: torch.device, **inputs):
    """One image of sample `spec` (prompt, negative prompt, size, steps, CFG, seed): the
    starting noise drawn on the CPU from the seed, so a seed gives the same image on any
    device. Autocast off: the training step's autocast must not leak into sampling."""
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    with torch.autocast(device.type, enabled=False):
        return pipeline(
            spec.prompt, negative_prompt=spec.negative_prompt or None,
            width=spec.width, height=spec.height, num_inference_steps=spec.diffusion_steps,
            guidance_scale=spec.cfg_scale, generator=generator, **inputs).images[0]


def _pipeline_modules(family) -> list[torch.nn.Module]:
    """The modules a pipeline calls with tensors made by another part: the UNet or transformer
    (the text encoders' states, latents in their type) and the VAE's halves (latents, images)."""
    vae = family.vae
    halves = [getattr(vae, name, None) for name in
              ("encoder", "quant_conv", "post_quant_conv", "decoder")]
    return [family.parts[family.denoiser], *[m for m in halves if m is not None]]


def inputs_in_own_dtype(modules) -> list:
    """Cast each module's floating-point inputs to its weights' type, for parts stored in
    different types (`<part>.weight_dtype`): diffusers' pipelines make the latents in the text
    encoder's type and hand them to the UNet and the VAE as they are. The timestep keeps its
    type (bfloat16 would round 999 to 1000). Returns the hooks, to remove; a no-op where the
    types agree."""
    hooks = []
    for module in modules:
        dtype = compute_dtype_of(module)  # the base weights' (adapters come after)

        def cast(_module, args, kwargs, dtype=dtype):
            args = tuple(a if i == 1 else _cast(a, dtype) for i, a in enumerate(args))
            kwargs = {k: v if k == "timestep" else _cast(v, dtype) for k, v in kwargs.items()}
            return args, kwargs
        hooks.append(module.register_forward_pre_hook(cast, with_kwargs=True))
    return hooks


def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value
