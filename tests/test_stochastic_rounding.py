"""`optimizer.stochastic_rounding` (OneTrainer's key): a fine-tune's BFLOAT_16 parts train their
bfloat16 weights in place, each update rounded up or down at random
(trainer/optim/stochastic_rounding.py). The rounding is unbiased; updates that rounding to the
nearest bfloat16 loses still add up, for every optimizer it is offered with; a real fine-tune
keeps no float32 copy of those weights and its loss falls; Prodigy is refused by name; the
optimizer dialog and the weight data type say what it does and costs."""
import pytest
import torch

from trainer import finetune
from trainer.config import Optimizer, check_supported, config_from_dict
from trainer.errors import ConfigError
from trainer.optim import stochastic_rounding
from trainer.optim.registry import build_optimizer, optimizer_schema

from helpers import read_metrics, same_trained, stop_at

def test_rounding_is_unbiased_and_lands_on_a_neighbour():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200_000, generator=g) * 3 - 1.5  # both signs, several binades
    nearest = x.to(torch.bfloat16)  # one of the two neighbours; the other is found from it
    down = torch.where(nearest.float() > x, torch.nextafter(nearest, torch.tensor(
        -float("inf"), dtype=torch.bfloat16)), nearest).float()
    up = torch.nextafter(down.to(torch.bfloat16), torch.tensor(
        float("inf"), dtype=torch.bfloat16)).float()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    stochastic_rounding.round_into(out, x.clone(), torch.Generator().manual_seed(1))
    out = out.float()
    assert ((out == down) | (out == up)).all()  # always one of the two neighbours
    # up with probability (x - down) / (up - down), whatever that position is (rounding to the
    # nearest would go up never below 0.5 and always above) ...
    position = (x - down) / (up - down)
    went_up = (out == up).float()
    for low in torch.arange(0, 1, 0.1):
        where = (position >= low) & (position < low + 0.1)
        assert abs(went_up[where].mean() - position[where].mean()) < 0.02, low
    # ... so the rounding error averages out to zero
    assert abs(((out - x) / (up - down)).mean().item()) < 3 * 0.5 / len(x) ** 0.5


OPTIMIZERS = list(stochastic_rounding.SUPPORTED)


def run_steps(optimizer: Optimizer, dtype: torch.dtype, rounding: bool, steps: int = 40):
    """`steps` updates of 4096 weights at 1.0, each update about 1e-3 (lr 1e-3 with a constant
    gradient: AdamW, Lion and Adafactor move each weight by about lr a step, SGD by lr·grad),
    a quarter of the bfloat16 spacing at 1.0. Returns the weights (float32) and the param."""
    weight = torch.nn.Parameter(torch.ones(4096, dtype=dtype))
    values = {"weight_decay": 0.0, "stochastic_rounding": rounding}
    torch.manual_seed(0)  # the rounding's seed
    built = build_optimizer(optimizer, values, [{"params": [weight], "lr": 1e-3, "name": "unet"}])
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)
        built.step()
        built.zero_grad(set_to_none=True)
    return weight.detach().float(), weight


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=[o.value for o in OPTIMIZERS])
def test_tiny_updates_that_nearest_rounding_loses_still_add_up(optimizer):
    reference, _ = run_steps(optimizer, torch.float32, rounding=False)
    moved = 1 - reference.mean().item()
    assert 0.02 < moved < 0.08  # about 40 steps of 1e-3
    nearest, _ = run_steps(optimizer, torch.bfloat16, rounding=False)
    assert (1 - nearest.mean().item()) < 0.1 * moved  # each update rounds back to 1.0
    rounded, param = run_steps(optimizer, torch.bfloat16, rounding=True)
    assert param.dtype == torch.bfloat16  # trained in place
    assert (1 - rounded.mean().item()) == pytest.approx(moved, rel=0.05)
    assert rounded.unique().numel() > 1  # each weight took its own random path


def test_rounding_repeats_with_the_seed():
    a, _ = run_steps(Optimizer.ADAMW, torch.bfloat16, rounding=True, steps=5)
    b, _ = run_steps(Optimizer.ADAMW, torch.bfloat16, rounding=True, steps=5)
    assert torch.equal(a, b)


