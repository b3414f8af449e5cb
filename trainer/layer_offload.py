"""Offloading: a share of a part's frozen weights lives in pinned CPU memory and is streamed
to the GPU block by block as each block runs. The share is the part's own `offload_fraction`
(OneTrainer's key, any part: the UNet or transformer, CLIP, T5, the language-model encoders)
or the older top-level `layer_offload_fraction` (the denoiser and the trained text encoders):
TrainConfig.offload_fraction_of.

The units are the blocks gradient checkpointing recomputes: the UNet's ResnetBlock2D and
BasicTransformerBlock, the flow transformers' (single) transformer blocks, a CLIP or T5
encoder layer, a language model's decoder layer. A forward pre-hook gives each frozen weight
of a streamed block a fresh device copy of its pinned CPU tensor (copied without blocking);
the forward post-hook points the weight back at the CPU tensor. Nothing else holds the device
copy, so it is freed as soon as the block is done, unless autograd saved it for the backward
pass: that is why a part a gradient flows through needs checkpointing. A checkpointed block
saves nothing in its forward pass and runs again (its pre-hook included) in the backward pass,
whose saved tensors are freed once that block's gradient is computed; torch may stop that
recomputation before the block's end, and its post-hook with it, so loading a block sends the
one loaded before back to the CPU (`LayerOffload.loaded`). So at most a block or two of
streamed weights is on the GPU at a time, at the cost of copying the streamed share twice per
step (forward and recomputation). A frozen text encoder runs without gradient (it fills the
text cache): one copy per call, no checkpointing needed.

Trained weights (LoRA adapters, a fine-tuned part) never move: only parameters frozen when
the run starts are streamed.
"""
from __future__ import annotations

import re

import torch

from trainer.config import CompileMode, TrainConfig, TrainingMethod
from trainer.errors import ConfigError

# The block classes of every family, by name: diffusers' UNet blocks and transformer blocks
# (BasicTransformerBlock, FluxTransformerBlock, JointTransformerBlock, ZImageTransformerBlock,
# ...), CLIP's and T5's encoder layers, the Qwen language models' decoder layers. Only the
# outermost match of a nesting is a unit.
UNIT_NAME = re.compile(r"(ResnetBlock2D|TransformerBlock|EncoderLayer|DecoderLayer|T5Block)$")


def offloaded_parts(config: TrainConfig) -> list[str]:
    """The family's parts with a share to stream, in the family's order."""
    return [p for p in config.model_type.facts.parts if config.offload_fraction_of(p) > 0]


def _key(config: TrainConfig, part: str) -> str:
    """The config key that set a part's fraction, as a message names it."""
    own = getattr(config, part).offload_fraction
    key = f"{part}.offload_fraction" if own > 0 else "layer_offload_fraction"
    return f"{key} {config.offload_fraction_of(part):g}"


def gradient_flows(config: TrainConfig, part: str) -> bool:
    """Whether training back-propagates through `part`: the denoiser always, a text encoder
    that trains or holds trained embedding vectors."""
    if part == config.model_type.facts.denoiser:
        return True
    trains = config.training_method != TrainingMethod.EMBEDDING and getattr(config, part).train
    return trains or any(e.train for e in config.additional_embeddings)


def check_layer_offload(config: TrainConfig, num_processes: int = 1) -> None:
    """Refuse what streaming cannot do, naming the keys."""
    check_activation_offloading(config)
    denoiser = config.model_type.facts.denoiser
    for part in sorted(offloaded_parts(config), key=lambda p: p != denoiser):  # denoiser first
        key = _key(config, part)
        section = getattr(config, part)
        if gradient_flows(config, part) and not (config.gradient_checkpointing
                                                 and section.gradient_checkpointing):
            raise ConfigError(
                f"{key} needs gradient_checkpointing (and {part}.gradient_checkpointing): "
                "without it autograd keeps every streamed block's weights on the GPU for the "
                "backward pass, and nothing is saved. Switch checkpointing on or set the "
                "fraction to 0.")
        if config.training_method == TrainingMethod.FINE_TUNE and section.train:
            name = "UNet" if part == "unet" else part
            raise ConfigError(
                f"{key}: a fine-tuned {name}'s weights change at every step and cannot live on "
                "the CPU; streaming is for frozen weights (LoRA, embeddings). Set the fraction "
                "to 0.")
        if config.compile == CompileMode.ON and part == config.model_type.facts.denoiser:
            raise ConfigError(
                f"compile ON with {key.split()[0]} > 0: a compiled block cannot follow its "
                "weights moving between the CPU and the GPU at every call. Set compile to AUTO "
                "or OFF, or the fraction to 0.")
        if num_processes > 1:
            raise ConfigError(f"{key.split()[0]} with several processes: DDP needs every "
                              "weight on its GPU. Set it to 0 for `accelerate launch` runs.")


