"""On-disk caches of VAE latents and text-encoder outputs, under `<workspace>/cache/`.

Latents. One safetensors file per (image, mask, training size, crop, flip, VAE): the key hashes
the image file's path, byte size and modification time, the same of its mask, the target size,
the resize and crop box, the flip, the VAE's identity (its name and its weight files' sizes and
times) and the dtype. Touching one image or one mask therefore changes exactly the keys of its
own samples; nothing else is re-encoded. The cache fills lazily: a sample is encoded the first
time it is trained (as without a cache) and read back after, so the first epoch costs what an
uncached epoch costs, and later epochs and later runs skip the VAE and the image decode.

What is stored: the latent distribution's mean and standard deviation (float32), and the mask
already averaged down to latent size. An inpainting model's masked image, where its mask is a
file, is an entry of its own (`derived_key`); see trainer/inpainting.py. Keeping the std, not only the mean, lets every step draw
a fresh latent `mean + std·ε` exactly as uncached training does (`latent_dist.sample()`), so
switching the cache on changes nothing about what is trained; it costs twice the space of a
mean-only cache (SD 1.5 at 512 px: 2 × 64 KiB per entry).

Text. When no text encoder is trained, the encoder's outputs for a caption are fixed: they are
cached per caption string (so multi-line captions, which pick one line per sample, and caption
dropout's empty caption are each one entry), keyed with the text encoders' identity, clip skip
and dtypes. A model family opts in for the parts of its conditioning that depend on the caption
alone: `family.text_cache_keys` (the dict keys) and, for the rest (SDXL's size/crop time ids),
`family.batch_conditioning(batch, device)`. SD 1.5's conditioning is the caption's hidden
states only, so it needs neither. The sampling pipeline's encodings of the sample prompts are
kept beside them, in `prompts/` (trainer/sample_prompts.py), under the text cache's identity.

Where. A CLI run keeps them all under its workspace, so the next run in the same workspace reuses
them. The app runs each job in a folder of its own, so its queue points every job of one owner
at that owner's folder (DATA_CACHE_ENV: `<workspace>/cache` on a local server,
`<workspace>/users/<user>/cache` on a shared one, where no user reads another's entries). Such
a folder outlives its jobs: at each run's start it is pruned to DATA_CACHE_GB_ENV, least
recently used entries first.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CACHE_VERSION = 1


# --- Identities -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def _absolute(path: str) -> str:
    # resolve() walks every component of the path (an lstat each): once per path per process
    return str(Path(path).resolve())


def file_stamp(path: Path | str | None) -> list | None:
    """[absolute path, byte size, modification time in ns] of a file; None when absent."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [_absolute(str(path)), stat.st_size, stat.st_mtime_ns]


def source_fingerprint(name: str, subfolder: str | None = None) -> list:
    """What identifies a model source: a local file by its stamp, a local diffusers folder by
    the stamps of the files in `subfolder` (or the folder), a hub id by its name."""
    if not name:
        return [""]
    path = Path(name).expanduser()
    if path.is_file():
        return file_stamp(path)
    if path.is_dir():
        folder = path / subfolder if subfolder and (path / subfolder).is_dir() else path
        stamps = sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns]
                        for f in folder.iterdir() if f.is_file())
        return [str(path.resolve()), subfolder or "", stamps]
    return [name]


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- Where the caches live, and how much they may hold --------------------------------------

# The app's job queue sets this for each job (trainer/jobs/queue.py): every job runs in a
# folder of its own, where a cache would serve no later job, so an owner's jobs share one
# folder. Unset (the CLI): `<workspace_dir>/cache`.
DATA_CACHE_ENV = "ATELIER_DATA_CACHE_DIR"
# What a shared folder (DATA_CACHE_ENV set) may hold, in GB: it outlives the jobs that wrote
# it, so the entries used least recently go first (a job folder's cache went with the job).
DATA_CACHE_GB_ENV = "ATELIER_DATA_CACHE_GB"
DEFAULT_DATA_CACHE_GB = 5.0
CACHE_KINDS = ("latents", "text", "prompts")  # prompts: trainer/sample_prompts.py
# A dot-file is an entry being written (`_atomic_save`); one this old was left by a crash.
STALE_WRITE_SECONDS = 24 * 3600


