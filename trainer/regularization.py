"""Keeping what the base model knew (issue 28): the concept types PRIOR_PREDICTION (OneTrainer's:
the base model's own prediction, adapters switched off, is the target), REGULARIZATION (kohya's
reg images: trained at `prior_loss_weight`, balanced against the standard concepts) and
OneTrainer's masked prior preservation (outside the mask the LoRA is held to the base model's
prediction). The batch loss (trainer/batch_loss.py) asks this module which rows are which and
for the prior prediction; the dataset asks it which regularization images an epoch takes."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from trainer.config import ConceptType, TrainConfig, TrainingMethod
from trainer.errors import ConfigError


def check_regularization(config: TrainConfig) -> None:
    """Refuse what has no meaning, naming the key: a prior prediction needs adapters to switch
    off (OneTrainer: LoRA only; a fine-tune would need a frozen copy of the whole model in
    memory, an embedding run has no adapter), and regularization images are balanced against
    the other concepts, so one of those must train."""
    lora = config.training_method == TrainingMethod.LORA
    enabled = [(i, c) for i, c in enumerate(config.concepts) if c.enabled and c.repeats > 0]
    for index, concept in enabled:
        if concept.type == ConceptType.PRIOR_PREDICTION and not lora:
            raise ConfigError(
                f"concepts[{index}].type = PRIOR_PREDICTION needs a LoRA: its target is the base "
                "model's prediction with the adapters switched off, and a "
                f"{config.training_method.value} run has no adapters to switch off. Use "
                "REGULARIZATION (class images) instead, or train a LoRA.")
    if config.masked_prior_preservation_weight > 0:
        if not lora:
            raise ConfigError(
                "masked_prior_preservation_weight needs a LoRA (the base model's prediction is "
                f"the LoRA's adapters switched off); set it to 0 for a "
                f"{config.training_method.value} run.")
        if not config.masked_training:
            raise ConfigError(
                "masked_prior_preservation_weight holds the area outside each mask to the base "
                "model, so it needs masked_training on; turn that on or set the weight to 0.")
    kinds = {c.type for _, c in enabled}
    if kinds == {ConceptType.REGULARIZATION}:
        raise ConfigError(
            "concepts: a REGULARIZATION concept takes as many images per epoch as the other "
            "concepts have, and every enabled concept is a REGULARIZATION one; add the images "
            "to learn as a STANDARD concept.")


def concept_rows(batch: dict, config: TrainConfig, kind: ConceptType) -> list[int]:
    """The rows of `batch` whose concept is of type `kind`."""
    concepts = config.concepts
    return [row for row, index in enumerate(batch["concept_index"])
            if concepts[index].type == kind]


def needs_prior(config: TrainConfig, prior_rows: Sequence[int]) -> bool:
    """Whether this batch needs the base model's prediction: it holds PRIOR_PREDICTION rows,
    or masked prior preservation is on (then for every row, as OneTrainer)."""
    return bool(prior_rows) or (config.masked_training
                                and config.masked_prior_preservation_weight > 0)


def _tuner_layers(part: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in part.modules() if isinstance(m, BaseTunerLayer)]


class AdapterSwitch:
    """The peft adapter layers of a family's parts, found once (a walk over every module of
    the UNet or transformer is not done again at each prior batch)."""

    def __init__(self, parts: dict[str, torch.nn.Module]):
        by_part = {name: _tuner_layers(m) for name, m in parts.items() if m is not None}
        self.layers = [layer for found in by_part.values() for layer in found]
        # text encoders with adapters: their outputs differ from the base model's
        self.text_encoders = any(found for name, found in by_part.items()
                                 if name.startswith("text_encoder"))

    @contextlib.contextmanager
    def off(self) -> Iterator[bool]:
        """Every adapter switched off inside the block: the model is its base. Yields whether
        a text encoder had adapters. peft's switch also sets requires_grad on the adapters;
        their flags are put back as they were, so a frozen adapter stays frozen."""
        flags = [(p, p.requires_grad) for layer in self.layers for p in layer.parameters()]
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            yield self.text_encoders
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)
            for parameter, flag in flags:
                parameter.requires_grad_(flag)


def regularization_epoch(reg_indices: Sequence[int], count: int, seed: int,
                         epoch: int) -> list[int]:
    """The `count` regularization items of one epoch (kohya's balance: as many as the other
    concepts' samples with repeats), taken in turn from one seeded order of all of them, so
    that every image comes round before any comes twice and later epochs continue where the
    previous one stopped (kohya takes the same first ones every epoch when there are more)."""
    n = len(reg_indices)
    if not n or count <= 0:
        return []
    order = np.random.default_rng([int(seed) % (1 << 64), 0x5E6]).permutation(n)
    start = epoch * count
    return [reg_indices[order[(start + k) % n]] for k in range(count)]
