"""The benchmark cases: what is trained, at what size, with which memory settings.

Every runner of a case trains the same model on the same images at the same resolution,
batch, LoRA and dtype settings; only how the training is driven differs (see bench/runners.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

RUNNERS = ("limit", "naive", "atelier")

# Parameters per part of the full-size models, as built from the shipped configs
# (trainer.models.random_full.parameter_counts; constants here so the parent process can
# estimate memory without importing torch or building anything).
FULL_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840},
}

# Activation memory of one sample's UNet forward kept for the backward pass (LoRA), GB at
# 256 px, without gradient checkpointing; scales with the pixel count. SD 1.5: measured on the
# CPU in float32 (the limit runner's training-phase peak RSS, 4.9 GB, minus its 3.4 GB of UNet
# weights and ~0.5 GB of runtime), rounded up. SDXL: taken as twice that (wider blocks, ten
# transformer layers at the lowest level), not measured here. Checkpointing keeps ~30%;
# half-precision autocast about halves them.
ACTIVATION_GB_256 = {"sd15": 1.2, "sdxl": 2.4}
CHECKPOINTED_SHARE = 0.3


@dataclass(frozen=True)
class Case:
    name: str
    family: str                      # "sd15" | "sdxl"
    size: str                        # "tiny" (trainer/models/tiny.py) | "full" (random_full)
    resolution: int
    batch_size: int = 1
    method: str = "LORA"             # | "FINE_TUNE" (the UNet's own weights)
    lora_rank: int = 16
    lora_alpha: float = 1.0
    lora_layer_preset: str = "attn-mlp"
    peft_type: str = "LORA"          # | "LOHA" | "LOKR": built by trainer/lora.py like a LoRA
    lora_decompose: bool = False     # DoRA (a LORA option)
    gradient_checkpointing: bool = False
    # The parts whose own checkpointing switch is on (it acts when the main one is on).
    checkpoint_parts: tuple[str, ...] = ("unet", "text_encoder")
    train_text_encoder: bool = False  # LoRA on the text encoder too (then nothing is cached)
    optimizer: str = "ADAMW"
    weight_dtype: str = "FLOAT_32"   # the frozen weights' storage type
    train_dtype: str = "AUTO"        # autocast: AUTO = FLOAT_32 on the CPU, BFLOAT_16 on CUDA
    fused_backward_pass: bool = False
    attention: str = "sdpa"          # "eager": diffusers' classic attention (the SDPA lever)
    compile: bool = False            # the UNet's blocks compiled (trainer/compilation.py), also
                                     # in the limit; the eager twin is the case without -compile
    layer_offload_fraction: float = 0.0  # frozen UNet blocks streamed from CPU memory
    learning_rate: float = 1e-4
    runners: tuple[str, ...] = RUNNERS
    warmup: int = 3                  # steps before the measured ones (atelier: its 1st epoch)
    measured: int = 8
    rounds: int = 1                  # runs of each runner, interleaved; the median is kept
    cpu_threads: int = 0             # torch threads on a CPU (0: torch's default)
    cuda_only: bool = False
    base: str = ""                   # a lever case: the case it differs from by one setting
    note: str = ""                   # what the case shows

    def train_dtype_on(self, device: str) -> str:
        if self.train_dtype != "AUTO":
            return self.train_dtype
        return "BFLOAT_16" if device == "cuda" else "FLOAT_32"

    def steps(self, quick: bool) -> tuple[int, int]:
        """(warm-up, measured) steps; --quick: just enough to run every code path."""
        if quick:
            return 2, 3
        return self.warmup, self.measured

    @property
    def clip_grad_norm(self) -> float | None:
        # Atelier's default (1.0); a fused backward pass cannot clip by the total norm.
        return None if self.fused_backward_pass else 1.0

    @property
    def unet_checkpointing(self) -> bool:
        return self.gradient_checkpointing and "unet" in self.checkpoint_parts

    def model_key(self) -> str:
        return f"{self.size}-{self.family}"


def _tiny(name, family, resolution, **kw) -> Case:
    # torch's own thread count, as `python -m trainer train` runs them (an earlier single
    # thread here measured something users do not run; with the OpenMP default wait policy
    # two threads are as fast as one on these small ops)
    return Case(name, family, "tiny", resolution, batch_size=2, lora_rank=4, lora_alpha=2.0,
                warmup=10, measured=20, rounds=3, learning_rate=1e-3, **kw)


_LEVERS = {"runners": ("limit", "atelier")}
_GPU = {"cuda_only": True}


def compiled(case: Case) -> Case:
    """`<case>-compile`: the same case with the UNet's blocks compiled (limit and atelier)."""
    return dataclasses.replace(case, name=f"{case.name}-compile", compile=True,
                               runners=tuple(r for r in case.runners if r != "naive"),
                               base=case.name, note=case.note + ", compiled",
                               cuda_only=True)  # on a CPU compiling takes minutes, for no gain


