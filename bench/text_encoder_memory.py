"""What reading the frozen text encoders only when they run saves (trainer/placement.py,
trainer/residency.py): a second Flux.1 LoRA run on the same data, every caption in the text
cache, in a fresh process, with the encoders read when they first run (the engine) against
read at the start and parked in CPU memory (as before), alternated; peak RSS and start time
as ratios.

    python -m bench.text_encoder_memory [--t5-layers 24] [--t5-width 1024] [--rounds 2]
                                        [--t5-dtype BFLOAT_16|FLOAT_8|FLOAT_32] [--samples N]

With `--samples N` it measures sampling instead (trainer/sample_prompts.py): N epochs with a
sample after each, the encoders read when they run in both modes; the samples draw from their
prompt's recorded encodings (`replayed`, the engine, recorded by the first run) against
reading T5 again for each (`re-read`, as before). Figures: the seconds of each sampling event
(median) and the peak RSS.

The model is the tiny Flux.1 (tests' model) with a T5 of T5 v1.1-large's encoder shape by
default (24 layers of width 1024, about 0.34 B parameters: 1.3 GB in float32; Flux's T5-XXL
is 4.7 B, 9.5 GB in bfloat16), built once under bench/.cache. Runs on the CPU, float32, two
epochs at 64 px, no samples (a sample reads the encoder in either mode). The first run fills
the text cache and is not measured.

What is measured is host memory that holds the encoder's weights. transformers maps a
safetensors file and a weight read in its file's dtype stays a view of the mapped file, which
costs no resident memory until it runs; a weight converted on reading (`--t5-dtype
BFLOAT_16` from this float32 file, as Flux's T5 is read in float32 on a CPU), quantized
(FLOAT_8), or, on a GPU, parked in CPU memory after filling the cache (a copy), is resident.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache" / "text-encoder-memory"


def build_model(folder: Path, layers: int, width: int) -> int:
    """The tiny Flux.1 with a T5 of `layers` x `width` (and the transformer's text input that
    width) written to `folder`; the T5's parameter count."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from trainer.models.tiny import write_pipeline
    from trainer.models.tiny_flow import build_tiny_flow_pipeline, tiny_t5_config

    pipe = build_tiny_flow_pipeline("flux")
    t5 = tiny_t5_config(pipe.text_encoder_2.config.vocab_size, d_model=width)
    t5.update(num_layers=layers, num_heads=width // 64, d_kv=64, d_ff=width * 11 // 4)
    pipe.text_encoder_2 = T5EncoderModel(T5Config(**t5)).eval()
    config = dict(pipe.transformer.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    pipe.transformer = FluxTransformer2DModel(**{**config, "joint_attention_dim": width}).eval()
    write_pipeline(pipe, folder)
    return sum(p.numel() for p in pipe.text_encoder_2.parameters())


def peak_rss_mb() -> float:
    """This process's peak resident memory: Linux's VmHWM (getrusage's ru_maxrss would carry
    the parent's peak over the fork that started this process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(mode: str, model: str, workspace: str, t5_dtype: str, samples: int) -> None:
    """One run in this process; prints its figures as one JSON line."""
    from trainer.config import config_from_dict
    from trainer.control import Control
    from trainer.demo import DEMO_DATASET_DIR
    from trainer.loop import train
    from trainer.models import flow_family
    from trainer.placement import PartPlacement
    from trainer.quiet import silence_library_noise
    from trainer.sample_prompts import SamplePromptCache

    silence_library_noise()
    if mode == "kept":  # as before: read at the start, parked in CPU memory
        flow_family.read_later_parts = lambda config: set()
        PartPlacement._reader = lambda self, name: None
    if mode == "re-read":  # as before: no recorded prompt encodings
        SamplePromptCache.beside = classmethod(lambda cls, text_cache: None)
    sampling = {"samples": [{"prompt": "a photo of a cat", "width": 64, "height": 64,
                             "diffusion_steps": 2, "cfg_scale": 3.5}],
                "sample_after": 1, "sample_after_unit": "EPOCH"} if samples else {}
    config = config_from_dict({
        "base_model_name": model, "model_type": "FLUX_DEV_1", "workspace_dir": workspace,
        "concepts": [{"path": str(DEMO_DATASET_DIR)}], "resolution": "64",
        "train_dtype": "FLOAT_32", "learning_rate": 1e-3, "learning_rate_warmup_steps": 0,
        "lora_rank": 4, "batch_size": 2, "epochs": max(samples, 2),
        "output_model_format": "DIFFUSERS_LORA", "text_encoder": {"train": False},
        "text_encoder_2": {"weight_dtype": t5_dtype}, **sampling})
    began = time.perf_counter()
    first_step: list[float] = []
    sampling_s: list[float] = []
    sampling_since: list[float] = []

    def on_event(event):
        now = time.perf_counter()
        if event["type"] == "progress" and not first_step:
            first_step.append(now - began)
        if event["type"] == "status" and event["message"].startswith("Sampling at step"):
            sampling_since.append(now)
        elif event["type"] == "status" and event["message"] == "Training" and sampling_since:
            sampling_s.append(now - sampling_since.pop())
    train(config, Control(on_event=on_event))
    print(json.dumps({"mode": mode, "peak_rss_mb": peak_rss_mb(),
                      "startup_s": first_step[0], "total_s": time.perf_counter() - began,
                      "sampling_s": statistics.median(sampling_s) if sampling_s else None}))


def run(mode: str, model: Path, workspace: Path, t5_dtype: str, samples: int) -> dict:
    env = {**os.environ, "ATELIER_DATA_CACHE_DIR": str(CACHE / "data-cache"),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "bench.text_encoder_memory", "--worker", mode,
                          str(model), str(workspace), t5_dtype, str(samples)], cwd=ROOT,
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t5-layers", type=int, default=24)
    parser.add_argument("--t5-width", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--t5-dtype", default="BFLOAT_16",
                        choices=("FLOAT_32", "BFLOAT_16", "FLOAT_8"))
    parser.add_argument("--samples", type=int, default=0,
                        help="measure sampling: this many epochs, a sample after each")
    parser.add_argument("--worker", nargs=5,
                        metavar=("MODE", "MODEL", "WORKSPACE", "DTYPE", "SAMPLES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, model, workspace, dtype, samples = args.worker
        worker(mode, model, workspace, dtype, int(samples))
        return
    model = CACHE / f"flux-t5-{args.t5_layers}x{args.t5_width}"
    if not model.is_dir():
        print(f"Building the model under {model} ...", flush=True)
        build_model(model, args.t5_layers, args.t5_width)
    from transformers import T5Config
    t5 = T5Config.from_pretrained(model / "text_encoder_2")
    t5_mb = sum(f.stat().st_size for f in (model / "text_encoder_2").glob("*.safetensors")) / 2**20
    print(f"T5: {t5.num_layers} layers of width {t5.d_model}, {t5_mb:,.0f} MB on disk (float32), "
          f"stored as {args.t5_dtype}")
    # fills the text and latent caches (and records the sample's prompt)
    run("read-later", model, CACHE / "fill", args.t5_dtype, args.samples)
    before, engine = ("re-read", "replayed") if args.samples else ("kept", "read-later")
    rows: dict[str, list[dict]] = {before: [], engine: []}
    for index in range(args.rounds):
        for mode in rows:
            rows[mode].append(run(mode, model, CACHE / f"{mode}-{index}", args.t5_dtype,
                                  args.samples))

    def median(mode, key):
        return statistics.median(r[key] for r in rows[mode])
    timed = "sampling_s" if args.samples else "startup_s"
    print(f"{'mode':<12}{'peak RSS MB':>14}{timed:>12}{'total s':>10}")
    for mode in rows:
        print(f"{mode:<12}{median(mode, 'peak_rss_mb'):>14,.0f}{median(mode, timed):>12.2f}"
              f"{median(mode, 'total_s'):>10.2f}")
    saved = median(before, "peak_rss_mb") - median(engine, "peak_rss_mb")
    print(f"{engine} / {before}: peak RSS "
          f"{median(engine, 'peak_rss_mb') / median(before, 'peak_rss_mb'):.3f}, {timed} "
          f"{median(engine, timed) / median(before, timed):.3f}, total "
          f"{median(engine, 'total_s') / median(before, 'total_s'):.3f}; "
          f"peak RSS saved {saved:,.0f} MB = {saved / t5_mb:.2f} x the T5's file")


if __name__ == "__main__":
    main()
