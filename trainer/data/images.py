"""Reading training images and masks from disk, whatever their format.

Users bring photos from phones (EXIF-rotated JPEGs), screenshots (RGBA PNGs), scans (16-bit
grayscale TIFFs), print files (CMYK) and now and then a broken download. Every one of them must
either become a plain 8-bit RGB image or be refused with a message naming the file; never a
stack trace, and never silently wrong pixels (black where the picture was transparent, white
where a 16-bit grey was clipped).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.errors import DatasetError

# Lower-case suffixes without the dot. GIF is left out on purpose: it is usually animated and
# always palette-limited, which makes poor training data.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")

# `<image stem>-masklabel.png` beside the image (SPEC §2, the OneTrainer convention).
MASK_SUFFIX = "-masklabel"
MASK_EXTENSION = ".png"

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WHITE = (255, 255, 255)


class UnreadableImageError(DatasetError):
    """An image (or mask) file that cannot be decoded. `reason` is the short human part."""

    def __init__(self, path: Path | str, reason: str, kind: str = "image"):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"Cannot read {kind} '{path}': {reason}")


def is_mask_file(path: Path) -> bool:
    """True for `<stem>-masklabel.png`: such a file is a mask, never a training image."""
    return path.suffix.lower() == MASK_EXTENSION and path.stem.lower().endswith(MASK_SUFFIX)


def is_misnamed_mask(path: Path) -> bool:
    """`<stem>-masklabel.jpg` and the like: meant as a mask, but masks are PNG (lossless, one
    channel). Never a training image either; the dataset warns about it."""
    return path.stem.lower().endswith(MASK_SUFFIX) and not is_mask_file(path)


def is_image_file(path: Path) -> bool:
    """A file that may be a training image: a known extension, not a mask, not hidden.

    Hidden files are skipped because macOS leaves `._photo.jpg` resource forks beside every
    copied photo; they carry an image extension but are not images.
    """
    return (
        path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and not is_mask_file(path)
        and not is_misnamed_mask(path)
    )


def mask_path_for(image_path: Path) -> Path:
    """Where the mask of `image_path` lives (it may not exist)."""
    return image_path.with_name(image_path.stem + MASK_SUFFIX + MASK_EXTENSION)


# --------------------------------------------------------------------------------------------
# Decoding


def _explain(error: Exception) -> str:
    """A short reason a person understands, from whatever Pillow raised."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file, or a format Pillow cannot read"
    if isinstance(error, Image.DecompressionBombError):
        return f"the image is too large to load safely ({error})"
    text = str(error) or type(error).__name__
    if "truncated" in text.lower():
        return f"the file is truncated or corrupt ({text})"
    return f"the file is corrupt or unsupported ({text})"


def open_image(path: Path | str, *, draft: bool = False, kind: str = "image") -> Image.Image:
    """Open and fully decode `path`, applying its EXIF orientation.

    `draft=True` lets JPEGs decode at a reduced scale: it still reads every byte (so truncated
    files are caught), but several times faster; for checking files, not for training.
    Raises UnreadableImageError naming the file.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImageError(path, "the file is empty (0 bytes)", kind)
    except OSError as error:  # missing, a folder, no permission
        raise UnreadableImageError(path, error.strerror or str(error), kind) from None
    try:
        with Image.open(path) as image:
            if draft:
                image.draft("RGB", (1, 1))
            # .load() forces the full decode: Image.open only reads the header, so a truncated
            # file would otherwise pass here and fail later, in the middle of training.
            image.load()
            return _apply_orientation(image)
    except UnreadableImageError:
        raise
    # Any failure while decoding a user's file means the same thing, "this file is unusable",
    # and Pillow's plugins raise many types on bad data (OSError, SyntaxError, ValueError,
    # struct.error, IndexError ...): catch them all here, at the boundary.
    except Exception as error:  # noqa: BLE001
        raise UnreadableImageError(path, _explain(error), kind) from None


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate/mirror as the EXIF orientation says; a broken EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - malformed EXIF must not cost the user a photo
        return image.copy()


def oriented_size(path: Path | str) -> tuple[int, int]:
    """(width, height) of the image as displayed (after EXIF rotation), from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001
            orientation = 1
    # Orientations 5-8 transpose the image (90 or 270 degree turns).
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# --------------------------------------------------------------------------------------------
# Colour conversion


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit ("I;16*"), 32-bit integer ("I") or float ("F") grayscale -> 8-bit "L".

    Pillow's own convert("L") clips these to 0..255, which turns almost every 16-bit photo
    white. Scale instead: 16-bit by 65535 -> 255. "I" and "F" carry no declared range, so take
    it from the data: values above 255 (above 1.0 for float) mean a 16-bit (0..1) image.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        scale = 255.0 / 65535.0
    elif image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        scale = 255.0
    elif values.size and np.nanmax(values) > 255:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    values = np.nan_to_num(values * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite a transparent image on a solid background and drop the alpha channel.

    A plain convert("RGB") keeps whatever colour hides under alpha 0, often black or noise.
    """
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = _WHITE) -> Image.Image:
    """Any Pillow image -> 8-bit RGB (transparent areas become `background`)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_bit_depth_to_8bit(image)
    if _has_transparency(image):
        return _flatten(image, background)
    if image.mode == "RGB":
        return image
    # L, 1, P, CMYK, YCbCr ...: Pillow converts these correctly.
    return image.convert("RGB")


def load_image_rgb(path: Path | str) -> Image.Image:
    """Open any supported image as 8-bit RGB, upright, transparency composited on white.

    Raises UnreadableImageError (a DatasetError) naming the file when it cannot be decoded.
    """
    image = open_image(path)
    try:
        return to_rgb(image)
    except Exception as error:  # noqa: BLE001 - e.g. LAB/HSV, which Pillow cannot convert
        raise UnreadableImageError(path, f"unsupported colour mode {image.mode} ({error})") from None


# --------------------------------------------------------------------------------------------
# Masks


def to_mask_l(image: Image.Image) -> Image.Image:
    """Any Pillow image -> single-channel 8-bit "L" mask (white = train, black = ignore).

    Transparent areas count as black: a mask painted on a transparent layer marks only what
    was painted.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_bit_depth_to_8bit(image)
    if _has_transparency(image):
        image = _flatten(image, (0, 0, 0))
    return image if image.mode == "L" else image.convert("L")


def load_mask(
    path: Path | str,
    size: tuple[int, int],
    warn: Callable[[str], None] | None = warnings.warn,
) -> Image.Image:
    """Load `<stem>-masklabel.png` as an "L" image of `size` = (width, height).

    A mask of another size is resized (bilinear) to the image and `warn` is told; pass
    warn=None where the mismatch was already reported (the dataset warns once, at collect
    time, not on every epoch).
    """
    mask = to_mask_l(open_image(path, kind="mask"))
    size = (int(size[0]), int(size[1]))
    if mask.size != size:
        if warn is not None:
            warn(
                f"Mask '{path}' is {mask.width}x{mask.height} but its image is "
                f"{size[0]}x{size[1]}; the mask is resized to fit"
            )
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask
