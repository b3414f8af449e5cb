"""The data side of the training loop in one object: dataset, bucket sampler, DataLoader, caches
and what the run is told about them. The loop calls it here:

    data = DataPipeline(config, items, warn=warn, status=status, is_main=is_main)
    dataloader = data.make_loader(family, device)          # after the model is loaded
    epoch_steps = data.epoch_steps(epochs, processes, accumulation)
    data.set_epoch(dataloader, epoch)                      # before each epoch
    latents = data.latents(batch, vae, generator, device)  # in the step
    conditioning = data.conditioning(family, captions, batch, ...)
    data.epoch_done(epoch)                                 # after each epoch

Messages also go to `<workspace>/data.log`, the run's record of its data (buckets, cache reuse).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig, parse_resolution
from trainer.data.buckets import BucketBatchSampler, plan_buckets, quantum_for
from trainer.data.cache import (DATA_CACHE_GB_ENV, CacheStats, LatentCache, TextCache,
                                batch_latents, data_cache_root, prune, shared_cache_bytes,
                                shared_cache_root, source_fingerprint)
from trainer.data.dataset import ImageItem, TrainDataset, collate
from trainer.data.images import oriented_size
from trainer.inpainting import InpaintingInputs


def _processes() -> int:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def loader_workers(device: torch.device | str) -> int:
    """DataLoader worker processes. On a GPU the step is fast and the CPU is free: decode in
    workers. On a CPU-only machine the step itself uses every core; there two prefetch threads
    of the main process decode the next batch while the current one trains (Pillow releases
    the GIL), and the latent cache removes the decoding after the first epoch.
    ATELIER_DATA_WORKERS overrides (ATELIER_DATA_PREFETCH=0 turns the threads off)."""
    override = os.environ.get("ATELIER_DATA_WORKERS", "").strip()
    if override.isdigit():
        return int(override)
    if torch.device(device).type == "cpu":
        return 0
    return max(0, min(4, (os.cpu_count() or 2) - 1))


def prefetch_threads_pay() -> bool:
    """Whether the main process should decode the next batch in threads (CPU training).

    Only where torch's OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE, as the app
    sets it). With the default policy (the CLI) they spin between ops, and threads sharing the
    cores with them slow every step: tiny SD 1.5 at 128 px took 0.098 s a step with prefetch
    threads against 0.049 s without (cached latents; 0.120 against 0.066 s decoding every
    step; 2 cores). ATELIER_DATA_PREFETCH=1 or 0 decides instead."""
    override = os.environ.get("ATELIER_DATA_PREFETCH", "").strip()
    if override in ("0", "1"):
        return override == "1"
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def text_cache_on(config) -> bool:
    """Whether a run caches its text encoders' outputs: with latent caching, no additional
    embeddings (their vectors are the encoders' inputs) and no text encoder training."""
    return (config.latent_caching and not config.additional_embeddings
            and not any(getattr(config, p).train for p in config.model_type.facts.text_encoders))


class DataPipeline:
    def __init__(self, config: TrainConfig, items: list[ImageItem], *,
                 warn: Callable[[str], None] = print, status: Callable[[str], None] = print,
                 is_main: bool = True):
        self.config = config
        self.warn_, self.status_ = warn, status
        self.is_main = is_main
        self.log_path = Path(config.workspace_dir) / "data.log"
        for item in items:
            if item.size is None:
                item.size = oriented_size(item.image_path)
        self.dataset = TrainDataset(items, parse_resolution(config.resolution)[0][:2],
                                    seed=config.seed)
        if config.model_type.is_inpainting:  # mask files only under masked training, as
            # OneTrainer; random circles elsewhere (trainer/inpainting.py)
            self.dataset.inpaint_masks = "files" if config.masked_training else "random"
        self.plan = plan_buckets(items, config.resolution,
                                 bucketing=config.aspect_ratio_bucketing,
                                 quantum=quantum_for(config.model_type))
        self.sampler = BucketBatchSampler(self.dataset, self.plan, config.batch_size,
                                          config.seed)
        self.latent_cache: LatentCache | None = None
        self.text_cache: TextCache | None = None
        self.latent_stats = CacheStats()
        self._epoch_started = time.monotonic()
        lines, warnings = self.sampler.report()
        if not config.aspect_ratio_bucketing:
            lines = [line + " (aspect-ratio bucketing is off: images are cropped to these sizes)"
                     for line in lines]
        for line in lines:
            self.status(line)
        for line in warnings:
            self.warn(line)

    # -- messages -------------------------------------------------------------------------

    def _log(self, kind: str, message: str) -> None:
        if not self.is_main:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {kind}: {message}\n")

    def status(self, message: str) -> None:
        self._log("status", message)
        if self.is_main:
            self.status_(message)

    def warn(self, message: str) -> None:
        self._log("warning", message)
        if self.is_main:
            self.warn_(message)

    # -- setup ----------------------------------------------------------------------------

    def make_loader(self, family, device: torch.device | str,
                    workers: int | None = None) -> torch.utils.data.DataLoader:
        """The DataLoader (over the bucket sampler), with the caches attached when switched on."""
        config = self.config
        if config.latent_caching:
            vae = family.vae
            scale = 2 ** (len(vae.config.block_out_channels) - 1)
            vae_source = (source_fingerprint(config.vae_model_name) if config.vae_model_name
                          else source_fingerprint(config.base_model_name, "vae"))
            dtype = str(next(vae.parameters()).dtype)
            self._prune_shared_cache()
            self.latent_cache = LatentCache(data_cache_root(config.workspace_dir) / "latents",
                                            [config.model_type.value, vae_source], dtype, scale)
            self.dataset.latent_cache = self.latent_cache
            self.text_cache = self._text_cache(family)
        workers = loader_workers(device) if workers is None else workers
        if workers == 0 and _processes() == 1 and prefetch_threads_pay():
            self.dataset.enable_prefetch()
            self.sampler.prefetch = True
        # Its own generator: the DataLoader draws a seed for its workers at every epoch, and
        # must not take it from the global RNG, which the step's draws (unmasked samples) use
        # and a backup restores.
        generator = torch.Generator().manual_seed(config.seed)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=torch.device(device).type == "cuda",
            generator=generator)

    def _prune_shared_cache(self) -> None:
        """A cache folder shared by runs (the app's, one per owner) is kept under its cap
        before this run adds to it; a run's own workspace cache is the user's to remove."""
        root = shared_cache_root()
        if not self.is_main or root is None:
            return
        cap = shared_cache_bytes()
        removed, freed = prune(root, cap)
        if removed:
            self.status(f"Removed {removed} cache entries used least recently from {root} "
                        f"({freed / 2**30:.2f} GB): it holds at most {cap / 2**30:g} GB "
                        f"({DATA_CACHE_GB_ENV}).")

    def _text_cache(self, family) -> TextCache | None:
        config = self.config
        if config.additional_embeddings:
            # the embeddings' vectors change every step, and captions with a placeholder read
            # the new tokens
            self.status("Text-encoder outputs are not cached: the additional embeddings are "
                        "inputs of the text encoder" + (" and train" if any(
                            e.train for e in config.additional_embeddings) else "") + ".")
            return None
        if not text_cache_on(config):
            return None  # a trained encoder's outputs change every step
        keys = getattr(family, "text_cache_keys", None)
        if keys is None and config.model_type.is_sdxl:
            self.status("Text-encoder outputs are not cached: this model family does not say "
                        "which of its conditioning depends on the caption alone.")
            return None
        identity = [config.model_type.value, source_fingerprint(config.base_model_name,
                                                                "text_encoder"),
                    source_fingerprint(config.base_model_name, "text_encoder_2"),
                    config.text_encoder.clip_skip, config.text_encoder_2.clip_skip,
                    config.text_encoder.weight_dtype.value,
                    config.text_encoder_2.weight_dtype.value, config.train_dtype.value]
        identity += family.text_cache_identity()  # what else shapes the family's outputs
        return TextCache(data_cache_root(config.workspace_dir) / "text", identity,
                         keys=tuple(keys) if keys else None)

    # -- epochs ---------------------------------------------------------------------------

    def bucket_count(self) -> int:
        """How many batch shapes (bucket sizes) the run trains."""
        return len({size for group in self.plan.groups for size in group.sizes})

    def epoch_steps(self, epochs: int, num_processes: int = 1,
                    accumulation: int = 1) -> list[int]:
        """Optimizer steps of each epoch as the loop will count them: the batches of the
        epoch, split over the processes (accelerate gives each the same count, repeating
        batches to even them out), grouped by gradient accumulation. Epochs differ only when
        fractional repeats pick images from other buckets."""
        current = self.dataset.epoch
        steps = []
        for epoch in range(epochs):
            self.dataset.set_epoch(epoch)
            batches = math.ceil(len(self.sampler) / num_processes)
            steps.append(math.ceil(batches / accumulation))
        self.dataset.set_epoch(current)
        if num_processes > 1 and len(self.sampler) % num_processes:
            self.status(f"{len(self.sampler)} batches per epoch over {num_processes} processes: "
                        f"{num_processes - len(self.sampler) % num_processes} batch(es) are "
                        "repeated so every process trains the same number.")
        return steps

    def set_epoch(self, dataloader, epoch: int) -> None:
        """Before each epoch: the dataset's samples, the sampler's order and accelerate's own
        epoch counter (which it passes to the dataset again at iteration) all agree."""
        self.dataset.set_epoch(epoch)
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        self._epoch_started = time.monotonic()

    def epoch_done(self, epoch: int) -> None:
        """After an epoch: tell how much the caches saved (after the first epoch, and every
        epoch where something was still encoded)."""
        stats = self.latent_stats
        if self.latent_cache is None or (epoch > 0 and stats.encoded == 0):
            self.latent_stats = CacheStats()
            return
        message = (f"Latent cache after epoch {epoch + 1}: {stats.reused} sample(s) reused, "
                   f"{stats.encoded} encoded and stored ({self.latent_cache.folder})")
        if self.text_cache is not None:
            message += f"; text cache: {self.text_cache.stats}"
            self.text_cache.stats = CacheStats()
        self.status(message)
        self.latent_stats = CacheStats()

    def fill_caches(self, dataloader, family, vae, device, *, clip_skip: int) -> int:
        """Encode the first epoch's samples (and the empty caption, for caption dropout) into
        the caches before training, so the VAE and the frozen text encoders can leave the GPU
        before the UNet arrives (trainer/residency.py). The epoch's samples depend only on
        (seed, epoch, index): training reads back exactly what is stored here. The latents'
        sampling noise comes from a generator of its own, so training draws what it would
        have drawn. Returns the number of samples seen."""
        self.set_epoch(dataloader, 0)
        generator = torch.Generator(device).manual_seed(self.config.seed)
        seen, last = 0, None
        for batch in dataloader:
            self.latents(batch, vae, generator, device)
            if self.text_cache is not None:
                self.conditioning(family, batch["caption"], batch, clip_skip=clip_skip,
                                  device=device, grad={})
            seen += len(batch["caption"])
            last = batch
        if self.text_cache is not None and last is not None:
            one = {k: v[:1] if isinstance(v, list) else v for k, v in last.items()}
            self.conditioning(family, [""], {**one, "caption": [""]}, clip_skip=clip_skip,
                              device=device, grad={})
        return seen

    # -- the step -------------------------------------------------------------------------

    def inpainting_inputs(self, vae) -> InpaintingInputs | None:
        """An inpainting model's extra UNet inputs for each batch; None for a plain model."""
        if not self.config.model_type.is_inpainting:
            return None
        return InpaintingInputs(vae, self.latent_cache)

    def latents(self, batch: dict, vae, generator, device) -> torch.Tensor:
        return batch_latents(batch, vae, generator, device, self.latent_cache,
                             self.latent_stats)

    def conditioning(self, family, captions: list[str], batch: dict, *, clip_skip: int,
                     device, grad: dict[str, bool]) -> dict[str, Any]:
        if self.text_cache is None:
            return family.encode_text(captions, batch, clip_skip=clip_skip, device=device,
                                      grad=grad)
        return self.text_cache.conditioning(family, captions, batch, clip_skip=clip_skip,
                                            device=device, grad=grad)