# The sizes people train at on a GPU (GPU only): SD 1.5 at 512 px batch 4, SDXL at 1024 px
# batch 1 and 4; LoRA, and full fine-tunes with the fused pass and with 8-bit AdamW. Frozen
# weights in bfloat16 with checkpointing, as a user with a consumer card would set them.
_SD15_512 = Case("sd15-512", "sd15", "full", 512, batch_size=4, weight_dtype="BFLOAT_16",
                 gradient_checkpointing=True, note="SD 1.5 LoRA 512 px batch 4", **_GPU)
_SDXL_1024 = Case("sdxl-1024", "sdxl", "full", 1024, weight_dtype="BFLOAT_16",
                  gradient_checkpointing=True, warmup=3, measured=6,
                  note="SDXL LoRA 1024 px batch 1", **_GPU)
_SDXL_1024_B4 = dataclasses.replace(_SDXL_1024, name="sdxl-1024-b4", batch_size=4,
                                    note="SDXL LoRA 1024 px batch 4")
_SD15_256 = Case("sd15-256", "sd15", "full", 256, note="SD 1.5-size LoRA r16 attn-mlp")
_FT = {"method": "FINE_TUNE", "learning_rate": 1e-5, "runners": ("limit", "atelier")}

CASES: dict[str, Case] = {c.name: c for c in [
    _tiny("tiny-sd15-64", "sd15", 64, note="tiny SD 1.5, LoRA"),
    _tiny("tiny-sd15-128", "sd15", 128, note="tiny SD 1.5, LoRA"),
    _tiny("tiny-sdxl-128", "sdxl", 128, note="tiny SDXL, LoRA"),
    _SD15_256,
    Case("sd15-256-gc", "sd15", "full", 256, gradient_checkpointing=True, base="sd15-256",
         note="+ gradient checkpointing"),
    Case("sd15-256-ft", "sd15", "full", 256, method="FINE_TUNE", learning_rate=1e-5,
         note="full fine-tune of the UNet, AdamW"),
    # Memory levers, each against the case above it (limit and atelier runners).
    Case("sd15-256-ft-fused", "sd15", "full", 256, method="FINE_TUNE", learning_rate=1e-5,
         fused_backward_pass=True, base="sd15-256-ft", note="fine-tune + fused backward pass",
         **_LEVERS),
    Case("sd15-256-ft-8bit", "sd15", "full", 256, method="FINE_TUNE", learning_rate=1e-5,
         optimizer="ADAMW_8BIT", base="sd15-256-ft", note="fine-tune + 8-bit AdamW state",
         **_LEVERS),
    Case("sd15-256-bf16", "sd15", "full", 256, weight_dtype="BFLOAT_16",
         train_dtype="BFLOAT_16", base="sd15-256",
         note="LoRA, bfloat16 frozen weights + autocast", **_LEVERS),
    # Training the text encoder (atelier only: the other runners train the UNet alone): what
    # the default, a frozen text encoder with its outputs cached, saves; then checkpointing
    # of the text encoder alone (the per-part switch).
    Case("sd15-256-te", "sd15", "full", 256, train_text_encoder=True, runners=("atelier",),
         base="sd15-256", note="LoRA on the text encoder too (not frozen, not cached)"),
    Case("sd15-256-te-gc", "sd15", "full", 256, train_text_encoder=True,
         gradient_checkpointing=True, checkpoint_parts=("text_encoder",),
         runners=("atelier",), base="sd15-256-te",
         note="+ checkpointing of the text encoder only"),
    # The other adapter types against plain LoRA, same rank and layers (atelier: the engine
    # builds them; what each costs a step and in memory).
    Case("sd15-256-dora", "sd15", "full", 256, lora_decompose=True, runners=("atelier",),
         base="sd15-256", note="DoRA instead of LoRA (r16 attn-mlp)"),
    Case("sd15-256-loha", "sd15", "full", 256, peft_type="LOHA", runners=("atelier",),
         base="sd15-256", note="LoHa instead of LoRA (r16 attn-mlp)"),
    Case("sd15-256-lokr", "sd15", "full", 256, peft_type="LOKR", runners=("atelier",),
         base="sd15-256", note="LoKr instead of LoRA (r16 attn-mlp)"),
    Case("sd15-256-eager-attn", "sd15", "full", 256, attention="eager", runners=("limit",),
         base="sd15-256", note="LoRA with classic attention instead of SDPA (limit only)"),
    Case("sdxl-512", "sdxl", "full", 512, gradient_checkpointing=True, warmup=2, measured=4,
         note="SDXL-size LoRA r16 attn-mlp, checkpointing"),
    # GPU only: peak VRAM with every memory lever on.
    Case("sd15-512-lowmem", "sd15", "full", 512, gradient_checkpointing=True,
         weight_dtype="BFLOAT_16", optimizer="ADAMW_8BIT", cuda_only=True,
         note="SD 1.5 LoRA 512 px: checkpointing, bf16 weights, 8-bit AdamW, cached TE"),
    Case("sdxl-1024-lowmem", "sdxl", "full", 1024, gradient_checkpointing=True,
         weight_dtype="BFLOAT_16", optimizer="ADAMW_8BIT", cuda_only=True,
         note="SDXL LoRA 1024 px: checkpointing, bf16 weights, 8-bit AdamW, cached TEs"),
    Case("sdxl-1024-offload", "sdxl", "full", 1024, gradient_checkpointing=True,
         weight_dtype="BFLOAT_16", optimizer="ADAMW_8BIT", layer_offload_fraction=0.5,
         runners=("atelier",), base="sdxl-1024-lowmem", cuda_only=True,
         note="+ half the UNet's frozen weights streamed from CPU memory"),
    # compiled against eager (the sizes, and the host-bound small ones)
    compiled(_SD15_256),
    _SD15_512, compiled(_SD15_512),
    _SDXL_1024, compiled(_SDXL_1024), _SDXL_1024_B4, compiled(_SDXL_1024_B4),
    dataclasses.replace(_SD15_512, name="sd15-512-ft-fused", fused_backward_pass=True,
                        note="SD 1.5 fine-tune 512 px batch 4, fused backward pass", **_FT),
    dataclasses.replace(_SD15_512, name="sd15-512-ft-8bit", optimizer="ADAMW_8BIT",
                        note="SD 1.5 fine-tune 512 px batch 4, 8-bit AdamW", **_FT),
    dataclasses.replace(_SDXL_1024, name="sdxl-1024-ft-fused", fused_backward_pass=True,
                        note="SDXL fine-tune 1024 px, fused backward pass", **_FT),
    dataclasses.replace(_SDXL_1024, name="sdxl-1024-ft-8bit", optimizer="ADAMW_8BIT",
                        note="SDXL fine-tune 1024 px, 8-bit AdamW", **_FT),
]}

