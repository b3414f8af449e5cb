"""Offloading of every part (issue 26): each part's own `offload_fraction` (OneTrainer's key)
streams that share of its frozen weights from CPU memory, block by block, for the transformer
families and their T5 as for the UNet (tests/test_gpu_levers.py holds the UNet's own tests)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from trainer import residency
from trainer.config import check_supported, config_from_dict
from trainer.control import Control
from trainer.errors import ConfigError
from trainer.layer_offload import LayerOffload, check_layer_offload, offload_units
from trainer.loop import train
from trainer.models.family import load_family
from trainer.models.tiny_flow import tiny_flow_model

from helpers import tiny_config


def flux(tmp_path, **overrides):
    data = dict(model_type="FLUX_DEV_1", text_encoder={"train": False}, epochs=2,
                output_model_format="DIFFUSERS_LORA", lora_rank=4, lora_alpha=4.0,
                gradient_checkpointing=True)
    data.update(overrides)
    return tiny_config(tiny_flow_model("flux"), tmp_path, **data)


def run(config):
    events = []
    result = train(config, Control(on_event=events.append))
    return result, events


def test_streamed_flux_run_with_its_t5_trains_exactly_like_one_without(tmp_path):
    """The transformer's, the CLIP's and T5's blocks streamed: the same losses and LoRA bit
    for bit (a frozen encoder's blocks stream while it fills the text cache; it is read, and
    streams, when it first runs: trainer/placement.py)."""
    plain_result, plain_events = run(flux(tmp_path / "plain"))
    streamed = flux(tmp_path / "streamed", transformer={"offload_fraction": 0.5},
                    text_encoder={"train": False, "offload_fraction": 1.0},
                    text_encoder_2={"offload_fraction": 0.5})
    result, events = run(streamed)
    said = [e["message"] for e in events if e["type"] == "status"
            and e["message"].startswith("Streaming ")]
    assert sorted(m.split(" of the ")[1].split("'s")[0] for m in said) == \
        ["text_encoder", "text_encoder_2", "transformer"], said
    loss = [e["loss"] for e in events if e["type"] == "progress"]
    assert loss and loss == [e["loss"] for e in plain_events if e["type"] == "progress"]
    a, b = load_file(plain_result.output_path), load_file(result.output_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind, blocks", [
    ("flux", ("transformer_blocks", "single_transformer_blocks")),
    ("chroma", ("transformer_blocks", "single_transformer_blocks")),
    ("sd35", ("transformer_blocks",)),
])
def test_the_units_are_each_familys_blocks_and_encoder_layers(kind, blocks, tmp_path):
    model_type = {"flux": "FLUX_DEV_1", "chroma": "CHROMA_1", "sd35": "STABLE_DIFFUSION_35"}
    family = load_family(tiny_config(tiny_flow_model(kind), tmp_path,
                                     model_type=model_type[kind]))
    transformer = family.parts["transformer"]
    want = [block for name in blocks for block in getattr(transformer, name)]
    assert [id(u) for u in offload_units(transformer)] == [id(b) for b in want]
    for part, module in family.parts.items():
        if part == "transformer":
            continue
        units = offload_units(module)
        layers = next(m for name, m in module.named_modules()  # CLIP's layers, T5's block
                      if name.endswith(("encoder.layers", "encoder.block")))
        assert [id(u) for u in units] == [id(layer) for layer in layers], part


def test_a_frozen_t5_streams_outside_the_autograd_graph_without_checkpointing(tmp_path):
    """No gradient flows through a frozen encoder: its blocks stream once per call and it
    needs no checkpointing; the transformer does."""
    config = flux(tmp_path, gradient_checkpointing=False,
                  text_encoder_2={"offload_fraction": 0.6})
    check_layer_offload(config)
    with pytest.raises(ConfigError, match=r"^transformer.offload_fraction 0.3 needs "
                                          r"gradient_checkpointing"):
        check_layer_offload(flux(tmp_path, gradient_checkpointing=False,
                                 transformer={"offload_fraction": 0.3}))
    t5 = load_family(config).parts["text_encoder_2"].requires_grad_(False)
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        reference = t5(ids).last_hidden_state
        offload = LayerOffload(t5, 0.6, "cpu")
        assert torch.equal(t5(ids).last_hidden_state, reference)
    assert offload.loads == len(offload.units) > 0


@pytest.mark.parametrize("overrides, message", [
    (dict(training_method="FINE_TUNE", transformer={"offload_fraction": 0.5}),
     "transformer.offload_fraction 0.5: a fine-tuned transformer's weights change"),
    (dict(compile="ON", transformer={"offload_fraction": 0.5}),
     "compile ON with transformer.offload_fraction > 0"),
    (dict(transformer={"weight_dtype": "INT_8", "offload_fraction": 0.5}),
     "transformer.offload_fraction = 0.5 with transformer.weight_dtype = INT_8"),
])
def test_what_streaming_cannot_do_is_refused_naming_the_key(overrides, message, tmp_path):
    if "training_method" in overrides:
        overrides["output_model_format"] = "DIFFUSERS"
    with pytest.raises(ConfigError, match=message):
        config = flux(tmp_path, **overrides)
        check_supported(config)  # the storage types
        check_layer_offload(config, num_processes=1)


def test_several_processes_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="text_encoder_2.offload_fraction with several "
                                          "processes"):
        check_layer_offload(flux(tmp_path, text_encoder_2={"offload_fraction": 0.5}),
                            num_processes=2)


def test_the_older_layer_offload_fraction_means_the_denoiser_and_trained_encoders(tmp_path):
    config = flux(tmp_path, layer_offload_fraction=0.4,
                  text_encoder={"train": True, "offload_fraction": 0.0},
                  text_encoder_2={"offload_fraction": 0.7})
    assert [config.offload_fraction_of(p) for p in config.model_type.facts.parts] == \
        [0.4, 0.7, 0.4]  # CLIP trained, T5 its own, the transformer
    frozen = config_from_dict({**config.model_dump(mode="json"),
                               "text_encoder": {"train": False}})
    assert frozen.offload_fraction_of("text_encoder") == 0.0


def test_a_streamed_frozen_encoder_is_parked_by_its_mover(monkeypatch):
    """Parking moves what is not streamed (the streamed blocks already live in CPU memory):
    the residency asks the part's mover, never `module.to`."""
    monkeypatch.setattr(residency, "parking_pays", lambda device: True)
    module, moves = torch.nn.Linear(2, 2), []
    monkeypatch.setattr(torch.nn.Module, "to", lambda *a, **k: pytest.fail("module.to"))
    parts = residency.FrozenPartsResidency({"text_encoder_2": module}, torch.device("cpu"),
                                           movers={"text_encoder_2": moves.append})
    parts.park()
    with parts.present():
        assert parts.parked == set()
    assert [str(m) for m in moves] == ["cpu", "cpu", "cpu"]  # park, bring back, park again
    assert parts.parked == {"text_encoder_2"}


