"""What the quantized cache saves a run's start: a Flux-shaped transformer read from its
diffusers folder and quantized (the first run), against the same part read from the quantized
cache (every later run), alternated in one process, as ratios of wall time and of bytes read.

    python -m bench.quantized_cache [--width 1024] [--blocks 2] [--single-blocks 4] [--rounds 3]
                                    [--types FLOAT_8,INT_8,NFLOAT_4]

The model is Flux.1's transformer class at a chosen width (the real one: width 3072, 19 + 38
blocks, 11.9 B parameters), stored in bfloat16 as a diffusers folder in a temporary folder;
both ways run on the CPU with the train dtype bfloat16. Files are read through the operating
system's page cache after the first round, so the time ratio is mostly the quantizing; on a
disk read for the first time (a 23.8 GB Flux transformer) the bytes ratio bounds it as well.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402

from trainer import quantization as q  # noqa: E402
from trainer import quantized_cache  # noqa: E402
from trainer.config import DataType, config_from_dict  # noqa: E402
from trainer.quiet import hide_weight_loading_bars, silence_library_noise  # noqa: E402


def build_model(folder: Path, width: int, blocks: int, single_blocks: int) -> int:
    """A Flux transformer of `width` saved in bfloat16 under folder/transformer; its
    parameter count."""
    heads = width // 128
    model = FluxTransformer2DModel(num_layers=blocks, num_single_layers=single_blocks,
                                   attention_head_dim=128, num_attention_heads=heads,
                                   joint_attention_dim=4096, pooled_projection_dim=768,
                                   guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model.to(torch.bfloat16).save_pretrained(folder / "transformer")
    return sum(p.numel() for p in model.parameters())


def first_run(folder: Path, config) -> tuple[torch.nn.Module, list[str]]:
    """What a run without an entry does: read the full weights and quantize (the model and
    its quantized layers' names; the caller writes the entry)."""
    dtype = config.transformer.weight_dtype
    model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer",
                                                   torch_dtype=torch.bfloat16)
    names = q.layers_to_quantize(model, *q.quantization_patterns(config), part="transformer")
    q.quantize_part(model, names, dtype, torch.bfloat16)
    return model, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--single-blocks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--types", default="FLOAT_8,INT_8,NFLOAT_4")
    args = parser.parse_args()
    silence_library_noise()
    hide_weight_loading_bars()
    with tempfile.TemporaryDirectory(prefix="atelier-bench-qcache-") as temporary:
        folder = Path(temporary) / "model"
        count = build_model(folder, args.width, args.blocks, args.single_blocks)
        source_bytes = sum(f.stat().st_size for f in (folder / "transformer").iterdir())
        print(f"Flux-shaped transformer: {count / 1e6:.0f} M parameters, "
              f"{source_bytes / 2**20:.0f} MiB in bfloat16; {args.rounds} rounds, CPU, "
              f"{torch.get_num_threads()} threads")
        print(f"{'type':10} {'read+quantize s':>16} {'cache s':>8} {'time ratio':>11} "
              f"{'bytes ratio':>12}")
        for name in args.types.split(","):
            dtype = DataType(name)
            if dtype != DataType.FLOAT_8 and not q.bitsandbytes_runs(name, "cpu"):
                print(f"{name:10} bitsandbytes does not run on this CPU")
                continue
            config = config_from_dict({
                "model_type": "FLUX_DEV_1", "base_model_name": str(folder),
                "workspace_dir": str(Path(temporary) / "ws"), "train_dtype": "BFLOAT_16",
                "concepts": [{"path": "images"}], "transformer": {"weight_dtype": name}})
            quantized, cached = [], []
            for _ in range(args.rounds):
                started = time.perf_counter()
                model, names = first_run(folder, config)
                quantized.append(time.perf_counter() - started)
                quantized_cache.store(config, "transformer", model, names, dtype)
                entry = quantized_cache.cache_root(config) / quantized_cache.part_key(
                    config, "transformer")[0]
                del model
                started = time.perf_counter()
                assert quantized_cache.load(config, "transformer") is not None
                cached.append(time.perf_counter() - started)
            entry_bytes = (entry / quantized_cache.WEIGHTS).stat().st_size
            slow, fast = statistics.median(quantized), statistics.median(cached)
            print(f"{name:10} {slow:16.2f} {fast:8.2f} {fast / slow:11.2f} "
                  f"{entry_bytes / source_bytes:12.2f}")


if __name__ == "__main__":
    main()
