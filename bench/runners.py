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

from bench.cases import Case

now = time.monotonic
cpu_now = time.process_time  # CPU seconds of the whole process (all threads)


class BenchDone(Exception):
    """Raised from the atelier runner's event callback once the measured steps are done: the
    run ends there, without the final backup and save (not part of any step)."""


# --- Shared pieces -----------------------------------------------------------------------------

def atelier_config_dict(case: Case, model_dir: Path, data_dir: Path, workspace: Path,
                        device: str) -> dict[str, Any]:
    """The Atelier config of a case: the engine's defaults, plus what the case sets. The text
    encoders are frozen in every case (the limit trains the UNet only). Backups are off
    (the default is every 30 minutes: not per-step work) and the run is ended by the bench
    after its measured steps."""
    data: dict[str, Any] = {
        "model_type": ("STABLE_DIFFUSION_15" if case.family == "sd15"
                       else "STABLE_DIFFUSION_XL_10_BASE"),
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
        "text_encoder": {"train": case.train_text_encoder, "stop_training_after_unit": "NEVER",
                         "gradient_checkpointing": "text_encoder" in case.checkpoint_parts,
                         "weight_dtype": case.weight_dtype},
        "text_encoder_2": {"train": False, "weight_dtype": case.weight_dtype},
        "unet": {"train": True, "gradient_checkpointing": "unet" in case.checkpoint_parts,
                 "weight_dtype": case.weight_dtype},
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


def set_attention(unet, attention: str) -> None:
    if attention == "eager":  # diffusers' classic attention: softmax(QK^T)V materialised
        from diffusers.models.attention_processor import AttnProcessor
        unet.set_attn_processor(AttnProcessor())


def prepare_unet(family, config, case: Case, device):
    """The UNet set up for training exactly as the engine does it: frozen weights in
    weight_dtype on the device, LoRA adapters (or float32 masters for a fine-tune),
    checkpointing, the optimizer from the engine's registry, the fused pass when asked."""
    from trainer import finetune
    from trainer.loop import TORCH_DTYPES, enable_gradient_checkpointing
    from trainer.optim.registry import build_optimizer
    unet = family.parts["unet"]
    unet.requires_grad_(False)
    unet.to(device, TORCH_DTYPES[config.unet.weight_dtype])
    params = finetune.trainable_parameters(unet, config, "unet")
    if case.unet_checkpointing:
        enable_gradient_checkpointing(unet)
    set_attention(unet, case.attention)
    unet.train()
    if case.compile:
        from trainer.compilation import compile_blocks
        compile_blocks(unet, buckets=1)
    optimizer = build_optimizer(config.optimizer.optimizer,
                                config.optimizer.model_dump(exclude={"optimizer"}),
                                [{"params": params, "lr": config.learning_rate, "name": "unet"}])
    fused = None
    if case.fused_backward_pass:
        from trainer.optim.fused import FusedBackward
        fused = FusedBackward(optimizer)
    return unet, params, optimizer, fused


# --- limit: the speed of the model -------------------------------------------------------------

def run_limit(case: Case, paths: dict, device: str, steps: int, mark_start,
              mark_steady=None) -> dict:
    """UNet forward + backward + optimizer step on latents and text embeddings encoded once
    before the loop, on the device; nothing else. The VAE and text encoders are freed before
    the loop."""
    import torch
    import torch.nn.functional as F

    from trainer.models.family import load_family
    config = load_config(case, paths, device, Path(paths["workspace"]))
    dev = torch.device(device)
    family = load_family(config)
    files = image_files(Path(paths["data"]))[:case.batch_size]
    generator = torch.Generator(dev).manual_seed(0)
    with torch.no_grad():
        vae = family.vae.to(dev, torch.float32)
        pixels = torch.stack([load_pixels(f, case.resolution) for f in files]).to(dev)
        latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
        for name, module in family.parts.items():
            if name != "unet":
                module.to(dev)
        conditioning = family.encode_text([caption_of(f) for f in files], {}, clip_skip=0,
                                          device=dev, grad={})
    unet, _, optimizer, fused = prepare_unet(family, config, case, dev)
    weight_dtype = next(unet.parameters()).dtype
    hidden = conditioning["encoder_hidden_states"].to(weight_dtype)
    extra = {}
    if case.family == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": conditioning["text_embeds"].to(weight_dtype),
            "time_ids": family.time_ids(conditioning, latents).to(weight_dtype)}
    scheduler = family.noise_scheduler
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(dev)
    del family, vae, pixels, conditioning
    gc.collect()
    autocast, scaler = autocast_and_scaler(config.train_dtype.value, dev)

    def step():
        noise = torch.randn(latents.shape, generator=generator, device=dev)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=dev)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            prediction = unet(noisy.to(weight_dtype), timesteps, hidden, **extra).sample
        loss = F.mse_loss(prediction.float(), noise)
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
    """The way most training scripts (diffusers' train_text_to_image_lora*.py among them)
    train: accelerate, a DataLoader over the files (no workers, the scripts' default), the
    VAE and the text encoder(s) run on every batch, captions tokenised every step, gradient
    clipping, the loss gathered and read back (`.item()`) every step for the log."""
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
        if name != "unet":
            module.requires_grad_(False).to(dev, TORCH_DTYPES[getattr(config, name).weight_dtype])
    unet, params, optimizer, fused = prepare_unet(family, config, case, dev)
    if fused is not None:
        raise ValueError("the naive runner has no fused backward pass")
    dataset = ImageCaptionFolder(Path(paths["data"]), case.resolution)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=case.batch_size, shuffle=True, num_workers=0, drop_last=True,
        collate_fn=lambda rows: {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                                 "caption": [r["caption"] for r in rows]})
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    family.wrapped = {"unet": unet}
    scheduler = family.noise_scheduler
    sync(dev)

    stamps, cpu, losses, train_loss = [], [], [], 0.0
    mark_start()
    done = False
    while not done:
        for batch in loader:
            with accelerator.accumulate(unet):
                with torch.no_grad():
                    latents = vae.encode(batch["pixel_values"].to(dev)).latent_dist.sample()
                    latents = latents * vae.config.scaling_factor
                    conditioning = family.encode_text(batch["caption"], {}, clip_skip=0,
                                                      device=dev, grad={})
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps,
                                          (latents.shape[0],), device=dev)
                noisy = scheduler.add_noise(latents, noise, timesteps)
                with accelerator.autocast():
                    prediction = family.predict(noisy, timesteps, conditioning)
                loss = F.mse_loss(prediction.float(), noise.float())
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
    config = load_config(case, paths, device, Path(paths["workspace"]))
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
            "warnings": warnings}


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
