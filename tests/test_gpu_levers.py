"""The GPU levers on the CPU: compile (its switch, one compile per bucket shape, the same
training), layer offloading (which blocks stream, twice per step, the same training) and the
VAE / frozen text encoders leaving the device once the caches serve them (a spy on `.to()`:
the CPU has no second device). Speed and memory are measured on a GPU by bench/gpu_check.sh.
"""
import pytest
import torch
from safetensors.torch import load_file

from helpers import stop_at, tiny_config
from trainer import compilation, residency
from trainer.compilation import COMPILING_STATUS, compile_wanted
from trainer.config import CompileMode, config_from_dict
from trainer.control import Control
from trainer.errors import ConfigError
from trainer.layer_offload import LayerOffload
from trainer.loop import train


def run(config, control=None):
    events = []
    control = control or Control()
    inner = control._on_event
    control._on_event = lambda e: (events.append(e), inner and inner(e))
    result = train(config, control)
    return result, events


def losses(events):
    return [e["loss"] for e in events if e["type"] == "progress"]


# --- compile ---------------------------------------------------------------------------------

def test_compile_switch_follows_the_device_and_onetrainer_bools(tmp_path):
    auto = config_from_dict({})
    assert auto.compile == CompileMode.AUTO
    # AUTO does not compile until a GPU measurement shows it pays (trainer/compilation.py)
    assert not compile_wanted(auto)
    assert compile_wanted(config_from_dict({"compile": True}))       # OneTrainer's bool
    assert not compile_wanted(config_from_dict({"compile": False}))
    # OneTrainer's checkpointing enum: CPU_OFFLOADED is checkpointing (+ the fraction)
    assert config_from_dict({"gradient_checkpointing": "CPU_OFFLOADED"}).gradient_checkpointing


