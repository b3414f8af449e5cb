"""Command line: the same engine as the page, headless, with a terminal progress bar.

    python -m trainer train --config my.json [--set key=value ...]
    python -m trainer estimate --config my.json [--set key=value ...] [--json] [--gpu-gb N]
    python -m trainer make-tiny-model sd15 OUT_DIR        (or sdxl, sd15-inpaint, sdxl-inpaint,
                                                           flux, flux-schnell, chroma, sd3, sd35,
                                                           or clipseg, or captioner
                                                           (Florence-2), captioner-blip)
    python -m trainer masks --folder DIR --method clipseg --prompt "a cat" [--mode fill ...]
    python -m trainer caption --folder DIR --model PATH_OR_ID [--mode fill|replace] [--prefix T]
    python -m trainer caption-edit --folder DIR (--add-trigger W | --remove-trigger W |
                                                 --find TEXT --replace-with TEXT)
    python -m trainer dataset import SOURCE... --name NAME [--replace] [--json FILE]
    python -m trainer dataset list
    python -m trainer publish OUTPUT --repo-id USER/NAME [--private] [--dry-run FOLDER]
    python -m trainer lora inspect|merge-into|merge|resize|extract ... [--json]
                                                          (trainer/lora_tools/command.py)
    python -m trainer compare JOB_OR_FOLDER... [--json] [--plot FILE.png] [--workspace DIR]
    accelerate launch -m trainer train --config my.json     # several GPUs (DDP)

Bad input ends with a one-line message and exit status 2; Ctrl-C once stops after the current
step and saves, twice aborts. `masks` exits 1 when some image failed (the others are done);
`dataset import` exits 1 when some file was skipped or refused (the others are added);
`caption` and `caption-edit` exit 1 when some image's caption failed (the others are done);
`publish` exits 1 when the upload failed (no network, refused by the Hub).
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys

# No telemetry. The OpenMP wait policy is left at the library default: the app sets PASSIVE
# (its server and the watching browser share the cores with training), but a CLI run has the
# cores to itself, and PASSIVE made every small op wake sleeping threads there (tiny model at
# 64 px: 0.074-0.083 s a step passive, 0.029 s with the default; 2 cores).
CLI_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
           # CUDA: memory freed by one bucket's shapes is reused by the next (less reserved
           # beyond what is allocated); the CUDA bench figures were measured with it.
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def apply_cli_environment() -> None:
    """The environment a CLI run trains in (the bench's atelier runner uses it too, so that
    it measures what users run). Before torch is imported; a user's own setting wins."""
    for key, value in CLI_ENV.items():
        os.environ.setdefault(key, value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a JSON config")
    train.add_argument("--config", required=True, help="an Atelier JSON config (Export config)")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a key, e.g. --set unet.learning_rate=1e-4")
    train.add_argument("--preset", action="append", default=[],
                       help="a partial JSON config layered under --config (repeatable)")

    estimate = sub.add_parser(
        "estimate", help="the GPU memory a config's training needs (before training)",
        description="Estimate the GPU memory a config's training needs: weights (from the "
                    "model files), gradients and optimizer state, activations, and whether it "
                    "fits this machine's GPU (or --gpu-gb), naming what would make it fit.")
    estimate.add_argument("--config", required=True, help="an Atelier JSON config (Export config)")
    estimate.add_argument("--set", dest="overrides", action="append", default=[],
                          metavar="KEY=VALUE", help="override a key, e.g. --set batch_size=4")
    estimate.add_argument("--json", action="store_true",
                          help="print {weights_gb, optimizer_gb, activations_gb, total_gb, "
                               "device_gb, parts, ...} as JSON")
    estimate.add_argument("--gpu-gb", type=float, default=None, metavar="N",
                          help="compare with a GPU of N GB instead of this machine's")

    convert = sub.add_parser("convert-checkpoint",
                             help="convert a trusted pickle .ckpt to .safetensors (local only)")
    convert.add_argument("source")
    convert.add_argument("destination")

    tiny = sub.add_parser("make-tiny-model",
                          help="write a tiny random SD model, CLIPSeg for masks or a captioner "
                               "(offline demo)")
    # The flow kinds are trainer.models.tiny_flow.TINY_FLOW_KINDS, written out here so that
    # parsing the command line does not import diffusers (a test keeps the two lists equal).
    tiny.add_argument("family", choices=["sd15", "sdxl", "sd15-inpaint", "sdxl-inpaint",
                                         "flux", "flux-schnell", "chroma", "sd3", "sd35",
                                         "z-image", "flux2", "qwen", "clipseg", "captioner",
                                         "captioner-blip"])
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)

    from trainer.masks.clipseg import DEFAULT_CLIPSEG_MODEL
    masks = sub.add_parser("masks", help="write <image>-masklabel.png masks for a folder",
                           description="Masks for every image of a folder (white = focus).")
    masks.add_argument("--folder", required=True, help="the folder of training images")
    masks.add_argument("--method", choices=["clipseg", "alpha", "color"], default="clipseg",
                       help="clipseg: text prompt; alpha: the image's transparency; "
                            "color: everything that is not --color")
    masks.add_argument("--mode", choices=["replace", "fill", "add", "subtract"], default="replace",
                       help="replace all masks, fill only missing ones, add to or subtract from "
                            "existing masks")
    masks.add_argument("--prompt", default="", help="clipseg: what to keep in focus, e.g. 'a cat'")
    masks.add_argument("--model", default=DEFAULT_CLIPSEG_MODEL,
                       help="clipseg: a local model folder or hub id (default %(default)s)")
    masks.add_argument("--color", default="#ffffff", help="color: the background, '#RRGGBB'")
    masks.add_argument("--tolerance", type=int, default=30,
                       help="color: max channel difference counted as background (0-255)")
    masks.add_argument("--threshold", type=float, default=0.3,
                       help="keep what scores above this (0-1)")
    masks.add_argument("--smooth", type=int, default=0, help="blur the edges by N px")
    masks.add_argument("--grow", type=int, default=0, help="grow the mask by N px")
    masks.add_argument("--recursive", action="store_true", help="include sub-folders")

    from trainer.captions.models import DEFAULT_CAPTION_MODEL, DEFAULT_MAX_LENGTH
    caption = sub.add_parser(
        "caption", help="write <image>.txt captions for a folder with Florence-2 or BLIP",
        description="Captions for every image of a folder, written to <image stem>.txt. Exit "
                    "status 0: all done; 1: some image failed (its caption is left as it was); "
                    "2: bad arguments or no model.")
    caption.add_argument("--folder", required=True, help="the folder of training images")
    caption.add_argument("--model", default=DEFAULT_CAPTION_MODEL,
                         help="a local Florence-2 or BLIP model folder, or a hub id (downloaded "
                              "only with --online or on a Space; default %(default)s)")
    caption.add_argument("--mode", choices=["fill", "replace"], default="fill",
                         help="fill: only images without a caption (default); replace: all")
    caption.add_argument("--style", choices=["short", "detailed"], default="short",
                         help="a one-phrase caption or a few sentences")
    caption.add_argument("--prefix", default="", help="put before each caption, e.g. a trigger word")
    caption.add_argument("--suffix", default="", help="put after each caption")
    caption.add_argument("--max-length", type=int, default=None, metavar="N",
                         help="generate at most N tokens (about N words; default "
                              f"{DEFAULT_MAX_LENGTH['short']} short, "
                              f"{DEFAULT_MAX_LENGTH['detailed']} detailed)")
    caption.add_argument("--online", action="store_true",
                         help="allow downloading a hub id's model")
    caption.add_argument("--recursive", action="store_true", help="include sub-folders")

    caption_edit = sub.add_parser(
        "caption-edit", help="add or remove a trigger word, or find and replace, in a "
                             "folder's captions",
        description="Edit every <image stem>.txt of a folder. Exit status 0: done; 1: some "
                    "caption could not be read or written; 2: bad arguments.")
    caption_edit.add_argument("--folder", required=True, help="the folder of training images")
    edit_action = caption_edit.add_mutually_exclusive_group(required=True)
    edit_action.add_argument("--add-trigger", metavar="WORD",
                             help="put WORD at the start of each caption (once)")
    edit_action.add_argument("--remove-trigger", metavar="WORD",
                             help="take WORD off the start of each caption")
    edit_action.add_argument("--find", metavar="TEXT", help="plain text to replace (with "
                             "--replace-with; case-sensitive)")
    caption_edit.add_argument("--replace-with", default=None, metavar="TEXT",
                              help="what --find's text becomes ('' deletes it)")
    caption_edit.add_argument("--recursive", action="store_true", help="include sub-folders")

    dataset = sub.add_parser("dataset", help="import images into the workspace's datasets")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", required=True)
    workspace_help = ("the workspace folder (default: $ATELIER_WORKSPACE, /data/workspace on "
                      "a Space, else the repo's workspace/, as the page)")
    imports = dataset_sub.add_parser(
        "import", help="import files, folders and zips into <workspace>/datasets/NAME",
        description="Import images, .txt captions, -masklabel.png masks, folders and zip "
                    "files into <workspace>/datasets/NAME, with the page's checks and limits. "
                    "Exit status 0: all added; 1: something skipped or refused; 2: bad "
                    "arguments.")
    imports.add_argument("sources", nargs="+", metavar="SOURCE",
                         help="an image, caption or mask file, a folder or a .zip")
    imports.add_argument("--name", required=True, help="the dataset's name (a folder name)")
    imports.add_argument("--workspace", default=None, help=workspace_help)
    imports.add_argument("--replace", action="store_true",
                         help="replace files the dataset already has (default: skip them)")
    imports.add_argument("--json", default=None, metavar="FILE",
                         help="also write the report as JSON: dataset, added, skipped")
    listing = dataset_sub.add_parser("list", help="the datasets with their counts")
    listing.add_argument("--workspace", default=None, help=workspace_help)

    publish = sub.add_parser(
        "publish", help="upload an output with its config, samples and a model card to the Hub",
        description="Publish a LoRA, single-file checkpoint or diffusers folder to the Hugging "
                    "Face Hub with its config JSON, the run's samples and a README.md model "
                    "card. The token is HF_TOKEN, else the saved `hf auth login`. Exit status "
                    "0: published (or the --dry-run folder written); 1: the upload failed; "
                    "2: bad arguments.")
    publish.add_argument("output", help="the output: a .safetensors file or a diffusers folder")
    publish.add_argument("--repo-id", required=True, help="the model repo, USER/NAME")
    publish.add_argument("--private", action="store_true",
                         help="create the repo private (an existing repo keeps its visibility)")
    publish.add_argument("--dry-run", default=None, metavar="FOLDER",
                         help="only write the folder that would be uploaded (a new folder)")
    publish.add_argument("--endpoint", default=None, metavar="URL",
                         help="the Hub's address (default: HF_ENDPOINT or huggingface.co)")
    publish.add_argument("--base-model", default=None, metavar="HUB_ID",
                         help="the base model's hub id for the card, when the run used a local "
                              "copy (default: the config's base model when it is a hub id)")
    publish.add_argument("--instance-prompt", default=None, metavar="TEXT",
                         help="the trigger word(s) for the card (default: a concept's prompt)")
    from trainer.lora_tools import command as lora_command
    lora_command.add_parser(sub)

    compare = sub.add_parser(
        "compare", help="the settings that differ between runs, their losses, their curves",
        description="Compare runs: the settings that differ (config.json, nested keys dotted), "
                    "each run's final and smoothed loss and best validation loss, and with "
                    "--plot their loss curves overlaid (trainer/compare.py).")
    compare.add_argument("runs", nargs="+", metavar="JOB_OR_FOLDER",
                         help="a job number (its folder in the workspace) or a run's folder")
    compare.add_argument("--json", action="store_true",
                         help='print {"differences": {key: [value per run]}, "runs": [...]}')
    compare.add_argument("--plot", default=None, metavar="FILE.png",
                         help="write the overlaid loss and validation-loss curves as PNG")
    compare.add_argument("--workspace", default=None, help=workspace_help)
    return parser


