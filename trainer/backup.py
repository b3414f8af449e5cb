"""Backups a run resumes from at the same step, with the same state (SPEC §3, issue 8).

A backup is a folder `<workspace>/backup/step-<N>/`:
    weights.safetensors   the trainable parameters of each trained part
    optimizer.json        optimizer state (its groups, steps, betas ...) and, in
    optimizer.safetensors   the .safetensors, its tensors (state_files.py)
    state.json            schedule, EMA, RNG states (python, numpy, torch, CUDA,
    state.safetensors       generators) and the smoothed loss, the same way
    progress.json         step, epoch, batches done in the epoch, what must match to resume
    config.json           the config of the run
No file of a backup is pickled, so a file planted in a backup folder cannot run code when a
run continues from it. Backups of older versions (state.pt, optimizer.pt) are read with
torch's restricted `weights_only` loader, which builds tensors and plain values only, and
refused with the reason when they hold anything else.
It is written under a temporary name and renamed when complete, so a folder named `step-*`
is always whole; a crash mid-backup leaves only a `.tmp-*` folder, ignored and cleaned up.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.config import TimeUnit, TrainConfig
from trainer.errors import ConfigError, TrainingError
from trainer.state_files import StateFileError, read_state, write_state

PREFIX = "step-"
# Settings that shape the trained tensors: a backup made with other values cannot resume.
MUST_MATCH = ("model_type", "training_method", "base_model_name", "peft_type", "lora_decompose",
              "lora_rank", "lora_layer_preset", "layer_filter", "layer_filter_regex",
              "optimizer.optimizer")
# What the loop's training state holds besides the optimizer's (loop.py, backup()).
EXTRA_KEYS = {"schedule", "ema", "rng", "smooth"}


def backup_root(config: TrainConfig) -> Path:
    return Path(config.workspace_dir) / "backup"


def list_backups(root: Path) -> list[Path]:
    """Complete backups, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / "progress.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):].split("-")[0]))


def _fingerprint(config: TrainConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    out = {}
    for key in MUST_MATCH:
        value: Any = data
        for part in key.split("."):
            value = value[part]
        out[key] = value
    out["trained_parts"] = [p for p in config.model_type.facts.parts if data[p]["train"]]
    # the embeddings' tokens shape their vectors
    out["additional_embeddings"] = [[e["placeholder"], e["token_count"]]
                                    for e in data.get("additional_embeddings", [])]
    return out


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(), "numpy": keys.tolist(), "numpy_pos": int(position),
            "numpy_gauss": [int(has_gauss), float(cached_gaussian)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": {k: g.get_state() for k, g in generators.items()}}


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    has_gauss, cached_gaussian = state.get("numpy_gauss", (0, 0.0))  # older backups: none
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32),
                         state["numpy_pos"], has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for key, generator in generators.items():
        generator.set_state(state["generators"][key])


def write_backup(config: TrainConfig, *, step: int, epoch: int, batches_done: int,
                 weights: dict[str, torch.Tensor], optimizer_state: dict, extra_state: dict,
                 keep: int | None) -> Path:
    """Write a complete backup atomically; with `keep`, delete all but the newest `keep`."""
    root = backup_root(config)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{time.time_ns()}"
    try:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  str(tmp / "weights.safetensors"))
        write_state(tmp, "optimizer", optimizer_state)
        write_state(tmp, "state", extra_state)
        (tmp / "config.json").write_text(config.to_json(), encoding="utf-8")
        progress = {"step": step, "epoch": epoch, "batches_done": batches_done,
                    "fingerprint": _fingerprint(config), "written_at": time.time()}
        (tmp / "progress.json").write_text(json.dumps(progress, indent=2), encoding="utf-8")
        if final.exists():  # a backup of the same step (e.g. stop right after a backup)
            shutil.rmtree(final)
        tmp.rename(final)
    except (OSError, StateFileError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"Could not write the backup {final}: {error}. The previous "
                            "backups are untouched.") from None
    for stale in root.glob(".tmp-*"):  # leftovers of a crash mid-backup
        shutil.rmtree(stale, ignore_errors=True)
    if keep:
        for old in list_backups(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_backup(folder: Path, config: TrainConfig) -> dict[str, Any]:
    """Load a backup for `config`, refusing one the config cannot continue, with the reason."""
    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"Cannot continue from the backup {folder}: {reason}. Delete that "
                           "folder to continue from an older backup, or switch "
                           "continue_last_backup off to start a new run.")

    try:
        progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
        fingerprint = dict(progress["fingerprint"])
        if not all(type(progress[key]) is int for key in ("step", "epoch", "batches_done")):
            raise ValueError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise refuse("its progress.json is damaged") from None
    # A backup written before a key joined MUST_MATCH was made with that key's default.
    then = {**_fingerprint(TrainConfig()), **fingerprint}
    now = _fingerprint(config)
    changed = [f"{k}: {then.get(k)!r} in the backup, {now[k]!r} now"
               for k in now if then.get(k) != now[k]]
    if changed:
        raise ConfigError(f"Cannot continue from the backup {folder}: " + "; ".join(changed)
                          + ". Switch continue_last_backup off to start a new run.")
    if (folder / "state.json").is_file():
        try:
            optimizer, extra = read_state(folder, "optimizer"), read_state(folder, "state")
        except StateFileError as error:
            raise refuse(str(error)) from None
    else:
        optimizer, extra = _read_pickled_state(folder, refuse)
    if not (isinstance(optimizer, dict) and isinstance(extra, dict)
            and EXTRA_KEYS <= extra.keys()):
        raise refuse("its optimizer or training state is incomplete")
    try:
        weights = load_file(str(folder / "weights.safetensors"))
    except Exception:  # safetensors' errors for a missing or damaged file
        raise refuse("its weights.safetensors cannot be read") from None
    return {"progress": progress, "weights": weights, "optimizer": optimizer, "extra": extra}


