"""The loss of one batch, the same for every family: latents (or cached ones), the captions'
conditioning with the family's caption dropout, the family's objective (noise, timesteps,
target: DDPM or flow matching), the prediction, and the weighting by masks, the objective's
per-sample weight (min-SNR, SIGMA) and the concepts' loss weights."""
from __future__ import annotations

import random

import torch

from trainer.config import ConceptType, TrainConfig
from trainer.loss import masked_prior_loss, masked_sample_loss, pixel_loss, sample_noise
from trainer.regularization import AdapterSwitch, concept_rows, needs_prior


class BatchLoss:
    """`loss(batch, grad)` -> the batch's mean loss; `grad`: which parts' outputs need a
    gradient this step (trained parts, and encoders whose embeddings train)."""

    def __init__(self, config: TrainConfig, family, data, device: torch.device,
                 generator: torch.Generator, inpainting=None):
        self.config, self.family, self.data = config, family, data
        self.device, self.generator = device, generator
        self.inpainting = inpainting  # an inpainting UNet's mask + masked image (or None)
        self.adapters: AdapterSwitch | None = None  # found at the first prior prediction

    def __call__(self, batch: dict, grad: dict[str, bool]) -> torch.Tensor:
        config, family, data, device = self.config, self.family, self.data, self.device
        latents = data.latents(batch, family.vae, self.generator, device)  # or cached
        # Caption dropout as the family was trained: SD 1.5 encodes an empty caption, SDXL
        # and the transformers zero each text encoder's output with that encoder's probability.
        dropout_draws = random.getstate()  # the prior prediction drops the same captions
        conditioning = family.caption_dropout(batch["caption"], self.encoder(batch, grad))
        noise = sample_noise(latents.shape, self.generator, latents.device,
                             config.offset_noise_weight)
        noised = family.objective.noised(latents, noise, self.generator)
        # Per sample: trained without its mask with probability unmasked_probability (with
        # masked training; for an inpainting model always, as OneTrainer).
        unmasked = None
        if config.masked_training or self.inpainting is not None:
            unmasked = torch.rand(latents.shape[0]) < config.unmasked_probability
        model_input, inpaint_mask = noised.noisy, None
        if self.inpainting is not None:  # 9 channels: latents, mask, masked image's latents
            inpaint_mask, masked_latents = self.inpainting(batch, latents.shape[-2:], device,
                                                           unmasked)
            model_input = torch.cat([model_input, inpaint_mask.to(model_input.dtype),
                                     masked_latents.to(model_input.dtype)], dim=1)
        # The base model's prediction (before the trained one: its activations are freed
        # first), for PRIOR_PREDICTION rows' targets and masked prior preservation.
        target, prior = noised.target, None
        prior_rows = concept_rows(batch, config, ConceptType.PRIOR_PREDICTION)
        if needs_prior(config, prior_rows):
            prior = self.prior_prediction(batch, grad, model_input, noised.timesteps,
                                          conditioning, dropout_draws).to(target.dtype)
            if prior_rows:
                target = target.clone()
                target[prior_rows] = prior[prior_rows]
        prediction = family.predict(model_input, noised.timesteps, conditioning)

        mask = self.loss_mask(batch, inpaint_mask, unmasked, latents.shape[-2:])
        loss = masked_sample_loss(self.pixel_loss(prediction, target), mask,
                                  unmasked_weight=config.unmasked_weight,
                                  normalize=config.normalize_masked_area_loss)
        if prior is not None and mask is not None and config.masked_prior_preservation_weight:
            loss = loss + masked_prior_loss(self.pixel_loss(prediction, prior), mask,
                                            unmasked_weight=config.unmasked_weight,
                                            normalize=config.normalize_masked_area_loss,
                                            weight=config.masked_prior_preservation_weight)
        if noised.weight is not None:  # min-SNR-γ, or flow matching's SIGMA weighting
            loss = loss * noised.weight
        weights = self.sample_weights(batch)  # per sample, from the concepts; usually all 1
        if bool((weights != 1).any()):  # decided on the host copy: no GPU read
            loss = loss * weights.to(loss.device, loss.dtype, non_blocking=True)
        return loss.mean()

    def encoder(self, batch: dict, grad: dict[str, bool]):
        """captions -> the conditioning, from the text cache where it can (frozen encoders)."""
        config, family, data = self.config, self.family, self.data
        return lambda captions: data.conditioning(
            family, captions, batch, clip_skip=config.text_encoder.clip_skip,
            device=self.device, grad=grad)

    def prior_prediction(self, batch: dict, grad: dict[str, bool], model_input: torch.Tensor,
                         timesteps: torch.Tensor, conditioning: dict,
                         dropout_draws) -> torch.Tensor:
        """The base model's prediction on the same noisy input: every adapter switched off, no
        gradient. When text encoders have adapters their base outputs are encoded again, with
        the same captions dropped (Python's random stream replayed from `dropout_draws`)."""
        family = self.family
        if self.adapters is None:
            self.adapters = AdapterSwitch(family.parts)
        with torch.no_grad(), self.adapters.off() as text_changed:
            if text_changed:
                after = random.getstate()
                random.setstate(dropout_draws)
                conditioning = family.caption_dropout(
                    batch["caption"], self.encoder(batch, dict.fromkeys(grad, False)))
                random.setstate(after)
            return family.predict(model_input, timesteps, conditioning)

    def pixel_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        config = self.config
        return pixel_loss(prediction, target, mse_strength=config.mse_strength,
                          mae_strength=config.mae_strength, huber_strength=config.huber_strength,
                          huber_delta=config.huber_delta)

    def sample_weights(self, batch: dict) -> torch.Tensor:
        """Each row's concept loss weight, times prior_loss_weight for REGULARIZATION rows."""
        weights = batch["loss_weight"]
        reg_rows = concept_rows(batch, self.config, ConceptType.REGULARIZATION)
        if reg_rows and self.config.prior_loss_weight != 1:
            weights = weights.clone()
            weights[reg_rows] *= self.config.prior_loss_weight
        return weights

    def loss_mask(self, batch: dict, inpaint_mask, unmasked, size) -> torch.Tensor | None:
        """The masked-training weight of each latent pixel (None: unmasked training)."""
        if not self.config.masked_training:
            return None
        if inpaint_mask is not None:
            return inpaint_mask  # one mask, as OneTrainer: the loss weights the inpaint region
        # a copy: the batch's tensor may be shared with a cache, never write into it
        mask = batch["mask"].to(self.device, torch.float32, copy=True)
        mask[unmasked.to(mask.device, non_blocking=True)] = 1.0
        return torch.nn.functional.interpolate(mask, size=size, mode="area")
