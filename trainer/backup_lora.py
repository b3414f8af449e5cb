"""A LoRA run's backup as a LoRA file, so that Try it (and anyone) can draw from any point a run
kept, not only from its saves (issue 27: "pick any saved output of a job ... backups as well").

A backup (trainer/backup.py) holds the trained parameters under the loop's own names
(`<part>/<peft parameter name>`), not a LoRA layout a pipeline reads. The file is made the way
the loop makes a save: the base model is loaded, the run's adapters are attached (trainer/lora.py
`add_lora`, the same targets and rank), the backup's tensors are put in them, and
`finetune.save_output` writes the config's output format with its metadata. These are the
weights as trained (a save of a run with EMA holds the EMA average instead).

The file is written once, inside the backup folder (`lora.safetensors`, beside its config
JSON), and reused while the backup is unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.backup import PREFIX, list_backups
from trainer.errors import ConfigError

FILE_NAME = "lora.safetensors"
WEIGHTS = "weights.safetensors"


def _config_data(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_lora_backup(folder: str | Path) -> bool:
    """A complete backup (`step-<N>` with its weights) of a LoRA run."""
    folder = Path(folder)
    if not (folder.name.startswith(PREFIX) and (folder / WEIGHTS).is_file()):
        return False
    data = _config_data(folder)
    return isinstance(data, dict) and data.get("training_method", "LORA") == "LORA"


def find_lora_backups(root: str | Path) -> list[Path]:
    """The LoRA runs' backups under `root` (not in hidden folders), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for backups in root.rglob("backup"):
        relative = backups.relative_to(root).parts
        if not backups.is_dir() or backups.is_symlink() or any(
                part.startswith(".") for part in relative):
            continue
        found += [b for b in list_backups(backups) if is_lora_backup(b)]
    return sorted(found, key=lambda p: (p / WEIGHTS).stat().st_mtime, reverse=True)


def backup_step(folder: Path) -> int:
    return int(folder.name[len(PREFIX):].split("-")[0])


def lora_from_backup(folder: str | Path) -> Path:
    """The backup's LoRA file, written on first use (atomically, with its config JSON), then
    reused while it is newer than the backup's weights. ConfigError naming the folder for
    anything but a LoRA backup this version can read."""
    folder = Path(folder)
    if not is_lora_backup(folder):
        raise ConfigError(f"'{folder}' is not a backup of a LoRA run (a backup/step-N folder "
                          "with weights.safetensors and the run's config.json).")
    target = folder / FILE_NAME
    if target.is_file() and target.stat().st_mtime >= (folder / WEIGHTS).stat().st_mtime:
        return target
    import torch
    from safetensors.torch import load_file

    from trainer.config import config_from_dict
    from trainer.finetune import save_output
    from trainer.lora import add_lora
    from trainer.loop import TORCH_DTYPES
    from trainer.models import registry
    from trainer.models.family import load_family

    try:
        config = config_from_dict(_config_data(folder), warn=lambda message: None)
        progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
        weights = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as error:
        raise ConfigError(f"The backup '{folder}' cannot be read: {error}") from None
    parts = [p for p in registry.facts(config.model_type).parts if getattr(config, p).train]
    if config.additional_embeddings and any(k.startswith("embeddings/") for k in weights):
        raise ConfigError(f"The backup '{folder}' holds trained embeddings as well; Try it "
                          "draws from a LoRA backup without them. Try a save of that run.")
    family = load_family(config)
    for part in parts:
        add_lora(family.parts[part], config, part)
    named = {f"{part}/{name}": param for part in parts
             for name, param in family.parts[part].named_parameters()}
    unknown = sorted(set(weights) - set(named))
    if unknown or not weights:
        raise ConfigError(f"The backup '{folder}' does not fit the run's own adapters "
                          f"({len(unknown)} tensor(s) without a place, e.g. "
                          f"{unknown[0] if unknown else 'none at all'}).")
    with torch.no_grad():
        for name, tensor in weights.items():
            named[name].copy_(tensor.to(named[name].dtype))
    save_output(target, family, parts, config, dtype=TORCH_DTYPES[config.output_dtype],
                steps=int(progress.get("step", backup_step(folder))),
                epochs=int(progress.get("epoch", 0)),
                title=f"backup-step{backup_step(folder)}")
    return target
