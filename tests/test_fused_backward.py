"""Fused backward pass: the optimizer step inside backward(), each gradient freed at once.
It must train exactly what a plain step trains (schedule, EMA, resume included), keep far
fewer gradients alive, and refuse what it cannot honour."""
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors import safe_open

from trainer.control import Control
from trainer.errors import ConfigError
from trainer.loop import train
from trainer.optim import fused as fused_module
from trainer.optim.fused import FusedBackward



def ft_config(model_dir, tmp_path, **overrides):
    """A UNet fine-tune of the tiny SD 1.5, AdamW, no clipping (the fused pass cannot clip)."""
    data = {"training_method": "FINE_TUNE", "text_encoder": {"train": False},
            "learning_rate": 1e-3, "clip_grad_norm": None, "epochs": 2}
    data.update(overrides)
    return tiny_config(model_dir, tmp_path, **data)


def weights(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def assert_close(a, b):
    assert a.keys() == b.keys()
    changed = 0
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
        changed += 1
    assert changed


@pytest.mark.parametrize("extra", [
    {},
    # the schedule sets the LR before each step; EMA averages after it; the output holds EMA
    {"learning_rate_scheduler": "COSINE", "learning_rate_warmup_steps": 2, "ema": "GPU",
     "ema_update_step_interval": 1, "ema_decay": 0.9},
    # recomputed activations: each weight is still updated only after its last use
    {"gradient_checkpointing": True},
    # block-wise 8-bit state (the UNet's larger weights are over min_8bit_size)
    {"optimizer": {"optimizer": "ADAMW_8BIT"}},
], ids=["plain", "cosine-warmup-ema", "checkpointing", "adamw-8bit"])
def test_fused_fine_tune_trains_the_same_weights_as_a_plain_step(extra, tiny_sd15_dir, tmp_path):
    plain = train(ft_config(tiny_sd15_dir, tmp_path / "plain", **extra))
    fused = train(ft_config(tiny_sd15_dir, tmp_path / "fused", fused_backward_pass=True, **extra))
    assert fused.global_step == plain.global_step == 6
    base = weights(Path(tiny_sd15_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    a, b = weights(plain.output_path), weights(fused.output_path)
    assert_close(a, b)
    # and it did train: the UNet's weights moved away from the base model's
    moved = [k for k in a if k.startswith("model.diffusion_model.") and k.endswith("proj_in.weight")]
    assert moved and not torch.equal(a[moved[0]], base["down_blocks.0.attentions.0.proj_in.weight"])


@pytest.mark.parametrize("optimizer", ["ADAMW", "ADAMW_8BIT", "ADAFACTOR", "LION", "SGD"])
def test_fused_lora_trains_the_same_adapters(optimizer, tiny_sd15_dir, tmp_path):
    """Every optimizer the fused pass accepts updates a parameter from its own gradient and
    state only: stepping one parameter at a time changes nothing."""
    settings = {"clip_grad_norm": None, "optimizer": {"optimizer": optimizer},
                "learning_rate": 5.0 if optimizer == "SGD" else 1e-2}
    plain = train(tiny_config(tiny_sd15_dir, tmp_path / "plain", **settings))
    fused = train(tiny_config(tiny_sd15_dir, tmp_path / "fused", fused_backward_pass=True,
                              **settings))
    assert_close(weights(plain.output_path), weights(fused.output_path))


def test_fused_pass_keeps_few_gradients_alive(tiny_sd15_dir, tmp_path, monkeypatch):
    """Plain: every gradient is alive when the optimizer steps. Fused: at each update only
    the gradients not yet applied, a small share of the total."""
    seen = {"fused": 0, "plain": 0, "total": 0, "updates": 0}

    def grad_bytes(params):
        return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)

    real_step = FusedBackward._step

    def spying_step(self, bucket):
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        seen["total"] = sum(p.numel() * 4 for p in params)
        seen["fused"] = max(seen["fused"], grad_bytes(params))
        seen["updates"] += 1
        return real_step(self, bucket)

    monkeypatch.setattr(FusedBackward, "_step", spying_step)
    train(ft_config(tiny_sd15_dir, tmp_path / "fused", fused_backward_pass=True, epochs=1))

    real_adamw_step = torch.optim.AdamW.step

    def spying_adamw_step(self, *args, **kwargs):
        params = [p for g in self.param_groups for p in g["params"]]
        seen["plain"] = max(seen["plain"], grad_bytes(params))
        return real_adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spying_adamw_step)
    train(ft_config(tiny_sd15_dir, tmp_path / "plain", epochs=1))
    assert seen["updates"] > 0 and seen["plain"] == seen["total"] > 0
    assert 0 < seen["fused"] < 0.25 * seen["plain"]


def test_interrupted_fused_run_resumes_to_the_same_weights(tiny_sd15_dir, tmp_path):
    whole = train(ft_config(tiny_sd15_dir, tmp_path / "whole", fused_backward_pass=True,
                            epochs=3, backup_after_unit="NEVER"))
    config = ft_config(tiny_sd15_dir, tmp_path / "parts", fused_backward_pass=True, epochs=3,
                       backup_after_unit="NEVER")
    control = Control()
    control._on_event = lambda e: (e["type"] == "progress" and e["step"] == 4
                                   and control.request_stop())
    assert train(config, control).global_step == 4
    resumed = train(config.model_copy(update={"continue_last_backup": True}))
    assert resumed.global_step == whole.global_step == 9
    assert_close(weights(whole.output_path), weights(resumed.output_path))


@pytest.mark.parametrize("overrides, words", [
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ({"clip_grad_norm": 1.0}, "clip_grad_norm"),
    ({"optimizer": {"optimizer": "PRODIGY"}, "learning_rate": 1.0}, "PRODIGY"),
    ({"train_dtype": "FLOAT_16"}, "FLOAT_16"),
])
def test_fused_pass_refuses_what_it_cannot_honour(overrides, words, tiny_sd15_dir, tmp_path):
    config = ft_config(tiny_sd15_dir, tmp_path, fused_backward_pass=True, **overrides)
    with pytest.raises(ConfigError, match=words) as error:
        fused_module.check_fused_backward(config)
    assert "fused_backward_pass" in str(error.value)
    with pytest.raises(ConfigError, match=words):
        train(config)  # refused before anything is loaded


def test_fused_pass_defaults_off_and_is_a_fine_tune_setting():
    from trainer.config import TrainConfig
    field = TrainConfig.model_fields["fused_backward_pass"]
    assert field.default is False
    assert field.json_schema_extra["section"] == "Main settings"
    assert field.json_schema_extra["applies_to"] == {"training_method": ["FINE_TUNE"]}


@pytest.mark.slow
def test_fused_pass_under_ddp_matches_the_plain_step(tiny_sd15_dir, tmp_path):
    """Two processes (gloo): the fused pass averages each gradient over the processes itself
    (DDP's own averaging is off), and ends with the weights of a plain DDP run."""
    import json

    from test_cli import launch_two_processes
    paths = []
    for name, fused in (("plain", False), ("fused", True)):
        config = ft_config(tiny_sd15_dir, tmp_path / name, fused_backward_pass=fused,
                           batch_size=1, epochs=1)
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(config.model_dump(mode="json")))
    done = launch_two_processes(*paths, port=29571)  # both runs in one launch
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = {name: weights(tmp_path / name / "ws" / "output" / "model.safetensors")
               for name in ("plain", "fused")}
    assert_close(outputs["plain"], outputs["fused"])