def offloading_checkpoint(device: torch.device | str):
    """diffusers' gradient-checkpointing function with the block's inputs kept in CPU memory
    (`activation_offloading`): each checkpointed block's tensor inputs are copied to the CPU,
    the recorded recomputation copies them back, and nothing else of the block is saved. The
    values are copies, so the outputs and gradients are those of plain checkpointing. (The
    caller's device tensors are freed as soon as the model moves on from them: the copy's
    backward keeps no tensor.)"""
    device = torch.device(device)

    def checkpointed(block, *args):
        stored = tuple(a.to("cpu", non_blocking=True) if torch.is_tensor(a) else a
                       for a in args)

        def run(*inputs):
            return block(*(a.to(device, non_blocking=True) if torch.is_tensor(a) else a
                           for a in inputs))
        checkpointed.calls += 1
        return torch.utils.checkpoint.checkpoint(run, *stored, use_reentrant=False)
    checkpointed.calls = 0  # blocks run so far (the tests count them)
    return checkpointed


def check_activation_offloading(config: TrainConfig) -> None:
    denoiser = config.model_type.facts.denoiser
    section = getattr(config, denoiser)
    if section.activation_offloading and not (config.gradient_checkpointing
                                              and section.gradient_checkpointing):
        raise ConfigError(f"{denoiser}.activation_offloading keeps the activations gradient "
                          "checkpointing saves in CPU memory: switch gradient_checkpointing "
                          f"(and {denoiser}.gradient_checkpointing) on, or offloading off.")


def offload_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost blocks of `module` whose class name marks a block (UNIT_NAME)."""
    units: list[torch.nn.Module] = []
    inside: set[int] = set()
    for sub in module.modules():  # parents come before their children
        if id(sub) in inside:
            continue
        if UNIT_NAME.search(type(sub).__name__):
            units.append(sub)
            inside.update(id(m) for m in sub.modules())
    return units


class LayerOffload:
    """Streams `fraction` of `module`'s frozen weight bytes (whole blocks, largest first)."""

    def __init__(self, module: torch.nn.Module, fraction: float, device: torch.device | str):
        """`module` is still on the CPU (in its storage type, adapters added): the streamed
        blocks' frozen weights are pinned there, and everything else moves to `device`, so
        the whole part is never on the device at once."""
        self.device = torch.device(device)
        self.loads = 0  # block loads so far (one per block call): what the tests count
        self.loaded: set[torch.nn.Module] = set()  # units whose weights are on the device now
        units = offload_units(module)
        frozen = {id(p) for p in module.parameters() if not p.requires_grad}
        total = sum(p.numel() * p.element_size() for p in module.parameters()
                    if id(p) in frozen)

        def frozen_bytes(unit):
            return sum(p.numel() * p.element_size() for p in unit.parameters() if id(p) in frozen)

        self.units: list[torch.nn.Module] = []
        self.streamed_bytes = 0
        for unit in sorted(units, key=frozen_bytes, reverse=True):
            if self.streamed_bytes >= fraction * total:
                break
            self.units.append(unit)
            self.streamed_bytes += frozen_bytes(unit)
        self.total_bytes = total
        pin = self.device.type == "cuda"
        self._host: dict[torch.nn.Module, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        streamed: set[int] = set()
        for unit in self.units:
            pairs = []
            for param in unit.parameters():
                if id(param) in frozen and id(param) not in streamed:
                    host = param.data.to("cpu")
                    param.data = host.pin_memory() if pin else host
                    pairs.append((param, param.data))
                    streamed.add(id(param))
            self._host[unit] = pairs
        self.module, self._streamed = module, streamed
        _move_except(module, self.device, streamed)
        for unit in self.units:
            unit.register_forward_pre_hook(self._load)
            unit.register_forward_hook(self._unload)

    def move_resident(self, device: torch.device | str) -> None:
        """Move everything but the streamed weights (which stay in pinned CPU memory): how
        the part is parked in CPU memory and brought back (trainer/residency.py)."""
        _move_except(self.module, torch.device(device), self._streamed)

    def forget(self) -> None:
        """Let go of the pinned CPU copies: the part's weights are being dropped
        (trainer/residency.py's ReadAgain); its blocks run again only under a new offload."""
        self._host = {unit: [] for unit in self._host}
        self.loaded.clear()

    def _load(self, unit, _args) -> None:
        # A block recomputed in the backward pass may never see its forward post-hook: torch's
        # checkpointing stops the recomputation as soon as it has the tensors it saves
        # (early stop), so its weights would stay on the device until the next step. The
        # block loaded before is sent back here instead; what autograd saved of it stays
        # valid, as checkpointing keeps its own references to the device copies.
        for other in list(self.loaded):
            self._unload(other, None, None)
        self.loads += 1
        for param, host in self._host[unit]:
            param.data = self._to_device(host)
        self.loaded.add(unit)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True)

    def _unload(self, unit, _args, _output) -> None:
        for param, host in self._host[unit]:
            param.data = host
        self.loaded.discard(unit)


def _move_except(module: torch.nn.Module, device: torch.device, kept: set[int]) -> None:
    """`module.to(device)` for every parameter and buffer not in `kept` (ids), one tensor at
    a time: `module.to` would first copy the streamed weights to the device too."""
    for sub in module.modules():
        for param in sub._parameters.values():
            if param is not None and id(param) not in kept:
                param.data = param.data.to(device)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = buffer.to(device)


def offload_parts(config: TrainConfig, family, parts: list[str],
                  device: torch.device) -> dict[str, LayerOffload]:
    """Stream the configured share of each of `parts` (still on the CPU, adapters added)."""
    return {part: LayerOffload(family.parts[part], config.offload_fraction_of(part), device)
            for part in parts}