def shared_cache_root() -> Path | None:
    """The cache folder runs share (DATA_CACHE_ENV), or None."""
    shared = os.environ.get(DATA_CACHE_ENV, "").strip()
    return Path(shared) if shared else None


def data_cache_root(workspace_dir: str | os.PathLike) -> Path:
    """The folder holding `latents/`, `text/` and `prompts/` for a run in `workspace_dir`."""
    return shared_cache_root() or Path(workspace_dir) / "cache"


def shared_cache_bytes() -> int:
    """The most a shared cache folder may hold (DATA_CACHE_GB_ENV; a bad value: the default)."""
    try:
        gb = float(os.environ.get(DATA_CACHE_GB_ENV, DEFAULT_DATA_CACHE_GB))
    except ValueError:
        gb = DEFAULT_DATA_CACHE_GB
    return int(max(gb, 0.0) * 2**30)


def prune(root: Path | str, max_bytes: int) -> tuple[int, int]:
    """Remove the least recently used latent, text and prompt entries under `root` until the
    rest hold at most `max_bytes`; (files removed, bytes freed). Last use is the modification
    time: an entry is written once and touched whenever a run reads it from disk. An entry
    another run is writing (a dot-file) is left alone, unless a crash left it long ago. An
    entry removed while another run uses it is encoded again by that run (a missing entry is
    a miss), so pruning never breaks a run."""
    now = time.time()
    entries: list[tuple[float, int, Path]] = []
    removed = freed = 0
    for kind in CACHE_KINDS:
        for path in (Path(root) / kind).glob("*/*"):
            try:
                stat = path.stat()
            except OSError:
                continue
            if path.name.startswith("."):
                if now - stat.st_mtime > STALE_WRITE_SECONDS:
                    path.unlink(missing_ok=True)
                    removed, freed = removed + 1, freed + stat.st_size
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
    held = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda entry: entry[0]):
        if held <= max_bytes:
            break
        path.unlink(missing_ok=True)
        held -= size
        removed, freed = removed + 1, freed + size
    return removed, freed


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Write then rename: a reader (another process, a later run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
              str(temporary), metadata=metadata)
    os.replace(temporary, path)


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        entry = load_file(str(path))
    except Exception:  # noqa: BLE001 - a damaged entry is re-encoded, never fatal
        path.unlink(missing_ok=True)
        return None
    touch(path)
    return entry


def touch(path: Path) -> None:
    """An entry used now: `prune` removes the entries used least recently first."""
    try:
        os.utime(path)
    except OSError:
        pass


# --- Latents --------------------------------------------------------------------------------

MAX_REMEMBERED_KEYS = 65536


