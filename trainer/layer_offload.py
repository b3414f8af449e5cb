"""`layer_offload_fraction`: a share of a part's frozen weights lives in pinned CPU memory and is
streamed to the GPU block by block as each block runs.

The units are the blocks gradient checkpointing recomputes (the UNet's ResnetBlock2D and
BasicTransformerBlock, a CLIP encoder layer). A forward pre-hook gives each frozen weight of a
streamed block a fresh device copy of its pinned CPU tensor (copied without blocking); the
forward post-hook points the weight back at the CPU tensor. Nothing else holds the device
copy, so it is freed as soon as the block is done, unless autograd saved it for the backward
pass: that is why checkpointing is required. A checkpointed block saves nothing in its
forward pass and runs again (hooks included) in the backward pass, whose saved tensors are
freed once that block's gradient is computed. So at most a block or two of streamed weights
is on the GPU at a time, at the cost of copying the streamed share twice per step (forward
and recomputation).

Trained weights (LoRA adapters, a fine-tuned part) never move: only parameters frozen when
the run starts are streamed.
"""
from __future__ import annotations

import torch

from trainer.config import TrainConfig, TrainingMethod
from trainer.errors import ConfigError

UNIT_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "CLIPEncoderLayer")


def check_layer_offload(config: TrainConfig) -> None:
    """Refuse what streaming cannot do, naming the keys."""
    if config.layer_offload_fraction <= 0:
        return
    key = f"layer_offload_fraction {config.layer_offload_fraction:g}"
    if not config.gradient_checkpointing or not config.unet.gradient_checkpointing:
        raise ConfigError(
            f"{key} needs gradient_checkpointing (and unet.gradient_checkpointing): without "
            "it autograd keeps every streamed block's weights on the GPU for the backward "
            "pass, and nothing is saved. Switch checkpointing on or set the fraction to 0.")
    if config.training_method == TrainingMethod.FINE_TUNE and config.unet.train:
        raise ConfigError(
            f"{key}: a fine-tuned UNet's weights change at every step and cannot live on the "
            "CPU; streaming is for frozen weights (LoRA, embeddings). Set the fraction to 0.")


class LayerOffload:
    """Streams `fraction` of `module`'s frozen weight bytes (whole blocks, largest first)."""

    def __init__(self, module: torch.nn.Module, fraction: float, device: torch.device | str):
        """`module` is still on the CPU (in its storage type, adapters added): the streamed
        blocks' frozen weights are pinned there, and everything else moves to `device`, so
        the whole part is never on the device at once."""
        self.device = torch.device(device)
        self.loads = 0  # block loads so far (one per block call): what the tests count
        units = [m for m in module.modules() if type(m).__name__ in UNIT_CLASSES]
        frozen = {id(p) for p in module.parameters() if not p.requires_grad}
        total = sum(p.numel() * p.element_size() for p in module.parameters()
                    if id(p) in frozen)

        def frozen_bytes(unit):
            return sum(p.numel() * p.element_size() for p in unit.parameters() if id(p) in frozen)

        self.units: list[torch.nn.Module] = []
        self.streamed_bytes = 0
        for unit in sorted(units, key=frozen_bytes, reverse=True):
            if self.streamed_bytes >= fraction * total:
                break
            self.units.append(unit)
            self.streamed_bytes += frozen_bytes(unit)
        self.total_bytes = total
        pin = self.device.type == "cuda"
        self._host: dict[torch.nn.Module, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        streamed: set[int] = set()
        for unit in self.units:
            pairs = []
            for param in unit.parameters():
                if id(param) in frozen and id(param) not in streamed:
                    host = param.data.to("cpu")
                    param.data = host.pin_memory() if pin else host
                    pairs.append((param, param.data))
                    streamed.add(id(param))
            self._host[unit] = pairs
        _move_except(module, self.device, streamed)
        for unit in self.units:
            unit.register_forward_pre_hook(self._load)
            unit.register_forward_hook(self._unload)

    def _load(self, unit, _args) -> None:
        self.loads += 1
        for param, host in self._host[unit]:
            param.data = host.to(self.device, non_blocking=True)

    def _unload(self, unit, _args, _output) -> None:
        for param, host in self._host[unit]:
            param.data = host


def _move_except(module: torch.nn.Module, device: torch.device, kept: set[int]) -> None:
    """`module.to(device)` for every parameter and buffer not in `kept` (ids), one tensor at
    a time: `module.to` would first copy the streamed weights to the device too."""
    for sub in module.modules():
        for param in sub._parameters.values():
            if param is not None and id(param) not in kept:
                param.data = param.data.to(device)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = buffer.to(device)


def streamed_parts(config: TrainConfig, parts: list[str]) -> list[str]:
    """The parts whose blocks stream: the UNet (transformer), and each trained text encoder
    whose own checkpointing is on (a frozen one's outputs are cached, and it leaves the GPU
    whole: trainer/residency.py)."""
    if config.layer_offload_fraction <= 0:
        return []
    denoiser = config.model_type.facts.denoiser
    return [denoiser] + [p for p in parts if p != denoiser
                         and getattr(config, p).gradient_checkpointing]


def offload_parts(config: TrainConfig, family, parts: list[str],
                  device: torch.device) -> dict[str, LayerOffload]:
    """Stream the configured share of each of `streamed_parts`; they are still on the CPU."""
    return {part: LayerOffload(family.parts[part], config.layer_offload_fraction, device)
            for part in streamed_parts(config, parts)}
