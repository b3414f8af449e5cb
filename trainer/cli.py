"""Command line: the same engine as the page, headless, with a terminal progress bar.

    python -m trainer train --config my.json [--set key=value ...]
    python -m trainer make-tiny-model sd15 OUT_DIR        (or sdxl)
    accelerate launch -m trainer train --config my.json     # several GPUs (DDP)

Bad input ends with a one-line message and exit status 2; Ctrl-C once stops after the current
step and saves, twice aborts.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
               # idle OpenMP threads sleep instead of spinning: a busy CPU is shared better
               # (the app measured 13-16 s for the demo instead of 77-114 s)
               "OMP_WAIT_POLICY": "PASSIVE"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a JSON config")
    train.add_argument("--config", required=True, help="an Atelier JSON config (Export config)")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a key, e.g. --set unet.learning_rate=1e-4")
    train.add_argument("--preset", action="append", default=[],
                       help="a partial JSON config layered under --config (repeatable)")

    convert = sub.add_parser("convert-checkpoint",
                             help="convert a trusted pickle .ckpt to .safetensors (local only)")
    convert.add_argument("source")
    convert.add_argument("destination")

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random SD model (offline demo)")
    tiny.add_argument("family", choices=["sd15", "sdxl"])
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


class ProgressBar:
    """tqdm bar fed by the loop's events: step of total, epoch, loss, smoothed loss, lr, ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, event: dict) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm
        kind = event["type"]
        if kind == "started":
            self.bar = tqdm(total=event["total_steps"], unit="step", dynamic_ncols=True)
        elif kind == "progress" and self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            lr = max(event["lr"].values(), default=0.0)
            self.bar.set_postfix_str(
                f"epoch {event['epoch'] + 1}/{event['epochs']} loss {event['loss']:.4f} "
                f"smooth {event['smooth_loss']:.4f} lr {lr:.2e}")
        elif kind in ("status", "warning", "saved", "sample"):
            text = event.get("message") or f"{kind}: {event.get('path')}"
            (self.bar.write if self.bar is not None else print)(
                ("warning: " if kind == "warning" else "") + text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_train(args) -> int:
    from trainer.config import load_config, read_json
    from trainer.control import Control
    from trainer.loop import train

    presets = [read_json(p) for p in args.preset]
    config = load_config(args.config, args.overrides, presets=presets,
                         warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    is_main = os.environ.get("RANK", "0") == "0"
    bar = ProgressBar(enabled=is_main)
    control = Control(on_event=bar)

    def on_interrupt(signum, frame):
        if control.stop_requested:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        print("\nStopping after the current step and saving (Ctrl-C again to abort).",
              file=sys.stderr)
        control.request_stop()

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        result = train(config, control, allow_custom_code=True)  # the owner's own machine
    finally:
        bar.close()
    if is_main:
        word = "Stopped early" if result.stopped_early else "Finished"
        print(f"{word} at step {result.global_step}: {result.output_path}")
    return 0


def run_make_tiny_model(args) -> int:
    from trainer.models.tiny import build_tiny_sd15, build_tiny_sdxl
    build, name = {"sd15": (build_tiny_sd15, "SD 1.5"), "sdxl": (build_tiny_sdxl, "SDXL")}[args.family]
    path = build(args.out_dir, seed=args.seed)
    print(f"Wrote a tiny {name} model to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    args = _parser().parse_args(argv)
    from trainer.errors import AtelierError
    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "convert-checkpoint":
            from trainer.models.convert import convert_pickle_checkpoint
            print(f"Wrote {convert_pickle_checkpoint(args.source, args.destination)}")
            return 0
        return run_make_tiny_model(args)
    except AtelierError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Aborted; the last backup (if any) is left as it was.", file=sys.stderr)
        return 130
