"""Fused backward pass (OneTrainer's "fused back pass"): the optimizer step inside the
backward pass.

A plain step keeps every gradient until the backward pass has produced the last one: for a
full fine-tune of SD 1.5's UNet that is 3.4 GB of float32 gradients alive at once (SDXL:
10 GB). Here each parameter is updated the moment its gradient is complete
(`Tensor.register_post_accumulate_grad_hook`), and the gradient is freed right after, so at
most a few gradients exist at any time.

One optimizer serves every parameter, as in a plain run: its parameter groups (per-part
learning rates, which the schedule sets before each step), its state (per parameter) and its
`state_dict` (backups, resume) are the same objects, so a fused and an unfused run can resume
each other's backups. For each parameter the hook narrows the groups to that one parameter,
calls `optimizer.step()`, and restores them: the update is exactly the one a full step would
make for that parameter, for optimizers whose update of a parameter depends only on that
parameter's gradient and state (AdamW, 8-bit AdamW, Adafactor, Lion, SGD).

What it cannot do, and refuses (`check_fused_backward`):
- gradient accumulation: the gradients of several micro-batches must add up before the step;
- clipping by the total gradient norm: the norm is known only after the last gradient, when
  every other parameter has already been updated;
- float16 training: the gradient scaler skips a whole step when any gradient overflowed,
  known only at the end;
- Prodigy: its step size comes from sums over all parameters' gradients.

Under DDP (several processes) each gradient is averaged over the processes in the hook, and
the loop runs the forward and backward passes in DDP's `no_sync()` so DDP does not average
them again.
"""
from __future__ import annotations

import torch

from trainer.config import DataType, Optimizer, TrainConfig
from trainer.errors import ConfigError

SUPPORTED = (Optimizer.ADAMW, Optimizer.ADAMW_8BIT, Optimizer.ADAFACTOR, Optimizer.LION,
             Optimizer.SGD)


def check_fused_backward(config: TrainConfig) -> None:
    """Refuse settings a fused backward pass cannot honour, naming each."""
    if not getattr(config, "fused_backward_pass", False):
        return
    reason = " (fused_backward_pass updates each weight as soon as its gradient is ready)"
    if config.gradient_accumulation_steps > 1:
        raise ConfigError("fused_backward_pass needs gradient_accumulation_steps 1: with "
                          "accumulation the gradients of several steps must add up first"
                          + reason + ". Raise batch_size instead, or switch the fused pass off.")
    if config.clip_grad_norm:
        raise ConfigError("fused_backward_pass cannot clip gradients by their total norm: the "
                          "norm is known only after every weight was already updated" + reason +
                          ". Leave clip_grad_norm empty, or switch the fused pass off.")
    if config.train_dtype == DataType.FLOAT_16:
        raise ConfigError("fused_backward_pass does not work with train_dtype FLOAT_16: its "
                          "gradient scaler skips a whole step on overflow, known only at the "
                          "end. Use BFLOAT_16 (no scaler) or FLOAT_32.")
    if config.optimizer.optimizer not in SUPPORTED:
        raise ConfigError(f"fused_backward_pass does not work with "
                          f"{config.optimizer.optimizer.value}: its step uses all gradients at "
                          f"once. Use one of {', '.join(o.value for o in SUPPORTED)}.")


class FusedBackward:
    """Steps `optimizer` parameter by parameter during `loss.backward()`.

    `optimizer` may be accelerate's wrapper (its torch optimizer is used). Every parameter of
    its groups that requires a gradient gets a hook; a parameter frozen later (requires_grad
    off) simply gets no gradient and no update. `world_size` > 1: gradients are averaged over
    the processes (torch.distributed) before each update.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, world_size: int = 1):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.world_size = world_size
        self.enabled = True
        self.updated = 0  # parameters updated in the current backward pass
        self._group_index: dict[torch.Tensor, int] = {}
        self._handles = []
        for index, group in enumerate(self.optimizer.param_groups):
            for param in group["params"]:
                if param.requires_grad and param not in self._group_index:
                    self._group_index[param] = index
                    self._handles.append(param.register_post_accumulate_grad_hook(self._step))

    @torch.no_grad()
    def _step(self, param: torch.Tensor) -> None:
        if not self.enabled or param.grad is None:
            return
        if self.world_size > 1:
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(self.world_size)
        groups = self.optimizer.param_groups
        index = self._group_index[param]
        kept = [group["params"] for group in groups]
        try:
            for number, group in enumerate(groups):
                group["params"] = [param] if number == index else []
            self.optimizer.step()
        finally:
            for group, params in zip(groups, kept):
                group["params"] = params
        param.grad = None  # the point of it all: this gradient's memory is free now
        self.updated += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