def _read_pickled_state(folder: Path, refuse) -> tuple[Any, Any]:
    """A backup of an older Atelier: optimizer.pt and state.pt, written with torch.save.
    Read with `weights_only=True` only, torch's restricted unpickler: it builds tensors and
    plain values (dict, list, tuple, numbers, str, OrderedDict, Counter) and refuses any
    other object before making it, so a planted file cannot run code. Every state these
    versions wrote is such values, unless a CUSTOM scheduler kept an object of its own."""
    loaded = []
    for name in ("optimizer.pt", "state.pt"):
        if not (folder / name).is_file():
            raise refuse(f"it holds neither state.json nor {name}")
        try:
            loaded.append(torch.load(folder / name, map_location="cpu", weights_only=True))
        except Exception:  # pickle.UnpicklingError for a refused object; anything for damage
            raise refuse(f"its {name} (the older pickle format) is damaged or holds more than "
                         "tensors and plain values, and is not unpickled because that could "
                         "run code") from None
    return loaded[0], loaded[1]


class Cadence:
    """'Every N units' for backups and saves: STEP, EPOCH, SECOND, MINUTE, HOUR or NEVER."""
    SECONDS = {TimeUnit.SECOND: 1, TimeUnit.MINUTE: 60, TimeUnit.HOUR: 3600}

    def __init__(self, every: float, unit: TimeUnit):
        self.every, self.unit = every, unit
        self.last_time = time.monotonic()

    def due_after_step(self, step: int) -> bool:
        if self.every <= 0 or self.unit == TimeUnit.NEVER:
            return False
        if self.unit == TimeUnit.STEP:
            return step % int(self.every) == 0
        if self.unit in self.SECONDS:
            if time.monotonic() - self.last_time >= self.every * self.SECONDS[self.unit]:
                self.last_time = time.monotonic()
                return True
        return False

    def due_after_epoch(self, epochs_done: int) -> bool:
        return (self.unit == TimeUnit.EPOCH and self.every > 0
                and epochs_done % int(self.every) == 0)
