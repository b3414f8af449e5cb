"""Where each trained embedding's own file goes, beside the run's output: the one rule that
training (trainer/embeddings.py) writes by and publishing (trainer/publish.py) reads by.

Light on purpose (no torch): `python -m trainer publish` imports it.
"""
from __future__ import annotations

import re
from pathlib import Path

from trainer.config import TrainConfig, TrainingMethod


def embedding_file_paths(config: TrainConfig, output: Path) -> list[tuple[str, Path]]:
    """(placeholder, file) of every embedding, in config order: beside `output`, named after
    the placeholder (`lora-mychar.safetensors`); with EMBEDDING the first one is the output
    itself."""
    output = Path(output)
    found, used = [], set()
    for index, embedding in enumerate(config.additional_embeddings):
        if index == 0 and config.training_method == TrainingMethod.EMBEDDING:
            found.append((embedding.placeholder, output))
            used.add(output.name)
            continue
        stem = re.sub(r"[^A-Za-z0-9_-]+", "", embedding.placeholder) or "embedding"
        name = f"{output.stem}-{stem}.safetensors"
        if name in used:
            name = f"{output.stem}-{stem}-{index}.safetensors"
        used.add(name)
        found.append((embedding.placeholder, output.with_name(name)))
    return found