def test_float32_weights_beside_are_stepped_as_usual():
    """An optimizer with bfloat16 and float32 weights (a BFLOAT_16 part and a FLOAT_32 one):
    the float32 ones get exactly the plain optimizer's update."""
    torch.manual_seed(0)
    half = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    full = torch.nn.Parameter(torch.linspace(-1, 1, 64))
    alone = torch.nn.Parameter(full.detach().clone())
    mixed = build_optimizer(Optimizer.ADAMW, {"stochastic_rounding": True},
                            [{"params": [half], "lr": 1e-2, "name": "unet"},
                             {"params": [full], "lr": 1e-2, "name": "text_encoder"}])
    plain = build_optimizer(Optimizer.ADAMW, {}, [{"params": [alone], "lr": 1e-2,
                                                   "name": "text_encoder"}])
    for step in range(3):
        grad = torch.sin(torch.arange(64.0) + step)
        half.grad, full.grad, alone.grad = grad.bfloat16(), grad.clone(), grad.clone()
        mixed.step()
        plain.step()
    assert torch.equal(full, alone) and half.dtype == torch.bfloat16


def test_it_applies_only_to_a_fine_tunes_bfloat16_parts():
    def config(**extra):
        return config_from_dict({"training_method": "FINE_TUNE",
                                 "unet": {"weight_dtype": "BFLOAT_16"},
                                 "optimizer": {"optimizer": "ADAMW",
                                               "stochastic_rounding": True}, **extra})
    assert stochastic_rounding.trains_in_place(config(), "unet")
    assert not stochastic_rounding.trains_in_place(config(), "text_encoder")  # FLOAT_32
    assert not stochastic_rounding.trains_in_place(config(training_method="LORA"), "unet")
    off = config(optimizer={"optimizer": "ADAMW", "stochastic_rounding": False})
    assert not stochastic_rounding.trains_in_place(off, "unet")
    # OneTrainer's default for AdamW, and here for every optimizer: off
    assert not config_from_dict({}).optimizer.stochastic_rounding


def test_prodigy_is_refused_by_name_where_it_would_apply():
    asked = {"training_method": "FINE_TUNE", "unet": {"weight_dtype": "BFLOAT_16"},
             "optimizer": {"optimizer": "PRODIGY", "stochastic_rounding": True}}
    with pytest.raises(ConfigError) as error:
        check_supported(config_from_dict(asked))
    assert "optimizer.stochastic_rounding" in str(error.value)
    assert "PRODIGY" in str(error.value) and "ADAMW" in str(error.value)
    # where nothing is bfloat16 and trained, there is nothing to round: no refusal
    check_supported(config_from_dict({**asked, "unet": {"weight_dtype": "FLOAT_32"}}))
    check_supported(config_from_dict({**asked, "training_method": "LORA"}))
    # and the optimizer itself refuses to round bfloat16 weights it cannot
    weight = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match="optimizer.stochastic_rounding"):
        build_optimizer(Optimizer.PRODIGY, {"stochastic_rounding": True},
                        [{"params": [weight], "lr": 1.0, "name": "unet"}])


def test_the_page_says_what_it_does_and_costs():
    """The "⋯" dialog is drawn from the schemas; the data type tooltip points to it."""
    from trainer.config import TrainConfig
    from ui import optimizers
    for optimizer in Optimizer:
        names = [p.name for p in optimizer_schema(optimizer)]
        assert ("stochastic_rounding" in names) == (optimizer in stochastic_rounding.SUPPORTED)
    param = next(p for p in optimizers.schema("ADAMW") if p.name == "stochastic_rounding")
    text = optimizers.tooltip(param)
    assert "BFLOAT_16" in text and "in place" in text and "master" in text
    assert "AdamW 12 instead of 16" in text
    assert optimizers.param_kind("stochastic_rounding") == "bool"
    unet = TrainConfig.model_fields["unet"].annotation
    dtype_tooltip = unet.model_fields["weight_dtype"].description
    assert "stochastic_rounding" in dtype_tooltip and "master" in dtype_tooltip


# --- A real fine-tune ------------------------------------------------------------------------

def sr_config(model_dir, where, **overrides):
    from trainer.demo import DEMO_DATASET_DIR
    data = {"training_method": "FINE_TUNE", "base_model_name": str(model_dir),
            "workspace_dir": str(where / "ws"), "concepts": [{"path": str(DEMO_DATASET_DIR)}],
            "resolution": "64", "train_dtype": "BFLOAT_16", "gradient_checkpointing": False,
            "learning_rate": 1e-4, "learning_rate_warmup_steps": 0, "batch_size": 2,
            "epochs": 10, "text_encoder": {"train": False},
            "unet": {"weight_dtype": "BFLOAT_16"},
            "optimizer": {"optimizer": "ADAMW", "stochastic_rounding": True}}
    data.update(overrides)
    return config_from_dict(data)


def train_recording_the_optimizer(config, control=None):
    """train(config), returning (result, the torch optimizer it built)."""
    import trainer.loop as loop_module
    from trainer.loop import train
    built = []
    real = loop_module.build_optimizer

    def record(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "build_optimizer", record)
        result = train(config, control) if control else train(config)
    return result, built[0]