class LatentCache:
    """VAE latent distributions (mean, std) and latent-size masks, one file per sample key.

    From the second epoch on every step reads its samples from here, so in the main process
    entries also stay in memory (least recently used first out, within `memory_bytes`):
    reading and decoding a file per sample cost more than the tiny models' whole data step on
    a CPU, where the main process loads the data. Entries are shared, never written to
    (collate stacks copies). Picklable: DataLoader workers (GPU machines, with CPU to spare)
    look entries up themselves, from the files, holding none: each would otherwise keep its
    own copy of the same entries.
    """

    def __init__(self, folder: Path | str, vae_identity: Any, dtype: str, latent_scale: int,
                 memory_bytes: int = 512 * 2**20):
        self.folder = Path(folder)
        self.vae_identity = vae_identity
        self.dtype = str(dtype)
        self.latent_scale = int(latent_scale)
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._held = 0
        self._keys: dict[tuple, str] = {}  # the digest of each identity seen, computed once
        self._lock = threading.Lock()  # the prefetch threads look entries up together

    def __getstate__(self):  # a DataLoader worker's copy: files only
        state = dict(self.__dict__)
        state["_memory"], state["_held"], state["_keys"] = OrderedDict(), 0, {}
        state["memory_bytes"] = 0
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def key(self, item, geometry) -> str | None:
        """The key of one sample; None when the image file is gone (then nothing is cached).
        The files are looked at every time: an image or mask changed during a run gets a new
        key, so it is encoded again."""
        image = file_stamp(item.image_path)
        if image is None:
            return None
        mask = file_stamp(item.mask_path) if item.mask_path is not None else None
        identity = (tuple(image), tuple(mask) if mask else None, geometry.target,
                    geometry.resized, geometry.box, geometry.flip)
        key = self._keys.get(identity)
        if key is None:
            if len(self._keys) >= MAX_REMEMBERED_KEYS:  # random crops make new ones every epoch
                self._keys.clear()
            key = self._keys[identity] = _digest(
                [CACHE_VERSION, image, mask, geometry.target, geometry.resized, geometry.box,
                 geometry.flip, self.vae_identity, self.dtype, self.latent_scale])
        return key

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """{"mean", "std"[, "mask"]} or None when not cached (or unreadable)."""
        with self._lock:
            entry = self._memory.get(key)
            if entry is not None:
                self._memory.move_to_end(key)
                return entry
        entry = _load(self.path(key))
        if entry is not None:
            self._remember(key, entry)
        return entry

    def store(self, key: str, mean: torch.Tensor, std: torch.Tensor,
              mask: torch.Tensor | None) -> None:
        tensors = {"mean": mean.float(), "std": std.float()}
        if mask is not None:
            tensors["mask"] = mask.float()
        _atomic_save(tensors, self.path(key))

    def derived_key(self, key: str, what: str) -> str:
        """The key of another entry that belongs to sample `key` (an inpainting model's masked
        image): it changes whenever the sample's key does."""
        return _digest([CACHE_VERSION, key, what])

    def store_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        _atomic_save({name: t.float() for name, t in tensors.items()}, self.path(key))

    def _remember(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if size > self.memory_bytes:
            return
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = entry
            self._held += size
            while self._held > self.memory_bytes:
                _, dropped = self._memory.popitem(last=False)
                self._held -= sum(t.numel() * t.element_size() for t in dropped.values())


class CacheStats:
    def __init__(self):
        self.reused = 0
        self.encoded = 0

    def __str__(self) -> str:
        return f"{self.reused} reused, {self.encoded} encoded"


def batch_latents(batch: dict, vae: torch.nn.Module, generator: torch.Generator | None,
                  device: torch.device, cache: LatentCache | None = None,
                  stats: CacheStats | None = None) -> torch.Tensor:
    """Scaled latents for a batch: cached distributions where the batch has them, the VAE for
    the rest (storing what it encodes when there is a cache). One sample `mean + std·ε` per
    sample, ε drawn from `generator` exactly as `latent_dist.sample(generator)` draws it."""
    pixel_index = batch.get("pixel_index", list(range(len(batch["caption"]))))
    latent_index = batch.get("latent_index", [])
    vae_dtype = next(vae.parameters()).dtype
    parts = []
    with torch.no_grad():
        if pixel_index:
            pixels = batch["pixel_values"].to(device, vae_dtype)
            dist = vae.encode(pixels).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
            parts.append((pixel_index, mean, std))
            if cache is not None:
                keys = batch.get("cache_key", [None] * len(batch["caption"]))
                for row, position in enumerate(pixel_index):
                    if keys[position] is None:
                        continue
                    mask = batch["mask"][position] if bool(batch["has_mask"][position]) else None
                    cache.store(keys[position], mean[row], std[row], mask)
            if stats is not None:
                stats.encoded += len(pixel_index)
        if latent_index:
            parts.append((latent_index, batch["latent_mean"].to(device, torch.float32),
                          batch["latent_std"].to(device, torch.float32)))
            if stats is not None:
                stats.reused += len(latent_index)
        if len(parts) == 1 and parts[0][0] == list(range(len(parts[0][0]))):
            mean, std = parts[0][1], parts[0][2]
        else:
            size = len(pixel_index) + len(latent_index)
            mean = torch.empty((size, *parts[0][1].shape[1:]), device=device)
            std = torch.empty_like(mean)
            for positions, part_mean, part_std in parts:
                mean[positions] = part_mean
                std[positions] = part_std
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        latents = mean + std * noise
    # One memory layout whatever the source: the VAE's convolutions may return channels-last
    # tensors on the CPU, cached latents are contiguous, and a compiled UNet block
    # (trainer/compilation.py) would compile again for each layout.
    shift = getattr(vae.config, "shift_factor", None)
    if shift:  # Flux's and SD 3's VAEs centre the latents before scaling them
        latents = latents - shift
    return (latents * vae.config.scaling_factor).contiguous()


# --- Text -----------------------------------------------------------------------------------

class TextCache:
    """Text-encoder outputs per caption, on disk and (bounded) in memory; main process only."""

    def __init__(self, folder: Path | str, identity: Any, keys: tuple[str, ...] | None = None,
                 memory_entries: int = 512):
        self.folder = Path(folder)
        self.identity = identity
        self.keys = tuple(keys) if keys else None   # None: every entry of the conditioning
        self.memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.memory_entries = memory_entries
        self.stats = CacheStats()

    def _key(self, caption: str) -> str:
        return _digest([CACHE_VERSION, self.identity, caption])

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def _remember(self, key: str, row: dict[str, torch.Tensor]) -> None:
        self.memory[key] = row
        self.memory.move_to_end(key)
        while len(self.memory) > self.memory_entries:
            self.memory.popitem(last=False)

    def _lookup(self, caption: str) -> dict[str, torch.Tensor] | None:
        key = self._key(caption)
        row = self.memory.get(key)
        if row is None:
            row = _load(self.path(key))
            if row is not None:
                self._remember(key, row)
        else:
            self.memory.move_to_end(key)
        return row

    def conditioning(self, family, captions: list[str], batch: dict, *, clip_skip: int,
                     device: torch.device, grad: dict[str, bool]) -> dict[str, Any]:
        """What `family.encode_text(captions, batch, ...)` returns, from the cache where it can."""
        rows: dict[str, dict[str, torch.Tensor]] = {}
        missing: list[str] = []
        for caption in dict.fromkeys(captions):
            row = self._lookup(caption)
            if row is None:
                missing.append(caption)
            else:
                rows[caption] = row
        self.stats.reused += sum(1 for c in captions if c in rows)
        self.stats.encoded += sum(1 for c in captions if c not in rows)
        if missing:
            first = [captions.index(c) for c in missing]
            sub_batch = {k: [v[i] for i in first] for k, v in batch.items()
                         if isinstance(v, list) and len(v) == len(captions)}
            with torch.no_grad():
                out = family.encode_text(missing, sub_batch, clip_skip=clip_skip, device=device,
                                         grad=grad)
            keys = self.keys or tuple(out)
            for j, caption in enumerate(missing):
                row = {k: out[k][j].detach().to("cpu") for k in keys}
                key = self._key(caption)
                _atomic_save(row, self.path(key))
                self._remember(key, row)
                rows[caption] = row
        keys = self.keys or tuple(rows[captions[0]])
        result: dict[str, Any] = {k: torch.stack([rows[c][k] for c in captions]).to(device)
                                  for k in keys}
        if self.keys is not None and hasattr(family, "batch_conditioning"):
            result.update(family.batch_conditioning(batch, device))
        return result
