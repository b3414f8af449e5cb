"""Shared test helpers (importable: pytest puts tests/ on sys.path)."""
import json

from trainer.config import config_from_dict
from trainer.demo import DEMO_DATASET_DIR


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
