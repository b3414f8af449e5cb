"""Concept folders -> checked image items -> training samples (image, mask, caption).

Two steps, kept apart so the page can show the dataset without building tensors:

1. `collect_items(concepts)` lists every usable image of every enabled concept once, with its
   caption, mask and loss weight. Each image is decoded once here, so a corrupt or truncated
   file is reported (and skipped) before training starts, not in the middle of epoch 3.
2. `TrainDataset(items, resolution)` expands the concepts' repeats into one epoch's list and
   turns an index into a resized, cropped, maybe flipped image tensor with the identical
   transform applied to its mask.

Repeats are expanded by the dataset, per epoch, not by `collect_items`: a fractional repeat
(0.5 = half of the concept's images per epoch) then takes a *different* share of the images each
epoch, so over the epochs every image is trained, not one fixed half forever.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from trainer.data.images import (
    IMAGE_EXTENSIONS,
    MASK_SUFFIX,
    UnreadableImageError,
    is_image_file,
    is_misnamed_mask,
    load_image_rgb,
    load_mask,
    mask_path_for,
    open_image,
    oriented_size,
    to_mask_l,
)
from trainer.errors import DatasetError
from trainer.inpainting import circle_rng, masked_pixels, random_circle_mask

log = logging.getLogger(__name__)

PROMPT_SOURCES = ("sample", "filename", "concept")


@dataclass
class ImageItem:
    """One usable training image, listed once (repeats are applied by TrainDataset)."""

    image_path: Path
    caption: str
    mask_path: Path | None
    loss_weight: float
    concept_index: int
    # The concept's repeats (may be fractional, >= 0), kept here so the dataset can expand an
    # epoch from the items alone.
    repeats: float = 1.0
    # (width, height) as displayed (after EXIF rotation), read at collect time: buckets and
    # cache keys need it without decoding the image.
    size: tuple[int, int] | None = None
    # The concept's resolution override ("" = the run's), crop jitter and random flip.
    resolution: str = ""
    crop_jitter: bool = False
    random_flip: bool = False
    # A REGULARIZATION concept's image: an epoch takes as many of those as it has standard
    # samples (trainer/regularization.py), whatever the concept's repeats.
    regularization: bool = False


# --------------------------------------------------------------------------------------------
# Captions


def read_caption_file(path: Path) -> str:
    """Read a caption .txt whatever editor wrote it; stripped.

    Order: a byte-order mark decides (UTF-8/16/32, as Windows Notepad writes them); else UTF-8;
    else Windows-1252 (what older Windows tools write); else Latin-1, which never fails.
    """
    data = path.read_bytes()
    boms = (
        (b"\xff\xfe\x00\x00", "utf-32"),  # before UTF-16 LE: it starts with the same 2 bytes
        (b"\x00\x00\xfe\xff", "utf-32"),
        (b"\xef\xbb\xbf", "utf-8-sig"),
        (b"\xff\xfe", "utf-16"),
        (b"\xfe\xff", "utf-16"),
    )
    for bom, encoding in boms:
        if data.startswith(bom):
            try:
                return data.decode(encoding).strip()
            except UnicodeDecodeError:
                break
    for encoding in ("utf-8", "cp1252", "latin-1"):
        try:
            return data.decode(encoding).strip()
        except UnicodeDecodeError:
            continue
    raise AssertionError("unreachable: latin-1 decodes any bytes")


def caption_from_filename(image_path: Path) -> str:
    """`a_red-car.jpg` -> "a red car"."""
    text = image_path.stem.replace("_", " ").replace("-", " ")
    return " ".join(text.split())


def _prompt_source(concept: Any) -> str:
    """"sample", "filename" or "concept", from a plain string or an Enum such as PromptSource.

    str() of a (str, Enum) member is "PromptSource.SAMPLE" on Python 3.11, hence `.value`.
    """
    source = getattr(concept, "prompt_source", "sample")
    return str(getattr(source, "value", source)).strip().lower()


def _caption_for(image_path: Path, concept: Any, warn: Callable[[str], None]) -> str | None:
    """The caption per the concept's prompt source; None when the .txt file is missing."""
    source = _prompt_source(concept)
    if source == "filename":
        return caption_from_filename(image_path)
    if source == "concept":
        return str(getattr(concept, "prompt", "") or "").strip()
    caption_path = image_path.with_suffix(".txt")
    if not caption_path.is_file():
        return None
    try:
        return read_caption_file(caption_path)
    except OSError as error:
        warn(f"Cannot read caption '{caption_path}' ({error}); training '{image_path.name}' with an empty caption")
        return ""


