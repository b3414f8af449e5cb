"""The three ways of training a case, each run in its own process by bench/worker.py.

Every runner returns the host times at which its optimizer steps ended, the time its first
step started, and what it saw of the loss. Timing rules, the same for all three:

- Times are `time.monotonic()` on the host when a step's work has been issued. On a CPU that
  is when it is done. On CUDA no runner synchronises per step for the bench's sake (that would
  hide the host work a real run overlaps with the GPU); in steady state the host cannot run
  more than a queue ahead of the GPU, so the step-to-step differences are the GPU's pace. The
  window's mean is taken between two synchronised points as a check (`step_s_mean`).
- A step is everything between two optimizer steps: fetching the batch, encoding (naive),
  forward, backward, update, logging.
"""
from __future__ import annotations

import gc
import math
import random
import time
from pathlib import Path
from typing import Any

from bench.cases import MODEL_TYPES, Case

now = time.monotonic
cpu_now = time.process_time  # CPU seconds of the whole process (all threads)


class BenchDone(Exception):
    """Raised from the atelier runner's event callback once the measured steps are done: the
    run ends there, without the final backup and save (not part of any step)."""


# --- Shared pieces -----------------------------------------------------------------------------

def part_settings(case: Case) -> dict[str, dict[str, Any]]:
    """The config's part sections of a case, for every part its family has (the registry
    says which: the text encoders, then the denoiser). Every frozen weight in the case's
    weight_dtype; the first text encoder's own switches as the case sets them (trained only
    in the text-encoder cases); a T5 is never trained. The denoiser trains."""
    facts = case.facts
    kinds = dict(facts.encoders)
    parts: dict[str, dict[str, Any]] = {}
    for part in facts.text_encoders:
        settings: dict[str, Any] = {"train": False, "weight_dtype": case.weight_dtype}
        if part == "text_encoder" and kinds[part] != "T5":
            settings.update(train=case.train_text_encoder, stop_training_after_unit="NEVER",
                            gradient_checkpointing="text_encoder" in case.checkpoint_parts)
        parts[part] = settings
    if facts.model_type == MODEL_TYPES["sd15"]:
        # what this bench has always written for SD 1.5 (an unused section, kept so that the
        # configs of the SD cases stay as they were)
        parts["text_encoder_2"] = {"train": False, "weight_dtype": case.weight_dtype}
    parts[facts.denoiser] = {"train": True,
                             "gradient_checkpointing": "denoiser" in case.checkpoint_parts,
                             "weight_dtype": case.weight_dtype}
    for part, dtype in case.part_dtypes:
        parts[part]["weight_dtype"] = dtype
    for part, fraction in case.part_offload:
        parts[part]["offload_fraction"] = fraction
    return parts


def atelier_config_dict(case: Case, model_dir: Path, data_dir: Path, workspace: Path,
                        device: str) -> dict[str, Any]:
    """The Atelier config of a case: the engine's defaults, plus what the case sets. The text
    encoders are frozen in every case (the limit trains the denoiser only). Backups are off
    (the default is every 30 minutes: not per-step work) and the run is ended by the bench
    after its measured steps."""
    data: dict[str, Any] = {
        "model_type": case.model_type,
        "training_method": case.method,
        "base_model_name": str(model_dir),
        "workspace_dir": str(workspace),
        "concepts": [{"path": str(data_dir)}],
        "resolution": str(case.resolution),
        "batch_size": case.batch_size,
        "epochs": 10_000,
        "learning_rate": case.learning_rate,
        "train_dtype": case.train_dtype_on(device),
        "gradient_checkpointing": case.gradient_checkpointing,
        "optimizer": {"optimizer": case.optimizer},
        "clip_grad_norm": case.clip_grad_norm,
        **part_settings(case),
        "lora_rank": case.lora_rank,
        "lora_alpha": case.lora_alpha,
        "lora_layer_preset": case.lora_layer_preset,
        "peft_type": case.peft_type,
        "lora_decompose": case.lora_decompose,
        "backup_after_unit": "NEVER",
        "backup_before_save": False,
        # explicit: AUTO would compile every case on CUDA; the -compile cases say ON
        "compile": "ON" if case.compile else "OFF",
        "layer_offload_fraction": case.layer_offload_fraction,
    }
    if case.facts.flow_matching and case.method == "LORA":
        data["output_model_format"] = "DIFFUSERS_LORA"  # what these families' LoRAs load as
    if case.fused_backward_pass:
        data["fused_backward_pass"] = True
    return data


