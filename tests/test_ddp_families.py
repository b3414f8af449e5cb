"""Every flow-matching family trains under `accelerate launch` on 2 CPU processes (gloo): the
transformer wrapped by DDP, the data split (5 images at batch 1 make 3 steps, not 5), rank 0
alone writing the log and the LoRA. One launch trains them all (tests/ddp_train_each.py)."""
import pytest
from safetensors import safe_open

from trainer.models.tiny_flow import tiny_flow_model

from test_cli import launch_two_processes, write_config

# model_type -> how the test gets its tiny model (a tiny_flow kind or a conftest fixture)
FAMILIES = {"FLUX_DEV_1": "flux", "CHROMA_1": "chroma", "STABLE_DIFFUSION_35": "sd35",
            "Z_IMAGE": "tiny_z_image_dir", "QWEN": "tiny_qwen_image_dir",
            "FLUX_2": "tiny_flux2_dir"}


@pytest.mark.slow
def test_every_flow_family_trains_under_accelerate_launch(request, tmp_path):
    configs = []
    for model_type, source in FAMILIES.items():
        model = (request.getfixturevalue(source) if source.startswith("tiny_")
                 else tiny_flow_model(source))
        folder = tmp_path / model_type
        folder.mkdir()
        encoders = {p: {"train": False} for p in ("text_encoder", "text_encoder_2")
                    if model_type in ("FLUX_DEV_1", "STABLE_DIFFUSION_35")}
        configs.append(write_config(folder, model, model_type=model_type, batch_size=1,
                                    epochs=1, output_model_format="DIFFUSERS_LORA",
                                    **encoders))
    done = launch_two_processes(*configs, port=29591)
    assert done.returncode == 0, done.stderr[-3000:]
    for model_type in FAMILIES:
        workspace = tmp_path / model_type / "ws"
        assert len((workspace / "metrics.jsonl").read_text().splitlines()) == 3, model_type
        with safe_open(str(workspace / "output" / "lora.safetensors"), "pt") as f:
            assert any(k.startswith("transformer.") for k in f.keys()), model_type
