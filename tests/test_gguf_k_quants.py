"""GGUF transformers in K-quant types (Q2_K ... Q6_K: most published Flux.1 / Chroma files,
city96's flux1-dev-Q4_K_S among them). Their blocks hold 256 values, so only a transformer
whose rows are multiples of 256 wide has K-quant layers: a Flux.1 of width 256 is built here.
The gguf library cannot write K-quants (llama.cpp's C++ quantizer does), so the file holds
random blocks with small scales, and what they mean is the gguf library's own dequantization.

The transformer read through the trainer (its layout converted, each K-quant row moved whole)
must then compute, forward and backward, exactly what the same network computes with the
weights diffusers dequantizes from the file, and that is what the gguf library dequantizes up
to float16 rounding: diffusers' dequantization (like ComfyUI-GGUF's, whose code it took)
multiplies the float16 block scales in float16, where gguf and llama.cpp use float32. A block
read in a wrong layout would be off by the weights' own size. The estimate counts the bytes
the file stores."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

from trainer.memory_estimate import gguf_packed_bytes
from trainer.model_tensors import gguf_tensors
from trainer.models.flow_family import _transformer_from_file, read_gguf
from trainer.models.flux import FLUX_SPEC
from trainer.models.transformer_layouts import FLUX, load_original_transformer, to_original
from trainer.quantization import is_gguf_layer

from gguf_files import dequantized, flux_inputs, write_random_k_quant_gguf

# diffusers' float16 scale arithmetic against gguf's float32: a few float16 roundings of each
# weight (2**-11 relative each). Measured, relative to the largest value: 1.7e-4 to 1.6e-3 on
# the output, 2.5e-4 to 2.8e-3 on the input's gradient (Q6_K the most); a wrong layout is ~1.
FLOAT16_ROUNDING = 1e-2

K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory):
    """(a config folder of a Flux.1 transformer 256 wide, its original-layout weights)."""
    folder = tmp_path_factory.mktemp("wide-flux")
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
        attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
        pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model.save_pretrained(folder / "transformer")
    return folder, to_original(FLUX, model.state_dict())


def output_and_input_gradient(model) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.randn(1, 16, model.config.in_channels,
                         generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = model(**flux_inputs(model.config, hidden)).sample
    out.square().mean().backward()
    return out.detach(), hidden.grad


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_a_k_quant_transformer_computes_what_gguf_dequantizes(qtype, wide_flux, tmp_path):
    folder, state = wide_flux
    path = tmp_path / f"wide-flux-{qtype}.gguf"
    written = write_random_k_quant_gguf(state, path, qtype)
    assert list(written.values()).count(qtype) >= 10, written

    transformer = _transformer_from_file(FLUX_SPEC, str(path), str(folder), torch.float32)
    packed = {name: layer.weight.quant_type.name for name, layer in
              transformer.named_modules() if is_gguf_layer(layer)}
    assert set(packed.values()) == {qtype}, packed
    assert len(packed) >= list(written.values()).count(qtype)  # Flux.1's fused q/k/v split
    out, grad = output_and_input_gradient(transformer)
    assert torch.isfinite(out).all() and out.abs().max() > 0

    by_diffusers = {key: dequantize_gguf_tensor(tensor).float()
                    for key, tensor in read_gguf(str(path), path.name).items()}
    by_gguf = dequantized(path)
    for weights, tolerance in ((by_diffusers, 0.0), (by_gguf, FLOAT16_ROUNDING)):
        reference = load_original_transformer(FluxTransformer2DModel, weights, config=folder,
                                              torch_dtype=torch.float32)
        want_out, want_grad = output_and_input_gradient(reference)
        for got, want in ((out, want_out), (grad, want_grad)):
            error = float((got - want).abs().max() / want.abs().max())
            assert error <= tolerance, (qtype, error)


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_the_estimate_counts_a_k_quant_file_as_stored(qtype, wide_flux, tmp_path):
    import gguf
    _, state = wide_flux
    path = tmp_path / f"wide-flux-{qtype}.gguf"
    write_random_k_quant_gguf(state, path, qtype)
    stored = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    infos = gguf_tensors(path, "transformer.model_name")
    assert {t.name for t in infos} == set(stored)
    for info in infos:
        if info.dtype == qtype:
            assert gguf_packed_bytes(info) == stored[info.name], info.name
            assert stored[info.name] < info.numel  # under a byte per value
