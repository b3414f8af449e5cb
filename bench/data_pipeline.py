"""Step time of the data pipeline on the tiny SD 1.5 model: latent caching off vs on, first vs
later epochs, as ratios against the uncached run measured in the same process.

    python bench/data_pipeline.py [--resolution 64] [--epochs 4] [--photos 8] [--rounds 3] [--threads N] [--workers]

Two datasets: the bundled demo photos (small JPEGs, cheap to decode) and `--photos` generated
1024x768 JPEGs (what a phone gives: decoding and resizing them is real host work). The text
encoder is frozen, so the text cache is exercised too. The first run of the process is a warm-up
(imports, allocator) and is not reported. Step time = wall time between consecutive progress
events (the first step of a run is excluded: it includes setup); the cases run interleaved,
`--rounds` times, and the medians are reported, so that other load on the machine cancels.
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
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from trainer.config import config_from_dict  # noqa: E402
from trainer.control import Control  # noqa: E402
from trainer.demo import DEMO_DATASET_DIR  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.models.tiny import build_tiny_sd15  # noqa: E402


def make_photos(folder: Path, count: int) -> Path:
    """`count` 1024x768 JPEGs with smooth colour fields and noise (photo-like to decode)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
    for i in range(count):
        base = np.stack([np.sin(x / (40 + 7 * i)) , np.cos(y / (55 + 3 * i)),
                         np.sin((x + y) / (70 + 5 * i))], axis=-1)
        pixels = (base * 90 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i}.jpg", quality=92)
        (folder / f"photo{i}.txt").write_text(f"a photo number {i}")
    return folder


def run(model: Path, data: Path, workspace: Path, *, caching: bool, epochs: int,
        resolution: str) -> list[list[float]]:
    """Train; return the step times (seconds) of each epoch."""
    config = config_from_dict({
        "base_model_name": str(model), "workspace_dir": str(workspace),
        "concepts": [{"path": str(data)}], "resolution": resolution,
        "train_dtype": "FLOAT_32", "gradient_checkpointing": False, "learning_rate": 1e-3,
        "learning_rate_warmup_steps": 0, "lora_rank": 4, "batch_size": 2, "epochs": epochs,
        "text_encoder": {"train": False}, "latent_caching": caching,
    })
    times: list[tuple[int, float]] = []

    def on_event(event):
        if event["type"] == "progress":
            times.append((event["epoch"], time.perf_counter()))

    train(config, Control(on_event=on_event))
    per_epoch: list[list[float]] = [[] for _ in range(epochs)]
    for (_, before), (epoch, after) in zip(times, times[1:]):
        per_epoch[epoch].append(after - before)
    return per_epoch


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench(model: Path, data: Path, root: Path, name: str, epochs: int, resolution: str,
          rounds: int) -> None:
    """`rounds` x (uncached run, cached run on an empty cache, cached run on the full cache),
    interleaved so that drift in machine load hits every case alike; medians."""
    cases: dict[str, list[float]] = {}

    def add(label: str, values: list[float]) -> None:
        cases.setdefault(label, []).extend(values)

    for number in range(rounds):
        off = run(model, data, root / f"{name}-off{number}", caching=False, epochs=epochs,
                  resolution=resolution)
        fill = run(model, data, root / f"{name}-on{number}", caching=True, epochs=epochs,
                   resolution=resolution)
        warm = run(model, data, root / f"{name}-on{number}", caching=True, epochs=epochs,
                   resolution=resolution)
        add("caching off, epoch 1", off[0])
        add("caching off, epochs 2+", sum(off[1:], []))
        add("caching on, epoch 1 (fills the cache)", fill[0])
        add("caching on, epochs 2+ (reuses)", sum(fill[1:], []))
        add("caching on, 2nd run, every epoch", sum(warm, []))
    baseline = median(cases["caching off, epoch 1"] + cases["caching off, epochs 2+"])
    print(f"\n{name}: median step time, ratio to the uncached run")
    for label, values in cases.items():
        print(f"  {label:40s} {median(values) * 1000:7.1f} ms  {median(values) / baseline:5.2f}"
              f"  ({len(values)} steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", default="64")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", action="store_true",
                        help="also compare loading in the main process, prefetch threads and "
                             "DataLoader worker processes (uncached)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    try:
        model = build_tiny_sd15(root / "tiny-sd15")
        photos = make_photos(root / "photos", args.photos)
        run(model, DEMO_DATASET_DIR, root / "warmup", caching=False, epochs=1,
            resolution=args.resolution)
        print(f"tiny SD 1.5, LoRA rank 4, batch 2, {args.resolution} px, {args.epochs} epochs, "
              f"text encoder frozen; torch threads {__import__('torch').get_num_threads()}")
        bench(model, DEMO_DATASET_DIR, root, "demo photos (5 small JPEGs)", args.epochs,
              args.resolution, args.rounds)
        bench(model, photos, root, f"{args.photos} generated 1024x768 JPEGs", args.epochs,
              args.resolution, args.rounds)
        if args.workers:
            loading = {"main process, no prefetch": {"ATELIER_DATA_WORKERS": "0",
                                                      "ATELIER_DATA_PREFETCH": "0"},
                       # the app's CPU default (it sets OMP_WAIT_POLICY=PASSIVE)
                       "2 prefetch threads": {"ATELIER_DATA_WORKERS": "0",
                                              "ATELIER_DATA_PREFETCH": "1"},
                       "1 worker process": {"ATELIER_DATA_WORKERS": "1"},
                       "2 worker processes": {"ATELIER_DATA_WORKERS": "2"}}
            steps: dict[str, list[float]] = {}
            for number in range(args.rounds):
                for label, env in loading.items():
                    os.environ.update(env)
                    times = run(model, photos, root / f"loading{number}-{len(steps)}",
                                caching=False, epochs=args.epochs, resolution=args.resolution)
                    for key in env:
                        os.environ.pop(key)
                    steps.setdefault(label, []).extend(sum(times, []))
            baseline = median(steps["main process, no prefetch"])
            print("\nLoading the generated JPEGs, caching off: median step, ratio")
            for label, values in steps.items():
                print(f"  {label:40s} {median(values) * 1000:7.1f} ms  "
                      f"{median(values) / baseline:5.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