class ProgressBar:
    """tqdm bar fed by the loop's events: step of total, epoch, loss, smoothed loss, lr, ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.validation = ""  # the newest validation loss, shown beside the training loss

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
                f"smooth {event['smooth_loss']:.4f}{self.validation} lr {lr:.2e}")
        elif kind == "validation":
            value, (best, at) = event["values"]["validation_loss"], event["best"]
            self.validation = f" val {value:.4f}"
            text = (f"validation loss {value:.4f} at step {event['step']} (best {best:.4f} at "
                    f"step {at})")
            (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)
        elif kind in ("status", "warning", "saved", "sample"):
            text = event.get("message") or f"{kind}: {event.get('path')}"
            (self.bar.write if self.bar is not None else print)(
                ("warning: " if kind == "warning" else "") + text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_estimate(args) -> int:
    import json

    from trainer import memory_estimate
    from trainer.config import load_config

    config = load_config(args.config, args.overrides,
                         warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    device = "auto" if args.gpu_gb is None else args.gpu_gb
    result = memory_estimate.estimate(config, device_gb=device)
    warning = memory_estimate.warning_sentence(config, result)
    if args.json:
        print(json.dumps({**result.to_json(), "warning": warning}, indent=2))
        return 0
    print(memory_estimate.fit_sentence(result))
    print(memory_estimate.breakdown(result))
    print("Weights by part: " + ", ".join(
        f"{part} {gb:.2f} GB{'' if part in result.on_gpu else ' (off the GPU)'}"
        for part, gb in result.parts.items()))
    for note in result.notes:
        print(note)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def run_train(args) -> int:
    from trainer.config import load_config, read_json
    from trainer.control import Control
    from trainer.loop import train

    presets = [read_json(p) for p in args.preset]
    config = load_config(args.config, args.overrides, presets=presets,
                         warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    # A foreground run never writes into the folder of a job a server is running.
    from trainer.jobs.lock import refuse_server_job_folders
    refuse_server_job_folders({"workspace_dir": config.workspace_dir,
                               "output_model_destination": config.output_model_destination})
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
        if result.best_validation is not None:
            best, at = result.best_validation
            print(f"Best validation loss {best:.4f} at step {at}")
    return 0


def run_make_tiny_model(args) -> int:
    if args.family == "clipseg":
        from trainer.masks.tiny_clipseg import build_tiny_clipseg
        build, name = build_tiny_clipseg, "CLIPSeg"
    elif args.family in ("captioner", "captioner-blip"):
        from trainer.captions import tiny as tiny_captioners
        build, name = ((tiny_captioners.build_tiny_florence2, "Florence-2 captioning")
                       if args.family == "captioner"
                       else (tiny_captioners.build_tiny_blip, "BLIP captioning"))
    elif args.family == "z-image":
        from trainer.models.tiny_z_image import build_tiny_z_image_model
        build, name = build_tiny_z_image_model, "Z-Image"
    elif args.family == "qwen":
        from trainer.models.tiny_qwen_image import build_tiny_qwen_image_model
        build, name = build_tiny_qwen_image_model, "Qwen-Image"
    elif args.family == "flux2":
        from trainer.models.tiny_flux2 import build_tiny_flux2_model
        build, name = build_tiny_flux2_model, "Flux.2 klein"
    elif args.family in ("flux", "flux-schnell", "chroma", "sd3", "sd35"):
        from trainer.models import tiny_flow
        build = functools.partial(tiny_flow.build_tiny_flow_model, args.family)
        name = tiny_flow.TINY_FLOW_LABELS[args.family]
    else:
        from trainer.models import tiny
        build, name = {"sd15": (tiny.build_tiny_sd15, "SD 1.5"),
                       "sdxl": (tiny.build_tiny_sdxl, "SDXL"),
                       "sd15-inpaint": (tiny.build_tiny_sd15_inpaint, "SD 1.5 inpainting"),
                       "sdxl-inpaint": (tiny.build_tiny_sdxl_inpaint, "SDXL inpainting"),
                       }[args.family]
    path = build(args.out_dir, seed=args.seed)
    print(f"Wrote a tiny {name} model to {path}")
    return 0


def run_over_folder(args, run) -> int:
    """A folder-wide run (masks, captions) in the terminal: a progress bar, Ctrl-C stops after
    the current image (twice aborts), the summary printed. Exit 0, 1 when an image failed,
    130 when stopped."""
    from tqdm import tqdm

    stop = []
    bar = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="image", dynamic_ncols=True, file=sys.stderr)
        bar.set_postfix_str(name)
        bar.update(done - bar.n)

    def on_interrupt(signum, frame):
        if stop:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        print("\nStopping after the current image (Ctrl-C again to abort).", file=sys.stderr)
        stop.append(True)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        summary = run(progress=progress, should_stop=lambda: bool(stop),
                      recursive=args.recursive)
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
    print(summary.text())
    if summary.stopped:
        return 130
    return 1 if summary.failed else 0


def run_masks(args) -> int:
    from trainer.masks.generate import MaskSettings, generate_masks

    settings = MaskSettings(method=args.method, mode=args.mode, prompt=args.prompt,
                            model=args.model, color=args.color, tolerance=args.tolerance,
                            threshold=args.threshold, smooth=args.smooth, grow=args.grow)
    settings.check()  # bad settings: one line, before any image is read
    return run_over_folder(args, lambda **hooks: generate_masks(args.folder, settings, **hooks))


def run_caption(args) -> int:
    from trainer.captions.generate import CaptionSettings, caption_folder

    settings = CaptionSettings(model=args.model, mode=args.mode, style=args.style,
                               prefix=args.prefix, suffix=args.suffix,
                               max_length=args.max_length, online=args.online)
    settings.check()  # bad settings: one line, before any image is read
    return run_over_folder(args, lambda **hooks: caption_folder(args.folder, settings, **hooks))


def run_caption_edit(args) -> int:
    from trainer.captions import edit
    from trainer.errors import CaptionError

    if args.find is not None:
        if args.replace_with is None:
            raise CaptionError("--find needs --replace-with (give '' to delete the text)")
        summary = edit.find_replace(args.folder, args.find, args.replace_with, args.recursive)
    elif args.replace_with is not None:
        raise CaptionError("--replace-with goes with --find")
    elif args.add_trigger is not None:
        summary = edit.add_trigger(args.folder, args.add_trigger, args.recursive)
    else:
        summary = edit.remove_trigger(args.folder, args.remove_trigger, args.recursive)
    print(summary.text())
    return 1 if summary.failed else 0


def run_dataset(args) -> int:
    import json

    from trainer.data.datasets import default_workspace, list_datasets
    from trainer.data.imports import import_dataset
    from trainer.io import atomic_write_text

    workspace = args.workspace or default_workspace()
    if args.dataset_command == "list":
        for summary in list_datasets(workspace):
            print(summary.label())
        return 0
    report = import_dataset(args.sources, args.name, workspace, replace=args.replace)
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    print(report.text())
    return 0 if report.complete else 1


def run_publish(args) -> int:
    from trainer import publish

    options = {"base_model": args.base_model, "instance_prompt": args.instance_prompt}
    if args.dry_run:
        files = publish.build_upload_folder(args.output, args.dry_run, repo_id=args.repo_id,
                                            **options)
        print(f"Wrote the folder for {args.repo_id} to {args.dry_run}: {', '.join(files)}")
        return 0
    try:
        url = publish.publish(args.output, args.repo_id, private=args.private,
                              endpoint=args.endpoint, on_status=print, **options)
    except publish.UploadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Published to {url}")
    return 0


def run_compare(args) -> int:
    import json

    from trainer import compare

    runs = compare.read_runs(args.runs, args.workspace)
    if args.plot:
        compare.write_plot(runs, args.plot)
    print(json.dumps(compare.comparison(runs), indent=2) if args.json
          else compare.comparison_text(runs))
    if args.plot and not args.json:
        print(f"Wrote the curves to {args.plot}")
    return 0


def run_lora(args) -> int:
    from trainer.lora_tools import command
    return command.run(args)


def main(argv: list[str] | None = None) -> int:
    apply_cli_environment()
    args = _parser().parse_args(argv)
    from trainer.errors import AtelierError
    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "estimate":
            return run_estimate(args)
        if args.command == "convert-checkpoint":
            from trainer.models.convert import convert_pickle_checkpoint
            print(f"Wrote {convert_pickle_checkpoint(args.source, args.destination)}")
            return 0
        if args.command == "masks":
            return run_masks(args)
        if args.command == "caption":
            return run_caption(args)
        if args.command == "caption-edit":
            return run_caption_edit(args)
        if args.command == "dataset":
            return run_dataset(args)
        if args.command == "publish":
            return run_publish(args)
        if args.command == "lora":
            return run_lora(args)
        if args.command == "compare":
            return run_compare(args)
        return run_make_tiny_model(args)
    except AtelierError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "masks":
            print("Aborted; the masks written so far are kept, and none is half-written.",
                  file=sys.stderr)
        elif args.command == "caption":
            print("Aborted; the captions written so far are kept, and none is half-written.",
                  file=sys.stderr)
        elif args.command == "publish":
            print("Aborted; no commit was made (the repo may exist, empty).", file=sys.stderr)
        elif args.command == "lora":
            print("Aborted; nothing was written (outputs are written whole or not at all).",
                  file=sys.stderr)
        else:
            print("Aborted; the last backup (if any) is left as it was.", file=sys.stderr)
        return 130
