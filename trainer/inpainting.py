"""Inpainting models: what their UNet reads besides the noisy latents, and where Atelier gets it.

An inpainting UNet (model_type STABLE_DIFFUSION_15_INPAINTING or
STABLE_DIFFUSION_XL_10_BASE_INPAINTING) takes 9 input channels, in this order (as OneTrainer
and diffusers' inpainting pipelines build them):

1. the noisy latents (4 channels);
2. the conditioning mask (1 channel): the pixel mask averaged down to latent size ("area"),
   not scaled. 1/white = the region to inpaint;
3. the masked image's latents (4 channels): `image * (1 - mask) + 0.5 * mask` in [0, 1] (the
   inpaint region mid-grey; 0 in [-1, 1]), VAE-encoded, the distribution's mean, times the
   VAE's scaling_factor.

Where the conditioning mask comes from, per sample:
- masked_training on and the image has a `<name>-masklabel.png`: that mask (after the same
  resize, crop and flip as the image), as OneTrainer does.
- otherwise (no mask file, or masked_training off): a random circle, OneTrainer's
  `RandomCircularMaskShrink` applied to a full white mask: a random point inside the mask,
  radius = U(0.2, 1.0) x the largest distance from it to any masked pixel, mask x disc. It is
  drawn anew for every sample of every epoch, from (seed, epoch, sample), so a resumed run
  draws the same circles. (OneTrainer's default there is the full white mask, its circle
  being an opt-in concept setting; a full mask only teaches redrawing the whole picture,
  which the unmasked samples below already do, so Atelier always draws the circle.)

Unmasked samples (OneTrainer's `RandomLatentMaskRemove`, which it applies to every inpainting
model): with probability unmasked_probability a sample's conditioning mask becomes all ones
and its masked-image latents the encoding of a mid-grey image, so the model also learns to
draw a whole picture. With masked_training on, the loss is weighted by the same mask (one
mask, as in OneTrainer): the inpaint region fully, the rest by unmasked_weight; an unmasked
sample is weighted evenly.

Latent caching: the masked image's latents are cached only where the mask is fixed, i.e. a
mask file under masked_training (an entry of its own beside the sample's, keyed by the
sample's key, which already covers the image, the mask file, the crop and the VAE). A random
circle changes every epoch, so its masked image is encoded at every step, never served from a
cache (the image's own latents still are). OneTrainer instead caches one circle per cached
"variation", so each image keeps its first circle; Atelier keeps the circles random.

Samples during training are drawn with diffusers' inpainting pipeline on the first training
image (centre-cropped to the sample's size), inpainting its mask file's region when it has
one, else a centred rectangle of half the width and height.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.errors import ModelLoadError

INPAINTING_IN_CHANNELS = 9
PLAIN_IN_CHANNELS = 4
# OneTrainer's RandomCircularMaskShrink factor range
CIRCLE_MIN_FACTOR, CIRCLE_MAX_FACTOR = 0.2, 1.0
# A stream of its own for the circles, so drawing them changes no other draw of the dataset.
CIRCLE_STREAM = 0x1C1C


# --- The model ------------------------------------------------------------------------------

def check_unet_channels(unet: torch.nn.Module, model_type, base_model_name: str) -> None:
    """Refuse a UNet whose input does not fit the model type: a plain model for an
    inpainting type, or an inpainting model for a plain one."""
    channels = int(unet.config.in_channels)
    wanted = INPAINTING_IN_CHANNELS if model_type.is_inpainting else PLAIN_IN_CHANNELS
    if channels == wanted:
        return
    if model_type.is_inpainting:
        raise ModelLoadError(
            f"base_model_name: '{base_model_name}' is not an inpainting model (its UNet takes "
            f"{channels} input channels, an inpainting UNet {INPAINTING_IN_CHANNELS}: latents, "
            f"mask, masked image). model_type {model_type.value} needs an inpainting model; "
            f"for this model choose model_type {model_type.plain.value}.")
    if channels == INPAINTING_IN_CHANNELS:
        raise ModelLoadError(
            f"base_model_name: '{base_model_name}' is an inpainting model (its UNet takes "
            f"{channels} input channels); choose model_type {model_type.value}_INPAINTING "
            "for it.")
    raise ModelLoadError(
        f"base_model_name: '{base_model_name}' has a UNet with {channels} input channels; "
        f"model_type {model_type.value} needs {wanted}.")


# --- Masks (the dataset's side) ---------------------------------------------------------------

def circle_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**64, int(epoch) % 2**64, int(index), CIRCLE_STREAM])


def random_circle_mask(mask: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """OneTrainer's RandomCircularMaskShrink (probability 1): `mask` (1xHxW, 1 = inpaint)
    times a disc around a random masked pixel, its radius U(0.2, 1.0) x the largest distance
    from that pixel to any masked pixel. An empty mask stays empty."""
    array = mask[0].numpy()
    ys, xs = np.nonzero(array > 0)
    if len(ys) == 0:
        return mask.clone()
    pick = int(rng.integers(len(ys)))
    cy, cx = float(ys[pick]), float(xs[pick])
    farthest = float(np.sqrt(((ys - cy) ** 2 + (xs - cx) ** 2).max()))
    radius = float(rng.uniform(CIRCLE_MIN_FACTOR, CIRCLE_MAX_FACTOR)) * farthest
    height, width = array.shape
    grid_y, grid_x = np.ogrid[:height, :width]
    disc = ((grid_y - cy) ** 2 + (grid_x - cx) ** 2) <= radius ** 2
    return mask * torch.from_numpy(disc.astype(np.float32))[None]


def masked_pixels(pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked image in [-1, 1]: `image * (1 - mask) + 0.5 * mask` in [0, 1], i.e. the
    inpaint region mid-grey (0 here). Grey mask values blend."""
    return pixel_values * (1.0 - mask)


