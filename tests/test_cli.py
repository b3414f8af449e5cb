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


def test_bad_input_is_one_clear_line(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, tmp_path / "missing-model")
    done = run("train", "--config", str(config))  # the real entry point, in its own process
    assert done.returncode == 2
    assert "missing-model" in done.stderr and "Traceback" not in done.stderr

    # the same main() in this process (its environment defaults set here first, so that the
    # CLI's own setdefault changes nothing that outlives the test)
    from trainer.cli import CLI_ENV, main
    for key, value in CLI_ENV.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--set", "learning_rate=-1"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert "nope.json" in err and "Traceback" not in err


def launch_two_processes(*configs, port: int) -> subprocess.CompletedProcess:
    """`accelerate launch` on 2 CPU processes (gloo) of `train --config` for each config, one
    after another in the same processes (tests/ddp_train_each.py: the launch is paid once).
    CUDA hidden: on a one-GPU machine two NCCL ranks cannot share the card; these tests are
    about the CPU (gloo) path, which every machine has."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(port), str(ROOT / "tests" / "ddp_train_each.py"),
         *map(str, configs)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300 * len(configs))


def test_sd15_lora_loha_and_embeddings_train_under_accelerate_launch(tiny_sd15_dir, tmp_path):
    """DDP on 2 CPU processes (gloo), one launch for three runs. A LoRA: the data is split, so
    an epoch of 5 images at batch 1 takes 3 steps instead of 5; one process writes the log and
    the LoRA. A LoHa: the new adapter types go through the same DDP path (peft's LoHa layers
    inside DDP's wrapper; the file written from the unwrapped model by rank 0 alone). Pivotal
    tuning: the frozen text encoder whose new vectors train goes through DDP like a trained
    part; rank 0 writes the LoRA with its bundled embedding."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPTextModel
    runs = {name: tmp_path / name for name in ("lora", "loha", "embedding")}
    for folder in runs.values():
        folder.mkdir()
    configs = [
        write_config(runs["lora"], tiny_sd15_dir, batch_size=1, epochs=2),
        write_config(runs["loha"], tiny_sd15_dir, batch_size=1, epochs=1, peft_type="LOHA",
                     lora_layer_preset="full"),
        write_config(runs["embedding"], tiny_sd15_dir, batch_size=1, epochs=1,
                     text_encoder={"train": False},
                     additional_embeddings=[{"placeholder": "<zq>", "token_count": 1,
                                             "initial_embedding_text": "cat"}])]
    done = launch_two_processes(*configs, port=29561)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {name: len((folder / "ws" / "metrics.jsonl").read_text().splitlines())
             for name, folder in runs.items()}
    assert steps == {"lora": 6, "loha": 3, "embedding": 3}

    with safe_open(str(runs["loha"] / "ws" / "output" / "lora.safetensors"), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha"}
    assert {k.split(".", 1)[1] for k in keys} == {"hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                  "hada_w2_b", "alpha"}

    vectors = load_file(str(runs["embedding"] / "ws" / "output" / "lora.safetensors"))[
        "bundle_emb.<zq>.clip_l"]
    vocabulary = CLIPTextModel.from_pretrained(tiny_sd15_dir, subfolder="text_encoder") \
        .get_input_embeddings().weight
    assert vectors.shape == (1, vocabulary.shape[1])
    # It trained: it started as a word's vector ("cat"), and is no word's vector now.
    assert not (vocabulary == vectors[0]).all(dim=1).any()


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