STREAMING_PRESETS = {  # OneTrainer's presets that stream blocks: their fate here
    "preset.chroma_lora_8gb.saved": None, "preset.z_image_lora_8gb.saved": None,
    "preset.qwen_lora_16gb.saved": None, "preset.qwen_lora_24gb.saved": None,
    "preset.qwen_finetune_16gb.saved": "transformer.offload_fraction 0.75: a fine-tuned",
    "preset.qwen_finetune_24gb.saved": "transformer.offload_fraction 0.55: a fine-tuned",
    "preset.flux2_finetune_16gb.saved": "transformer.offload_fraction 0.6: a fine-tuned",
}


@pytest.mark.parametrize("name, refused", STREAMING_PRESETS.items())
def test_onetrainers_streaming_presets_start_or_name_what_cannot(name, refused):
    """A LoRA preset streams as written (its compile switched off with a note: compiled blocks
    cannot follow moving weights; speed only); a fine-tune that streams its trained transformer
    is refused before the start, naming the key (its weights change at every step)."""
    from onetrainer_files import raw
    data = {k: v for k, v in raw(name).items() if k != "concept_file_name"}
    notes = []
    config = config_from_dict({**data, "concepts": []}, warn=notes.append, onetrainer=True)
    assert config.transformer.offload_fraction == raw(name)["transformer"]["offload_fraction"]
    if refused is None:
        check_supported(config)
        assert config.compile.value == "OFF"
        if raw(name).get("compile"):
            assert any(n.startswith("compile: true with transformer.offload_fraction")
                       for n in notes), notes
    else:
        with pytest.raises(ConfigError, match=f"^{refused}"):
            check_supported(config)


def test_activation_offloading_trains_exactly_like_plain_checkpointing(tmp_path, monkeypatch):
    """transformer.activation_offloading: every checkpointed block runs through the offloading
    checkpoint (its inputs kept in CPU memory, copied back for the recomputation) and the run
    is the plain checkpointed run, loss for loss and weight for weight."""
    import trainer.placement as placement
    made = []
    real = placement.offloading_checkpoint
    monkeypatch.setattr(placement, "offloading_checkpoint",
                        lambda device: made.append(real(device)) or made[-1])
    plain_result, plain_events = run(flux(tmp_path / "plain"))
    assert not made
    result, events = run(flux(tmp_path / "offloaded", transformer={"activation_offloading": True}))
    # every block of the tiny Flux once per forward pass, 6 steps (2 epochs of 5 images at
    # batch 2; recomputations run inside the checkpoint, not through it)
    import json
    shape = json.loads((tiny_flow_model("flux") / "transformer" / "config.json").read_text())
    assert len(made) == 1 and made[0].calls == (shape["num_layers"]
                                                + shape["num_single_layers"]) * 6
    loss = [e["loss"] for e in events if e["type"] == "progress"]
    assert loss == [e["loss"] for e in plain_events if e["type"] == "progress"]
    a, b = load_file(plain_result.output_path), load_file(result.output_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="^transformer.activation_offloading keeps the "
                                          "activations gradient checkpointing saves"):
        check_layer_offload(flux(tmp_path, gradient_checkpointing=False,
                                 transformer={"activation_offloading": True}))