def load_config(case: Case, paths: dict, device: str, workspace: Path):
    from trainer.config import config_from_dict
    return config_from_dict(atelier_config_dict(case, Path(paths["model"]), Path(paths["data"]),
                                                workspace, device))


def image_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in Path(data_dir).iterdir() if p.suffix.lower() in (".jpg", ".png"))


def load_pixels(path: Path, resolution: int):
    """What a simple script does: open, RGB, shorter side to `resolution`, centre crop,
    [-1, 1] CHW float tensor."""
    import numpy as np
    import torch
    from PIL import Image
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)),
                max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def caption_of(path: Path) -> str:
    text = path.with_suffix(".txt")
    return text.read_text(encoding="utf-8").strip() if text.is_file() else ""


def sync(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast_and_scaler(train_dtype: str, device):
    """Autocast context and (float16 only) a gradient scaler, as accelerate sets them up."""
    import contextlib

    import torch
    kind = torch.device(device).type
    if train_dtype == "BFLOAT_16":
        return torch.autocast(kind, dtype=torch.bfloat16), None
    if train_dtype == "FLOAT_16":
        return torch.autocast(kind, dtype=torch.float16), torch.amp.GradScaler(kind)
    return contextlib.nullcontext(), None


def set_attention(denoiser, attention: str) -> None:
    if attention == "eager":  # diffusers' classic attention: softmax(QK^T)V materialised
        from diffusers.models.attention_processor import AttnProcessor
        denoiser.set_attn_processor(AttnProcessor())


def scaled_latents(vae, sample):
    """A VAE sample as the denoiser reads it: Flux's and SD 3's VAEs centre it first
    (`shift_factor`, as the engine's trainer/data/cache.py does); SD's have no shift, and
    theirs is the plain `sample * scaling_factor` this bench has always computed."""
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        sample = sample - shift
    return sample * vae.config.scaling_factor


def sample_latents(vae, pixels, generator=None):
    """One draw of the VAE's latent distribution, mean + std·ε. A VAE wrapper of the engine's
    (Qwen-Image's) hands a plain mean and std without `sample`: ε is drawn as the engine's
    trainer/data/cache.py draws it, which is what `sample(generator)` does where it exists."""
    import torch
    dist = vae.encode(pixels).latent_dist
    if hasattr(dist, "sample"):
        return dist.sample(generator)
    noise = torch.randn(dist.mean.shape, generator=generator, device=dist.mean.device,
                        dtype=dist.mean.dtype)
    return dist.mean + dist.std * noise


def prepare_denoiser(family, config, case: Case, device):
    """The denoiser (the UNet, or a flow model's transformer) set up for training exactly as
    the engine does it: frozen weights in weight_dtype on the device, LoRA adapters (or
    float32 masters for a fine-tune), checkpointing, the optimizer from the engine's
    registry, the fused pass when asked."""
    from trainer import finetune
    from trainer.loop import TORCH_DTYPES, enable_gradient_checkpointing
    from trainer.optim.registry import build_optimizer
    part = family.denoiser
    denoiser = family.parts[part]
    denoiser.requires_grad_(False)
    denoiser.to(device, TORCH_DTYPES[getattr(config, part).weight_dtype])
    params = finetune.trainable_parameters(denoiser, config, part)
    if case.denoiser_checkpointing:
        enable_gradient_checkpointing(denoiser)
    set_attention(denoiser, case.attention)
    denoiser.train()
    if case.compile:
        from trainer.compilation import compile_blocks
        compile_blocks(denoiser, buckets=1)
    optimizer = build_optimizer(config.optimizer.optimizer,
                                config.optimizer.model_dump(exclude={"optimizer"}),
                                [{"params": params, "lr": config.learning_rate, "name": part}])
    fused = None
    if case.fused_backward_pass:
        from trainer.optim.fused import FusedBackward
        fused = FusedBackward(optimizer)
    return denoiser, params, optimizer, fused


def drop_frozen_parts(family) -> None:
    """Free the VAE and the text encoders of a family whose conditioning is encoded already:
    only the denoiser stays (in `parts`, and in the components the family keeps)."""
    keep = family.denoiser
    for name in [p for p in family.parts if p != keep] + ["vae"]:
        family.parts.pop(name, None)
        if hasattr(family.components, name):
            setattr(family.components, name, None)
    family.vae = None


# --- limit: the speed of the model -------------------------------------------------------------

def ddpm_loss(family, case: Case, unet, latents, conditioning, weight_dtype, generator):
    """SD 1.5 / SDXL: the loss of one step from its noise, the UNet called directly (timesteps
    drawn uniformly, ε target), exactly as this bench has always measured the limit (its
    figures stay comparable with bench/results-*.json)."""
    import torch
    import torch.nn.functional as F
    dev = latents.device
    hidden = conditioning["encoder_hidden_states"].to(weight_dtype)
    extra = {}
    if case.family == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": conditioning["text_embeds"].to(weight_dtype),
            "time_ids": family.time_ids(conditioning, latents).to(weight_dtype)}
    scheduler = family.noise_scheduler
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(dev)

    def loss_of(noise, autocast):
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=dev)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            prediction = unet(noisy.to(weight_dtype), timesteps, hidden, **extra).sample
        return F.mse_loss(prediction.float(), noise)

    return loss_of