@pytest.fixture(scope="module")
def in_place_run(tiny_sd15_dir, tmp_path_factory):
    config = sr_config(tiny_sd15_dir, tmp_path_factory.mktemp("sr"))
    result, optimizer = train_recording_the_optimizer(config)
    return config, result, optimizer


def test_a_bfloat16_fine_tune_keeps_no_float32_copy_of_its_weights(in_place_run):
    config, _, optimizer = in_place_run
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert params and {p.dtype for p in params} == {torch.bfloat16}
    count = sum(p.numel() for p in params)
    assert sum(p.numel() * p.element_size() for p in params) == 2 * count
    # the optimizer's state is AdamW's two float32 moments a weight, nothing weight-like more
    states = [optimizer.state[p] for p in params]
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in states)
    moments = [t for s in states for k, t in s.items() if k != "step"]
    assert {t.dtype for t in moments} == {torch.float32}
    assert sum(t.numel() for t in moments) == 2 * count


def test_without_it_the_same_part_trains_float32_master_weights(tiny_sd15_dir, tmp_path):
    config = sr_config(tiny_sd15_dir, tmp_path, epochs=1,
                       optimizer={"optimizer": "ADAMW", "stochastic_rounding": False})
    _, optimizer = train_recording_the_optimizer(config)
    assert {p.dtype for g in optimizer.param_groups for p in g["params"]} == {torch.float32}


def test_the_in_place_fine_tune_learns(in_place_run, tiny_sd15_dir):
    """30 steps at lr 1e-4 (measured: the loss's first third 1.063, last third 0.907, the same
    as with float32 master weights); and the weights moved from the base model's."""
    config, result, _ = in_place_run
    losses = [r["loss"] for r in read_metrics(config)]
    assert len(losses) == 30
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10]), losses
    assert moved_fraction(result.output_path, tiny_sd15_dir) > 0.9


def moved_fraction(output_path, model_dir) -> float:
    """The share of the UNet's weight tensors in the saved checkpoint that differ from the
    base model's."""
    from safetensors.torch import load_file
    from trainer.models.sd15 import load_sd15
    from trainer.models.single_file import unet_to_ldm
    saved = load_file(output_path)
    base = unet_to_ldm(load_sd15(str(model_dir)).unet.state_dict())
    return sum(not torch.equal(saved[k].float(), base[k].float()) for k in base) / len(base)


def test_an_interrupted_in_place_run_resumes_to_the_same_weights(tiny_sd15_dir, tmp_path):
    """The rounding's random bits follow the optimizer's call count (kept in the backup), and
    the float32 moments come back as they were: the resumed run is the same run."""
    from safetensors.torch import load_file
    from trainer.loop import train
    make = lambda where: sr_config(tiny_sd15_dir, tmp_path / where, epochs=2,  # noqa: E731
                                   backup_after_unit="NEVER")
    reference = train(make("whole"))
    parts = make("parts")
    assert train(parts, stop_at(2)).global_step == 2
    resumed = train(parts.model_copy(update={"continue_last_backup": True}))
    assert resumed.global_step == reference.global_step == 6
    a, b = load_file(reference.output_path), load_file(resumed.output_path)
    assert a.keys() == b.keys()
    assert all(same_trained(a[k], b[k]) for k in a)


def test_the_fused_backward_pass_rounds_its_buckets_too(tiny_sd15_dir, tmp_path):
    """With the optimizer stepping inside the backward pass, each of its buckets is rounded
    the same way: the weights stay bfloat16 and train."""
    config = sr_config(tiny_sd15_dir, tmp_path, epochs=1, fused_backward_pass=True,
                       clip_grad_norm=None)
    result, optimizer = train_recording_the_optimizer(config)
    assert {p.dtype for g in optimizer.param_groups for p in g["params"]} == {torch.bfloat16}
    calls = optimizer.param_groups[0][stochastic_rounding.STEP_KEY]
    assert calls > 3  # 3 steps, several buckets each
    assert moved_fraction(result.output_path, tiny_sd15_dir) > 0.9


def test_trainable_parameters_keep_bfloat16_only_with_rounding(tiny_sd15_dir, tmp_path):
    from trainer.models.sd15 import load_sd15
    for rounding, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        unet = load_sd15(str(tiny_sd15_dir)).unet.to(torch.bfloat16).requires_grad_(False)
        config = sr_config(tiny_sd15_dir, tmp_path,
                           optimizer={"optimizer": "ADAMW", "stochastic_rounding": rounding})
        params = finetune.trainable_parameters(unet, config, "unet")
        assert len(params) == len(list(unet.parameters()))
        assert all(p.dtype == dtype and p.requires_grad for p in params)
