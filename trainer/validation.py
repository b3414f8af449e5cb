"""The validation loss (issue 27): the run's loss on images it never trains on, measured so that
two measurements differ only because the weights changed.

- Each validation image is seen once (no repeats), centred, unflipped, at epoch 0's size and
  caption line; its latents are the same sample of the VAE's distribution every time (a
  generator seeded per batch).
- It is noised at `VALIDATION_TIMESTEPS` fixed timesteps spread over the distribution the run
  trains with (quantiles of a seeded draw of it, at the batch's size: a dynamic shift depends
  on it), each with noise seeded by (seed, image, timestep).
- No caption dropout, no "unmasked" draw (masked training uses every mask), the objective's
  own weighting (min-SNR, SIGMA) as the training loss has it; no gradient, the models in eval
  mode (no LoRA dropout), the raw modules (no DDP collective inside a forward pass). The loop
  applies the EMA weights around it.
- Per concept (its folder's name) and overall (the mean over images). Under DDP each process
  takes every n-th batch and the sums are reduced: the same number as one process.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from trainer.batch_loss import BatchLoss
from trainer.config import TrainConfig
from trainer.loss import masked_sample_loss, sample_noise
from trainer.validation_split import concept_labels

VALIDATION_TIMESTEPS = 4  # timesteps per image: quantiles (k + ½)/K of the run's distribution
SPREAD_DRAWS = 4096       # draws of the distribution the quantiles are read from
SEED_SALT = 0x7A11D


def validation_items(items: list) -> list:
    """The items as validation sees them: once each, centred, never flipped."""
    return [dataclasses.replace(item, repeats=1.0, crop_jitter=False, random_flip=False,
                                regularization=False) for item in items]


class Validation:
    """`measure(process_index, num_processes, reduce)` -> {"validation_loss": x,
    "validation_loss/<concept>": y, ...} over the validation items."""

    def __init__(self, config: TrainConfig, family, items: list, device: torch.device, *,
                 status: Callable[[str], None] = print, warn: Callable[[str], None] = print,
                 is_main: bool = True):
        from trainer.data.loader import DataPipeline
        self.config, self.family, self.device = config, family, device
        self.items = validation_items(items)
        self.data = DataPipeline(config, self.items, warn=warn, is_main=is_main,
                                 status=lambda line: status(f"Validation images: {line}"))
        self.data.make_loader(family, device, workers=0)  # attaches the caches to the dataset
        self.number = {str(item.image_path): n for n, item in enumerate(self.items)}
        self.labels = concept_labels(config.concepts)
        self.concepts = sorted({item.concept_index for item in self.items})
        self.inpainting = self.data.inpainting_inputs(family.vae)
        # its loss mask and per-pixel loss, the training loss's own
        self.loss = BatchLoss(config, family, self.data, device, torch.Generator(),
                              self.inpainting)
        self._timesteps: dict[tuple[int, int], torch.Tensor] = {}

    def timesteps(self, size: tuple[int, int]) -> torch.Tensor:
        """The fixed timesteps for latents of `size`: quantiles of the run's distribution."""
        if size not in self._timesteps:
            generator = torch.Generator(self.device).manual_seed(self.config.seed + SEED_SALT)
            drawn = self.family.objective.draw(SPREAD_DRAWS, size, generator, self.device)
            ordered = drawn.sort().values
            picks = [int((k + 0.5) / VALIDATION_TIMESTEPS * SPREAD_DRAWS)
                     for k in range(VALIDATION_TIMESTEPS)]
            self._timesteps[size] = ordered[picks]
        return self._timesteps[size]

    def noise(self, batch: dict, shape: tuple[int, ...], k: int) -> torch.Tensor:
        """Each row's noise for timestep number `k`, seeded by (seed, image, k): the same
        whatever batch the image is in."""
        rows = []
        for path in batch["image_path"]:
            seed = (self.config.seed * 1_000_003 + self.number[path] * VALIDATION_TIMESTEPS + k
                    + SEED_SALT) % (1 << 63)
            generator = torch.Generator(self.device).manual_seed(seed)
            rows.append(sample_noise((1, *shape[1:]), generator, self.device,
                                     self.config.offset_noise_weight))
        return torch.cat(rows)

    @torch.no_grad()
    def batch_losses(self, batch: dict, number: int) -> torch.Tensor:
        """[B] float32: each image's loss, the mean over the fixed timesteps."""
        config, family, device = self.config, self.family, self.device
        generator = torch.Generator(device).manual_seed(config.seed + SEED_SALT + number)
        latents = self.data.latents(batch, family.vae, generator, device)
        conditioning = self.data.conditioning(family, batch["caption"], batch,
                                              clip_skip=config.text_encoder.clip_skip,
                                              device=device, grad={})
        rows = latents.shape[0]
        size = tuple(latents.shape[-2:])
        unmasked = torch.zeros(rows, dtype=torch.bool)  # every mask is used
        inpaint_mask = extra = None
        if self.inpainting is not None:
            inpaint_mask, masked_latents = self.inpainting(batch, size, device, unmasked)
            extra = [inpaint_mask, masked_latents]
        mask = self.loss.loss_mask(batch, inpaint_mask, unmasked, size)
        total = torch.zeros(rows, device=device)
        for k, timestep in enumerate(self.timesteps(size)):
            noise = self.noise(batch, tuple(latents.shape), k)
            noised = family.objective.at(latents, noise, timestep.expand(rows))
            model_input = noised.noisy
            if extra is not None:
                model_input = torch.cat([model_input, *(t.to(model_input.dtype) for t in extra)],
                                        dim=1)
            prediction = family.predict(model_input, noised.timesteps, conditioning)
            loss = masked_sample_loss(self.loss.pixel_loss(prediction, noised.target), mask,
                                      unmasked_weight=config.unmasked_weight,
                                      normalize=config.normalize_masked_area_loss)
            if noised.weight is not None:
                loss = loss * noised.weight
            total += loss.float()
        return total / VALIDATION_TIMESTEPS

    def batches(self) -> list[list]:
        self.data.dataset.set_epoch(0)
        return self.data.sampler.batches()

    def measure(self, process_index: int = 0, num_processes: int = 1,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The validation losses. This process measures every `num_processes`-th batch from
        `process_index`; `reduce` sums a tensor over the processes (None: one process)."""
        from trainer.data.dataset import collate
        from trainer.loop import to_device
        sums = torch.zeros(len(self.concepts), 2, dtype=torch.float64, device=self.device)
        where = {concept: row for row, concept in enumerate(self.concepts)}
        with self.eval_mode(), self.unwrapped():
            for number, indices in enumerate(self.batches()):
                if number % num_processes != process_index:
                    continue
                batch = to_device(collate([self.data.dataset[i] for i in indices]),
                                  self.device)
                losses = self.batch_losses(batch, number).double()
                for row, concept in enumerate(batch["concept_index"]):
                    sums[where[concept], 0] += losses[row]
                    sums[where[concept], 1] += 1
        if reduce is not None:
            sums = reduce(sums)
        sums = sums.cpu()
        result = {"validation_loss": float(sums[:, 0].sum() / sums[:, 1].sum())}
        if len(self.concepts) > 1:
            for concept, row in where.items():
                result[f"validation_loss/{self.labels[concept]}"] = float(sums[row, 0]
                                                                          / sums[row, 1])
        return result

    @contextlib.contextmanager
    def eval_mode(self):
        """The models in eval mode (no LoRA dropout), put back as they were after."""
        models = list(self.family.parts.values())
        modes = [m.training for m in models]
        for model in models:
            model.eval()
        try:
            yield
        finally:
            for model, mode in zip(models, modes):
                model.train(mode)

    @contextlib.contextmanager
    def unwrapped(self):
        """The family's raw modules, not their DDP wrappers: a wrapper's forward may sync
        buffers with the other processes, which measure other batches."""
        wrapped, self.family.wrapped = self.family.wrapped, {}
        try:
            yield
        finally:
            self.family.wrapped = wrapped


def check_validation_cadence(config: TrainConfig, num_processes: int) -> None:
    """Several processes measure together, at the same step: a clock could tell one process
    to measure and another not."""
    from trainer.config import TimeUnit
    from trainer.errors import ConfigError
    clock = (TimeUnit.SECOND, TimeUnit.MINUTE, TimeUnit.HOUR)
    if config.validation and num_processes > 1 and config.validate_after_unit in clock:
        raise ConfigError(f"validate_after_unit {config.validate_after_unit.value} with "
                          f"{num_processes} processes: they must measure at the same step; "
                          "use STEP or EPOCH.")
