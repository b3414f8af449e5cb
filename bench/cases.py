"""The benchmark cases: what is trained, at what size, with which memory settings.

Every runner of a case trains the same model on the same images at the same resolution,
batch, LoRA and dtype settings; only how the training is driven differs (see bench/runners.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainer.models import registry  # light: the families' static facts, no torch

RUNNERS = ("limit", "naive", "atelier")

# The bench's family names (also the tiny model kinds of trainer/models/tiny.py and
# tiny_flow.py) -> the engine's model_type. What a family's model is made of (its denoiser,
# its text encoders, its objective) is asked of the registry, never spelled out here.
MODEL_TYPES = {"sd15": "STABLE_DIFFUSION_15", "sdxl": "STABLE_DIFFUSION_XL_10_BASE",
               "flux": "FLUX_DEV_1", "sd35": "STABLE_DIFFUSION_35",
               # the kinds of `python -m trainer make-tiny-model` (tiny_z_image.py, ...)
               "z-image": "Z_IMAGE", "qwen": "QWEN", "flux2": "FLUX_2"}

# Parameters per part of the full-size models, so that the parent process can estimate
# memory without importing torch or building anything. SD 1.5 / SDXL: as built from the
# shipped configs (trainer.models.random_full.parameter_counts). Flux.1-dev and SD 3.5 Large:
# counted on the meta device by bench/meta_counts.py (tests/test_bench.py checks them): Flux's
# transformer is diffusers 0.42.1's FluxTransformer2DModel defaults (19 double + 38 single
# blocks, 24 heads x 128, T5 width 4096, CLIP width 768: what its single-file converter
# assumes, inner width 3072) with guidance_embeds; SD 3.5 Large, its CLIPs (with projection)
# and T5-XXL from trainer/models/configs/sd35/large; Flux's CLIP-L from configs/sdxl; Flux's
# VAE counted with SD 3.5's VAE config (the same 16-channel 8x autoencoder: Flux's 64 packed
# input channels are 4 x 16).
FULL_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840},
    "flux": {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
             "text_encoder_2": 4_762_310_656},
    "sd35": {"transformer": 8_056_627_520, "vae": 83_819_683, "text_encoder": 123_650_304,
             "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656},
}

# Activation memory of one sample's denoiser forward kept for the backward pass (LoRA), GB at
# 256 px, without gradient checkpointing; scaled with the pixel count. SD 1.5: measured on the
# CPU in float32 (the limit runner's training-phase peak RSS, 4.9 GB, minus its 3.4 GB of UNet
# weights and ~0.5 GB of runtime), rounded up. SDXL: taken as twice that (wider blocks, ten
# transformer layers at the lowest level), not measured here. Flux.1-dev and SD 3.5 Large: not
# measured (no such model runs here); bench/meta_counts.py counts the tensors each forward
# saves for backward on the meta device (float32, every weight trainable, a fused attention
# keeping q/k/v/out, 77 T5 tokens): SD 1.5 0.47 GB, SDXL 0.91, Flux 5.16, SD 3.5 Large 3.79;
# the two new ones are scaled by SD 1.5's measured/counted ratio (1.2 / 0.47), which also puts
# SDXL's count at its figure above (0.91 x 2.5 = 2.3). Their text tokens do not grow with the
# image, so the pixel scaling over-estimates them at 1024 px (an upper estimate is the aim).
# Checkpointing keeps ~30% (measured on the UNet; a transformer keeps less); half-precision
# autocast about halves them.
ACTIVATION_GB_256 = {"sd15": 1.2, "sdxl": 2.4, "flux": 13.1, "sd35": 9.6}
CHECKPOINTED_SHARE = 0.3


@dataclass(frozen=True)
class Case:
    name: str
    family: str                      # a MODEL_TYPES key: "sd15" | "sdxl" | "flux" | "sd35" ...
    size: str                        # "tiny" (trainer/models/tiny.py) | "full" (random_full)
    resolution: int
    batch_size: int = 1
    method: str = "LORA"             # | "FINE_TUNE" (the denoiser's own weights)
    lora_rank: int = 16
    lora_alpha: float = 1.0
    lora_layer_preset: str = "attn-mlp"
    peft_type: str = "LORA"          # | "LOHA" | "LOKR": built by trainer/lora.py like a LoRA
    lora_decompose: bool = False     # DoRA (a LORA option)
    gradient_checkpointing: bool = False
    # The parts whose own checkpointing switch is on (it acts when the main one is on):
    # "denoiser" (the UNet or the transformer) and/or "text_encoder".
    checkpoint_parts: tuple[str, ...] = ("denoiser", "text_encoder")
    train_text_encoder: bool = False  # LoRA on the text encoder too (then nothing is cached)
    optimizer: str = "ADAMW"
    weight_dtype: str = "FLOAT_32"   # the frozen weights' storage type
    train_dtype: str = "AUTO"        # autocast: AUTO = FLOAT_32 on the CPU, BFLOAT_16 on CUDA
    fused_backward_pass: bool = False
    attention: str = "sdpa"          # "eager": diffusers' classic attention (the SDPA lever)
    compile: bool = False            # the UNet's blocks compiled (trainer/compilation.py), also
                                     # in the limit; the eager twin is the case without -compile
    layer_offload_fraction: float = 0.0  # frozen UNet blocks streamed from CPU memory
    # Per part, over the above: ((part, weight_dtype), ...) - FLOAT_8 / NFLOAT_4 storage - and
    # ((part, offload_fraction), ...): the memory levers of issue 26, as the presets set them
    part_dtypes: tuple[tuple[str, str], ...] = ()
    part_offload: tuple[tuple[str, float], ...] = ()
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
    def denoiser_checkpointing(self) -> bool:
        return self.gradient_checkpointing and "denoiser" in self.checkpoint_parts

    @property
    def model_type(self) -> str:
        return MODEL_TYPES[self.family]

    @property
    def facts(self) -> registry.FamilyFacts:
        """The engine's facts of the case's family (parts, denoiser, objective)."""
        return registry.facts(self.model_type)

    @property
    def denoiser(self) -> str:
        """The part that predicts: "unet" (SD 1.5, SDXL) or "transformer" (flow models)."""
        return self.facts.denoiser

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
    # The flow-matching families (trainer/models/tiny_flow.py), their T5 frozen and cached.
    _tiny("tiny-flux-64", "flux", 64, note="tiny Flux.1-dev, LoRA attn-mlp"),
    _tiny("tiny-sd35-64", "sd35", 64, lora_layer_preset="attn-only",
          note="tiny SD 3.5, LoRA attn-only (SD 3 has no attn-mlp preset)"),
    # Z-Image, Qwen-Image, Flux.2 klein (tiny_z_image.py, tiny_qwen_image.py, tiny_flux2.py),
    # each on OneTrainer's default LoRA layer preset of its family; their Qwen text encoder is
    # frozen and cached. The limit and naive runners drive them through the family's own
    # objective, predict and VAE wrapper, as they do Flux.1 and SD 3.5.
    _tiny("tiny-z-image-64", "z-image", 64,
          note="tiny Z-Image, LoRA attn-mlp (OneTrainer's Z-Image default)"),
    _tiny("tiny-qwen-64", "qwen", 64,
          note="tiny Qwen-Image, LoRA attn-mlp (OneTrainer's Qwen-Image default)"),
    _tiny("tiny-flux2-64", "flux2", 64, lora_layer_preset="blocks",
          note="tiny Flux.2 klein, LoRA blocks (OneTrainer's Flux.2 default)"),
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

# The flow models at the sizes people train them (GPU only; LoRA r16, bfloat16 frozen weights,
# checkpointing, batch 1, T5 at 77 tokens and cached). What each needs (FULL_PARAMETERS,
# estimate_peak_gb on CUDA; each note's peak is the atelier runner's estimate, a test keeps
# them equal): Flux.1-dev's transformer is 11.9B parameters, 23.8 GB in bfloat16; with T5-XXL
# (4.8B, 9.5 GB while its outputs are cached), CLIP-L and the VAE ~34 GB of weights. SD 3.5
# Large's 8.1B transformer with its three encoders ~27 GB. An 80 GB card holds each. Flux's
# random full-size model is built on the GPU machine (trainer/models/random_full.py); SD 3.5's
# is not buildable yet (bench/worker.py says why when one is run).
_FLOW_GPU = {"weight_dtype": "BFLOAT_16", "gradient_checkpointing": True, "warmup": 3,
             "measured": 6, **_GPU}
FLOW_GPU_CASES = [
    Case("flux-512", "flux", "full", 512, note="Flux.1-dev LoRA r16 attn-mlp 512 px batch 1: "
         "~34 GB of bf16 weights, peak ~42 GB VRAM (upper estimate)", **_FLOW_GPU),
    Case("flux-1024", "flux", "full", 1024, note="Flux.1-dev LoRA r16 attn-mlp 1024 px batch "
         "1: ~34 GB of bf16 weights, peak ~66 GB VRAM (upper estimate)", **_FLOW_GPU),
    Case("sd35-1024", "sd35", "full", 1024, lora_layer_preset="attn-only",
         note="SD 3.5 Large LoRA r16 attn-only 1024 px batch 1: ~27 GB of bf16 weights, peak "
              "~51 GB VRAM (upper estimate)", **_FLOW_GPU),
]
# Issue 26's targets on a GPU, atelier runner (the limit and naive runners hold weights in a
# plain dtype): Flux.1-dev LoRA at 512 px with the transformer and T5 in NF4 (≤ 16 GB), with
# the 8 GB preset's levers (FLOAT_8, 85 % of the transformer's and T5's blocks streamed:
# ≤ 10 GB), at 1024 px with the 24 GB preset's (FLOAT_8: ≤ 24 GB). Each row also carries the
# engine's own estimate (`estimate_gb`) to compare with the measured peak (within 15 %).
_ATELIER_FLOW_GPU = {**_FLOW_GPU, "runners": ("atelier",)}
FLOW_GPU_CASES += [
    Case("flux-512-nf4", "flux", "full", 512, base="flux-512",
         part_dtypes=(("transformer", "NFLOAT_4"), ("text_encoder_2", "NFLOAT_4")),
         note="Flux.1-dev LoRA 512 px, transformer and T5 in NF4 (issue 26: <= 16 GB)",
         **_ATELIER_FLOW_GPU),
    Case("flux-512-8gb", "flux", "full", 512, base="flux-512",
         part_dtypes=(("transformer", "FLOAT_8"), ("text_encoder_2", "FLOAT_8")),
         part_offload=(("transformer", 0.85), ("text_encoder_2", 0.85)),
         note="Flux.1-dev LoRA 512 px, the 8 GB preset's levers: FLOAT_8, 85 % of the "
              "transformer's and T5's blocks streamed (issue 26: <= 10 GB)",
         **_ATELIER_FLOW_GPU),
    Case("flux-1024-fp8", "flux", "full", 1024, base="flux-1024",
         part_dtypes=(("transformer", "FLOAT_8"), ("text_encoder_2", "FLOAT_8")),
         note="Flux.1-dev LoRA 1024 px, the 24 GB preset's levers: transformer and T5 in "
              "FLOAT_8 (issue 26: <= 24 GB)", **_ATELIER_FLOW_GPU),
]
CASES.update((c.name, c) for c in FLOW_GPU_CASES)

# What a plain `python -m bench` runs (every case; the GPU-only ones are skipped on a CPU).
DEFAULT_CASES = list(CASES)
# What the test suite runs (--quick): the tiny models only. The flow families' paths are run
# by a test of their own on tiny Flux alone (both tiny flow cases would add ~40 s to it).
SMOKE_CASES = ["tiny-sd15-64", "tiny-sdxl-128"]
FLOW_SMOKE_CASES = ["tiny-flux-64"]


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
    denoiser = counts[case.denoiser]
    weight_bytes = _BYTES[case.weight_dtype]
    if device == "cpu":
        # The loader reads every part in float32 before the cast to weight_dtype.
        weights = total * 4
    else:
        weights = (total - counts["vae"]) * weight_bytes + counts["vae"] * 4
    if case.method == "FINE_TUNE":
        weights += denoiser * (4 - weight_bytes) if device != "cpu" else 0  # float32 masters
        state = 2 if case.optimizer == "ADAMW_8BIT" else 8
        grads = 0 if case.fused_backward_pass else 4
        weights += denoiser * (state + grads)
    activations = (ACTIVATION_GB_256[case.family] * (case.resolution / 256) ** 2
                   * case.batch_size * 1e9)
    if case.denoiser_checkpointing:
        activations *= CHECKPOINTED_SHARE
    if case.train_dtype_on(device) in ("BFLOAT_16", "FLOAT_16"):
        activations *= 0.5
    if runner == "naive":  # the VAE encoder's activations every step (no grad)
        activations += 0.3e9 * (case.resolution / 256) ** 2 * case.batch_size
    overhead = 1.0e9 if device == "cpu" else 0.5e9  # torch, libraries, allocator slack
    return (weights + activations + overhead) / 1e9
