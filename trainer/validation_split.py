"""Which images a run validates on instead of training (issue 27): every image of a VALIDATION
concept, and with `validation_split` a seeded share of each STANDARD concept's images (kohya's
idea). No tensors here: the step estimate (trainer/limits.py) counts with the same rule."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SPLIT_LIST = "validation_split.txt"


def held_out_count(images: int, share: float) -> int:
    """How many of a concept's `images` the split holds out: round(share · n), at least one
    when the share is above 0, and never all of them (one is always trained)."""
    if share <= 0 or images < 2:
        return 0
    return min(max(1, math.floor(share * images + 0.5)), images - 1)


def concept_kind(concept) -> str:
    kind = getattr(concept, "type", "STANDARD")
    return getattr(kind, "value", kind)


def split_items(items: list, concepts, share: float, seed: int) -> tuple[list, list]:
    """(items to train, items to validate on). `items`: collect_items' ImageItems (each with
    its concept_index). The held-out images of a concept are the first of one permutation
    seeded by (seed, concept), so the same seed holds out the same images."""
    by_concept: dict[int, list] = {}
    for item in items:
        by_concept.setdefault(item.concept_index, []).append(item)
    train, validate = [], []
    for index, group in by_concept.items():
        kind = concept_kind(concepts[index])
        if kind == "VALIDATION":
            validate += group
            continue
        held = held_out_count(len(group), share) if kind == "STANDARD" else 0
        order = np.random.default_rng([int(seed) % (1 << 64), index, 0x7A1]).permutation(
            len(group))
        chosen = {int(i) for i in order[:held]}
        for position, item in enumerate(group):
            (validate if position in chosen else train).append(item)
    return train, validate


def write_split_list(folder: Path, held_out: list, concepts) -> Path:
    """The held-out images of the split, one path per line, beside the run's metrics."""
    from trainer.io import atomic_write_text
    lines = [str(item.image_path) for item in held_out
             if concept_kind(concepts[item.concept_index]) != "VALIDATION"]
    path = Path(folder) / SPLIT_LIST
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))
    return path


def concept_labels(concepts) -> dict[int, str]:
    """Each concept's name in the metrics (`validation_loss/<name>`): its folder's name, with
    (2), (3) … where two folders share one."""
    labels: dict[int, str] = {}
    used: set[str] = set()
    for index, concept in enumerate(concepts):
        base = Path(str(concept.path)).name or f"concept {index + 1}"
        label, n = base, 1
        while label in used:
            n += 1
            label = f"{base}({n})"
        used.add(label)
        labels[index] = label
    return labels


def training_and_validation(config, items: list, *, warn, write_list: bool) -> tuple[list, list]:
    """(items to train, items to validate on) for a run. Validation off: VALIDATION concepts'
    images are left out (said once) and nothing is split. Validation on with nothing to
    validate on is refused, naming the keys; so is a run left with nothing to train."""
    from trainer.errors import ConfigError, DatasetError
    share = config.validation_split if config.validation else 0.0
    train, validate = split_items(items, config.concepts, share, config.seed)
    if not config.validation:
        if validate:
            warn(f"{len(validate)} image(s) of VALIDATION concepts are not used: validation is "
                 "off (switch on 'Validation loss' to measure them).")
        validate = []
    elif not validate:
        raise ConfigError("validation: no image to validate on; add a concept of type "
                          "VALIDATION, or set validation_split to hold out a share of the "
                          "standard concepts' images.")
    if not train:
        raise DatasetError("No images to train on: every enabled concept is a VALIDATION "
                           "concept (concepts[i].type).")
    if config.validation and write_list and share > 0:
        write_split_list(config.workspace_dir, validate, config.concepts)
    return train, validate
