"""Host time of the fused backward pass's optimizer calls: one call per parameter against one
per bucket (trainer.optim.fused), as ratios against a plain step measured in the same process.

    python -m bench.fused_overhead [--steps 30] [--rounds 5]

On a fast GPU the fused pass of a full fine-tune is bound by the host: every optimizer call
costs Python work and kernel launches whatever the tensor's size, and SD 1.5's UNet has 686
weight tensors (SDXL's 1,680). This bench keeps that host work and drops the arithmetic: each
UNet weight is stood in for by a tensor 4,096 times smaller (the same count, the same
proportions, so the same buckets), and AdamW runs its foreach path (its default on CUDA).
Reported per family: the optimizer calls per step and the step's milliseconds for
  plain      backward, then one optimizer.step() over everything (the reference);
  per-param  the fused pass with a bucket per parameter (what it did before buckets);
  bucketed   the fused pass with its default buckets.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.models.random_full import CONFIG_DIRS, meta_model  # noqa: E402
from trainer.optim import fused  # noqa: E402

SHRINK = 4096  # stand-in tensors have this many times fewer elements than the real weights


def stand_ins(family: str) -> list[torch.Tensor]:
    """One float32 tensor per UNet weight, in the UNet's order, SHRINK times smaller."""
    unet = meta_model(family, "unet", CONFIG_DIRS[family])
    return [torch.zeros(max(1, p.numel() // SHRINK), requires_grad=True)
            for p in unet.parameters()]


def one_step(params, optimizer, plain: bool) -> None:
    loss = sum((p * 1.5).sum() for p in params)  # every weight gets a gradient
    loss.backward()
    if plain:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure(params, mode: str, steps: int) -> tuple[float, int]:
    """(median ms per step, optimizer calls per step) for `mode`."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if mode == "plain":
        hook = None
        calls = 1
    else:
        # The real buckets: sizes scaled back up by SHRINK, so the default limit applies.
        total = sum(p.numel() * 4 for p in params)
        limit = 1 if mode == "per-param" else max(
            1, min(fused.BUCKET_BYTES // SHRINK, total // fused.MIN_BUCKETS))
        hook = fused.FusedBackward(optimizer, bucket_bytes=limit)
        calls = len(hook.buckets)
    for _ in range(3):  # warm-up: optimizer state, allocator
        one_step(params, optimizer, mode == "plain")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one_step(params, optimizer, mode == "plain")
        times.append(time.perf_counter() - start)
    if hook is not None:
        hook.remove()
    return statistics.median(times) * 1000, calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5,
                        help="the modes run interleaved this many times; medians reported")
    parser.add_argument("--families", default="sd15,sdxl")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the work is host calls, not arithmetic: one thread, less noise
    try:
        report(args)
    finally:
        torch.set_num_threads(threads)
    return 0


def report(args: argparse.Namespace) -> None:
    print(f"{'family':8} {'mode':10} {'calls/step':>10} {'ms/step':>9} {'x plain':>8}")
    for family in args.families.split(","):
        params = stand_ins(family)
        results: dict[str, list[float]] = {}
        calls: dict[str, int] = {}
        for _ in range(args.rounds):
            for mode in ("plain", "per-param", "bucketed"):
                fresh = [p.detach().clone().requires_grad_(True) for p in params]
                ms, calls[mode] = measure(fresh, mode, args.steps)
                results.setdefault(mode, []).append(ms)
        plain = statistics.median(results["plain"])
        for mode in ("plain", "per-param", "bucketed"):
            ms = statistics.median(results[mode])
            print(f"{family:8} {mode:10} {calls[mode]:>10} {ms:>9.1f} {ms / plain:>8.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
