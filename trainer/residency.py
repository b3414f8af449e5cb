"""The VAE and the frozen text encoders leave the GPU once the caches serve them.

With latent caching, the VAE encodes an image the first time it is trained and never again;
with a frozen text encoder, its outputs are cached per caption likewise. After the first epoch
they only hold memory (SDXL: 1.4 GB for the second text encoder, 0.3 GB VAE, 0.25 GB the
first). So at the end of each epoch the loop parks them in CPU memory; they come back for
sampling (`present()`) and go again after.

Where it can, the run fills the caches with the first epoch's samples before the UNet comes
to the GPU (`fill_caches_first`), and parks the VAE and text encoders right after: they and
the UNet are then never on the GPU together (with SDXL at 1024 px the VAE's encoder alone
needs ~2 GB of activations).

A sample the cache has not seen yet (a new random crop or flip, a caption line first drawn
later) still works: a forward pre-hook brings a parked module back before it runs, and it is
parked again at the end of the epoch. On the CPU there is no other memory to park in, and
nothing moves.

A frozen text encoder of a flow family (T5-XXL, the Qwen language models: 4 to 16 GB) is not
parked in CPU memory but dropped (`ReadAgain`): its weights are freed, and read again from the
model's files (its quantized-cache entry where it has one) only when it runs, for a caption the
text cache has not seen or for samples, and dropped again after. The run loads it without
weights in the first place (family.READ_LATER), so once the cache holds every caption the
encoder is read only for samples, and holds no memory while the run trains; on the CPU as well.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable

import torch


def parking_pays(device: torch.device) -> bool:
    """Whether parking frees anything: only a separate device's memory."""
    return device.type != "cpu"


# torch's own hook registries of a module (not a library's flags about hooks it installed on
# the submodules, such as transformers' `_output_capturing_hooks_installed`: those are the
# fresh copy's to keep).
TORCH_HOOK_ATTRIBUTES = tuple(name for name in torch.nn.Module().__dict__ if "hook" in name)


def adopt(module: torch.nn.Module, fresh: torch.nn.Module) -> None:
    """`module` becomes `fresh` (a copy of the same class read again): its submodules,
    weights and attributes, keeping its own hooks and mode. Every holder of `module` (the
    family's parts, a pipeline's components) sees the weights without being told."""
    if type(fresh) is not type(module):
        raise TypeError(f"read a {type(fresh).__name__} in place of a {type(module).__name__}")
    hooks = {name: module.__dict__[name] for name in TORCH_HOOK_ATTRIBUTES}
    training = module.training
    module.__dict__.clear()
    module.__dict__.update(fresh.__dict__)
    module.__dict__.update(hooks)
    module.train(training)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): its allocator is left alone
        return None


