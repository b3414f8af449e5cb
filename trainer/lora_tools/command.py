"""`python -m trainer lora ...`: the LoRA tools on the command line (trainer/cli.py adds the
parser and calls `run`).

    lora inspect FILE [--json]
    lora merge-into --base MODEL --lora FILE[:STRENGTH] ... --out PATH
                    [--format ORIGINAL_SINGLE_FILE|DIFFUSERS] [--model-type T] [--dtype D]
    lora merge FILE[:STRENGTH] ... --out FILE [--rank R | --energy F]
    lora resize FILE --out FILE (--rank R | --energy F)
    lora extract --base MODEL --tuned MODEL --out FILE (--rank R | --energy F)

Exit 0 on success; 2 on bad input with one line naming the file or flag (argparse's own
complaints too: the parser prints them on one line). `--json` prints the result as one JSON
object on stdout. Progress goes to stderr when it is a terminal.
"""
from __future__ import annotations

import argparse
import json
import sys

from trainer.errors import ConfigError

FORMATS = ("ORIGINAL_SINGLE_FILE", "DIFFUSERS")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def parse_source(value: str, flag: str) -> tuple[str, float]:
    """'file.safetensors:0.8' -> ('file.safetensors', 0.8); no strength: 1.0. A colon whose
    tail is not a number belongs to the path (C:\\…)."""
    path, sep, tail = value.rpartition(":")
    if sep and path and not tail.startswith(("\\", "/")):
        try:
            strength = float(tail)
        except ValueError:
            raise ConfigError(f"{flag} {value}: the strength after ':' must be a number "
                              "(e.g. file.safetensors:0.8).") from None
        if strength != strength or abs(strength) == float("inf"):
            raise ConfigError(f"{flag} {value}: the strength must be a finite number.")
        return path, strength
    return value, 1.0


def add_parser(sub) -> None:
    lora = sub.add_parser("lora", help="inspect, merge, bake in, resize or extract LoRAs",
                          description="The LoRA tools. Exit status 0: done; 2: bad input "
                                      "(one line naming the file or flag).")
    tools = lora.add_subparsers(dest="lora_command", required=True,
                                parser_class=OneLineParser)

    def target(p) -> None:
        p.add_argument("--rank", type=int, default=None, help="the rank to keep")
        p.add_argument("--energy", type=float, default=None,
                       help="keep, per layer, the smallest rank holding this share of the "
                            "delta's energy (squared singular values), 0 < F <= 1")

    def json_flag(p) -> None:
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    inspect = tools.add_parser("inspect", help="what a LoRA file is")
    inspect.add_argument("file")
    json_flag(inspect)

    into = tools.add_parser("merge-into", help="bake LoRAs into their base model")
    into.add_argument("--base", required=True, help="the base model: diffusers folder or "
                      "single .safetensors file")
    into.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]",
                      help="a LoRA file and its strength (default 1); repeatable")
    into.add_argument("--out", required=True, help="the checkpoint file or diffusers folder")
    into.add_argument("--format", default="ORIGINAL_SINGLE_FILE", help=" or ".join(FORMATS))
    into.add_argument("--model-type", default=None,
                      help="the base model's type (default: from the model or the LoRA)")
    into.add_argument("--dtype", default="FLOAT_32", help="FLOAT_32, FLOAT_16 or BFLOAT_16")
    json_flag(into)

    merge = tools.add_parser("merge", help="several LoRAs into one")
    merge.add_argument("files", nargs="+", metavar="FILE[:STRENGTH]")
    merge.add_argument("--out", required=True)
    target(merge)
    json_flag(merge)

    resize = tools.add_parser("resize", help="a LoRA to a lower rank by SVD")
    resize.add_argument("file")
    resize.add_argument("--out", required=True)
    target(resize)
    json_flag(resize)

    extract = tools.add_parser("extract", help="a LoRA from a fine-tune and its base")
    extract.add_argument("--base", required=True)
    extract.add_argument("--tuned", required=True)
    extract.add_argument("--out", required=True)
    extract.add_argument("--model-type", default=None)
    target(extract)
    json_flag(extract)


def _progress():
    """A callback that keeps one status line on a terminal's stderr (None elsewhere)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int, what: str) -> None:
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{done}/{total} {what[:60]:<60}{end}")
        sys.stderr.flush()
    return show


def run(args) -> int:
    """Run one tool; AtelierError (bad input) is left to trainer/cli.py's handler (exit 2)."""
    command = args.lora_command
    progress = _progress()
    if command == "inspect":
        from trainer.lora_tools.inspect import inspect
        result = inspect(args.file)
    elif command == "merge-into":
        from trainer.lora_tools.merge_into import merge_into
        if args.format not in FORMATS:
            raise ConfigError(f"--format {args.format}: choose {' or '.join(FORMATS)}.")
        result = merge_into(args.base, [parse_source(v, "--lora") for v in args.lora],
                            args.out, output_format=args.format, model_type=args.model_type,
                            dtype=args.dtype, on_progress=progress)
    elif command == "merge":
        from trainer.lora_tools.merge import merge
        result = merge([parse_source(v, "FILE") for v in args.files], args.out,
                       rank=args.rank, energy=args.energy, on_progress=progress)
    elif command == "resize":
        from trainer.lora_tools.resize import resize
        result = resize(args.file, args.out, rank=args.rank, energy=args.energy,
                        on_progress=progress)
    else:
        from trainer.lora_tools.extract import extract
        result = extract(args.base, args.tuned, args.out, rank=args.rank, energy=args.energy,
                         model_type=args.model_type, on_progress=progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(result.text())
    return 0
