"""`compile`: the UNet's blocks compiled with torch.compile, one region per block.

Regional compilation: each ResnetBlock2D and each BasicTransformerBlock (the units gradient
checkpointing also cuts the UNet into) is compiled on its own with `nn.Module.compile`, in
place, so the module tree, its state-dict names and the LoRA files do not change. Blocks of the
same shape share one compiled graph (torch inlines module parameters as inputs), so SD 1.5
compiles a dozen small graphs, not the whole UNet. Even so the first step is long (below).

Shapes are static on purpose (`dynamic=False`): a batch holds one bucket, the buckets are few,
and a graph specialised to its shape is the fastest. Each new bucket shape therefore compiles
once, on its first step (the loop says so in the status); dynamo's recompile limits are raised
to the number of buckets, so a run with many buckets never falls back to eager silently.
"""
from __future__ import annotations

import torch

from trainer.config import CompileMode, TrainConfig

# The units compiled one by one: the blocks gradient checkpointing recomputes (diffusers'
# ResnetBlock2D and BasicTransformerBlock in a UNet; the flow transformers' double/joint and
# single blocks).
BLOCK_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "FluxTransformerBlock",
                 "FluxSingleTransformerBlock", "ChromaTransformerBlock",
                 "ChromaSingleTransformerBlock", "JointTransformerBlock")
# Distinct block shapes of one bucket: SD 1.5's UNet has ~12 (channel counts of the resnets,
# the transformer widths), SDXL's a few more; each bucket shape adds that many graphs.
GRAPHS_PER_BUCKET = 24

COMPILING_STATUS = "Compiling (first step of each bucket)…"
# torch.compile's backend. Tests on the CPU use "aot_eager" (dynamo's tracing, guards and
# recompiles, AOT autograd; no code generation, which takes minutes with a C++ compiler).
BACKEND = "inductor"


def compile_wanted(config: TrainConfig) -> bool:
    """ON and OFF as set. AUTO does not compile, on any device, until the bench shows that
    compiling pays: on an H200 (2026-11-30, bench/results-cuda-h200.json) the tiny demo's
    first compiled step had not finished after 40 s, and sd15-512-compile did not finish its
    three warm-up steps within about 75 s, so no compiled step time could be compared yet. On
    a 2-core CPU the tiny model's three batch shapes took 4 minutes to compile."""
    return config.compile == CompileMode.ON


def compile_blocks(module: torch.nn.Module, buckets: int) -> int:
    """Compile each block of `module` in place; returns how many were compiled."""
    blocks = [m for m in module.modules() if type(m).__name__ in BLOCK_CLASSES]
    limit = GRAPHS_PER_BUCKET * max(1, buckets)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 2 * limit)
    for block in blocks:
        block.compile(dynamic=False, backend=BACKEND)
    return len(blocks)


class FirstStepOfShape:
    """Tells which steps see a batch shape for the first time (the steps that compile)."""

    def __init__(self):
        self.seen: set[tuple] = set()

    def is_new(self, batch: dict) -> bool:
        shape = (len(batch["caption"]), tuple(batch["target_size"][0]))
        if shape in self.seen:
            return False
        self.seen.add(shape)
        return True