@pytest.fixture
def cpu_compile(monkeypatch):
    """dynamo's tracing, guards and recompiles on the CPU, without minutes of C++ codegen."""
    import torch._dynamo
    monkeypatch.setattr(compilation, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_run_compiles_once_per_bucket_and_trains_like_eager(
        tiny_sd15_dir, tmp_path, cpu_compile):
    from torch._dynamo.utils import counters
    common = dict(epochs=3, text_encoder={"train": False}, learning_rate_warmup_steps=0)
    eager = tiny_config(tiny_sd15_dir, tmp_path / "eager", compile="OFF", **common)
    eager_result, eager_events = run(eager)

    compiled = tiny_config(tiny_sd15_dir, tmp_path / "compiled", compile="ON", **common)
    graphs_per_epoch = []  # dynamo's count of graphs compiled, at each epoch's last step
    control = Control(on_event=lambda e: graphs_per_epoch.append(
        counters["stats"]["unique_graphs"]) if e["type"] == "progress"
        and e["epoch_step"] == e["steps_per_epoch"] else None)
    result, events = run(compiled, control)
    statuses = [e["message"] for e in events if e["type"] == "status"]
    # the demo's 5 images at 64 px: buckets 80x56 (3 images: a batch of 2 and one of 1) and
    # 64x64 (a batch of 2): three batch shapes, each compiled on its first step only
    assert statuses.count(COMPILING_STATUS) == 3
    assert any("Compiling the UNet's 12 blocks" in s for s in statuses)
    assert len(graphs_per_epoch) == 3 and graphs_per_epoch[0] > 0
    assert graphs_per_epoch[-1] == graphs_per_epoch[0], \
        f"recompiled after the first epoch: {graphs_per_epoch}"
    # the same training within float rounding (compiled kernels fuse differently)
    assert losses(events) == pytest.approx(losses(eager_events), rel=1e-3, abs=1e-4)
    # the LoRA file keeps its names: compiling in place adds no '_orig_mod'
    assert load_file(result.output_path).keys() == load_file(eager_result.output_path).keys()


def test_compiled_run_resumes_where_it_stopped(tiny_sd15_dir, tmp_path, cpu_compile):
    # one batch shape (every image at 64x64, the 5 in one batch): one compile per run
    common = dict(epochs=4, batch_size=5, aspect_ratio_bucketing=False,
                  text_encoder={"train": False}, compile="ON")
    whole = tiny_config(tiny_sd15_dir, tmp_path / "whole", **common)
    whole_result, whole_events = run(whole)
    parted = tiny_config(tiny_sd15_dir, tmp_path / "parted", **common)
    first = train(parted, stop_at(2))
    assert first.stopped_early and first.global_step == 2
    resumed = tiny_config(tiny_sd15_dir, tmp_path / "parted", continue_last_backup=True,
                          **common)
    result, events = run(resumed)
    assert result.global_step == 4
    assert losses(events) == pytest.approx(losses(whole_events)[2:], rel=1e-5)
    a, b = load_file(whole_result.output_path), load_file(result.output_path)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_refusals_name_the_keys(tiny_sd15_dir, tmp_path):
    cases = [
        (dict(compile="ON", layer_offload_fraction=0.5, gradient_checkpointing=True),
         "compile ON with layer_offload_fraction"),
        (dict(layer_offload_fraction=0.5, gradient_checkpointing=False),
         "needs gradient_checkpointing"),
        (dict(layer_offload_fraction=0.5, gradient_checkpointing=True,
              training_method="FINE_TUNE", output_model_format="ORIGINAL_SINGLE_FILE"),
         "fine-tuned UNet"),
    ]
    for overrides, message in cases:
        config = tiny_config(tiny_sd15_dir, tmp_path, **overrides)
        with pytest.raises(ConfigError, match=message):
            train(config)


# --- layer offloading --------------------------------------------------------------------------

def lora_unet(model_dir, tmp_path):
    from trainer import finetune
    from trainer.models.family import load_family
    config = tiny_config(model_dir, tmp_path, gradient_checkpointing=True)
    family = load_family(config)
    unet = family.parts["unet"].requires_grad_(False)
    finetune.trainable_parameters(unet, config, "unet")
    unet.enable_gradient_checkpointing()
    return unet.train()


def unet_call(unet):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return unet(latents, torch.tensor([10, 500]), hidden).sample


def reference_step(unet) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`unet_call`'s output and the LoRA gradients of its backward pass, every weight in
    place (the gradients cleared again after)."""
    reference = unet_call(unet)
    reference.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad(set_to_none=True)
    return reference, grads


def test_layer_offload_streams_whole_blocks_twice_per_step(tiny_sd15_dir, tmp_path):
    unet = lora_unet(tiny_sd15_dir, tmp_path)
    reference, grads = reference_step(unet)

    offload = LayerOffload(unet, 0.5, "cpu")
    largest_unit = max(sum(p.numel() * p.element_size() for p in u.parameters())
                       for u in offload.units)
    assert 0.5 * offload.total_bytes <= offload.streamed_bytes < \
        0.5 * offload.total_bytes + largest_unit
    assert all(not any(p.requires_grad for p in pairs_params) for pairs_params in
               ([p for p, _ in offload._host[u]] for u in offload.units))
    out = unet_call(unet)
    out.square().mean().backward()
    # each streamed block: loaded for the forward pass, and again for its recomputation in the
    # backward pass when a gradient flows through it (the first block, before any adapter,
    # has none: it runs once)
    assert len(offload.units) < offload.loads <= 2 * len(offload.units)
    # the same outputs and LoRA gradients as with every weight in place
    assert torch.equal(out, reference)
    for name, param in unet.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, grads[name]), name
    # between calls the streamed weights point at their CPU copies again
    for unit in offload.units:
        for param, host in offload._host[unit]:
            assert param.data.data_ptr() == host.data_ptr()
    with torch.no_grad():  # sampling: one load per block
        before = offload.loads
        unet_call(unet.eval())
        assert offload.loads - before == len(offload.units)


def test_a_recomputed_block_leaves_the_device_though_torch_stops_its_recomputation_early(
        tiny_sd15_dir, tmp_path):
    """torch's checkpointing stops a block's recomputation once it has what the block saves,
    before the block's forward post-hook: its weights must still leave the device, or by the
    end of the backward pass every streamed block would be there at once. The device is
    played by copies here (on a CPU, `.to("cpu")` returns the host tensor itself)."""
    unet = lora_unet(tiny_sd15_dir, tmp_path)
    reference, grads = reference_step(unet)
    offload = LayerOffload(unet, 1.0, "cpu")
    offload._to_device = lambda host: host.clone()
    on_device, most = set(), [0]
    real_load = offload._load

    def load(unit, args):
        real_load(unit, args)
        on_device.clear()
        on_device.update(id(u) for u in offload.units for param, host in offload._host[u]
                         if param.data.data_ptr() != host.data_ptr())
        most[0] = max(most[0], len(on_device))
    for unit in offload.units:  # the recorder runs in place of the registered pre-hook
        unit._forward_pre_hooks.clear()
        unit.register_forward_pre_hook(load)
    out = unet_call(unet)
    out.square().mean().backward()
    assert torch.equal(out, reference)
    for name, param in unet.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, grads[name]), name
    assert offload.loads > len(offload.units)  # recomputed blocks were loaded again
    assert most[0] == 1, most  # never two blocks' weights on the device at once
    assert len(offload.loaded) <= 1


def test_streamed_run_trains_exactly_like_one_without(tiny_sd15_dir, tmp_path):
    common = dict(epochs=2, text_encoder={"train": False}, gradient_checkpointing=True)
    plain = tiny_config(tiny_sd15_dir, tmp_path / "plain", **common)
    plain_result, plain_events = run(plain)
    streamed = tiny_config(tiny_sd15_dir, tmp_path / "streamed", layer_offload_fraction=0.5,
                           **common)
    result, events = run(streamed)
    assert any(e["type"] == "status" and e["message"].startswith("Streaming ")
               for e in events)
    assert losses(events) == losses(plain_events)
    a, b = load_file(plain_result.output_path), load_file(result.output_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the VAE and frozen text encoders leave the device ----------------------------------------

def spy_moves(monkeypatch, log):
    """Record `.to()` calls of the VAE, the text encoder and the UNet as (class, where)."""
    real_to = torch.nn.Module.to

    def spy_to(module, *args, **kwargs):
        name = type(module).__name__
        if name in ("AutoencoderKL", "CLIPTextModel", "UNet2DConditionModel"):
            target = args[0] if args else kwargs.get("device")
            log.append((name, str(target)))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy_to)


def test_caches_fill_first_then_the_vae_and_text_encoder_leave_before_the_unet_comes(
        tiny_sd15_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(residency, "parking_pays", lambda device: True)
    log = []
    spy_moves(monkeypatch, log)
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=3, text_encoder={"train": False},
                         samples=[{"prompt": "a cat", "seed": 1, "width": 64, "height": 64,
                                   "diffusion_steps": 2}],
                         sample_after=2, sample_after_unit="EPOCH")
    statuses = []

    def on_event(e):
        if e["type"] in ("sample", "started"):
            log.append(("event", e["type"]))
        if e["type"] == "status":
            statuses.append(e["message"])
            if e["message"].startswith("Latent cache after"):
                log.append(("epoch done", ""))

    train(config, Control(on_event=on_event))
    assert "Filling the latent and text caches before training" in statuses
    # every sample of the first epoch came from the caches: nothing encoded while training
    first = next(s for s in statuses if s.startswith("Latent cache after epoch 1"))
    # (the counts include the filling pass: 5 samples and 5 captions + the empty one)
    assert "5 sample(s) reused, 5 encoded" in first and "text cache: 5 reused, 6 encoded" in first
    started = log.index(("event", "started"))
    setup = [m for m in log[:started] if m[0] != "event"]
    vae_off = setup.index(("AutoencoderKL", "cpu"))
    te_off = setup.index(("CLIPTextModel", "cpu"))
    unet_on = max(i for i, m in enumerate(setup) if m == ("UNet2DConditionModel", "cpu"))
    assert vae_off < unet_on and te_off < unet_on  # parked before the UNet is placed
    # while training nothing moves, except around the sample after epoch 2: the VAE comes
    # back to the device for it and parks again; the text encoder stays parked, as the
    # sample's prompt was encoded while the caches filled (trainer/sample_prompts.py)
    assert "Encoded the prompts of 1 sample(s) before training: sampling needs no text " \
        "encoder" in statuses
    at = [i for i, m in enumerate(log) if i > started
          and m[0] in ("AutoencoderKL", "CLIPTextModel")]
    assert [log[i][0] for i in at] == ["AutoencoderKL", "AutoencoderKL"]
    assert at[0] < log.index(("event", "sample")) < at[1] and log[at[1]][1] == "cpu"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_filling_the_caches_first_trains_exactly_as_filling_them_on_the_way(
        family, tiny_sd15_dir, tiny_sdxl_dir, tmp_path, monkeypatch):
    common = dict(epochs=2, text_encoder={"train": False, "caption_dropout_probability": 0.3})
    if family == "sdxl":
        common.update(model_type="STABLE_DIFFUSION_XL_10_BASE",
                      text_encoder_2={"train": False, "caption_dropout_probability": 0.3})
    model = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    lazy_result, lazy_events = run(tiny_config(model, tmp_path / "lazy", **common))
    monkeypatch.setattr(residency, "parking_pays", lambda device: True)
    first_result, first_events = run(tiny_config(model, tmp_path / "first", **common))
    assert losses(first_events) == losses(lazy_events)
    a, b = load_file(lazy_result.output_path), load_file(first_result.output_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the empty caption (caption dropout) was cached up front too: the encoder never returned
    assert not any(e["type"] == "status" and "is back on the GPU" in e["message"]
                   for e in first_events)


def test_a_parked_module_comes_back_when_the_cache_misses(monkeypatch):
    monkeypatch.setattr(residency, "parking_pays", lambda device: True)
    encoder = torch.nn.Linear(3, 3)
    moved, returned = [], []
    real_to = encoder.to
    encoder.to = lambda *a, **k: (moved.append(str(a[0])), real_to(*a, **k))[1]
    tracker = residency.FrozenPartsResidency({"text_encoder": encoder}, torch.device("cpu"),
                                             on_return=returned.append)
    tracker.park()
    assert tracker.parked == {"text_encoder"} and moved == ["cpu"]
    encoder(torch.ones(1, 3))  # a caption the cache has not seen
    assert returned == ["text_encoder"] and not tracker.parked and len(moved) == 2
    with tracker.present():
        assert not tracker.parked
    assert not tracker.parked  # it was not parked before sampling: it stays
