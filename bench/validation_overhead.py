"""What the validation loss costs a run: the same tiny run with validation every epoch against
validation off, alternated in one process, as ratios of wall time.

    python -m bench.validation_overhead [--epochs 4] [--rounds 3] [--held 2]

The run is the tiny SD 1.5 LoRA of the tests (64 px, the demo's images, latent caching on),
the validation images a VALIDATION concept of `--held` of those images (no masks). Reported:
the median seconds of a run with validation off (the reference), with validation on, their
ratio, and the seconds one measurement takes (the difference over the number measured).
A measurement runs without gradients, batched, with each image at 4 fixed timesteps: about
4 forward passes per image against a training step's forward and backward per image.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import config_from_dict  # noqa: E402
from trainer.demo import DEMO_DATASET_DIR  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.models.tiny import build_tiny_sd15  # noqa: E402
from trainer.quiet import hide_weight_loading_bars, silence_library_noise  # noqa: E402


def held_out(folder: Path, count: int) -> Path:
    """`count` of the demo's images with their captions, without masks."""
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted(DEMO_DATASET_DIR.glob("*.jpg"))[:count]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    return folder


def one_run(model: Path, work: Path, held: Path, epochs: int, validation: bool) -> float:
    """Seconds of one whole run (model loading included, as a user waits for it)."""
    shutil.rmtree(work, ignore_errors=True)
    config = config_from_dict({
        "base_model_name": str(model), "workspace_dir": str(work),
        "concepts": [{"path": str(DEMO_DATASET_DIR)},
                     {"path": str(held), "type": "VALIDATION"}],
        "resolution": "64", "train_dtype": "FLOAT_32", "gradient_checkpointing": False,
        "learning_rate": 1e-3, "learning_rate_warmup_steps": 0, "lora_rank": 4,
        "batch_size": 1, "epochs": epochs, "validation": validation,
        "backup_after_unit": "NEVER", "backup_before_save": False})
    started = time.perf_counter()
    train(config)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--held", type=int, default=2, help="validation images")
    args = parser.parse_args(argv)
    silence_library_noise()
    hide_weight_loading_bars()
    with tempfile.TemporaryDirectory(prefix="bench-validation-") as temp:
        temp = Path(temp)
        model = build_tiny_sd15(temp / "model")
        held = held_out(temp / "held", args.held)
        one_run(model, temp / "warm", held, 1, True)  # imports, caches: not measured
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for validation in (False, True):  # alternated: a noisy machine hits both alike
                times[validation].append(one_run(model, temp / "run", held, args.epochs,
                                                 validation))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    each = (on - off) / args.epochs
    print(f"tiny SD 1.5 LoRA, 64 px, {args.epochs} epochs of 5 images (batch 1), "
          f"{args.held} validation images measured every epoch; median of {args.rounds}")
    print(f"  validation off  {off:7.2f} s   1.00x")
    print(f"  validation on   {on:7.2f} s   {on / off:.2f}x   (+{each:.2f} s per measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
