"""The training loop, readable top to bottom: set up, train, sample, save.

`train(config, control)` is the whole engine. It runs in the session's background thread, in
the CLI's main thread, and once per process under `accelerate launch`. It reports through
`control.emit(...)` and reads stop/sample/save requests from `control`.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from trainer import finetune
from trainer.advice import comfyui_loads_part, images_without_masks, warmup_longer_than_run
from trainer.config import (DataType, EMAMode, TimeUnit, TrainConfig, TrainingMethod,
                            check_supported)
from trainer.compilation import (COMPILING_STATUS, FirstStepOfShape,
                                 compile_blocks, compile_wanted)
from trainer.batch_loss import BatchLoss
from trainer.backup import (Cadence, backup_root, capture_rng, list_backups, read_backup,
                            restore_rng, write_backup)
from trainer.control import Control
from trainer.data.dataset import collect_items
from trainer.data.loader import DataPipeline
from trainer.embeddings import AdditionalEmbeddings
from trainer.errors import ConfigError, DatasetError, TrainingError
from trainer.io import atomic_write_text
from trainer.layer_offload import check_layer_offload
from trainer.lora import continue_from_file
from trainer.metrics import MetricsLog, PendingSteps, SmoothedValue
from trainer.models import registry
from trainer.models.family import load_family
from trainer.models.flow_family import encoders_read_later
from trainer.ema import WeightEMA
from trainer.optim.clipping import clip_gradients
from trainer.optim.fused import FusedBackward, check_fused_backward
from trainer.optim.registry import ADAPTIVE, build_optimizer, effective_learning_rates
from trainer.optim.schedules import Schedule
from trainer import quantized_cache
from trainer.quantization import is_quantized, quantize_frozen_parts
from trainer.placement import PartPlacement
from trainer.residency import cache_served
from trainer.sample_prompts import SamplePromptCache
from trainer.sampling import record_sample_prompts, render_samples
from trainer.validation import Validation, check_validation_cadence
from trainer.validation_split import training_and_validation

TORCH_DTYPES = {DataType.FLOAT_32: torch.float32, DataType.FLOAT_16: torch.float16,
                DataType.BFLOAT_16: torch.bfloat16, DataType.TFLOAT_32: torch.float32}

# How often (host seconds) a GPU run reads its losses back to report progress; each read
# waits for the GPU (see PendingSteps). A CPU run reports every step: there it costs nothing.
GPU_REPORT_INTERVAL_S = 1.0


@dataclass
class TrainResult:
    output_path: str
    global_step: int
    epoch: int
    stopped_early: bool
    best_validation: tuple[float, int] | None = None  # (lowest validation loss, its step)


# --- Setup ----------------------------------------------------------------------------------

def mixed_precision(config: TrainConfig, device_type: str, warn) -> str:
    """accelerate's mixed-precision mode for `train_dtype`; refuses what the device can't run."""
    dtype = config.train_dtype
    if dtype == DataType.FLOAT_16:
        if device_type != "cuda":
            raise TrainingError(
                "train_dtype FLOAT_16 needs a CUDA GPU: float16 autocast with gradient scaling "
                "does not run on the CPU. Choose BFLOAT_16 or FLOAT_32 for CPU training.")
        return "fp16"
    if dtype == DataType.BFLOAT_16:
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError("train_dtype BFLOAT_16 is not supported by this GPU; "
                                "choose FLOAT_16 or FLOAT_32.")
        return "bf16"
    if dtype == DataType.TFLOAT_32:
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            warn("train_dtype TFLOAT_32 is a CUDA feature; training in FLOAT_32 on the CPU.")
    return "no"


def weight_dtypes(config: TrainConfig, device_type: str) -> dict[str, torch.dtype]:
    """The storage type of each model part's frozen weights (`<part>.weight_dtype`). A part
    stored quantized (FLOAT_8, INT_8, NFLOAT_4) keeps its quantized linear layers as they are
    (no `.to(dtype)` touches them: trainer/quantization.py) and the rest of it, norms,
    embeddings, convolutions, biases and unquantized layers, in the train dtype, as OneTrainer
    stores it: that is the type given here."""
    dtypes = {}
    for part in (*registry.facts(config.model_type).parts, "vae"):
        stored = getattr(config, part).weight_dtype
        dtype = TORCH_DTYPES[config.train_dtype if is_quantized(stored) else stored]
        if dtype == torch.float16 and device_type != "cuda":
            raise TrainingError(f"{part}.weight_dtype FLOAT_16 needs a CUDA GPU; on the CPU "
                                "use FLOAT_32 or BFLOAT_16.")
        dtypes[part] = dtype
    return dtypes


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
        module.enable_gradient_checkpointing()
        return
    # transformers; non-reentrant works with frozen inputs (LoRA). transformers 5.23 renamed
    # the switch (the old name is deprecated, going in v6); older releases have only that one.
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# The batch tensors the step uses on the device; the rest (has_mask, loss_weight) is read on
# the host, where reading it costs no wait for the GPU.
DEVICE_KEYS = ("pixel_values", "latent_mean", "latent_std", "mask",
               "inpaint_mask", "masked_pixels", "masked_latents")  # the last 3: inpainting


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's image tensors on the device, copied without blocking: from the
    DataLoader's pinned memory the copy overlaps the GPU's work, where a blocking copy
    (`.to(device)`) first waits for everything queued before it. On a CPU nothing moves."""
    if device.type == "cpu":
        return batch
    return {key: value.to(device, non_blocking=True)
            if key in DEVICE_KEYS and isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def output_path(config: TrainConfig) -> Path:
    return finetune.output_path(config)  # a LoRA / checkpoint file, or a diffusers folder


def part_is_active(config: TrainConfig, part: str, epoch: int, step: int) -> bool:
    """A part trains while its switch is on and its 'stop training after' is not reached."""
    settings = getattr(config, part)
    if not settings.train:
        return False
    unit = settings.stop_training_after_unit
    if unit == TimeUnit.EPOCH:
        return epoch < settings.stop_training_after
    if unit == TimeUnit.STEP:
        return step < settings.stop_training_after
    return True


# --- The loop -------------------------------------------------------------------------------

def record_prompts_first(config: TrainConfig, family, prompts, residency, device, *,
                         status, warn) -> None:
    """While the caches fill before training, the samples' prompts are encoded too, before
    the denoiser comes to the GPU (trainer/sample_prompts.py). A failure only warns: each
    sample then encodes them when it is first drawn."""
    if prompts is None or prompts.covers(family, config.samples):
        return
    try:
        with residency.present():  # the text encoders, read if they were not
            recorded = record_sample_prompts(family, config.samples, prompts, device)
        if recorded:
            status(f"Encoded the prompts of {recorded} sample(s) before training: sampling "
                   "needs no text encoder")
    except Exception as error:  # noqa: BLE001 - the samples encode them when drawn
        warn(f"Could not encode the samples' prompts before training ({error}); each sample "
             "encodes them when it is first drawn.")


def train(config: TrainConfig, control: Control | None = None, *,
          allow_custom_code: bool = False) -> TrainResult:
    """Run one training job. `allow_custom_code` (the CLI, a local app) permits the CUSTOM
    schedule, which imports a class named in the config."""
    control = control or Control()

    def warn(message: str) -> None:
        control.emit("warning", message=message)

    def status(message: str) -> None:
        control.emit("status", message=message)

    check_supported(config)
    check_fused_backward(config)
    # EMBEDDING (textual inversion) keeps the whole model frozen: only the embeddings train.
    embedding_only = config.training_method == TrainingMethod.EMBEDDING
    facts = registry.facts(config.model_type)  # the family's parts, its denoiser ("unet", "transformer")
    parts = [] if embedding_only else [p for p in facts.parts if getattr(config, p).train]
    trains_embeddings = any(e.train for e in config.additional_embeddings)
    if not parts and not trains_embeddings:
        raise ConfigError(f"Nothing to train: switch on text_encoder.train or "
                          f"{facts.denoiser}.train.")
    # An embedding's vectors get no gradient in a batch without its placeholder: DDP must
    # allow unused parameters then, as for a part that stops training part-way.
    stops_early = trains_embeddings or any(
        getattr(config, p).stop_training_after_unit != TimeUnit.NEVER for p in parts)
    # ... and for a family whose adapted layers include some the prediction never reaches
    unused_parameters = stops_early or registry.family_class(config.model_type).UNUSED_LAYERS

    # Device, precision, seed. find_unused_parameters lets DDP cope with a part that stops
    # training part-way (its adapter then gets no gradient).
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = mixed_precision(config, device_type, warn)
    # accelerate keeps its settings in a process-wide singleton; a server runs many jobs with
    # different precisions one after another, so start each from a clean one (the process
    # group, PartialState, is kept for `accelerate launch`).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=device_type == "cpu",  # on a CPU-only machine, `accelerate launch` DDP uses gloo
        mixed_precision=precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_parameters)])
    dtypes = weight_dtypes(config, accelerator.device.type)
    check_layer_offload(config, accelerator.num_processes)
    seed_everything(config.seed)
    is_main = accelerator.is_main_process

    # Data first: a bad folder should fail before minutes of model loading.
    status("Reading the dataset")
    items = collect_items(config.concepts, warn=warn)
    # VALIDATION concepts and the validation split: measured, never trained
    items, held_out = training_and_validation(config, items, warn=warn, write_list=is_main)
    check_validation_cadence(config, accelerator.num_processes)
    if is_main and (message := images_without_masks(config, items)) is not None:
        warn(message)
    data = DataPipeline(config, items, warn=warn, status=status, is_main=is_main)
    dataset = data.dataset  # buckets and their counts are reported above
    if config.batch_size > len(dataset):
        raise DatasetError(f"batch_size {config.batch_size} is larger than the dataset "
                           f"({len(dataset)} images with repeats); lower batch_size.")

    status(f"Loading {config.base_model_name}")
    # a part quantized by an earlier run: read as it is; a frozen text encoder the text cache
    # serves: read when it first runs (trainer/placement.py)
    with quantized_cache.serving(config), encoders_read_later():
        family = load_family(config)
    # FLOAT_8 / INT_8 / NFLOAT_4 parts: their linear layers quantized, before adapters are added
    for line in quantize_frozen_parts(family, config, accelerator.device, write_cache=is_main):
        status(line)
    vae = family.vae
    # Parts on the device, held on the CPU for now, or streamed (placement.py)
    placement = PartPlacement(config, family, accelerator.device, accelerator.num_processes,
                              status, is_main=is_main)
    placement.place(dtypes)

    # LoRA adapters on the trained parts (FINE_TUNE: their own weights, in float32), one
    # parameter group (own LR) per part.
    param_groups = []
    for part in parts:
        params = finetune.trainable_parameters(family.parts[part], config, part)
        param_groups.append({"params": params, "lr": config.part_learning_rate(part),
                             "name": part})
        if config.gradient_checkpointing and getattr(config, part).gradient_checkpointing:
            enable_gradient_checkpointing(family.parts[part])
    placement.recompute_streamed(parts, enable_gradient_checkpointing)
    continue_from_file(config, family, parts)  # lora_model_name: start from a saved LoRA
    # Additional embeddings: new tokens in the tokenizers, their vectors in the text encoders,
    # trained in a parameter group of their own (embedding_learning_rate).
    embeddings = family.embeddings = None
    if config.additional_embeddings:
        embeddings = family.embeddings = AdditionalEmbeddings(family, config, accelerator.device)
        if embeddings.trained():
            param_groups.append({"params": embeddings.trained(), "name": "embeddings",
                                 "lr": config.part_learning_rate("embeddings")})
        if embedding_only:
            status("Textual inversion: the model stays frozen, only the embeddings "
                   f"({', '.join(e.placeholder for e in config.additional_embeddings)}) train")

    # Streamed blocks of the frozen text encoders now: they fill the text cache. The denoiser's
    # and trained parts' after the caches are full.
    placement.stream_frozen_encoders(parts)
    dataloader = data.make_loader(family, accelerator.device)  # one bucket per batch
    inpainting = data.inpainting_inputs(vae)  # an inpainting UNet's mask + masked image
    validator = (Validation(config, family, held_out, accelerator.device, status=status,
                            warn=warn, is_main=is_main) if held_out else None)
    # The VAE and frozen text encoders leave the GPU when the caches serve them (epoch ends).
    residency = placement.residency(cache_served(config, family, data, parts, embeddings))
    # Samples' prompt encodings (the text encoders' only use once the text cache is full),
    # recorded while the caches fill or at the first draw; main process only, as sampling is.
    sample_prompts = SamplePromptCache.beside(data.text_cache) if is_main else None

    if placement.caches_first:
        status("Filling the latent and text caches before training")
        data.fill_caches(dataloader, family, vae, accelerator.device,
                         clip_skip=config.text_encoder.clip_skip)
        record_prompts_first(config, family, sample_prompts, residency, accelerator.device,
                             status=status, warn=warn)
        residency.park()

    # Streamed blocks (offload_fraction): pinned in CPU memory, the rest to the device.
    placement.stream_the_rest()
    compiling = compile_wanted(config)
    if compiling:
        blocks = compile_blocks(family.parts[facts.denoiser], data.bucket_count())
        status(f"Compiling the {'UNet' if facts.denoiser == 'unet' else 'transformer'}'s "
               f"{blocks} blocks with torch.compile (on the first step of each bucket)")

    optimizer = build_optimizer(config.optimizer.optimizer,
                                config.optimizer.model_dump(exclude={"optimizer"}), param_groups)
    if config.optimizer.optimizer in ADAPTIVE and not 0.1 <= config.learning_rate <= 10:
        warn(f"{config.optimizer.optimizer.value} finds its own step size: set every learning "
             f"rate to 1 (learning_rate is {config.learning_rate:g}), use a CONSTANT or COSINE "
             "schedule and a small batch (~4).")

    # A text encoder whose embeddings train is prepared (wrapped for DDP) even when its own
    # weights are frozen: DDP then averages the vectors' gradients like any other.
    wrapped_parts = parts + [p for p in (embeddings.encoders_with_trained_vectors()
                                         if embeddings else []) if p not in parts]
    prepared = accelerator.prepare(*[family.parts[p] for p in wrapped_parts], optimizer,
                                   device_placement=placement.placed_by_accelerate(wrapped_parts)
                                   + [True])
    optimizer = prepared[-1]
    family.wrapped = dict(zip(wrapped_parts, prepared[:-1]))
    # Sharded over the processes by accelerate, but moved to the device by the step itself
    # (`to_device`): accelerate would copy every tensor of the batch with a blocking copy.
    dataloader = accelerator.prepare_data_loader(dataloader, device_placement=False)
    # The trained parameters, listed once (clipping reads them every step).
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    # Fused backward pass: the optimizer steps inside backward(), bucket by bucket.
    fused = (FusedBackward(optimizer, world_size=accelerator.num_processes)
             if config.fused_backward_pass else None)

    def no_ddp_sync():
        """A fused pass averages each gradient itself (FusedBackward); DDP must not."""
        stack = contextlib.ExitStack()
        if fused is not None and accelerator.num_processes > 1:
            for module in family.wrapped.values():
                stack.enter_context(accelerator.no_sync(module))
        return stack

    epoch_steps = data.epoch_steps(config.epochs, accelerator.num_processes,
                                   config.gradient_accumulation_steps)
    steps_per_epoch, total_steps = epoch_steps[0], sum(epoch_steps)
    if is_main and (message := warmup_longer_than_run(config, total_steps)) is not None:
        warn(message)
    if is_main and (message := comfyui_loads_part(config)) is not None:
        warn(message)  # the format is the user's choice: said, never changed

    schedule = Schedule(config, optimizer, steps_per_epoch=steps_per_epoch,
                        total_steps=total_steps, allow_custom_code=allow_custom_code)
    ema = None
    if config.ema != EMAMode.OFF:
        ema = WeightEMA([p for g in param_groups for p in g["params"]], config.ema_decay,
                        device="cpu" if config.ema == EMAMode.CPU else accelerator.device)

    workspace = Path(config.workspace_dir)
    metrics = MetricsLog(workspace, enabled=is_main)
    if is_main:
        atomic_write_text(workspace / "config.json", config.to_json())
    destination = output_path(config)
    noise_generator = torch.Generator(accelerator.device).manual_seed(
        config.seed + accelerator.process_index)

    batch_loss = BatchLoss(config, family, data, accelerator.device, noise_generator,
                           inpainting)

    def training_loss(batch: dict, epoch: int, step: int) -> torch.Tensor:
        grad = {p: part_is_active(config, p, epoch, step) for p in parts}
        for part in embeddings.encoders_with_trained_vectors() if embeddings else ():
            grad[part] = True  # the vectors' gradient flows through the (frozen) encoder
        return batch_loss(batch, grad)

    def ema_weights():
        """Samples and saved models use the EMA weights when EMA is on."""
        return ema.applied() if ema is not None else contextlib.nullcontext()

    told_recorded = False  # the status about recorded prompts is said once

    def sample(step: int, epoch: int) -> None:
        nonlocal told_recorded
        if not config.samples or not is_main:
            return
        status(f"Sampling at step {step}")
        try:
            recorded = (sample_prompts is not None
                        and sample_prompts.covers(family, config.samples))
            encoders = tuple(name for name in family.parts if name != facts.denoiser)
            if recorded and not told_recorded:
                told_recorded = True
                status(f"The samples' prompts were encoded before (cache): sampling leaves "
                       f"the {' and '.join(encoders)} out")
            with ema_weights(), residency.present(leave=encoders if recorded else ()):
                for record in render_samples(family, config.samples, workspace / "samples",
                                             step=step, device=accelerator.device,
                                             inpaint_item=items[0], prompts=sample_prompts,
                                             without_encoders=recorded):
                    metrics.log_image(f"sample/{record['index']}", record["image"], step)
                    control.emit("sample", step=step, epoch=epoch, path=record["path"],
                                 prompt=record["prompt"])
        except Exception as error:  # a failed sample must not end the run
            warn(f"Sampling at step {step} failed: {error}")
        status("Training")

    best_validation: list = []  # [(loss, step)] once measured

    def validate(step: int, epoch: int) -> None:
        """The validation loss (EMA weights when EMA is on) to the metrics and the page."""
        status(f"Measuring the validation loss at step {step}")
        reduce = ((lambda t: accelerator.reduce(t, "sum"))
                  if accelerator.num_processes > 1 else None)
        with ema_weights(), residency.present(read_dropped=False), accelerator.autocast():
            values = validator.measure(accelerator.process_index,
                                       accelerator.num_processes, reduce)
        if not best_validation or values["validation_loss"] < best_validation[0][0]:
            best_validation[:] = [(values["validation_loss"], step)]
        metrics.log_step({"step": step, "epoch": epoch, **values})
        control.emit("validation", step=step, epoch=epoch, values=values,
                     best=best_validation[0])
        status("Training")

    def save(step: int, epoch: int, *, final: bool) -> None:
        """The model file: the final one at `destination`, intermediate ones beside it with
        the step in the name. Atomic: a failed write leaves no partial file."""
        accelerator.wait_for_everyone()
        if is_main:
            path = destination if final else destination.with_name(
                f"{destination.stem}-step{step:06d}{destination.suffix}")
            status(f"Saving to {path}")
            # a fine-tune's model folder holds the frozen text encoders too
            whole_model = finetune.is_fine_tune(config) and finetune.writes_folder(config)
            try:
                with ema_weights(), (residency.weights_read() if whole_model
                                     else contextlib.nullcontext()):
                    finetune.save_output(path, family, parts, config,  # + its config JSON
                                         dtype=TORCH_DTYPES[config.output_dtype], steps=step,
                                         epochs=epoch, title=path.stem)
            except OSError as error:
                raise TrainingError(f"Could not write {path}: {error}. Nothing was left "
                                    "half-written; free some space or choose another output "
                                    "folder.") from None
            control.emit("saved", path=str(path), step=step)
        accelerator.wait_for_everyone()

    # --- backups and resume ---
    named_params = {f"{part}/{name}": param for part in parts
                    for name, param in family.parts[part].named_parameters()
                    if any(param is p for g in param_groups if g["name"] != "embeddings"
                           for p in g["params"])}
    if embeddings is not None:  # their own names (a trained encoder also lists them)
        named_params.update(embeddings.named_trained())
    # The data order needs no saved state: the bucket sampler shuffles from (seed, epoch).
    generators = {"noise": noise_generator}
    # Samples, backups and saves every N steps, epochs, or seconds, minutes, hours
    sample_cadence = Cadence(config.sample_after, config.sample_after_unit)
    validation_cadence = Cadence(config.validate_after if validator else 0,
                                 config.validate_after_unit)
    backup_cadence = Cadence(config.backup_after, config.backup_after_unit)
    save_cadence = Cadence(config.save_every, config.save_every_unit)
    smooth = SmoothedValue()
    progress = {"step": 0, "epoch": 0, "batches_done": 0}

    def backup(step: int, epoch: int, batches_done: int) -> None:
        accelerator.wait_for_everyone()
        if is_main:
            status(f"Writing a backup at step {step}")
            folder = write_backup(
                config, step=step, epoch=epoch, batches_done=batches_done,
                weights=named_params, optimizer_state=optimizer.state_dict(),
                extra_state={"schedule": schedule.state_dict(),
                             "ema": ema.state_dict() if ema else None,
                             "rng": capture_rng(generators),
                             "smooth": [smooth._avg, smooth._n]},
                keep=config.rolling_backup_count if config.rolling_backup else None)
            control.emit("backup", path=str(folder), step=step)
        accelerator.wait_for_everyone()

    if config.continue_last_backup:
        found = list_backups(backup_root(config))
        if not found:
            warn(f"continue_last_backup: no backup in {backup_root(config)}; starting at step 0.")
        else:
            saved = read_backup(found[-1], config)
            with torch.no_grad():
                for key, param in named_params.items():
                    param.copy_(saved["weights"][key].to(param.device, param.dtype))
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["extra"]["schedule"])
            if ema is not None and saved["extra"]["ema"] is not None:
                ema.load_state_dict(saved["extra"]["ema"])
            restore_rng(saved["extra"]["rng"], generators)
            smooth._avg, smooth._n = saved["extra"]["smooth"]
            progress.update(saved["progress"])
            status(f"Continuing from {found[-1]} at step {progress['step']}")

    # --- train ---
    # Several processes read back at every step, all at the same step: a clock-timed read
    # would let one process stop on a NaN loss while the others wait in the next all-reduce.
    batched_reads = accelerator.device.type != "cpu" and accelerator.num_processes == 1
    pending = PendingSteps(GPU_REPORT_INTERVAL_S if batched_reads else 0.0)

    def report() -> None:
        """Log and announce the finished steps whose losses are still on the device (one
        host read for all of them); a non-finite loss ends the run here, before any backup
        or save could keep the weights it produced."""
        for record, loss in pending.flush():
            if not math.isfinite(loss):
                raise TrainingError(
                    f"The loss became {loss} at step {record['step']}. Usual causes: "
                    "a learning rate too high, or float16 overflow (try BFLOAT_16). "
                    f"The last backup (if any) in {backup_root(config)} is kept.")
            smoothed = smooth.update(loss)
            metrics.log_step({"step": record["step"], "epoch": record["epoch"], "loss": loss,
                              "smooth_loss": smoothed, "lr": record["lr"]})
            elapsed = record["time"] - started
            control.emit("progress", step=record["step"], total_steps=total_steps,
                         epoch=record["epoch"], epochs=config.epochs,
                         epoch_step=record["epoch_step"],
                         steps_per_epoch=record["steps_per_epoch"], loss=loss,
                         smooth_loss=smoothed, lr=record["lr"], lr_factor=record["lr_factor"],
                         eta_seconds=elapsed / (record["step"] - first_step)
                         * (total_steps - record["step"]), time=record["time"])

    control.emit("started", total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                 epochs=config.epochs, images=len(dataset))
    status("Training")
    step, stopped = progress["step"], False
    first_step, started = step, time.monotonic()
    new_shape = FirstStepOfShape()
    epoch = progress["epoch"]
    frozen: set[str] = set()  # parts whose "stop training after" has come
    for part in parts:
        family.parts[part].train()
    try:
        for epoch in range(progress["epoch"], config.epochs):
            data.set_epoch(dataloader, epoch)
            # The epoch's batch order comes from (seed, epoch); a resumed run skips the
            # batches it already trained in its first epoch.
            skip = progress["batches_done"] if epoch == progress["epoch"] else 0
            batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
            accumulated, micro, batches_done, batches_at_step = None, 0, skip, skip
            for batch in batches:
                batches_done += 1
                for part in parts:  # "stop training after": freeze the part from here on
                    if part not in frozen and not part_is_active(config, part, epoch, step):
                        frozen.add(part)
                        for p in finetune.parameters_of(family.parts[part], config):
                            p.requires_grad_(False)
                if embeddings is not None:
                    embeddings.freeze_finished(epoch, step)
                factor = schedule.before_step(step)
                compiles_now = compiling and new_shape.is_new(batch)
                if compiles_now:
                    status(COMPILING_STATUS)
                batch = to_device(batch, accelerator.device)
                with accelerator.accumulate(*family.wrapped.values()), no_ddp_sync():
                    with accelerator.autocast():
                        loss = training_loss(batch, epoch, step)
                    accelerator.backward(loss)  # with a fused pass, this also updates
                    # the mean over all processes, so the log shows the whole batch's loss;
                    # summed on the device, read back later (PendingSteps)
                    reduced = (accelerator.reduce(loss.detach(), "mean")
                               if accelerator.num_processes > 1 else loss.detach())
                    accumulated = reduced if accumulated is None else accumulated + reduced
                    micro += 1
                    if fused is None:
                        if accelerator.sync_gradients and config.clip_grad_norm:
                            clip_gradients(accelerator, trained, config.clip_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                if compiles_now:
                    status("Training")
                if not accelerator.sync_gradients:
                    if control.stop_requested:  # drop the unfinished accumulation window
                        stopped = True
                        break
                    continue
                step += 1
                batches_at_step = batches_done
                if embeddings is not None and config.preserve_embedding_norm:
                    embeddings.preserve_norms()
                lrs = effective_learning_rates(optimizer)  # the rates this update used
                schedule.after_step()
                if ema is not None and step % config.ema_update_step_interval == 0:
                    ema.update(step)
                pending.add({"step": step, "epoch": epoch, "lr": lrs, "lr_factor": factor,
                             "epoch_step": step - sum(epoch_steps[:epoch]),
                             "steps_per_epoch": epoch_steps[epoch], "time": time.monotonic()},
                            accumulated / micro)
                accumulated, micro = None, 0
                sample_now = (control.take_request("sample")
                              or sample_cadence.due_after_step(step))
                backup_now = control.take_request("backup") or backup_cadence.due_after_step(step)
                save_now = control.take_request("save") or save_cadence.due_after_step(step)
                validate_now = validation_cadence.due_after_step(step)
                if (pending.due() or sample_now or backup_now or save_now or validate_now
                        or control.stop_requested):
                    report()
                if validate_now:
                    validate(step, epoch)
                if sample_now:
                    sample(step, epoch)
                if backup_now:
                    backup(step, epoch, batches_at_step)
                if save_now:
                    save(step, epoch, final=False)
                if control.stop_requested:
                    stopped = True
                    break
            report()  # one read per epoch at least; before anything is written below
            data.epoch_done(epoch)  # what the latent cache saved
            residency.park()  # the caches hold what this epoch encoded
            if stopped:
                break
            if validation_cadence.due_after_epoch(epoch + 1):
                validate(step, epoch + 1)
            if sample_cadence.due_after_epoch(epoch + 1):
                sample(step, epoch + 1)
            if backup_cadence.due_after_epoch(epoch + 1):
                backup(step, epoch + 1, 0)
            if save_cadence.due_after_epoch(epoch + 1) and epoch + 1 < config.epochs:
                save(step, epoch + 1, final=False)
        epochs_done = epoch + (0 if stopped else 1)
        if stopped or config.backup_before_save:
            if stopped:
                backup(step, epoch, batches_at_step)
            else:
                backup(step, epochs_done, 0)
        save(step, epochs_done, final=True)
    finally:
        metrics.close()
    where = f"saved to {destination}"
    if stopped:
        status(f"Stopped at step {step}; {where}; a backup to continue from is in "
               f"{backup_root(config)}")
    else:
        status(f"Finished {step} steps; {where}")
    return TrainResult(str(destination), step, epochs_done, stopped,
                       best_validation[0] if best_validation else None)
