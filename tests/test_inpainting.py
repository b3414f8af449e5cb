"""Inpainting models (STABLE_DIFFUSION_15_INPAINTING, STABLE_DIFFUSION_XL_10_BASE_INPAINTING) on
the tiny 9-channel models: the UNet's inputs (mask from the mask file or a random circle, the
masked image's latents, unmasked samples), real LoRA and fine-tune trainings of both families,
samples drawn with the inpainting pipeline, and the outputs reloading in diffusers'
inpainting pipelines."""
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from trainer.config import ModelType
from trainer.control import Control
from trainer.errors import ModelLoadError
from trainer.inpainting import INPAINTING_IN_CHANNELS, random_circle_mask
from trainer.loop import train
from trainer.models.family import load_family

from helpers import read_metrics, tiny_config

SD15_INPAINTING = "STABLE_DIFFUSION_15_INPAINTING"
SDXL_INPAINTING = "STABLE_DIFFUSION_XL_10_BASE_INPAINTING"
SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
          "diffusion_steps": 4, "cfg_scale": 3.0}


@pytest.fixture(scope="module")
def sd15_inpaint_dir(tiny_sd15_inpaint_dir):
    return tiny_sd15_inpaint_dir


@pytest.fixture(scope="module")
def sdxl_inpaint_dir(tiny_sdxl_inpaint_dir):
    return tiny_sdxl_inpaint_dir


def inpaint_config(model_dir, tmp_path, model_type=SD15_INPAINTING, **overrides):
    data = {"model_type": model_type}
    if model_type == SDXL_INPAINTING:
        data["text_encoder_2"] = {"train": True, "stop_training_after_unit": "NEVER"}
    data.update(overrides)
    return tiny_config(model_dir, tmp_path, **data)


def render(pipe, image, mask):
    generator = torch.Generator("cpu").manual_seed(SAMPLE["seed"])
    out = pipe(SAMPLE["prompt"], image=image, mask_image=mask, strength=1.0,
               width=SAMPLE["width"], height=SAMPLE["height"],
               num_inference_steps=SAMPLE["diffusion_steps"], guidance_scale=SAMPLE["cfg_scale"],
               generator=generator).images[0]
    return np.asarray(out, dtype=np.int16)


def sample_inputs(workspace):
    folder = pathlib.Path(workspace) / "samples"
    return (Image.open(folder / "inpaint-input-0.png").convert("RGB"),
            Image.open(folder / "inpaint-input-0-masklabel.png"))


def loss_fell(config, share):
    losses = [r["loss"] for r in read_metrics(config)]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < share * first, (first, last)


# --- The tiny models and the loader -----------------------------------------------------------

def test_make_tiny_model_sd15_inpaint_from_the_command_line(tmp_path, capsys):
    from diffusers import StableDiffusionInpaintPipeline
    from trainer.cli import main
    assert main(["make-tiny-model", "sd15-inpaint", str(tmp_path / "m")]) == 0
    assert "SD 1.5 inpainting" in capsys.readouterr().out
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "m")
    assert pipe.unet.config.in_channels == INPAINTING_IN_CHANNELS
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionInpaintPipeline"


def test_sdxl_inpaint_model_loads_as_the_xl_inpainting_type(sdxl_inpaint_dir, tmp_path):
    family = load_family(inpaint_config(sdxl_inpaint_dir, tmp_path, SDXL_INPAINTING))
    assert family.inpainting and "text_encoder_2" in family.parts
    assert family.parts["unet"].config.in_channels == 9
    assert type(family.pipeline()).__name__ == "StableDiffusionXLInpaintPipeline"
    assert ModelType(SDXL_INPAINTING).is_sdxl and not ModelType(SD15_INPAINTING).is_sdxl


def test_a_plain_model_is_refused_for_an_inpainting_type_and_back(tiny_sd15_dir, sd15_inpaint_dir,
                                                                 tmp_path):
    with pytest.raises(ModelLoadError, match="model_type STABLE_DIFFUSION_15_INPAINTING") as err:
        load_family(inpaint_config(tiny_sd15_dir, tmp_path))
    assert "base_model_name" in str(err.value) and "4 input channels" in str(err.value)
    with pytest.raises(ModelLoadError, match="base_model_name.*inpainting model.*"
                                             "STABLE_DIFFUSION_15_INPAINTING"):
        load_family(inpaint_config(sd15_inpaint_dir, tmp_path, "STABLE_DIFFUSION_15"))


# --- What the UNet reads --------------------------------------------------------------------