def flow_loss(family, latents, conditioning, weight_dtype, generator):
    """A flow family: the loss of one step from its noise, through the family's objective
    (timesteps from the config's distribution and shift, noisy latents, target ε − x₀, the
    loss weight where one is set) and its `predict`."""
    import torch.nn.functional as F
    objective = family.objective
    conditioning = {key: value.to(weight_dtype) if value.is_floating_point() else value
                    for key, value in conditioning.items()}

    def loss_of(noise, autocast):
        noised = objective.noised(latents, noise, generator)
        with autocast:
            prediction = family.predict(noised.noisy, noised.timesteps, conditioning)
        if noised.weight is None:
            return F.mse_loss(prediction.float(), noised.target)
        per_sample = F.mse_loss(prediction.float(), noised.target,
                                reduction="none").flatten(1).mean(1)
        return (per_sample * noised.weight).mean()

    return loss_of


def run_limit(case: Case, paths: dict, device: str, steps: int, mark_start,
              mark_steady=None) -> dict:
    """Denoiser forward + backward + optimizer step on latents and text embeddings encoded
    once before the loop, on the device; nothing else. The VAE and text encoders are freed
    before the loop. SD 1.5 / SDXL: the UNet called directly on DDPM noise (ε target); the
    flow families: the family's own objective (`noised`: σ, noisy latents, target ε − x₀)
    and `predict` (packing, position ids, guidance input), as the engine's step calls them."""
    import torch

    from trainer.loop import TORCH_DTYPES
    from trainer.models.family import load_family
    config = load_config(case, paths, device, Path(paths["workspace"]))
    dev = torch.device(device)
    family = load_family(config)
    flow = family.objective.flow_matching
    files = image_files(Path(paths["data"]))[:case.batch_size]
    generator = torch.Generator(dev).manual_seed(0)
    with torch.no_grad():
        vae = family.vae.to(dev, torch.float32)
        pixels = torch.stack([load_pixels(f, case.resolution) for f in files]).to(dev)
        latents = scaled_latents(vae, sample_latents(vae, pixels, generator))
        for name, module in family.parts.items():
            if name == family.denoiser:
                continue
            if flow:  # in their weight_dtype, as the engine holds them (T5-XXL: 19 GB in
                # float32); SD's stay as this bench has always encoded them
                module.to(dev, TORCH_DTYPES[getattr(config, name).weight_dtype])
            else:
                module.to(dev)
        conditioning = family.encode_text([caption_of(f) for f in files], {}, clip_skip=0,
                                          device=dev, grad={})
    denoiser, _, optimizer, fused = prepare_denoiser(family, config, case, dev)
    weight_dtype = next(denoiser.parameters()).dtype
    del vae, pixels
    if flow:
        loss_of = flow_loss(family, latents, conditioning, weight_dtype, generator)
        drop_frozen_parts(family)
    else:
        loss_of = ddpm_loss(family, case, denoiser, latents, conditioning, weight_dtype,
                            generator)
        del family
    del conditioning
    gc.collect()
    autocast, scaler = autocast_and_scaler(config.train_dtype.value, dev)

    def step():
        noise = torch.randn(latents.shape, generator=generator, device=dev)
        loss = loss_of(noise, autocast)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if fused is None:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # The FLOPs of one step (forward, backward incl. checkpointing's recomputation), counted
    # on the GPU only (a few seconds there), before the timed steps and before anything is
    # compiled (compiled kernels are invisible to the counter; the arithmetic is the same).
    flops = None
    if dev.type == "cuda" and not case.compile:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    sync(dev)

    stamps, cpu, losses = [], [], []
    mark_start()
    for _ in range(steps):
        losses.append(step())
        stamps.append(now())
        cpu.append(cpu_now())
        if mark_steady is not None:
            mark_steady(len(stamps))
    sync(dev)
    end = now()
    values = torch.stack(losses).float().tolist()
    return {"stamps": stamps, "cpu": cpu, "end": end, "losses": values, "flops": flops}


