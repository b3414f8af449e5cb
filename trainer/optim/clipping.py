"""Gradient clipping by the total norm, with one shortcut for the CPU."""
from __future__ import annotations

import torch

# Clipping multiplies every trained gradient by max_norm / (norm + 1e-6) capped at 1, in
# torch's arithmetic; on a GPU it does so unconditionally, since deciding on the host would
# wait for the device. A CPU has nothing to wait for: the multiply by exactly 1 is skipped
# (the weights come out bit for bit the same), which was most of the clipping's cost for a
# tiny model's small LoRA tensors.
_SPLIT_API = (hasattr(torch.nn.utils, "get_total_norm")  # torch >= 2.6
              and hasattr(torch.nn.utils, "clip_grads_with_norm_"))


def clip_gradients(accelerator, parameters: list[torch.nn.Parameter], max_norm: float):
    """accelerator.clip_grad_norm_(parameters, max_norm), sparing the no-op scaling on a CPU."""
    if accelerator.device.type != "cpu" or not _SPLIT_API:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if max_norm / (total + 1e-6) < 1.0:  # the same tensor arithmetic as clip_grads_with_norm_
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total