def test_random_circle_is_a_disc_inside_the_mask():
    rng = np.random.default_rng(3)
    full = torch.ones(1, 40, 60)
    for _ in range(5):
        circle = random_circle_mask(full, rng)
        inside = circle[0] > 0
        assert 0 < int(inside.sum()) < 40 * 60  # a part of the image, never all or nothing
        ys, xs = torch.nonzero(inside, as_tuple=True)
        cy, cx = ys.float().mean(), xs.float().mean()
        radius = torch.sqrt(((ys - cy) ** 2 + (xs - cx) ** 2).max().float())
        farthest = max(np.hypot(y - float(cy), x - float(cx)) for y in (0, 39) for x in (0, 59))
        assert radius <= farthest + 1.5  # OneTrainer: radius <= 1.0 x the farthest masked pixel
    band = torch.zeros(1, 40, 60)
    band[:, 10:20] = 1
    assert torch.all(random_circle_mask(band, rng) <= band)  # mask x disc: never outside


@pytest.fixture()
def two_images(tmp_path):
    """Two 64 px images; only 'marked' has a mask (its left half white)."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("marked", "plain"):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} picture")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(folder / "marked-masklabel.png")
    return folder


def spy_on_the_step(monkeypatch):
    """Record each step's batch image paths, the UNet's input and the loss mask."""
    import trainer.batch_loss as batch_loss
    import trainer.loop as loop
    from trainer.models.sd15 import SD15Family
    seen = {"paths": [], "inputs": [], "loss_masks": []}
    real_to_device, real_predict, real_loss = (loop.to_device, SD15Family.predict,
                                               batch_loss.masked_sample_loss)

    def to_device(batch, device):
        seen["paths"].append([pathlib.Path(p).stem for p in batch["image_path"]])
        return real_to_device(batch, device)

    def predict(self, noisy, timesteps, conditioning):
        seen["inputs"].append(noisy.detach().clone())
        return real_predict(self, noisy, timesteps, conditioning)

    def loss(per_pixel, mask, **kwargs):
        seen["loss_masks"].append(None if mask is None else mask.clone())
        return real_loss(per_pixel, mask, **kwargs)

    monkeypatch.setattr(loop, "to_device", to_device)
    monkeypatch.setattr(SD15Family, "predict", predict)
    monkeypatch.setattr(batch_loss, "masked_sample_loss", loss)
    return seen


def by_image(seen):
    out = {}
    for paths, model_input, loss_mask in zip(seen["paths"], seen["inputs"], seen["loss_masks"]):
        for row, name in enumerate(paths):
            out.setdefault(name, []).append(
                (model_input[row], None if loss_mask is None else loss_mask[row]))
    return out


@pytest.mark.parametrize("latent_caching", [True, False])
def test_the_mask_file_is_the_fifth_channel_and_the_rest_get_new_circles(
        sd15_inpaint_dir, two_images, tmp_path, monkeypatch, latent_caching):
    seen = spy_on_the_step(monkeypatch)
    config = inpaint_config(sd15_inpaint_dir, tmp_path, concepts=[{"path": str(two_images)}],
                            masked_training=True, unmasked_probability=0.0,
                            unmasked_weight=0.25, batch_size=1, epochs=3,
                            latent_caching=latent_caching)
    train(config)
    steps = by_image(seen)
    assert len(steps["marked"]) == len(steps["plain"]) == 3
    file_mask = torch.zeros(1, 8, 8)
    file_mask[:, :, :4] = 1.0  # the left half, at latent size
    masked_latents = []
    for model_input, loss_mask in steps["marked"]:
        assert model_input.shape[0] == INPAINTING_IN_CHANNELS
        assert torch.equal(model_input[4:5], file_mask)
        assert torch.equal(loss_mask, file_mask)  # the loss weights the same mask
        masked_latents.append(model_input[5:])
    # a fixed mask, a fixed masked image (served from the cache after the first epoch)
    assert all(torch.allclose(m, masked_latents[0], atol=1e-5) for m in masked_latents)
    circles = [model_input[4:5] for model_input, _ in steps["plain"]]
    plain_latents = [model_input[5:] for model_input, _ in steps["plain"]]
    for circle in circles:  # no mask file: a random circle, part of the image
        assert 0 < float(circle.mean()) < 1 and not torch.equal(circle, file_mask)
    # new every epoch, and the masked image's latents follow it (never stale from a cache)
    assert not torch.equal(circles[0], circles[1]) and not torch.equal(circles[1], circles[2])
    assert not torch.allclose(plain_latents[0], plain_latents[1])


def test_unmasked_samples_see_all_ones_and_a_grey_image(sd15_inpaint_dir, two_images, tmp_path,
                                                        monkeypatch):
    seen = spy_on_the_step(monkeypatch)
    config = inpaint_config(sd15_inpaint_dir, tmp_path, concepts=[{"path": str(two_images)}],
                            masked_training=True, unmasked_probability=1.0, batch_size=2,
                            epochs=1)
    train(config)
    family = load_family(config)
    vae = family.vae
    with torch.no_grad():
        grey = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean[0] * vae.config.scaling_factor
    for model_input, loss_mask in by_image(seen)["marked"] + by_image(seen)["plain"]:
        assert torch.equal(model_input[4], torch.ones(8, 8))
        assert torch.allclose(model_input[5:], grey, atol=1e-5)
        assert torch.equal(loss_mask, torch.ones(1, 8, 8))


# --- Training, samples, outputs -------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_lora(sd15_inpaint_dir, tmp_path_factory):
    """150 LoRA steps with the demo's mask files, sampling at the last step."""
    tmp_path = tmp_path_factory.mktemp("sd15-inpaint-lora")
    config = inpaint_config(sd15_inpaint_dir, tmp_path, masked_training=True, epochs=50,
                            samples=[SAMPLE], sample_after=50, sample_after_unit="EPOCH")
    events = []
    return config, train(config, Control(on_event=events.append)), events