# --- naive: the simple way ---------------------------------------------------------------------

class ImageCaptionFolder:
    """A plain map-style dataset: the image decoded, resized and cropped at every access."""

    def __init__(self, folder: Path, resolution: int):
        self.files = image_files(folder)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        return {"pixel_values": load_pixels(path, self.resolution), "caption": caption_of(path)}


def run_naive(case: Case, paths: dict, device: str, steps: int, mark_start,
              mark_steady=None) -> dict:
    """The way most training scripts (diffusers' train_text_to_image_lora*.py and
    train_dreambooth_lora_flux/sd3.py among them) train: accelerate, a DataLoader over the
    files (no workers, the scripts' default), the VAE and the text encoder(s) run on every
    batch, captions tokenised every step, gradient clipping, the loss gathered and read back
    (`.item()`) every step for the log. SD: DDPM noise drawn as those scripts draw it; the
    flow families: the family's objective (the scripts' flow-matching noise and target)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from trainer.loop import TORCH_DTYPES
    from trainer.models.family import load_family
    config = load_config(case, paths, device, Path(paths["workspace"]))
    dev = torch.device(device)
    precision = {"BFLOAT_16": "bf16", "FLOAT_16": "fp16"}.get(config.train_dtype.value, "no")
    AcceleratorState._reset_state(reset_partial_state=False)  # a fresh one, as the engine does
    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision=precision)
    family = load_family(config)
    vae = family.vae.to(dev, torch.float32).requires_grad_(False)
    for name, module in family.parts.items():
        if name != family.denoiser:
            module.requires_grad_(False).to(dev, TORCH_DTYPES[getattr(config, name).weight_dtype])
    denoiser, params, optimizer, fused = prepare_denoiser(family, config, case, dev)
    if fused is not None:
        raise ValueError("the naive runner has no fused backward pass")
    dataset = ImageCaptionFolder(Path(paths["data"]), case.resolution)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=case.batch_size, shuffle=True, num_workers=0, drop_last=True,
        collate_fn=lambda rows: {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                                 "caption": [r["caption"] for r in rows]})
    denoiser, optimizer, loader = accelerator.prepare(denoiser, optimizer, loader)
    family.wrapped = {family.denoiser: denoiser}
    scheduler = family.noise_scheduler
    flow = family.objective.flow_matching
    generator = torch.Generator(dev).manual_seed(0) if flow else None
    sync(dev)

    stamps, cpu, losses, train_loss = [], [], [], 0.0
    mark_start()
    done = False
    while not done:
        for batch in loader:
            with accelerator.accumulate(denoiser):
                with torch.no_grad():
                    latents = sample_latents(vae, batch["pixel_values"].to(dev))
                    latents = scaled_latents(vae, latents)
                    conditioning = family.encode_text(batch["caption"], {}, clip_skip=0,
                                                      device=dev, grad={})
                noise = torch.randn_like(latents)
                if flow:
                    noised = family.objective.noised(latents, noise, generator)
                    noisy, timesteps, target = noised.noisy, noised.timesteps, noised.target
                else:
                    timesteps = torch.randint(0, scheduler.config.num_train_timesteps,
                                              (latents.shape[0],), device=dev)
                    noisy, target = scheduler.add_noise(latents, noise, timesteps), noise
                with accelerator.autocast():
                    prediction = family.predict(noisy, timesteps, conditioning)
                loss = F.mse_loss(prediction.float(), target.float())
                average = accelerator.gather(loss.repeat(case.batch_size)).mean()
                train_loss += average.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.item())
            stamps.append(now())
            cpu.append(cpu_now())
            if mark_steady is not None:
                mark_steady(len(stamps))
            if len(stamps) >= steps:
                done = True
                break
    sync(dev)
    return {"stamps": stamps, "cpu": cpu, "end": now(), "losses": losses}


# --- atelier: the real engine ------------------------------------------------------------------

def run_atelier(case: Case, paths: dict, device: str, steps: int, mark_start,
                mark_steady=None, on_started=None) -> dict:
    """`trainer.loop.train(config, control)`, as `python -m trainer train` calls it. Step
    times come from the progress events (their `time`: when the loop finished the step);
    the run is ended after `steps` steps by raising from the event callback."""
    from trainer.control import Control
    from trainer.loop import train
    from trainer.memory_estimate import estimate
    config = load_config(case, paths, device, Path(paths["workspace"]))
    from trainer.errors import AtelierError
    # the engine's estimate of this run's peak, to set beside the measured one
    try:
        estimate_gb = estimate(config, device_gb=None).total_gb
    except AtelierError:  # a setting the estimate cannot tell: the row goes without it
        estimate_gb = None
    stamps: dict[int, float] = {}
    cpu: dict[int, float] = {}
    losses: dict[int, float] = {}
    phases: dict[str, float] = {}
    warnings: list[str] = []
    marks: dict[str, float] = {}

    def on_event(event: dict) -> None:
        kind = event["type"]
        if kind == "status":
            message = event.get("message", "")
            for key, prefix in (("dataset", "Reading the dataset"), ("model", "Loading "),
                                ("setup", "Training")):
                if message.startswith(prefix) and key not in phases:
                    phases[key] = now()
        elif kind == "warning":
            warnings.append(event.get("message", ""))
        elif kind == "started":
            mark_start()
            marks["cpu_start"] = cpu_now()
            if on_started is not None:
                on_started()
        elif kind == "progress":
            stamps[event["step"]] = event.get("time", now())
            # On CUDA the loop reports steps in batches (one loss read a second), so the CPU
            # clock read here would give every step of a batch ~0 s: CPU seconds are a CPU
            # figure only.
            if device == "cpu":
                cpu[event["step"]] = cpu_now()
            losses[event["step"]] = event["loss"]
            # the warm-up (the first epoch: caches filled, compiled) is over; on CUDA the
            # events come a second apart, so this may be a few steps later: still steady ones
            if mark_steady is not None:
                mark_steady(len(stamps))
            if len(stamps) >= steps:
                raise BenchDone

    try:
        train(config, Control(on_event=on_event))
    except BenchDone:
        pass
    ordered = [stamps[k] for k in sorted(stamps)][:steps]
    return {"stamps": ordered, "cpu": [cpu[k] for k in sorted(cpu)][:steps],
            "cpu_start": marks.get("cpu_start"), "end": ordered[-1] if ordered else now(),
            "losses": [losses[k] for k in sorted(losses)][:steps], "phases": phases,
            "warnings": warnings, "estimate_gb": estimate_gb}


RUNNERS = {"limit": run_limit, "naive": run_naive, "atelier": run_atelier}


def summarise(result: dict, start: float, cpu_start: float, warmup: int) -> dict:
    """Step times from the stamps: the first step (start -> first stamp), then the median and
    mean over the steps after the warm-up. Also the process's CPU seconds per step: on a
    shared machine, less disturbed by other processes than the wall time."""
    import statistics
    stamps = result["stamps"]
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    measured = times[warmup:]
    cpu = result.get("cpu") or []
    cpu_start = result.get("cpu_start") or cpu_start
    cpu_times = [b - a for a, b in zip([cpu_start, *cpu[:-1]], cpu)][warmup:]
    losses = result.get("losses") or []
    return {
        "cpu_s_median": statistics.median(cpu_times) if cpu_times else None,
        "first_step_s": times[0] if times else None,
        "step_s_median": statistics.median(measured) if measured else None,
        "step_s_mean": (sum(measured) / len(measured)) if measured else None,
        "step_s_min": min(measured) if measured else None,
        "steps_measured": len(measured),
        "warmup_steps": min(warmup, len(times)),
        "warmup_step_s_median": statistics.median(times[1:warmup]) if warmup > 1 else None,
        "loss_last": losses[-1] if losses else None,
        "loss_finite": all(math.isfinite(v) for v in losses) if losses else None,
    }


def seed_all(seed: int = 0) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
