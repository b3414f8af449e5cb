"""One (case, runner) measurement in a fresh process, so that its start-up and peak memory are
its own:

    python -m bench.worker --case sd15-256 --runner atelier [--device cpu] [--quick]
    python -m bench.worker --case sd15-256 --prepare      (build the model and images once)

Prints one line `BENCH_RESULT {json}` (or `BENCH_PREPARED {json}`) on stdout; everything else
goes to stderr.

Start-up is measured from the parent's spawn time (`--spawned-at`, wall clock), so it includes
the interpreter and the imports, up to the start of the first optimizer step. Peak memory: the
process's peak RSS (VmHWM) on the CPU; `torch.cuda.max_memory_allocated/reserved` on CUDA;
both for the whole process and for the training phase alone (the peak is reset when the first
step starts).
"""
from __future__ import annotations

import time

T0_MONO, T0_WALL = time.monotonic(), time.time()  # before any heavy import

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Every runner trains in exactly the environment of `python -m trainer train` (the same
# function sets it), so the atelier rows measure what users run. Offline on top: the bench's
# models are built locally, and nothing may be downloaded.
from trainer.cli import apply_cli_environment  # light: no torch yet

apply_cli_environment()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.cases import CASES, Case

# --- Memory --------------------------------------------------------------------------------------

def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size since the start (or the last reset)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


# --- Preparing a case ----------------------------------------------------------------------------

def make_images(folder: Path, count: int, side: int) -> Path:
    """`count` photo-like JPEGs (smooth colour fields + noise) of side x side pixels, each
    with a caption file. Written under a temporary name, then renamed: a folder is whole."""
    import numpy as np
    from PIL import Image
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) * (768 / side)
    for i in range(count):
        base = np.stack([np.sin(x / (40 + 7 * i)), np.cos(y / (55 + 3 * i)),
                         np.sin((x + y) / (70 + 5 * i))], axis=-1)
        pixels = (base * 90 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(staging / f"image{i:03d}.jpg", quality=90)
        (staging / f"image{i:03d}.txt").write_text(
            f"a photo of pattern number {i}, soft studio light, high detail", encoding="utf-8")
    os.replace(staging, folder)
    return folder


def image_count(case: Case, quick: bool) -> int:
    """One epoch of the atelier runner = its warm-up: the latent cache fills during the
    warm-up, and the measured steps are the steady state (cached latents and captions)."""
    warmup, _ = case.steps(quick)
    return max(1, warmup) * case.batch_size


# The families whose tiny model has a module of its own (what `python -m trainer
# make-tiny-model z-image|qwen|flux2` calls): family -> (module, builder of a folder).
_TINY_BUILDERS = {
    "z-image": ("trainer.models.tiny_z_image", "build_tiny_z_image_model"),
    "qwen": ("trainer.models.tiny_qwen_image", "build_tiny_qwen_image_model"),
    "flux2": ("trainer.models.tiny_flux2", "build_tiny_flux2_model"),
}


class NotBuildable(Exception):
    """The case's model cannot be built here yet; the message says why (the row's reason)."""


def build_model(case: Case, model: Path) -> None:
    """The case's model as a diffusers folder: a tiny one (trainer/models/tiny.py,
    tiny_flow.py, tiny_z_image.py, tiny_qwen_image.py, tiny_flux2.py; the bench's family names
    are their kinds), or a random full-size one
    (trainer/models/random_full.py), built once into the cache."""
    if case.size == "tiny":
        if (model / "model_index.json").is_file():
            return
        if case.family in ("sd15", "sdxl"):
            from trainer.models.tiny import build_tiny_sd15, build_tiny_sdxl
            (build_tiny_sd15 if case.family == "sd15" else build_tiny_sdxl)(model)
        elif case.family in _TINY_BUILDERS:
            module, function = _TINY_BUILDERS[case.family]
            getattr(importlib.import_module(module), function)(model)
        else:
            from trainer.models.tiny_flow import build_tiny_flow_model
            build_tiny_flow_model(case.family, model)
        return
    from trainer.models import random_full
    if random_full.is_built(model):
        return
    if case.family not in random_full.FAMILIES:
        raise NotBuildable(full_size_refusal(case))
    if case.cuda_only:
        import torch
        if not torch.cuda.is_available():
            raise NotBuildable(f"{case.name} is a GPU case: its full-size model is built only "
                               "on a machine with a CUDA device.")
    print(f"building a random full-size {case.family} model in {model} ...",
          file=sys.stderr, flush=True)
    random_full.build_random_model(case.family, model)


# What else a random full-size model of a flow family needs that the project lacks today.
_MISSING = {
    "sd35": "a T5-XXL tokenizer (configs/sd35 ships the configs, not T5's tokenizer: see its "
            "README.txt)",
}


def full_size_refusal(case: Case) -> str:
    """Why a full-size model of the case's family cannot be built yet. The bench builds no
    stand-in of its own: a different model would not be the one the case names."""
    return (f"not buildable yet: trainer/models/random_full.py builds random full-size "
            f"sd15, sdxl and flux models only (no '{case.family}' in its FAMILIES); a "
            f"{case.facts.label} also needs {_MISSING.get(case.family, 'its configs')}")


def prepare(case: Case, cache_dir: Path, quick: bool) -> dict:
    """Build (once, kept in the cache folder) the case's model and images."""
    model = cache_dir / "models" / case.model_key()
    build_model(case, model)
    count = image_count(case, quick)
    side = max(256, case.resolution * 3 // 2 // 8 * 8)
    data = make_images(cache_dir / "data" / f"{side}px-{count}", count, side)
    return {"model": str(model), "data": str(data)}


# --- Measuring ----------------------------------------------------------------------------------

def device_name(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def measure(case: Case, runner: str, device: str, cache_dir: Path, quick: bool,
            spawned_at: float) -> dict:
    import torch

    from bench import runners
    imported = time.monotonic()
    warmup, measured = case.steps(quick)
    paths = prepare(case, cache_dir, quick)
    (cache_dir / "runs").mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=f"{case.name}-{runner}-", dir=cache_dir / "runs"))
    paths["workspace"] = str(workspace / "ws")
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    marks: dict[str, float] = {}

    def mark_start() -> None:
        """The first optimizer step starts now: note the setup's peaks, then reset them so
        the training phase's own peak is measured too."""
        marks["start"] = time.monotonic()
        marks["cpu_start"] = time.process_time()
        marks["setup_rss_mb"] = peak_rss_mb()
        marks["rss_reset"] = reset_peak_rss()
        if cuda:
            torch.cuda.synchronize()
            marks["setup_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            marks["setup_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
            torch.cuda.reset_peak_memory_stats()

    def mark_steady(steps_done: int) -> None:
        """The warm-up is over (atelier: its first epoch, caches filled and blocks compiled):
        the peak from here on is the steady training's."""
        if cuda and steps_done == warmup:
            torch.cuda.synchronize()
            marks["warmup_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            marks["warmup_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
            torch.cuda.reset_peak_memory_stats()

    runners.seed_all(0)
    try:
        result = runners.RUNNERS[runner](case, paths, device, warmup + measured, mark_start,
                                         mark_steady)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    if "start" not in marks:
        raise RuntimeError(f"{runner} never started a step")
    start = marks["start"]
    row = {"case": case.name, "runner": runner, "device": device,
           "device_name": device_name(device), "quick": quick}
    row.update(runners.summarise(result, start, marks["cpu_start"], warmup))
    row["startup_s"] = (T0_WALL - spawned_at) + (start - T0_MONO)
    row["imports_s"] = imported - T0_MONO
    if len(result["stamps"]) > warmup:  # from the end of the warm-up to a synchronised end
        first = result["stamps"][warmup - 1] if warmup else start
        row["window_s_per_step"] = (result["end"] - first) / (len(result["stamps"]) - warmup)
    for name, at in (result.get("phases") or {}).items():
        row[f"startup_{name}_s"] = (T0_WALL - spawned_at) + (at - T0_MONO)
    if result.get("warnings"):
        row["warnings"] = result["warnings"][:5]
    train_rss = peak_rss_mb()
    row["peak_rss_mb"] = max(marks["setup_rss_mb"], train_rss)
    row["train_peak_rss_mb"] = train_rss if marks["rss_reset"] else None
    if cuda:
        allocated = torch.cuda.max_memory_allocated() / 2**20
        reserved = torch.cuda.max_memory_reserved() / 2**20
        warm_allocated = marks.get("warmup_allocated_mb", 0.0)
        warm_reserved = marks.get("warmup_reserved_mb", 0.0)
        row["peak_mem_mb"] = max(marks["setup_allocated_mb"], warm_allocated, allocated)
        row["peak_reserved_mb"] = max(marks["setup_reserved_mb"], warm_reserved, reserved)
        row["train_peak_mem_mb"] = max(warm_allocated, allocated)
        row["train_peak_reserved_mb"] = max(warm_reserved, reserved)
        if "warmup_allocated_mb" in marks:  # after the warm-up: the steady steps alone
            row["steady_peak_mem_mb"] = allocated
            row["steady_peak_reserved_mb"] = reserved
    else:
        row["peak_mem_mb"] = row["peak_rss_mb"]
        row["train_peak_mem_mb"] = row["train_peak_rss_mb"]
    row["date"] = time.strftime("%Y-%m-%d")
    if row.get("step_s_median"):
        row["images_per_s"] = case.batch_size / row["step_s_median"]
    if result.get("flops"):
        row["flops_per_step"] = result["flops"]
    if result.get("estimate_gb") is not None:  # atelier: the engine's estimate of the peak
        row["estimate_gb"] = round(result["estimate_gb"], 2)
    row["torch"] = torch.__version__
    row["threads"] = torch.get_num_threads()
    row["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, choices=sorted(CASES))
    parser.add_argument("--runner", choices=["limit", "naive", "atelier"])
    parser.add_argument("--prepare", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent / ".cache"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--spawned-at", type=float, default=T0_WALL)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: the case's cpu_threads, else torch's)")
    args = parser.parse_args(argv)
    threads = args.threads or (CASES[args.case].cpu_threads if args.device == "cpu" else 0)
    if threads:
        import torch
        torch.set_num_threads(threads)
    case = CASES[args.case]
    cache_dir = Path(args.cache_dir)
    if args.prepare:
        print("BENCH_PREPARED " + json.dumps(prepare(case, cache_dir, args.quick)), flush=True)
        return 0
    if not args.runner:
        parser.error("--runner is required (or --prepare)")
    # Everything the engine and the libraries print goes to stderr; stdout carries the result.
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        row = measure(case, args.runner, args.device, cache_dir, args.quick, args.spawned_at)
    finally:
        sys.stdout = stdout
    print("BENCH_RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