def test_sd15_inpainting_lora_learns_and_samples_with_the_inpaint_pipeline(sd15_lora,
                                                                        sd15_inpaint_dir):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
    config, result, events = sd15_lora
    loss_fell(config, 0.85)
    samples = [e for e in events if e["type"] == "sample"]
    assert samples and samples[-1]["step"] == result.global_step == 150
    trained = np.asarray(Image.open(samples[-1]["path"]), dtype=np.int16)
    image, mask = sample_inputs(config.workspace_dir)
    # the first training image (astronaut) with its own mask file, at the sample's size
    assert image.size == mask.size == (64, 64) and 0 < np.asarray(mask).mean() < 255

    pipe = StableDiffusionInpaintPipeline.from_pretrained(sd15_inpaint_dir, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe, image, mask)
    pipe.load_lora_weights(result.output_path)
    reloaded = render(pipe, image, mask)
    assert np.abs(reloaded - trained).max() <= 2     # the image drawn during training
    assert np.abs(reloaded - base).mean() > 2        # and not the base model's


def test_sdxl_inpainting_fine_tune_learns_and_reloads_as_a_diffusers_folder(sdxl_inpaint_dir,
                                                                           tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionXLInpaintPipeline
    config = inpaint_config(sdxl_inpaint_dir, tmp_path, SDXL_INPAINTING,
                            training_method="FINE_TUNE", learning_rate=1e-3, epochs=20,
                            output_model_format="DIFFUSERS", samples=[SAMPLE], sample_after=20,
                            sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    loss_fell(config, 0.7)
    samples = [e for e in events if e["type"] == "sample"]
    assert samples and samples[-1]["step"] == result.global_step
    trained = np.asarray(Image.open(samples[-1]["path"]), dtype=np.int16)
    image, mask = sample_inputs(config.workspace_dir)

    kwargs = {"add_watermarker": False}
    base_pipe = StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_inpaint_dir, **kwargs)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(result.output_path, **kwargs)
    assert pipe.unet.config.in_channels == INPAINTING_IN_CHANNELS
    for p in (base_pipe, pipe):
        p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
        p.set_progress_bar_config(disable=True)
    reloaded = render(pipe, image, mask)
    assert np.abs(reloaded - trained).max() <= 2
    assert np.abs(reloaded - render(base_pipe, image, mask)).mean() > 2


def test_sd15_inpainting_fine_tune_single_file_reloads_in_diffusers_and_in_atelier(
        sd15_inpaint_dir, tiny_sd15_dir, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline
    from trainer.models.sd15 import load_sd15
    config = inpaint_config(sd15_inpaint_dir, tmp_path, training_method="FINE_TUNE",
                            learning_rate=1e-3, epochs=1)
    result = train(config)
    with safe_open(result.output_path, "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1-inpainting"
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape()[1] == 9
    base = StableDiffusionInpaintPipeline.from_pretrained(sd15_inpaint_dir, safety_checker=None)
    pipe = StableDiffusionInpaintPipeline.from_single_file(
        result.output_path, config=str(sd15_inpaint_dir), local_files_only=True,
        safety_checker=None)
    changed = [not torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(),
                                                      base.unet.state_dict().values())]
    assert pipe.unet.config.in_channels == INPAINTING_IN_CHANNELS and any(changed)
    # Atelier's own loader reads the 9 channels from the file, even with a 4-channel config
    components = load_sd15(result.output_path, single_file_config=tiny_sd15_dir)
    assert components.unet.config.in_channels == INPAINTING_IN_CHANNELS
    assert torch.equal(components.unet.conv_in.weight, pipe.unet.conv_in.weight)
