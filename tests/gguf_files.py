"""GGUF transformer files for the tests, written by the gguf library (the format's own Python
package, whose writer and quantizers llama.cpp's converters and city96's tools use). Which
tensors are quantized follows the tools that make the published files: city96's converter keeps
1-D tensors and tensors of at most 1024 values in F32, and llama.cpp's quantizer (which his
files go through) quantizes only 2-D tensors named `*.weight`; everything else stays F32, and a
tensor whose rows the type's blocks do not divide falls back to F16, as his converter does.
`qtype` "BF16" is his converter's own output for a bfloat16 model, before llama.cpp: every
tensor of more than one dimension and 1024 values in BF16, whatever its name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SMALL = 1024  # city96's QUANTIZATION_THRESHOLD


def write_gguf(state: dict[str, torch.Tensor], path: Path, qtype: str = "Q8_0",
               arch: str = "flux") -> dict[str, str]:
    """Write `state` (an original-layout transformer) to `path`; {tensor: type written}."""
    import gguf
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    written = {}
    for key, tensor in state.items():
        data = tensor.detach().to(torch.float32).numpy()
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        if data.ndim == 1 or data.size <= SMALL or (
                qtype != "BF16" and (data.ndim != 2 or not key.endswith(".weight"))):
            kind = gguf.GGMLQuantizationType.F32
        try:
            packed = gguf.quants.quantize(data, kind)
        except (gguf.QuantError, ValueError):
            kind = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, kind)
        writer.add_tensor(key, packed, raw_dtype=kind)
        written[key] = kind.name
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as the gguf library dequantizes them (float32)."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        values = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                          dtype=np.float32)
        shape = [int(n) for n in reversed(tensor.shape)]
        out[tensor.name] = torch.from_numpy(values).reshape(shape)
    return out


# Where each K-quant block (256 values) keeps its float16 super-block scales (d, and dmin
# where the type has one), as ggml's block_q2_K ... block_q6_K lay them out; the other bytes
# are codes and sub-block scales, any value of which is valid.
K_QUANT_F16_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                       "Q6_K": (208,)}


def k_quant_eligible(key: str, tensor: torch.Tensor) -> bool:
    """A tensor llama.cpp's quantizer would store in a K-quant type: a 2-D `*.weight` of more
    than 1024 values whose rows its 256-value blocks divide."""
    return (tensor.ndim == 2 and key.endswith(".weight") and tensor.numel() > SMALL
            and tensor.shape[1] % 256 == 0)


def write_random_k_quant_gguf(state: dict[str, torch.Tensor], path: Path, qtype: str,
                              seed: int = 0) -> dict[str, str]:
    """`state`'s tensors to `path`, each K-quant-eligible one as random `qtype` blocks (the
    gguf library cannot quantize into K-quants; llama.cpp's C++ quantizer makes the published
    files) whose scales are small, so the model stays finite; the rest F32. What the file then
    holds is defined by the gguf library's own dequantization (`dequantized`)."""
    import gguf
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    written = {}
    for key, tensor in state.items():
        if not k_quant_eligible(key, tensor):
            writer.add_tensor(key, tensor.detach().to(torch.float32).numpy())
            written[key] = "F32"
            continue
        rows, columns = tensor.shape
        blocks = rng.integers(0, 256, (rows * columns // block_values, block_bytes),
                              dtype=np.uint8)
        for offset in K_QUANT_F16_OFFSETS[qtype]:
            scales = rng.uniform(1e-5, 1e-4, len(blocks)).astype(np.float16)
            blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
        writer.add_tensor(key, blocks.reshape(rows, -1), raw_dtype=kind)
        written[key] = qtype
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def flux_inputs(config, hidden: torch.Tensor | None = None) -> dict:
    """A Flux transformer's inputs: 16 image and 8 text tokens (`hidden`: the image tokens,
    else drawn with the rest)."""
    generator = torch.Generator().manual_seed(0)
    drawn = torch.randn(1, 16, config.in_channels, generator=generator)
    return dict(hidden_states=drawn if hidden is None else hidden,
                encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim,
                                                  generator=generator),
                pooled_projections=torch.randn(1, config.pooled_projection_dim,
                                               generator=generator),
                timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
