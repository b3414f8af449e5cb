"""Where each model part's weights live while a run sets up and trains: on the device, held
on the CPU for now, or streamed block by block from CPU memory (`offload_fraction`).

The set-up is ordered so that large parts are never on the GPU together needlessly:

1. `place`: every part frozen and in its storage dtype; a streamed part stays on the CPU until
   its blocks are chosen (trainer/layer_offload.py), and the UNet / transformer too while the
   caches fill first (trainer/residency.py); everything else goes to the device.
2. `recompute_streamed` (after the adapters): a frozen streamed part that a gradient flows
   through recomputes its blocks in the backward pass, or autograd would keep every streamed
   block's weights on the GPU; `activation_offloading` keeps the checkpointed blocks' inputs in
   CPU memory.
3. `stream_frozen_encoders`: the frozen text encoders' streamed blocks, before they fill the
   text cache.
4. `residency`: the VAE and frozen encoders leave the GPU once the caches serve them.
5. `stream_the_rest` (after the caches are full): the denoiser's and the trained parts' blocks,
   and the held-back parts to the device.

`placed_by_accelerate` then tells accelerate which prepared parts it may move: a streamed part
is placed already (accelerate would copy all of it to the device).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.config import TrainConfig
from trainer.layer_offload import (LayerOffload, gradient_flows, offload_parts,
                                   offloaded_parts, offloading_checkpoint)
from trainer.residency import FrozenPartsResidency, fill_caches_first


class PartPlacement:
    def __init__(self, config: TrainConfig, family, device: torch.device, num_processes: int,
                 status: Callable[[str], None]):
        self.config, self.family, self.device, self.status = config, family, device, status
        self.denoiser = config.model_type.facts.denoiser
        self.streamed = offloaded_parts(config)
        self.caches_first = fill_caches_first(config, device, num_processes)
        self.held_back = set(self.streamed) | ({self.denoiser} if self.caches_first else set())
        self.offloads: dict[str, LayerOffload] = {}

    def place(self, dtypes: dict[str, torch.dtype]) -> None:
        """Every part frozen, in its storage dtype, on the device unless held back."""
        vae = self.family.vae
        vae.requires_grad_(False)
        vae.to(self.device, dtypes["vae"])
        for name, module in self.family.parts.items():
            module.requires_grad_(False)
            # a part diffusers quantized (a GGUF transformer) was loaded in its dtypes and
            # refuses a cast
            cast = () if getattr(module, "is_quantized", False) else (dtypes[name],)
            module.to(None if name in self.held_back else self.device, *cast)

    def recompute_streamed(self, trained: list[str], checkpoint: Callable) -> None:
        """Gradient checkpointing where streaming needs it (`checkpoint(module)` switches it on
        the way the trained parts have it), and activation offloading on the denoiser."""
        for part in self.streamed:
            if part not in trained and gradient_flows(self.config, part):
                checkpoint(self.family.parts[part])
        if getattr(self.config, self.denoiser).activation_offloading:
            self.family.parts[self.denoiser].enable_gradient_checkpointing(
                gradient_checkpointing_func=offloading_checkpoint(self.device))

    def stream_frozen_encoders(self, trained: list[str]) -> None:
        """The streamed blocks of the frozen text encoders: they fill the text cache next."""
        self.offloads.update(offload_parts(
            self.config, self.family,
            [p for p in self.streamed if p not in trained and p != self.denoiser], self.device))

    def residency(self, served: dict[str, torch.nn.Module]) -> FrozenPartsResidency:
        """The cache-served frozen modules (`residency.cache_served`) leave the GPU at each
        epoch's end; a streamed one moves all but its streamed blocks."""
        return FrozenPartsResidency(
            served, self.device,
            on_return=lambda name: self.status(
                f"The {name} is back on the GPU for a sample the cache has not seen yet; it "
                "leaves again at the epoch's end"),
            movers={name: offload.move_resident for name, offload in self.offloads.items()})

    def stream_the_rest(self) -> None:
        """After the caches are full: the other streamed parts' blocks pinned in CPU memory,
        their other weights and the held-back parts to the device."""
        self.offloads.update(offload_parts(
            self.config, self.family, [p for p in self.streamed if p not in self.offloads],
            self.device))
        for name in self.held_back - set(self.offloads):
            self.family.parts[name].to(self.device)
        for name, offload in self.offloads.items():
            self.status(f"Streaming {offload.streamed_bytes / 2**20:,.0f} of "
                        f"{offload.total_bytes / 2**20:,.0f} MB of the {name}'s frozen weights "
                        f"from CPU memory ({len(offload.units)} blocks)")

    def placed_by_accelerate(self, names: list[str]) -> list[bool]:
        """accelerate's `device_placement` for the prepared parts `names`."""
        return [name not in self.offloads for name in names]
