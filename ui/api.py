"""JSON endpoints for programs (gradio_client): start a config, read the job's state.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860")
    config = client.predict(api_name="/default_config")      # the demo, as JSON
    client.predict(config, api_name="/start")                 # "started" or "error: ..."
    client.predict(api_name="/state")                         # status, step, loss, ...
    client.predict(api_name="/stop")
"""
from __future__ import annotations

import json

from trainer.config import check_supported, config_from_dict
from trainer.errors import AtelierError, ConfigError
from ui import paths, presets
from ui.state import SESSION, check_paths, start_training


def start(config_json: str) -> str:
    """Start training from a JSON config (partial: defaults fill the rest). Returns 'started'
    or 'error: <why it did not start>'."""
    try:
        data = json.loads(config_json) if isinstance(config_json, str) else config_json
        if not isinstance(data, dict):
            raise ConfigError("The config must be a JSON object.")
        config = config_from_dict(paths.localize_config(data), warn=lambda message: None)
        check_supported(config)
        check_paths(config)
        start_training(config)
    except json.JSONDecodeError as error:
        return f"error: the config is not valid JSON: {error}"
    except AtelierError as error:
        return f"error: {error}"
    return "started"


def state() -> dict:
    """The training job's state: status, message, epoch/epochs, step/total_steps, loss,
    smooth_loss, lr, eta_seconds, samples, warnings, output_path, error."""
    data = SESSION.state().as_dict()
    # "file", not "path": gradio_client takes {"path": ...} dicts for files to download.
    data["samples"] = [{("file" if k == "path" else k): v for k, v in sample.items()}
                       for sample in data["samples"]]
    data["loss_history"] = data["loss_history"][-200:]
    data["lr_history"] = data["lr_history"][-200:]
    return json.loads(json.dumps(data, default=str))


def default_config() -> str:
    """The demo preset as a full JSON config (a starting point for `start`)."""
    from ui.page import initial_config
    config, memory = initial_config()
    return json.dumps(presets.export_dict(config, memory))
