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
4. `residency`: the VAE and frozen encoders leave the GPU once the caches serve them; a flow
   family's frozen text encoders leave memory altogether, read again when they run (`_reader`).
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
from trainer.models.family import is_read_later
from trainer.quantization import BITSANDBYTES
from trainer.residency import FrozenPartsResidency, ReadAgain, fill_caches_first


class PartPlacement:
    def __init__(self, config: TrainConfig, family, device: torch.device, num_processes: int,
                 status: Callable[[str], None], *, is_main: bool = True):
        self.config, self.family, self.device, self.status = config, family, device, status
        self.is_main = is_main
        self.denoiser = config.model_type.facts.denoiser
        self.streamed = offloaded_parts(config)
        self.caches_first = fill_caches_first(config, device, num_processes)
        self.held_back = set(self.streamed) | ({self.denoiser} if self.caches_first else set())
        self.offloads: dict[str, LayerOffload] = {}
        # text encoders dropped from memory (`_reader`), or not read yet (family.READ_LATER)
        self.dropped: set[str] = {name for name, module in family.parts.items()
                                  if is_read_later(module)}

    def place(self, dtypes: dict[str, torch.dtype]) -> None:
        """Every part frozen, in its storage dtype, on the device unless held back."""
        self.dtypes = dtypes
        vae = self.family.vae
        vae.requires_grad_(False)
        vae.to(self.device, dtypes["vae"])
        for name, module in self.family.parts.items():
            if name in self.dropped:  # no weights yet: set up when read (`_reader`)
                continue
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
            self.config, self.family, [p for p in self.streamed if p not in trained
                                       and p != self.denoiser and p not in self.dropped],
            self.device))

    def residency(self, served: dict[str, torch.nn.Module]) -> FrozenPartsResidency:
        """The cache-served frozen modules (`residency.cache_served`) leave the GPU at each
        epoch's end; a streamed one moves all but its streamed blocks; a flow family's text
        encoder is dropped from memory and read again from its files when it runs."""
        readers = {name: self._reader(name) for name in served if name in self.family.parts}
        readers = {name: reader for name, reader in readers.items() if reader is not None}
        for name in sorted(self.dropped - set(readers)):  # not served after all: read now
            self._read_now(name)
        unread = [name for name, reader in readers.items() if reader.dropped]
        if unread:
            self.status(f"The {' and '.join(unread)} {'is' if len(unread) == 1 else 'are'} not "
                        "read yet: the text cache serves their outputs, and each is read from "
                        "the model's files only when a caption the cache has not seen, or a "
                        "sample, needs it.")

        def returned(name: str) -> None:
            if name in readers:
                self.status(f"Read the {name} from the model's files for a caption the text "
                            "cache has not seen yet; it is dropped at the epoch's end")
            else:
                self.status(f"The {name} is back on the GPU for a sample the cache has not "
                            "seen yet; it leaves again at the epoch's end")
        residency = FrozenPartsResidency(
            served, self.device, on_return=returned, readers=readers,
            # a streamed part moves all but its streamed blocks (an encoder read when it first
            # runs streams from then on: `_reader`)
            movers={name: (lambda device, name=name: self.offloads[name].move_resident(device))
                    for name in served if name in self.offloads or name in self.streamed})
        for name in served:
            if name in self.family.parts:
                self.family.before_use[name] = lambda name=name: residency.before_use(name)
        return residency

    def _reader(self, name: str) -> ReadAgain | None:
        """A frozen text encoder the run drops while the text cache serves it: one its family
        can read again (a flow family's, from a diffusers folder), not packed by bitsandbytes
        (INT_8 / NFLOAT_4: small already, and their packed weights do not move to the meta
        device)."""
        if getattr(self.config, name).weight_dtype in BITSANDBYTES:
            return None
        reader = getattr(self.family, "text_encoder_reader", None)
        read = reader(name) if reader is not None else None
        if read is None:
            return None
        module = self.family.parts[name]
        said: list[bool] = [] if name not in self.dropped else [True]
        reads: list[bool] = []

        def read_as_set_up() -> torch.nn.Module:
            """The encoder as `place` set it up: quantized as configured, frozen, in its
            storage type, on the CPU (the residency moves it)."""
            from trainer.quantization import QUANTIZED, quantize_frozen_part
            fresh = read()
            if getattr(self.config, name).weight_dtype in QUANTIZED:
                for line in quantize_frozen_part(fresh, name, self.config, self.device,
                                                 denoiser=self.denoiser,
                                                 write_cache=self.is_main and not reads):
                    if not reads:
                        self.status(line)
            reads.append(True)
            fresh.requires_grad_(False)
            if not getattr(fresh, "is_quantized", False):
                fresh.to(self.dtypes[name])
            return fresh

        def dropped() -> None:
            self.dropped.add(name)
            if name in self.offloads:  # its pinned blocks are freed with it
                self.offloads.pop(name).forget()
            if not said:
                said.append(True)
                self.status(f"Dropped the {name}'s weights from memory: the text cache serves "
                            "its outputs. It is read again from its files only for a caption "
                            "the cache has not seen and for samples.")

        def restream() -> None:
            self.dropped.discard(name)
            if name in self.streamed:
                self.offloads.update(offload_parts(self.config, self.family, [name],
                                                   self.device))
                if len(reads) == 1:  # said once, at its first read
                    self._say_streaming(name)
        return ReadAgain(module, read_as_set_up, on_drop=dropped, on_read=restream,
                         dropped=name in self.dropped)

    def _read_now(self, name: str) -> None:
        """A text encoder not read yet that the run needs in memory after all: read and set up
        as `place` sets up the others (its streamed blocks as `stream_frozen_encoders`)."""
        reader = self._reader(name)
        if reader is None:
            raise RuntimeError(f"the {name} was not read and cannot be read now")
        reader.restore()
        if name not in self.offloads:
            self.family.parts[name].to(self.device)

    def stream_the_rest(self) -> None:
        """After the caches are full: the other streamed parts' blocks pinned in CPU memory,
        their other weights and the held-back parts to the device."""
        self.offloads.update(offload_parts(
            self.config, self.family,
            [p for p in self.streamed if p not in self.offloads and p not in self.dropped],
            self.device))
        for name in self.held_back - set(self.offloads) - self.dropped:
            self.family.parts[name].to(self.device)
        for name in self.offloads:
            self._say_streaming(name)

    def _say_streaming(self, name: str) -> None:
        offload = self.offloads[name]
        self.status(f"Streaming {offload.streamed_bytes / 2**20:,.0f} of "
                    f"{offload.total_bytes / 2**20:,.0f} MB of the {name}'s frozen weights "
                    f"from CPU memory ({len(offload.units)} blocks)")

    def placed_by_accelerate(self, names: list[str]) -> list[bool]:
        """accelerate's `device_placement` for the prepared parts `names`."""
        return [name not in self.offloads for name in names]
