"""Fused backward pass (OneTrainer's "fused back pass"): the optimizer step inside the
backward pass.

A plain step keeps every gradient until the backward pass has produced the last one: for a
full fine-tune of SD 1.5's UNet that is 3.4 GB of float32 gradients alive at once (SDXL:
10 GB). Here parameters are updated as soon as their gradients are complete
(`Tensor.register_post_accumulate_grad_hook`), a bucket of them at a time, and the gradients
are freed right after, so only a bucket or two of gradients exist at any time.

One optimizer serves every parameter, as in a plain run: its parameter groups (per-part
learning rates, which the schedule sets before each step), its state (per parameter) and its
`state_dict` (backups, resume) are the same objects, so a fused and an unfused run can resume
each other's backups. For each bucket the hook narrows the groups to the bucket's parameters,
calls `optimizer.step()`, and restores them: the update is exactly the one a full step would
make for those parameters, for optimizers whose update of a parameter depends only on that
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
from trainer.optim.stochastic_rounding import narrowed

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


# Parameters are updated in buckets of about this many bytes of gradient: one optimizer call
# per bucket instead of one per parameter (SD 1.5's UNet has 686 weight tensors; a call costs
# the host ~0.1-0.3 ms, which on a GPU was 3.4x the step). Gradients alive at once stay a
# bucket or two, a few percent of the 3.4 GB a plain step holds.
BUCKET_BYTES = 128 * 2**20
MIN_BUCKETS = 16  # a small model is still cut in this many (its gradients freed as it goes)


class _Bucket:
    __slots__ = ("size", "ready")

    def __init__(self, size: int):
        self.size = size                        # parameters in the bucket
        self.ready: list[torch.Tensor] = []     # those whose gradient is complete


class FusedBackward:
    """Steps `optimizer` bucket by bucket during `loss.backward()`.

    `optimizer` may be accelerate's wrapper (its torch optimizer is used). Every parameter of
    its groups that requires a gradient gets a hook; a parameter frozen later (requires_grad
    off) simply gets no gradient and no update. `world_size` > 1: gradients are averaged over
    the processes (torch.distributed) before each update. `bucket_bytes`: the gradient bytes
    per bucket (default: BUCKET_BYTES, or less, so that a small model still has MIN_BUCKETS).

    Buckets are cut from the parameters in reverse order: backward produces gradients from
    the model's output back to its input, so a bucket's gradients arrive close together. A
    bucket is stepped when its last gradient arrives; one whose gradients do not all arrive (a
    part frozen by "stop training after", a weight the forward pass did not use) is stepped
    when the backward pass ends.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, world_size: int = 1,
                 bucket_bytes: int | None = None):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.world_size = world_size
        self.enabled = True
        self.updated = 0  # parameters updated since this object was made
        self.steps = 0    # optimizer calls since this object was made
        self._group_index: dict[torch.Tensor, int] = {}
        for index, group in enumerate(self.optimizer.param_groups):
            for param in group["params"]:
                if param.requires_grad and param not in self._group_index:
                    self._group_index[param] = index
        params = list(self._group_index)
        total = sum(p.numel() * p.element_size() for p in params)
        limit = max(1, bucket_bytes if bucket_bytes is not None
                    else min(BUCKET_BYTES, total // MIN_BUCKETS))
        self._bucket_of: dict[torch.Tensor, _Bucket] = {}
        self.buckets: list[_Bucket] = []
        members: list[torch.Tensor] = []
        size = 0
        for param in reversed(params):
            members.append(param)
            size += param.numel() * param.element_size()
            if size >= limit or param is params[0]:
                bucket = _Bucket(len(members))
                self.buckets.append(bucket)
                self._bucket_of.update((member, bucket) for member in members)
                members, size = [], 0
        self._flush_queued = False
        self._handles = [param.register_post_accumulate_grad_hook(self._on_gradient)
                         for param in params]

    def _on_gradient(self, param: torch.Tensor) -> None:
        if not self.enabled or param.grad is None:
            return
        if self.world_size > 1:
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(self.world_size)
        if not self._flush_queued:
            # Runs once autograd has finished this backward pass (as DDP's reducer does).
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self._flush_queued = True
        bucket = self._bucket_of[param]
        bucket.ready.append(param)
        if len(bucket.ready) == bucket.size:
            self._step(bucket)

    def _flush(self) -> None:
        self._flush_queued = False
        for bucket in self.buckets:
            if bucket.ready:
                self._step(bucket)

    @torch.no_grad()
    def _step(self, bucket: _Bucket) -> None:
        """The update a full step makes for these parameters: the optimizer's groups are
        narrowed to them for one call, then restored."""
        params, bucket.ready = bucket.ready, []
        with narrowed(self.optimizer, params, self._group_index):
            self.optimizer.step()
        for param in params:
            param.grad = None  # the point of it all: these gradients' memory is free now
        self.updated += len(params)
        self.steps += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
