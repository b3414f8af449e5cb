"""The command line: the same engine headless; bad input is one line and exit status 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.demo import DEMO_DATASET_DIR

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def write_config(tmp_path, model_dir, **extra):
    data = {"base_model_name": str(model_dir), "workspace_dir": str(tmp_path / "ws"),
            "concepts": [{"path": str(DEMO_DATASET_DIR)}], "resolution": "64",
            "train_dtype": "FLOAT_32", "gradient_checkpointing": False, "lora_rank": 4,
            "learning_rate": 1e-3, "learning_rate_warmup_steps": 0, "batch_size": 5,
            "epochs": 1, "aspect_ratio_bucketing": False}  # one batch of all 5 images
    data.update(extra)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_make_tiny_model_and_train_from_the_command_line(tmp_path):
    model = tmp_path / "tiny"
    made = run("make-tiny-model", "sd15", str(model))
    assert made.returncode == 0, made.stderr
    assert (model / "model_index.json").is_file()

    config = write_config(tmp_path, model)
    out = tmp_path / "out" / "mine.safetensors"
    done = run("train", "--config", str(config), "--set", "epochs=2",
               "--set", f"output_model_destination={out}")
    assert done.returncode == 0, done.stderr
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert json.loads(out.with_suffix(".json").read_text())["epochs"] == 2
    assert "2/2" in done.stderr and "loss" in done.stderr     # the tqdm bar
    records = (tmp_path / "ws" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2


def test_bad_input_is_one_clear_line(tmp_path):
    config = write_config(tmp_path, tmp_path / "missing-model")
    done = run("train", "--config", str(config))
    assert done.returncode == 2
    assert "missing-model" in done.stderr and "Traceback" not in done.stderr

    done = run("train", "--config", str(config), "--set", "learning_rate=-1")
    assert done.returncode == 2 and "learning_rate" in done.stderr

    done = run("train", "--config", str(tmp_path / "nope.json"))
    assert done.returncode == 2 and "nope.json" in done.stderr


def launch_two_processes(config, port: int) -> subprocess.CompletedProcess:
    """`accelerate launch` of `train --config` on 2 CPU processes (gloo). CUDA hidden: on a
    one-GPU machine two NCCL ranks cannot share the card; these tests are about the CPU
    (gloo) path, which every machine has."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(port), "-m", "trainer", "train", "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_under_accelerate_launch(tmp_path):
    """DDP on 2 CPU processes (gloo): the data is split, so an epoch of 5 images at batch 1
    takes 3 steps instead of 5; one process writes the log and the LoRA."""
    model = tmp_path / "tiny"
    assert run("make-tiny-model", "sd15", str(model)).returncode == 0
    config = write_config(tmp_path, model, batch_size=1, epochs=2)
    done = launch_two_processes(config, 29561)
    assert done.returncode == 0, done.stderr[-3000:]
    records = (tmp_path / "ws" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 6
    assert (tmp_path / "ws" / "output" / "lora.safetensors").is_file()


def test_a_loha_trains_under_accelerate_launch(tiny_sd15_dir, tmp_path):
    """The new adapter types go through the same DDP path as a LoRA (peft's LoHa layers
    inside DDP's wrapper; the file written from the unwrapped model by rank 0 alone)."""
    config = write_config(tmp_path, tiny_sd15_dir, batch_size=1, epochs=1, peft_type="LOHA",
                          lora_layer_preset="full")
    done = launch_two_processes(config, 29563)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((tmp_path / "ws" / "metrics.jsonl").read_text().splitlines()) == 3
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ws" / "output" / "lora.safetensors"), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha"}
    assert {k.split(".", 1)[1] for k in keys} == {"hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                  "hada_w2_b", "alpha"}


# Lines the libraries print that a user can do nothing about (trainer/quiet.py filters them).
LIBRARY_NOISE = ("requires torchvision", "should be kept in float32: []",
                 "gradient_checkpointing_enable", "kernels-community", "Loading weights")


def test_a_plain_run_prints_only_what_is_ours(tiny_sd15_dir, tmp_path):
    config = write_config(tmp_path, tiny_sd15_dir, gradient_checkpointing=True,
                          learning_rate_warmup_steps=50,  # longer than the run: ours, shown
                          text_encoder={"train": True, "stop_training_after_unit": "NEVER"})
    done = run("train", "--config", str(config))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.replace("\r", "\n").splitlines()
    for noise in LIBRARY_NOISE:
        assert not [line for line in lines if noise in line], noise
    assert not [line for line in lines if "Warning:" in line or "warnings.warn" in line]
    assert any(line.startswith("warning: The warm-up") for line in lines), done.stderr
    assert any(line.startswith("Finished 1 steps") for line in lines)


def test_embeddings_train_under_accelerate_launch(tiny_sd15_dir, tmp_path):
    """Pivotal tuning on 2 processes: the frozen text encoder whose new vectors train goes
    through DDP like a trained part; rank 0 writes the LoRA with its bundled embedding."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel
    config = write_config(tmp_path, tiny_sd15_dir, batch_size=1, epochs=1,
                          text_encoder={"train": False},
                          additional_embeddings=[{"placeholder": "<zq>", "token_count": 1,
                                                  "initial_embedding_text": "cat"}])
    done = launch_two_processes(config, 29565)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((tmp_path / "ws" / "metrics.jsonl").read_text().splitlines()) == 3
    vectors = load_file(str(tmp_path / "ws" / "output" / "lora.safetensors"))[
        "bundle_emb.<zq>.clip_l"]
    vocabulary = CLIPTextModel.from_pretrained(tiny_sd15_dir, subfolder="text_encoder") \
        .get_input_embeddings().weight
    assert vectors.shape == (1, vocabulary.shape[1])
    # It trained: it started as a word's vector ("cat"), and is no word's vector now.
    assert not (vocabulary == vectors[0]).all(dim=1).any()