# --------------------------------------------------------------------------------------------
# Collecting


def _list_image_files(folder: Path, recursive: bool) -> list[Path]:
    """Candidate image files, sorted so every run sees the same order."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        path
        for path in candidates
        if path.is_file()
        and is_image_file(path)
        # Skip hidden folders (.git, .cache ...) when recursing.
        and not any(part.startswith(".") for part in path.relative_to(folder).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _check_image(path: Path) -> tuple[int, int]:
    """Decode the whole file once (JPEGs at reduced scale: fast, and still catches truncation).

    Returns the displayed (width, height); raises UnreadableImageError.
    """
    open_image(path, draft=True)
    return oriented_size(path)


def _check_mask(mask_path: Path, image_path: Path, image_size: tuple[int, int], warn) -> Path | None:
    """The mask to use for an image, or None (unmasked). Problems are warned about once here."""
    if not mask_path.is_file():
        return None
    try:
        mask = to_mask_l(open_image(mask_path, kind="mask"))
    except UnreadableImageError as error:
        warn(f"Ignoring mask '{mask_path}': {error.reason}; '{image_path.name}' is trained unmasked")
        return None
    if mask.size != image_size:
        warn(
            f"Mask '{mask_path}' is {mask.width}x{mask.height} but its image is "
            f"{image_size[0]}x{image_size[1]}; the mask is resized to fit"
        )
    return mask_path


def _warn_uncaptioned(paths: list[Path], folder: Path, warn: Callable[[str], None]) -> None:
    """One warning for all images without a .txt caption, not one per image."""
    if len(paths) == 1:
        warn(f"No caption file '{paths[0].with_suffix('.txt').name}' for '{paths[0]}'; it is trained with an empty caption")
    elif paths:
        examples = ", ".join(f"'{p.name}'" for p in paths[:3])
        warn(
            f"{len(paths)} images in '{folder}' have no caption .txt (e.g. {examples}); "
            "they are trained with empty captions"
        )


def _concept_folder(concept: Any, number: int) -> Path:
    raw = str(getattr(concept, "path", "") or "").strip()
    field = f"concepts[{number - 1}].path"
    if not raw:
        raise DatasetError(f"Concept {number}: no folder given ({field})")
    folder = Path(raw).expanduser()
    if not folder.exists():
        raise DatasetError(f"Concept {number}: folder '{raw}' does not exist ({field})")
    if not folder.is_dir():
        raise DatasetError(f"Concept {number}: '{raw}' is a file, not a folder ({field})")
    return folder


def _collect_concept(concept: Any, index: int, warn: Callable[[str], None]) -> list[ImageItem]:
    number = index + 1
    folder = _concept_folder(concept, number)
    source = _prompt_source(concept)
    if source not in PROMPT_SOURCES:
        raise DatasetError(
            f"Concept {number}: unknown caption source '{source}' "
            f"(concepts[{index}].prompt_source; one of {', '.join(PROMPT_SOURCES)})"
        )
    files = _list_image_files(folder, bool(getattr(concept, "include_subdirectories", False)))
    for odd in sorted(p for p in folder.iterdir() if p.is_file() and is_misnamed_mask(p)):
        warn(f"Ignoring '{odd}': masks must be PNG files named <image name>{MASK_SUFFIX}.png")
    if not files:
        raise DatasetError(
            f"Concept {number}: folder '{folder}' holds no images "
            f"({', '.join(IMAGE_EXTENSIONS)}) (concepts[{index}].path)"
        )
    items = []
    uncaptioned: list[Path] = []
    for path in files:
        try:
            size = _check_image(path)
        except UnreadableImageError as error:
            warn(f"Skipping '{path}': {error.reason}")
            continue
        caption = _caption_for(path, concept, warn)
        if caption is None:
            uncaptioned.append(path)
        items.append(
            ImageItem(
                image_path=path,
                caption=caption or "",
                mask_path=_check_mask(mask_path_for(path), path, size, warn),
                loss_weight=float(getattr(concept, "loss_weight", 1.0)),
                concept_index=index,
                repeats=float(getattr(concept, "repeats", 1.0)),
                size=size,
                resolution=str(getattr(concept, "resolution", "") or "").strip(),
                crop_jitter=bool(getattr(concept, "crop_jitter", False)),
                random_flip=bool(getattr(concept, "random_flip", False)),
                regularization=_concept_type(concept) == "REGULARIZATION",
            )
        )
    _warn_uncaptioned(uncaptioned, folder, warn)
    if not items:
        raise DatasetError(
            f"Concept {number}: no usable image in folder '{folder}' "
            f"({len(files)} file(s) skipped as unreadable) (concepts[{index}].path)"
        )
    return items


def collect_items(concepts: Sequence[Any], warn: Callable[[str], None] | None = None) -> list[ImageItem]:
    """Every usable image of every enabled concept, listed once, in a stable order.

    `concepts`: objects with path, enabled, repeats, prompt_source, prompt, loss_weight and
    optionally include_subdirectories. Concepts that are disabled or have repeats 0 are not
    read at all. Unreadable images and masks are skipped with `warn(message)`; a missing
    folder, a folder without usable images, or nothing to train raises DatasetError.
    """
    warn = warn or log.warning
    items: list[ImageItem] = []
    for index, concept in enumerate(concepts):
        if not getattr(concept, "enabled", True):
            continue
        repeats = float(getattr(concept, "repeats", 1.0))
        if not math.isfinite(repeats) or repeats < 0:
            raise DatasetError(
                f"Concept {index + 1}: repeats must be a number >= 0, got {repeats} (concepts[{index}].repeats)"
            )
        if repeats == 0:
            continue
        items.extend(_collect_concept(concept, index, warn))
    if not items:
        raise DatasetError("No images to train on: every concept is disabled or has repeats 0 (concepts)")
    return items


# --------------------------------------------------------------------------------------------
# Epoch expansion (repeats)


def _entropy(value: int) -> int:
    """numpy seeds must be >= 0; fold any int (a negative seed too) into 64 bits."""
    return int(value) % (1 << 64)


def _concept_epoch_indices(indices: list[int], repeats: float, seed: int, epoch: int, concept: int) -> list[int]:
    """Item indices one concept contributes to an epoch.

    Every image `floor(repeats)` times, plus round(fraction * n) images taken in turn from a
    fixed shuffled order, so consecutive epochs take consecutive slices and every image comes
    round before any comes twice. A concept with repeats > 0 contributes at least one image.
    """
    n = len(indices)
    whole = int(math.floor(repeats))
    extra = int(math.floor((repeats - whole) * n + 0.5))
    if whole == 0 and extra == 0 and repeats > 0:
        extra = 1
    chosen = indices * whole
    if extra:
        order = np.random.default_rng([_entropy(seed), concept, 0x5EED]).permutation(n)
        start = epoch * extra
        chosen += [indices[order[(start + k) % n]] for k in range(extra)]
    return chosen


def epoch_indices(items: Sequence[ImageItem], seed: int, epoch: int) -> list[int]:
    """Item indices for one epoch (length is the same every epoch; the fractional share varies).
    Regularization items follow, as many as the others (kohya's balance)."""
    from trainer.regularization import regularization_epoch
    groups: dict[int, list[int]] = {}
    regularization: list[int] = []
    for i, item in enumerate(items):
        if item.regularization:
            regularization.append(i)
        else:
            groups.setdefault(item.concept_index, []).append(i)
    result: list[int] = []
    for concept, indices in groups.items():
        result += _concept_epoch_indices(indices, items[indices[0]].repeats, seed, epoch, concept)
    return result + regularization_epoch(regularization, len(result), seed, epoch)


def _concept_type(concept: Any) -> str:
    kind = getattr(concept, "type", "STANDARD")
    return getattr(kind, "value", kind)


# --------------------------------------------------------------------------------------------
# Geometry: the one transform the image and its mask share


def cover_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """The smallest size with the image's aspect ratio that covers the target (never stretch)."""
    scale = max(target_w / width, target_h / height)
    return max(target_w, round(width * scale)), max(target_h, round(height * scale))


def _pick_line(caption: str, rng: np.random.Generator) -> str:
    """A caption file with several lines holds alternatives (OneTrainer's convention): one per sample."""
    lines = [line.strip() for line in caption.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return lines[int(rng.integers(len(lines)))]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """HxWxC uint8 (or HxW) -> CxHxW float32 in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


@dataclass(frozen=True)
class Geometry:
    """The one transform an image and its mask share: scale to `resized` (covering the target,
    aspect kept), crop `box` = (left, top, right, bottom) in the resized image, then maybe
    mirror. `crop_top_left` is (top, left) as the model sees it (mirrored when flipped)."""

    target: tuple[int, int]          # (width, height)
    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool
    crop_top_left: tuple[int, int]


def sample_geometry(
    image_size: tuple[int, int],
    target: tuple[int, int],
    *,
    crop: Literal["center", "random"] = "center",
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> Geometry:
    """Where to crop an image of `image_size` for `target` (both (width, height)).

    A random crop draws (top, left) from `rng`, in that order; a centre crop draws nothing.
    """
    target_w, target_h = int(target[0]), int(target[1])
    width, height = int(image_size[0]), int(image_size[1])
    new_w, new_h = cover_size(width, height, target_w, target_h)
    if crop == "random":
        rng = rng if rng is not None else np.random.default_rng(0)
        top = int(rng.integers(new_h - target_h + 1))
        left = int(rng.integers(new_w - target_w + 1))
    else:
        top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    box = (left, top, left + target_w, top + target_h)
    seen_left = new_w - target_w - left if flip else left
    return Geometry((target_w, target_h), (new_w, new_h), box, bool(flip), (top, seen_left))


def apply_geometry(image: Image.Image, mask: Image.Image | None,
                   geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixel_values in [-1, 1] as CxHxW, mask in [0, 1] as 1xHxW or None)."""
    # Lanczos keeps photos sharp; the mask is a weight map, bilinear keeps grey edges honest.
    image = image.resize(geometry.resized, Image.Resampling.LANCZOS).crop(geometry.box)
    if mask is not None:
        mask = mask.resize(geometry.resized, Image.Resampling.BILINEAR).crop(geometry.box)
    if geometry.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if mask is not None:
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_tensor(image) * 2.0 - 1.0, (_to_tensor(mask) if mask is not None else None)


def load_item(item: ImageItem) -> tuple[Image.Image, Image.Image | None]:
    """The item's RGB image and its mask (resized to the image), or None without a mask."""
    image = load_image_rgb(item.image_path)
    mask = load_mask(item.mask_path, image.size, warn=None) if item.mask_path is not None else None
    return image, mask


def _sample_fields(item: ImageItem, geometry: Geometry, caption: str,
                   image_size: tuple[int, int]) -> dict:
    """What every sample carries besides its pixels or latents."""
    return {
        "caption": caption,
        "loss_weight": float(item.loss_weight),
        "image_path": str(item.image_path),
        "original_size": (int(image_size[1]), int(image_size[0])),  # (height, width)
        "crop_top_left": geometry.crop_top_left,
        "target_size": (geometry.target[1], geometry.target[0]),   # (height, width)
        "concept_index": item.concept_index,
    }


def prepare_sample(
    item: ImageItem,
    resolution: tuple[int, int],
    *,
    crop: Literal["center", "random"] = "center",
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> dict:
    """Load one item at `resolution` = (width, height). `flip` is the decision, not a chance.

    Usable on its own for bucketed or multi-resolution batches.
    `crop_top_left` is (top, left) of the crop in the resized image as the model sees it, i.e.
    mirrored when flipped: SDXL's crop conditioning then describes the picture trained on.
    `original_size` and `target_size` are (height, width), as SDXL's time ids want them.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    image, mask = load_item(item)
    geometry = sample_geometry(image.size, resolution, crop=crop, flip=flip, rng=rng)
    pixel_values, mask_tensor = apply_geometry(image, mask, geometry)
    target_w, target_h = geometry.target
    return {
        "pixel_values": pixel_values,
        "mask": mask_tensor if mask_tensor is not None else torch.ones(1, target_h, target_w),
        "has_mask": mask is not None,
        **_sample_fields(item, geometry, _pick_line(item.caption, rng), image.size),
    }


def latent_mask(mask: torch.Tensor | None, target: tuple[int, int], scale: int) -> torch.Tensor:
    """A 1xHxW pixel mask averaged down to latent size (ones without a mask): the same "area"
    downscale the loss applies to pixel masks, done once here so the cache can keep it."""
    height, width = target[1] // scale, target[0] // scale
    if mask is None:
        return torch.ones(1, height, width)
    return torch.nn.functional.interpolate(mask[None], size=(height, width), mode="area")[0]


class TrainDataset(torch.utils.data.Dataset):
    """One epoch of samples: items expanded by their concept's repeats.

    Deterministic: sample i of epoch e depends only on (seed, e, i). Call `set_epoch(e)` before
    each epoch so random crops/flips and fractional repeats differ between epochs yet replay
    the same on resume. With crop="center" and random_flip=False an item's pixels never change
    between epochs (safe to cache latents).

    An index is a sample number (trained at `resolution`) or `(sample, width, height, epoch)`
    as the bucket sampler yields it. Crop jitter and flips apply when the dataset or the item's
    concept asks for them. With a `latent_cache` (see trainer/data/cache.py) a sample whose
    latents are cached is returned without decoding its image: `latent_mean`/`latent_std`
    instead of `pixel_values`, and the mask at latent size.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        resolution: tuple[int, int] | int,
        random_flip: bool = False,
        crop: Literal["center", "random"] = "center",
        seed: int = 0,
    ):
        if not items:
            raise DatasetError("No images to train on (the dataset is empty)")
        if isinstance(resolution, int):
            resolution = (resolution, resolution)
        if len(resolution) != 2 or min(resolution) <= 0:
            raise ValueError(f"resolution must be (width, height) > 0, got {resolution!r}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.items = list(items)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.random_flip = bool(random_flip)
        self.crop = crop
        self.seed = int(seed)
        self.epoch = 0
        self.latent_cache = None  # set by the data pipeline once the VAE is known
        # An inpainting model's conditioning masks (trainer/inpainting.py): None for a plain
        # model; "files" (mask files where there are, random circles elsewhere) or "random".
        self.inpaint_masks: Literal["files", "random"] | None = None
        self._pool = None         # prefetch threads (see enable_prefetch)
        self._pending: dict = {}
        self._indices = epoch_indices(self.items, self.seed, self.epoch)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._indices = epoch_indices(self.items, self.seed, self.epoch)

    def __len__(self) -> int:
        return len(self._indices)

    def item_index(self, index: int) -> int:
        """The position in `items` of sample `index` of the current epoch."""
        return self._indices[index]

    def item_at(self, index: int) -> ImageItem:
        """The ImageItem behind sample `index` of the current epoch."""
        return self.items[self._indices[index]]

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([_entropy(self.seed), _entropy(self.epoch), index])

    # -- prefetch: decode the next batch in threads while the current one trains -----------

    def enable_prefetch(self, threads: int = 2) -> None:
        """Load samples announced by `prefetch` in background threads (Pillow's decode and
        resize release the GIL, so they overlap the training step). For a DataLoader without
        worker processes; a sample is the same whichever thread loads it."""
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="atelier-prefetch")

    def prefetch(self, refs: Sequence) -> None:
        """Start loading these indices (the batch after the next one)."""
        if self._pool is None:
            return
        if len(self._pending) > 4 * max(len(refs), 1):  # announced but never asked for
            self._pending.clear()
        for ref in refs:
            key = tuple(ref) if isinstance(ref, (tuple, list)) else ref
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._load, ref)

    def __getstate__(self):  # DataLoader workers get the dataset without the thread pool
        state = dict(self.__dict__)
        state["_pool"], state["_pending"] = None, {}
        return state

    def __getitem__(self, index) -> dict:
        if self._pool is not None:
            key = tuple(index) if isinstance(index, (tuple, list)) else index
            future = self._pending.pop(key, None)
            if future is not None:
                return future.result()
        return self._load(index)

    def _load(self, index) -> dict:
        if isinstance(index, (tuple, list)):
            if len(index) > 3 and int(index[3]) != self.epoch:
                # A DataLoader worker's copy of the dataset follows the sampler's epoch.
                self.set_epoch(int(index[3]))
            index, target = int(index[0]), (int(index[1]), int(index[2]))
        else:
            target = self.resolution
        if not 0 <= index < len(self):
            raise IndexError(index)
        item = self.item_at(index)
        rng = self._rng(index)
        # Draw the flip first so it does not depend on whether the crop consumed randomness.
        flip = (self.random_flip or item.random_flip) and bool(rng.random() < 0.5)
        crop = "random" if (self.crop == "random" or item.crop_jitter) else "center"
        if self.latent_cache is None:
            sample = prepare_sample(item, target, crop=crop, flip=flip, rng=rng)
            if self.inpaint_masks is not None:
                file_mask = sample["mask"] if sample["has_mask"] else None
                sample.update(self._inpainting_fields(index, sample["pixel_values"], file_mask,
                                                      target, latent_scale=None, masked_key=None))
            return sample
        return self._cached_sample(index, item, target, crop, flip, rng)

    def _inpainting_fields(self, index, pixels, file_mask, target, *, latent_scale,
                           masked_key) -> dict:
        """The conditioning mask (pixel size, or latent size with a cache) and the masked
        image of an inpainting model's sample; `masked_key` is where its latents may be
        cached, used only for a mask file (a random circle changes every epoch)."""
        use_file = self.inpaint_masks == "files" and file_mask is not None
        mask = file_mask if use_file else random_circle_mask(
            torch.ones_like(pixels[:1]), circle_rng(self.seed, self.epoch, index))
        return {
            "inpaint_mask": mask if latent_scale is None else latent_mask(mask, target,
                                                                         latent_scale),
            "masked_pixels": masked_pixels(pixels, mask),
            "masked_cache_key": masked_key if use_file else None,
        }

    def _cached_inpainting_fields(self, index, item, geometry, target, key, entry) -> dict:
        """An inpainting sample whose image latents came from the cache: its masked image's
        latents from the cache too where its mask is a file, else the image is decoded."""
        cache = self.latent_cache
        masked_key = cache.derived_key(key, "inpainting-masked-image")
        if self.inpaint_masks == "files" and "mask" in entry:
            masked = cache.load(masked_key)
            if masked is not None:
                return {"inpaint_mask": entry["mask"], "masked_latents": masked["mean"]}
        image, mask = load_item(item)
        pixels, mask_tensor = apply_geometry(image, mask, geometry)
        return self._inpainting_fields(index, pixels, mask_tensor, target,
                                       latent_scale=cache.latent_scale, masked_key=masked_key)

    def _cached_sample(self, index, item, target, crop, flip, rng) -> dict:
        cache = self.latent_cache
        size = item.size or oriented_size(item.image_path)
        geometry = sample_geometry(size, target, crop=crop, flip=flip, rng=rng)
        caption = _pick_line(item.caption, rng)
        key = cache.key(item, geometry)
        entry = cache.load(key) if key is not None else None
        if entry is not None:
            sample = {
                "latent_mean": entry["mean"],
                "latent_std": entry["std"],
                "mask": (entry["mask"] if "mask" in entry
                         else latent_mask(None, target, cache.latent_scale)),
                "has_mask": "mask" in entry,
                "cache_key": key,
                **_sample_fields(item, geometry, caption, size),
            }
            if self.inpaint_masks is not None:
                sample.update(self._cached_inpainting_fields(index, item, geometry, target,
                                                             key, entry))
            return sample
        image, mask = load_item(item)
        if image.size != tuple(size):  # the file changed since it was listed: no caching
            key = None
            rng = self._rng(index)
            if self.random_flip or item.random_flip:
                rng.random()
            geometry = sample_geometry(image.size, target, crop=crop, flip=flip, rng=rng)
            size = image.size
        pixel_values, mask_tensor = apply_geometry(image, mask, geometry)
        sample = {
            "pixel_values": pixel_values,
            "mask": latent_mask(mask_tensor, target, cache.latent_scale),
            "has_mask": mask is not None,
            "cache_key": key,
            **_sample_fields(item, geometry, caption, size),
        }
        if self.inpaint_masks is not None:
            masked_key = (cache.derived_key(key, "inpainting-masked-image")
                          if key is not None else None)
            sample.update(self._inpainting_fields(index, pixel_values, mask_tensor, target,
                                                  latent_scale=cache.latent_scale,
                                                  masked_key=masked_key))
        return sample


def collate(batch: Iterable[dict]) -> dict:
    """Stack a list of samples: tensors stacked, numbers as tensors, the rest as lists.

    Samples may carry pixels (`pixel_values`) or cached latents (`latent_mean`, `latent_std`);
    each kind is stacked on its own, and `pixel_index` / `latent_index` say which positions of
    the batch they are.
    """
    batch = list(batch)
    pixel_index = [i for i, s in enumerate(batch) if "pixel_values" in s]
    latent_index = [i for i, s in enumerate(batch) if "latent_mean" in s]
    out = {
        "mask": torch.stack([s["mask"] for s in batch]),
        "has_mask": torch.tensor([s["has_mask"] for s in batch], dtype=torch.bool),
        "loss_weight": torch.tensor([s["loss_weight"] for s in batch], dtype=torch.float32),
        "caption": [s["caption"] for s in batch],
        "image_path": [s["image_path"] for s in batch],
        "original_size": [s["original_size"] for s in batch],
        "crop_top_left": [s["crop_top_left"] for s in batch],
        "target_size": [s["target_size"] for s in batch],
        "concept_index": [s["concept_index"] for s in batch],
        "cache_key": [s.get("cache_key") for s in batch],
        "pixel_index": pixel_index,
        "latent_index": latent_index,
    }
    if pixel_index:
        out["pixel_values"] = torch.stack([batch[i]["pixel_values"] for i in pixel_index])
    if latent_index:
        out["latent_mean"] = torch.stack([batch[i]["latent_mean"] for i in latent_index])
        out["latent_std"] = torch.stack([batch[i]["latent_std"] for i in latent_index])
    if "inpaint_mask" in batch[0]:  # an inpainting model's conditioning (trainer/inpainting.py)
        out["inpaint_mask"] = torch.stack([s["inpaint_mask"] for s in batch])
        out["masked_cache_key"] = [s.get("masked_cache_key") for s in batch]
        # the masked image as pixels (to encode) or as cached latents, like the image itself
        for key, index_key in (("masked_pixels", "masked_pixel_index"),
                               ("masked_latents", "masked_latent_index")):
            out[index_key] = [i for i, s in enumerate(batch) if key in s]
            if out[index_key]:
                out[key] = torch.stack([batch[i][key] for i in out[index_key]])
    return out