# What a plain `python -m bench` runs (every case; the GPU-only ones are skipped on a CPU).
DEFAULT_CASES = list(CASES)
# What the test suite runs (--quick): the tiny models only.
SMOKE_CASES = ["tiny-sd15-64", "tiny-sdxl-128"]


def with_overrides(case: Case, **changes) -> Case:
    return dataclasses.replace(case, **changes)


# --- Will it fit? -----------------------------------------------------------------------------

_BYTES = {"FLOAT_32": 4, "TFLOAT_32": 4, "BFLOAT_16": 2, "FLOAT_16": 2}


def estimate_peak_gb(case: Case, runner: str, device: str) -> float:
    """A rough upper estimate of a runner's peak memory (RSS on the CPU, VRAM on CUDA), from
    parameter counts and a measured activation size, so that a case too big for the machine
    is skipped with its reason before anything is allocated. Tiny models: ~0."""
    if case.size == "tiny":
        return 0.5
    counts = FULL_PARAMETERS[case.family]
    total = sum(counts.values())
    unet = counts["unet"]
    weight_bytes = _BYTES[case.weight_dtype]
    if device == "cpu":
        # The loader reads every part in float32 before the cast to weight_dtype.
        weights = total * 4
    else:
        weights = (total - counts["vae"]) * weight_bytes + counts["vae"] * 4
    if case.method == "FINE_TUNE":
        weights += unet * (4 - weight_bytes) if device != "cpu" else 0  # float32 masters
        state = 2 if case.optimizer == "ADAMW_8BIT" else 8
        grads = 0 if case.fused_backward_pass else 4
        weights += unet * (state + grads)
    activations = (ACTIVATION_GB_256[case.family] * (case.resolution / 256) ** 2
                   * case.batch_size * 1e9)
    if case.unet_checkpointing:
        activations *= CHECKPOINTED_SHARE
    if case.train_dtype_on(device) in ("BFLOAT_16", "FLOAT_16"):
        activations *= 0.5
    if runner == "naive":  # the VAE encoder's activations every step (no grad)
        activations += 0.3e9 * (case.resolution / 256) ** 2 * case.batch_size
    overhead = 1.0e9 if device == "cpu" else 0.5e9  # torch, libraries, allocator slack
    return (weights + activations + overhead) / 1e9