def twin_models(layers=12, width=32):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    fused = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def test_parameters_are_stepped_in_buckets_each_exactly_once():
    """One optimizer call per bucket, not per parameter; every parameter updated once per
    backward pass, as a plain step would (per-part groups included), its gradient freed."""
    plain, fused = twin_models()
    groups = lambda model: [{"params": list(model[:6].parameters()), "lr": 1e-2},  # noqa: E731
                            {"params": list(model[6:].parameters()), "lr": 3e-3}]
    plain_opt = torch.optim.AdamW(groups(plain))
    fused_opt = torch.optim.AdamW(groups(fused))
    size = sum(p.numel() * 4 for p in fused.parameters())
    pass_ = FusedBackward(fused_opt, bucket_bytes=size // 4)  # about four buckets
    assert 3 <= len(pass_.buckets) <= 5
    x = torch.randn(4, 32)
    for step in range(1, 4):
        plain(x).pow(2).mean().backward()
        plain_opt.step()
        plain_opt.zero_grad()
        fused(x).pow(2).mean().backward()
        assert pass_.steps == step * len(pass_.buckets)
        assert pass_.updated == step * 24
        assert all(p.grad is None for p in fused.parameters())
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)
    assert [g["params"] for g in fused_opt.param_groups] == [list(fused[:6].parameters()),
                                                              list(fused[6:].parameters())]


def test_a_bucket_whose_gradients_do_not_all_arrive_is_stepped_when_backward_ends():
    """A weight the forward pass did not use (or a part frozen mid-run) never gets a
    gradient: its bucket's other weights are still updated, before backward() returns."""
    plain, fused = twin_models(layers=3)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    fused_opt = torch.optim.AdamW(fused.parameters(), lr=1e-2)
    pass_ = FusedBackward(fused_opt, bucket_bytes=1 << 30)  # one bucket for everything
    assert len(pass_.buckets) == 1
    fused[2].requires_grad_(False)  # frozen after the hooks were set: never arrives
    plain[2].requires_grad_(False)
    x = torch.randn(4, 32)
    fused(x).pow(2).mean().backward()
    assert pass_.steps == 1 and pass_.updated == 4  # two layers' weight and bias
    plain(x).pow(2).mean().backward()
    plain_opt.step()
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)
    # The next backward starts with no stale readiness (the end-of-pass flush re-arms).
    fused(x).pow(2).mean().backward()
    assert pass_.steps == 2 and pass_.updated == 8