def trim_heap() -> None:
    """Give freed heap memory back to the system. glibc keeps freed blocks below its mmap
    threshold (which rises to 32 MB after a large block is freed) in the process's heap, so
    a dropped encoder read a second time would stay resident after its next drop (measured:
    a 0.6 GB T5 dropped again left the process at 978 MB resident, 394 MB after trimming)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class ReadAgain:
    """A frozen module whose weights are dropped (`drop`: to the meta device, which holds no
    memory) and read again (`restore`: `read()` makes a copy as the run set it up, which the
    module adopts). `on_drop` / `on_read` let the placement forget and redo what it set up on
    the weights (their streamed blocks)."""

    def __init__(self, module: torch.nn.Module, read: Callable[[], torch.nn.Module], *,
                 on_drop: Callable[[], None] | None = None,
                 on_read: Callable[[], None] | None = None, dropped: bool = False):
        """`dropped`: `module` holds no weights yet (built on the meta device)."""
        self.module, self.read = module, read
        self.on_drop, self.on_read = on_drop, on_read
        self.dropped = dropped

    def drop(self) -> None:
        if self.dropped:
            return
        if self.on_drop is not None:
            self.on_drop()
        self.module.to("meta")  # the weights are freed as their last reference goes
        self.dropped = True
        trim_heap()

    def restore(self) -> None:
        if not self.dropped:
            return
        adopt(self.module, self.read())
        self.dropped = False
        if self.on_read is not None:
            self.on_read()


class FrozenPartsResidency:
    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device, *,
                 on_return=None, movers=None, readers: dict[str, ReadAgain] | None = None):
        """`modules`: the cache-served frozen modules by name ("vae", "text_encoder", ...).
        `on_return(name)` is told when a parked module had to come back for a cache miss.
        `movers[name](device)` moves a module whose blocks stream from CPU memory
        (trainer/layer_offload.py) in place of `module.to(device)`. `readers[name]`: a module
        dropped when parked and read again when it comes back (on any device)."""
        self.device = torch.device(device)
        self.movers = movers or {}
        self.readers = readers or {}
        self.enabled = parking_pays(self.device)
        self.modules = {name: module for name, module in modules.items()
                        if self.enabled or name in self.readers}
        # a module not read yet is parked from the start: its first use reads it
        self.parked: set[str] = {name for name, reader in self.readers.items()
                                 if reader.dropped}
        self.on_return = on_return
        for name, module in self.modules.items():
            # The VAE is called through `encode`/`decode`, not `forward`: hook its halves.
            targets = ([module.encoder, module.decoder] if hasattr(module, "encoder")
                       and hasattr(module, "decoder") else [module])
            for target in targets:
                target.register_forward_pre_hook(lambda _m, _args, name=name: self._on_use(name))

    def before_use(self, name: str) -> None:
        """`name` is about to run (also through a submodule, which no hook of the module sees:
        the families call this through `ModelFamily.module`)."""
        self._on_use(name)

    def _on_use(self, name: str) -> None:
        if name in self.parked:
            self._bring_back(name)
            if self.on_return is not None:
                self.on_return(name)

    def _move(self, name: str, device: torch.device | str) -> None:
        if name in self.movers:
            self.movers[name](device)
        else:
            self.modules[name].to(device)

    def _bring_back(self, name: str) -> None:
        if name in self.readers:
            self.readers[name].restore()
        if self.enabled:
            self._move(name, self.device)
        self.parked.discard(name)

    def park(self) -> None:
        """Every module not parked yet to CPU memory (a reader's dropped), and the freed
        blocks back to the GPU's pool for others (torch keeps them reserved otherwise)."""
        moved = False
        for name in self.modules:
            if name not in self.parked:
                if name in self.readers:
                    self.readers[name].drop()
                else:
                    self._move(name, "cpu")
                self.parked.add(name)
                moved = True
        if moved and self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def weights_read(self):
        """The dropped modules' weights read again (where parking keeps them) while something
        reads every part's (a whole-model export), and dropped again after."""
        dropped = [reader for reader in self.readers.values() if reader.dropped]
        for reader in dropped:
            reader.restore()
        try:
            yield
        finally:
            for reader in dropped:
                reader.drop()

    @contextlib.contextmanager
    def present(self, read_dropped: bool = True, leave: tuple[str, ...] = ()):
        """Everything on the device (for sampling), parked again after. `read_dropped` False:
        a dropped module is read only if it runs (the validation loss reads the caches; a
        pipeline needs every module's weights before it runs any). `leave`: modules that stay
        parked or dropped (text encoders whose sample encodings are recorded: the pipeline
        draws without them)."""
        was_parked = {name for name in self.parked if name not in leave
                      and (read_dropped or name not in self.readers)}
        for name in was_parked:
            self._bring_back(name)
        try:
            yield
        finally:
            if was_parked:
                self.park()


def fill_caches_first(config, device: torch.device, num_processes: int) -> bool:
    """Whether the run fills the caches before training (the VAE and the frozen text encoders
    then leave the GPU before the UNet comes, so they never hold memory at the same time):
    where parking pays, with latent caching, in one process (the text cache is the main
    process's), and not for an inpainting model (its random masks need the VAE every step)."""
    return (parking_pays(device) and config.latent_caching and num_processes == 1
            and not config.model_type.is_inpainting)


def cache_served(config, family, data, parts: list[str], embeddings) -> dict[str, torch.nn.Module]:
    """The frozen modules whose every use in training the caches replace: the VAE with latent
    caching (not for an inpainting model, whose random masks are encoded each step), each
    frozen text encoder when the text cache is on."""
    served: dict[str, torch.nn.Module] = {}
    if data.latent_cache is not None and not family.inpainting:
        served["vae"] = family.vae
    if data.text_cache is not None:
        trained_vectors = set(embeddings.encoders_with_trained_vectors()) if embeddings else set()
        for name, module in family.parts.items():
            if name != family.denoiser and name not in parts and name not in trained_vectors:
                served[name] = module
    return served
