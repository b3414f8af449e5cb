"""Sample images during training, with the weights as they are now (LoRA active)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch


@torch.no_grad()
def render_samples(family, samples, folder: Path, *, step: int,
                   device: torch.device) -> Iterator[dict]:
    """Draw each sample prompt; yield {'index', 'prompt', 'path', 'image'} as each is saved.

    The models are put in eval mode for sampling (no LoRA dropout) and back in train mode
    after, whatever happens."""
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = family.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    models = tuple(family.parts.values())
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for index, spec in enumerate(samples):
            generator = torch.Generator("cpu").manual_seed(spec.seed)
            with torch.autocast(device.type, enabled=False):
                image = pipeline(
                    spec.prompt, negative_prompt=spec.negative_prompt or None,
                    width=spec.width, height=spec.height,
                    num_inference_steps=spec.diffusion_steps, guidance_scale=spec.cfg_scale,
                    generator=generator).images[0]
            path = folder / f"step{step:06d}-{index}.png"
            image.save(path)
            yield {"index": index, "prompt": spec.prompt, "path": str(path), "image": image}
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
