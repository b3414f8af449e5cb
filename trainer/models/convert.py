"""Turn a pickle checkpoint (.ckpt/.pt) into a .safetensors file, as an explicit local act.

Atelier never opens pickle files while loading models: unpickling can run arbitrary code. A
user who trusts a checkpoint runs this once on their own machine (the CLI's
`convert-checkpoint`); the result loads like any single-file model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.errors import ModelLoadError
from trainer.io import atomic_save_safetensors


def convert_pickle_checkpoint(source: str | Path, destination: str | Path) -> Path:
    source, destination = Path(source), Path(destination)
    if not source.is_file():
        raise ModelLoadError(f"'{source}' does not exist.")
    if destination.suffix != ".safetensors":
        raise ModelLoadError(f"'{destination}': the output must end in .safetensors.")
    try:
        # weights_only=False: real SD checkpoints pickle training-library objects beside the
        # weights. The user asked for this file explicitly, on their own machine.
        loaded = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ModelLoadError(f"'{source}' could not be read as a PyTorch checkpoint: "
                             f"{error}") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ModelLoadError(f"'{source}' holds no state dict of weights.")
    # clone: checkpoints share storage between tensors, which safetensors refuses
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()
               if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"'{source}' holds no tensors.")
    atomic_save_safetensors(tensors, destination, {"converted_from": source.name})
    return destination
