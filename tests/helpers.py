"""Shared test helpers (importable: pytest puts tests/ on sys.path)."""
import json

import torch

from trainer.config import config_from_dict
from trainer.demo import DEMO_DATASET_DIR


# Two identical training runs are bit-identical on the CPU. CUDA backward kernels accumulate with
# atomic adds in a varying order, so there "the same run" means equal to float32 rounding.
RUNS_ARE_BIT_EXACT = not torch.cuda.is_available()


def same_trained(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Weights of two runs that should be the same run (bit-exact where the device allows)."""
    if RUNS_ARE_BIT_EXACT:
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def tiny_config(model_dir, tmp_path, **overrides):
    """A run that takes seconds: 64 px, rank 4, fp32, no warmup, no checkpointing."""
    data = {
        "base_model_name": str(model_dir),
        "workspace_dir": str(tmp_path / "ws"),
        "concepts": [{"path": str(DEMO_DATASET_DIR)}],
        "resolution": "64", "train_dtype": "FLOAT_32", "gradient_checkpointing": False,
        "learning_rate": 1e-2, "learning_rate_warmup_steps": 0,
        "lora_rank": 4, "lora_alpha": 2.0, "batch_size": 2, "epochs": 2,
        "text_encoder": {"train": True, "stop_training_after_unit": "NEVER"},
    }
    data.update(overrides)
    return config_from_dict(data)


def read_metrics(config):
    with open(f"{config.workspace_dir}/metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sdxl_config(model_dir, tmp_path, **overrides):
    """tiny_config for the tiny SDXL: both text encoders and the UNet trained."""
    data = {"model_type": "STABLE_DIFFUSION_XL_10_BASE",
            "text_encoder_2": {"train": True, "stop_training_after_unit": "NEVER"}}
    data.update(overrides)
    return tiny_config(model_dir, tmp_path, **data)


LAST_STEP_SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
                    "diffusion_steps": 4, "cfg_scale": 3.0}


def train_sampling_at_the_end(make_config, model_dir, tmp_path):
    """A 4-epoch run that samples at its last step, so the trained model's image is on disk.
    Returns (config, result, events, sample)."""
    from trainer.control import Control
    from trainer.loop import train
    config = make_config(model_dir, tmp_path, epochs=4, lora_alpha=3.0,
                         samples=[LAST_STEP_SAMPLE], sample_after=4, sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    return config, result, events, LAST_STEP_SAMPLE


def poison_loss_at(monkeypatch, call: int) -> None:
    """Make the loop's `call`-th pixel loss NaN (the others unchanged): a run that diverges
    at a known step."""
    import trainer.batch_loss as loss_module

    real, calls = loss_module.pixel_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == call else loss

    monkeypatch.setattr(loss_module, "pixel_loss", poisoned)


def stop_at(step):
    """A Control that asks the run to stop once `step` is done (an interrupted run)."""
    from trainer.control import Control
    control = Control()

    def on_event(event):
        if event["type"] == "progress" and event["step"] == step:
            control.request_stop()
    control._on_event = on_event
    return control


@torch.no_grad()
def outputs(unet, text_encoder, text_encoder_2=None) -> list[torch.Tensor]:
    """The UNet's noise prediction on fixed inputs and the text encoders' outputs (TE2's
    pooled projection included): what a LoRA changes."""
    g = torch.Generator().manual_seed(0)
    c = unet.config
    latents = torch.randn(1, c.in_channels, 8, 8, generator=g)
    states = torch.randn(1, 77, c.cross_attention_dim, generator=g)
    extra = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                      "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = (torch.arange(77)[None] % 40) + 1
    out = [unet(latents, torch.tensor([500]), states, **extra).sample,
           text_encoder(ids).last_hidden_state]
    if text_encoder_2 is not None:
        te2 = text_encoder_2(ids)
        out += [te2.last_hidden_state, te2.text_embeds]
    return out


def black_masked_folder(tmp_path):
    """Three flat images, each with an all-black mask: with masked training, unmasked weight
    0 and never unmasked, the loss is exactly 0 and a LoRA learns nothing."""
    import numpy as np
    from PIL import Image
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i + 30, np.uint8)).save(folder / f"{i}.png")
        Image.new("L", (64, 64), 0).save(folder / f"{i}-masklabel.png")
        (folder / f"{i}.txt").write_text("a photo")
    return folder


BLACK_MASKS = dict(masked_training=True, unmasked_weight=0.0, unmasked_probability=0.0,
                   optimizer={"weight_decay": 0.0})


def assert_same_files(path_a, path_b):
    """Two runs' saved files hold the same tensors (bit-exact where the device allows)."""
    from safetensors import safe_open
    with safe_open(str(path_a), "pt") as a, safe_open(str(path_b), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert same_trained(a.get_tensor(key), b.get_tensor(key)), key


def resumed_equals_whole(make_config, tmp_path, stop_step: int, **extra):
    """A run stopped at `stop_step` and continued from its backup ends with the weights of the
    same run done in one go; returns the global step."""
    from trainer.loop import train
    reference = train(make_config(tmp_path / "whole", backup_after_unit="NEVER", **extra))
    parts = make_config(tmp_path / "parts", backup_after_unit="NEVER", **extra)
    first = train(parts, stop_at(stop_step))
    assert first.stopped_early and first.global_step == stop_step
    resumed = train(parts.model_copy(update={"continue_last_backup": True}))
    assert resumed.global_step == reference.global_step
    assert_same_files(reference.output_path, resumed.output_path)
    return resumed.global_step


def fine_tune_keeping_weights(config, monkeypatch, part: str = "transformer"):
    """Train `config` (a fine-tune) and return (output path, the trained `part`'s state dict
    as the run left it in memory), to compare with what a reload of the output gives."""
    import trainer.loop as loop
    from trainer.models.family import load_family
    loaded = []

    def load_and_keep(config):
        family = load_family(config)
        loaded.append(family)
        return family
    monkeypatch.setattr(loop, "load_family", load_and_keep)
    result = loop.train(config)
    trained = {k: v.detach().clone() for k, v in loaded[0].parts[part].state_dict().items()}
    return result.output_path, trained


def assert_same_weights(state: dict, want: dict):
    """Two state dicts with the same keys and bit-identical tensors."""
    import torch
    assert state.keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(state[key], tensor), key


def assert_loss_falls(config, result, steps: int, factor: float, window: int = 10):
    """The run took `steps` steps, each logged with its loss, and the mean loss of the last
    `window` steps is below `factor` times that of the first `window`."""
    import numpy as np
    losses = [r["loss"] for r in read_metrics(config) if "loss" in r]
    assert result.global_step == len(losses) == steps
    first, last = np.mean(losses[:window]), np.mean(losses[-window:])
    assert last < factor * first, (first, last)


def assert_black_masks_learn_nothing(make_config, tmp_path, epochs: int):
    """A LoRA run on black_masked_folder with BLACK_MASKS ends with every up weight zero."""
    from safetensors import safe_open

    from trainer.loop import train
    config = make_config(tmp_path, epochs=epochs,
                         concepts=[{"path": str(black_masked_folder(tmp_path))}], **BLACK_MASKS)
    with safe_open(train(config).output_path, "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
    assert ups and all(torch.count_nonzero(u) == 0 for u in ups)