# --- The step's side --------------------------------------------------------------------------

def _encode_mean(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's mean latents (unscaled), as OneTrainer's SampleVAEDistribution(mode='mean')."""
    dtype = next(vae.parameters()).dtype
    return vae.encode(pixels.to(dtype)).latent_dist.mean.float()


class InpaintingInputs:
    """The 5 extra UNet channels (mask, masked-image latents) of a batch, on the device.

    The batch carries per sample the conditioning mask (`inpaint_mask`, pixel or latent size)
    and either the masked image's pixels (`masked_pixels`, encoded here and stored in the
    latent cache when the sample has a `masked_cache_key`) or its cached latents
    (`masked_latents`)."""

    def __init__(self, vae, cache=None):
        self.vae = vae
        self.cache = cache
        self._grey: dict[tuple, torch.Tensor] = {}  # the frozen VAE's grey image, per size

    def grey_latents(self, size: tuple[int, int], device) -> torch.Tensor:
        """Scaled latents (1x4xhxw) of a mid-grey image (all zeros in [-1, 1])."""
        key = (size, str(device))
        if key not in self._grey:
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            pixels = torch.zeros(1, 3, size[0] * scale, size[1] * scale, device=device)
            with torch.no_grad():
                self._grey[key] = _encode_mean(self.vae, pixels) * self.vae.config.scaling_factor
        return self._grey[key]

    @torch.no_grad()
    def __call__(self, batch: dict, size: tuple[int, int], device,
                 unmasked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask Bx1xhxw, masked-image latents Bx4xhxw) at latent size `size` = (h, w);
        samples flagged in `unmasked` (a host bool tensor) get all ones and grey latents."""
        mask = batch["inpaint_mask"].to(device, torch.float32, copy=True)
        mask = torch.nn.functional.interpolate(mask, size=size, mode="area")
        latents = torch.empty(mask.shape[0], 4, *size, device=device)
        pixel_index = batch.get("masked_pixel_index", [])
        if pixel_index:
            means = _encode_mean(self.vae, batch["masked_pixels"].to(device))
            latents[pixel_index] = means
            keys = batch.get("masked_cache_key") or [None] * mask.shape[0]
            if self.cache is not None:
                for row, position in enumerate(pixel_index):
                    if keys[position] is not None:
                        self.cache.store_tensors(keys[position], {"mean": means[row]})
        latent_index = batch.get("masked_latent_index", [])
        if latent_index:
            latents[latent_index] = batch["masked_latents"].to(device, torch.float32)
        latents = latents * self.vae.config.scaling_factor
        if bool(unmasked.any()):
            rows = unmasked.to(device, non_blocking=True)
            mask[rows] = 1.0
            latents[rows] = self.grey_latents(size, device).expand(int(unmasked.sum()), -1, -1, -1)
        return mask, latents


# --- Samples ----------------------------------------------------------------------------------

def sample_image_and_mask(item, width: int, height: int) -> tuple[Image.Image, Image.Image]:
    """What training samples inpaint: the first training image centre-cropped to the sample's
    size, and its mask file (same crop) or a centred rectangle of half its width and height."""
    from trainer.data.dataset import apply_geometry, load_item, sample_geometry

    image, mask = load_item(item)
    geometry = sample_geometry(image.size, (width, height))
    pixels, mask_tensor = apply_geometry(image, mask, geometry)
    picture = Image.fromarray(((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
                              .to(torch.uint8).numpy())
    if mask_tensor is None:
        mask_tensor = torch.zeros(1, height, width)
        mask_tensor[:, height // 4:height // 4 + height // 2,
                    width // 4:width // 4 + width // 2] = 1.0
    mask_image = Image.fromarray((mask_tensor[0] * 255).round().to(torch.uint8).numpy())  # "L"
    return picture, mask_image


def save_sample_input(folder: Path, index: int, image: Image.Image, mask: Image.Image) -> None:
    """The image and mask a sample inpaints, saved once beside the samples for reference."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, picture in ((f"inpaint-input-{index}.png", image),
                          (f"inpaint-input-{index}-masklabel.png", mask)):
        path = folder / name
        if not path.exists():
            picture.save(path)
