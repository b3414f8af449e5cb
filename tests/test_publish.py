"""Publishing to the Hub: the folder and model card (`publish --dry-run`), the upload against a
local stand-in for the Hub that records what huggingface_hub sends, and the token kept out of
every file and message."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from safetensors.numpy import save_file

from helpers import tiny_config, train_sampling_at_the_end
from trainer import cli, publish
from trainer.config import config_from_dict
from trainer.demo import DEMO_DATASET_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_AtelierTestTokenNeverWritten0123"
REPO_ID = "alice/cat-lora"
BASE_ID = "atelier-tests/tiny-sd15"


@pytest.fixture(scope="module")
def trained(tiny_sd15_dir, tmp_path_factory):
    """A LoRA trained on the tiny model, sampled at its last step, with a concept prompt; the
    base model sits where the hub cache would put `atelier-tests/tiny-sd15`."""
    root = tmp_path_factory.mktemp("publish")
    model = root / "hub" / "models--atelier-tests--tiny-sd15" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_sd15_dir, model)

    def make_config(model_dir, tmp_path, **overrides):
        concept = {"path": str(DEMO_DATASET_DIR), "prompt_source": "concept",
                   "prompt": "sks cat"}
        return tiny_config(model_dir, tmp_path, concepts=[concept], **overrides)

    _, result, _, sample = train_sampling_at_the_end(make_config, model, root)
    return root, Path(result.output_path), result.global_step, sample


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "publish", *args],
                          cwd=REPO_ROOT, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=120)


def online_env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a machine with a network: offline mode off, an empty hub home (no
    saved login), the token in HF_TOKEN."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=TOKEN, **extra)
    return env


def test_dry_run_writes_the_repo_folder_and_a_hub_model_card(trained, tmp_path):
    root, output, steps, sample = trained
    folder = tmp_path / "to-upload"
    done = run_cli(str(output), "--repo-id", REPO_ID, "--dry-run", str(folder))
    assert done.returncode == 0, done.stderr

    newest = max((root / "ws" / "samples").glob("step*-0.png"))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["README.md", "cat-lora.json", "cat-lora.safetensors", "sample-grid.png",
                     f"samples/{newest.name}"]
    assert (folder / "cat-lora.safetensors").read_bytes() == output.read_bytes()
    assert (folder / "cat-lora.json").read_text() == publish.config_path(output).read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == BASE_ID  # read off the hub cache's folder name
    assert {"lora", "text-to-image", "stable-diffusion", "diffusers"} <= set(data["tags"])
    assert "stable-diffusion-xl" not in data["tags"]
    assert data["instance_prompt"] == "sks cat"
    assert data["widget"] == [{"text": sample["prompt"],
                               "output": {"url": f"samples/{newest.name}"}}]
    text = card.text
    assert "| LoRA rank / alpha | 4 / 3 |" in text and "| Optimizer | ADAMW |" in text
    assert f"| Steps | {steps} |" in text  # from the LoRA's header
    assert f"pipe.load_lora_weights({json.dumps(REPO_ID)}" in text
    assert "ComfyUI/models/loras/" in text and "<lora:cat-lora:1>" in text

    # A folder that holds something is never replaced.
    again = run_cli(str(output), "--repo-id", REPO_ID, "--dry-run", str(folder))
    assert again.returncode == 2 and "not an empty folder" in again.stderr


def test_bad_arguments_exit_2_with_one_line(trained, tmp_path, capsys):
    _, output, _, _ = trained
    assert cli.main(["publish", str(tmp_path / "nope.safetensors"), "--repo-id", REPO_ID,
                     "--dry-run", str(tmp_path / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for bad in ("cat-lora", "alice/cat--lora", "a/b/c"):
        assert cli.main(["publish", str(output), "--repo-id", bad,
                         "--dry-run", str(tmp_path / "b")]) == 2
        assert "Repo id" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_samples_are_the_newest_per_prompt_up_to_the_outputs_step(tmp_path):
    config = config_from_dict({"samples": [{"prompt": "one"}, {"prompt": "two"}]})
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in ("step000004-0.png", "step000008-0.png", "step000012-0.png",
                 "step000008-1.png", "step000004-1.png", "step000008-5.png",
                 "inpaint-input-0.png"):
        (samples / name).write_bytes(b"png")
    assert publish.pick_samples(config, tmp_path, up_to_step=8) == [
        (samples / "step000008-0.png", 0), (samples / "step000008-1.png", 1)]
    assert publish.pick_samples(config, tmp_path, up_to_step=None)[0] == (
        samples / "step000012-0.png", 0)


def test_the_config_beside_an_output_is_where_the_engine_writes_it():
    from trainer.finetune import config_path
    for output in (Path("/w/lora.safetensors"), Path("/w/lora-step000010.safetensors"),
                   Path("/w/model"), Path("/w/model.v2")):
        assert publish.config_path(output) == config_path(output)


def test_base_model_hub_id(tmp_path):
    assert publish.hub_id_of("stabilityai/stable-diffusion-xl-base-1.0") == (
        "stabilityai/stable-diffusion-xl-base-1.0")
    cached = tmp_path / "hub" / "models--org--model" / "snapshots" / "abc"
    assert publish.hub_id_of(str(cached)) == "org/model"
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert publish.hub_id_of(str(tmp_path / "org" / "model")) is None  # a local folder
    assert publish.hub_id_of("/models/sd15.safetensors") is None


def fake_output(folder: Path, config: dict, *, diffusers: bool) -> Path:
    """An output as a run leaves it (weights with the header's step count, config beside)."""
    metadata = {"ss_steps": "40", "ss_num_epochs": "2"}
    tensors = {"w": np.zeros((2, 2), np.float32)}
    if diffusers:
        output = folder / "model"
        (output / "unet").mkdir(parents=True)
        (output / "model_index.json").write_text("{}")
        (output / ".atelier-model").write_text("written by a model save")  # trainer.io's marker
        save_file(tensors, str(output / "unet" / "diffusion_pytorch_model.safetensors"), metadata)
    else:
        output = folder / "model.safetensors"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(output), metadata)
    publish.config_path(output).write_text(json.dumps(config))
    return output


def test_an_sdxl_checkpoint_and_a_diffusers_folder_get_their_own_cards(tmp_path):
    base = {"base_model_name": "stabilityai/stable-diffusion-xl-base-1.0",
            "model_type": "STABLE_DIFFUSION_XL_10_BASE", "training_method": "FINE_TUNE",
            "workspace_dir": str(tmp_path / "ws")}
    single = fake_output(tmp_path / "a", base, diffusers=False)
    publish.build_upload_folder(single, tmp_path / "up-a", repo_id="bob/xl-tune")
    card = ModelCard.load(tmp_path / "up-a" / "README.md")
    tags = set(card.data.tags)
    assert "stable-diffusion-xl" in tags and "stable-diffusion" not in tags
    assert "lora" not in tags and card.data.base_model == base["base_model_name"]
    assert "StableDiffusionXLPipeline.from_single_file(" in card.text
    assert "ComfyUI/models/checkpoints/" in card.text and "| Steps | 40 |" in card.text

    folder = fake_output(tmp_path / "b", dict(base, output_model_format="DIFFUSERS"),
                         diffusers=True)
    files = publish.build_upload_folder(folder, tmp_path / "up-b", repo_id="bob/xl-folder")
    # The folder's files at the repo's root, so from_pretrained(repo id) loads it.
    assert files == ["README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors",
                     "xl-folder.json"]
    assert 'from_pretrained("bob/xl-folder"' in (tmp_path / "up-b" / "README.md").read_text()


def test_a_configs_relative_paths_are_read_from_where_the_run_started(tmp_path):
    # A preset's relative paths (`workspace/demo`), published from another folder.
    config = {"base_model_name": "runs/tiny-base", "workspace_dir": "runs/cat",
              "samples": [{"prompt": "a cat"}], "output_model_format": "COMFY_LORA"}
    output = fake_output(tmp_path / "runs" / "cat" / "output", config, diffusers=False)
    (tmp_path / "runs" / "tiny-base").mkdir()
    (tmp_path / "runs" / "cat" / "samples").mkdir()
    (tmp_path / "runs" / "cat" / "samples" / "step000040-0.png").write_bytes(b"png")
    files = publish.build_upload_folder(output, tmp_path / "up", repo_id="bob/cat")
    assert "samples/step000040-0.png" in files
    card = ModelCard.load(tmp_path / "up" / "README.md")
    assert card.data.base_model is None  # a local folder, not the hub id it looks like
    assert "a local model (`runs/tiny-base`)" in card.text
    # ComfyUI's own layout: only its recipe, and who does not load it.
    assert "### ComfyUI" in card.text and "### diffusers" not in card.text
    assert "diffusers and A1111/Forge do not load this file" in card.text


class FakeHub:
    """The Hub endpoints huggingface_hub's create_repo and upload_folder call, recording each
    request: /api/repos/create, /api/validate-yaml, /api/models/<id>/preupload/<rev> (every
    file answered "regular", so it travels inline in the commit) and the ndjson commit."""

    def __init__(self, refuse: bool = False):
        self.requests: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append({"path": self.path, "body": body,
                                     "authorization": self.headers.get("Authorization")})
                if refuse:
                    return self.answer(403, {"error": "You don't have the rights"})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    return self.answer(200, {"url": f"{hub.url}/{REPO_ID}"})
                if path == "/api/validate-yaml":
                    return self.answer(200, {"errors": [], "warnings": []})
                if path.endswith("/preupload/main"):
                    files = json.loads(body)["files"]
                    return self.answer(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files]})
                if path.endswith("/commit/main"):
                    return self.answer(200, {"commitUrl": f"{hub.url}/{REPO_ID}/commit/1234",
                                             "commitOid": "1234" * 10})
                return self.answer(404, {"error": f"no route {path}"})

            def do_GET(self):
                hub.requests.append({"path": self.path, "body": b"",
                                     "authorization": self.headers.get("Authorization")})
                self.answer(404, {"error": "not here"})

            def answer(self, status, data):
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [r["path"].split("?")[0] for r in self.requests]


def token_is_nowhere(*folders: Path) -> None:
    for folder in folders:
        for file in folder.rglob("*"):
            if file.is_file():
                assert TOKEN.encode() not in file.read_bytes(), file


def test_publish_uploads_the_folder_to_the_hub_and_keeps_the_token_out(trained, tmp_path):
    root, output, _, _ = trained
    with FakeHub() as hub:
        done = run_cli(str(output), "--repo-id", REPO_ID, "--private", "--endpoint", hub.url,
                       env=online_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"Published to {hub.url}/{REPO_ID}" in done.stdout
    assert hub.paths() == ["/api/repos/create", "/api/validate-yaml",
                           f"/api/models/{REPO_ID}/preupload/main",
                           f"/api/models/{REPO_ID}/commit/main"]
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert json.loads(hub.requests[0]["body"]) == {  # a model repo: the Hub's default type
        "name": "cat-lora", "organization": "alice", "visibility": "private"}

    commit = [json.loads(line) for line in hub.requests[-1]["body"].splitlines()]
    assert commit[0]["key"] == "header"
    uploaded = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in commit[1:] if item["key"] == "file"}
    newest = max((root / "ws" / "samples").glob("step*-0.png"))
    assert sorted(uploaded) == ["README.md", "cat-lora.json", "cat-lora.safetensors",
                                "sample-grid.png", f"samples/{newest.name}"]
    assert uploaded["cat-lora.safetensors"] == output.read_bytes()
    assert b"base_model: atelier-tests/tiny-sd15" in uploaded["README.md"]

    assert TOKEN not in done.stdout + done.stderr
    token_is_nowhere(tmp_path, root)
    assert not list(output.parent.glob(".publish-*"))  # the temporary folder is gone


def test_a_refused_upload_exits_1_without_the_token(trained, tmp_path):
    _, output, _, _ = trained
    with FakeHub(refuse=True) as hub:
        done = run_cli(str(output), "--repo-id", REPO_ID, "--endpoint", hub.url,
                       env=online_env(tmp_path))
    assert done.returncode == 1
    assert "refused the upload" in done.stderr and "cannot write there" in done.stderr
    assert "Traceback" not in done.stderr and TOKEN not in done.stdout + done.stderr


def test_without_a_network_the_message_says_so(trained, tmp_path):
    _, output, _, _ = trained
    # HF_HUB_OFFLINE=1 (the tests' own environment, and the app's default off a Space)
    offline = run_cli(str(output), "--repo-id", REPO_ID, env=dict(os.environ, HF_TOKEN=TOKEN))
    assert offline.returncode == 1 and "No network" in offline.stderr
    # a network that does not answer: a closed local port
    with FakeHub() as hub:
        closed = hub.url
    unreachable = run_cli(str(output), "--repo-id", REPO_ID, "--endpoint", closed,
                          env=online_env(tmp_path))
    assert unreachable.returncode == 1 and "No network" in unreachable.stderr
    for done in (offline, unreachable):
        assert "Traceback" not in done.stderr and TOKEN not in done.stdout + done.stderr


def test_no_token_is_a_clear_error(trained, tmp_path):
    _, output, _, _ = trained
    env = online_env(tmp_path)
    del env["HF_TOKEN"]
    with FakeHub() as hub:
        done = run_cli(str(output), "--repo-id", REPO_ID, "--endpoint", hub.url, env=env)
    assert done.returncode == 2 and "No Hugging Face token" in done.stderr
    assert hub.requests == []


def test_embeddings_travel_with_their_card(tiny_sd15_dir, tmp_path):
    """Textual inversion and pivotal tuning: each embedding's own file goes up, named after
    the repo, and the card says how to load it (diffusers' load_textual_inversion, the
    ComfyUI and A1111 embeddings folders) with the placeholder as its trigger."""
    from huggingface_hub import ModelCard

    from trainer.loop import train
    embedding = {"placeholder": "<zq>", "token_count": 2, "initial_embedding_text": "cat"}
    ti = train(tiny_config(tiny_sd15_dir, tmp_path / "ti", epochs=1, batch_size=4,
                           training_method="EMBEDDING", additional_embeddings=[embedding]))
    folder = tmp_path / "ti-repo"
    assert run_cli(ti.output_path, "--repo-id", "alice/zq", "--dry-run", str(folder)
                   ).returncode == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "zq.json",
                                                        "zq.safetensors"]
    card = ModelCard.load(folder / "README.md")
    assert "textual_inversion" in card.data.tags and card.data.instance_prompt == "<zq>"
    assert ('pipe.load_textual_inversion("alice/zq", weight_name="zq.safetensors", '
            'token="<zq>")') in card.text
    assert "ComfyUI/models/embeddings/" in card.text and "embedding:zq" in card.text
    assert "| Method | textual inversion embedding |" in card.text

    pivotal = train(tiny_config(tiny_sd15_dir, tmp_path / "pt", epochs=1,
                                additional_embeddings=[embedding]))
    folder = tmp_path / "pt-repo"
    assert run_cli(pivotal.output_path, "--repo-id", "alice/cat", "--dry-run", str(folder)
                   ).returncode == 0
    assert "cat-zq.safetensors" in {p.name for p in folder.iterdir()}
    card = ModelCard.load(folder / "README.md")
    assert 'pipe.load_lora_weights("alice/cat", weight_name="cat.safetensors")' in card.text
    assert 'weight_name="cat-zq.safetensors", token="<zq>")' in card.text
    assert "`<zq>` in `cat-zq.safetensors`" in card.text


# --- The transformer families (Flux.1, Chroma, SD 3): the card asks the family ------------------

FLUX_ID = "atelier-tests/tiny-flux"


@pytest.fixture(scope="module")
def flux_trained(tmp_path_factory):
    """A Flux.1 DIFFUSERS_LORA trained on the tiny Flux.1-dev (its base model where the hub
    cache puts `atelier-tests/tiny-flux`), sampled at its last step."""
    from helpers import LAST_STEP_SAMPLE

    from trainer.control import Control
    from trainer.loop import train
    from trainer.models.tiny_flow import tiny_flow_model
    root = tmp_path_factory.mktemp("flux-publish")
    model = root / "hub" / "models--atelier-tests--tiny-flux" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_flow_model("flux"), model)
    config = tiny_config(model, root, model_type="FLUX_DEV_1", text_encoder={"train": False},
                         output_model_format="DIFFUSERS_LORA", epochs=2,
                         samples=[LAST_STEP_SAMPLE], sample_after=2, sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    sample = [e for e in events if e.get("type") == "sample"][-1]["path"]
    return model, Path(result.output_path), sample


def diffusers_recipe(card_text: str) -> str:
    start = card_text.index("```python\n") + len("```python\n")
    return card_text[start:card_text.index("```", start)]


def test_a_flux_lora_card_names_its_base_and_a_recipe_that_draws_its_sample(flux_trained,
                                                                             tmp_path):
    import numpy as np
    from PIL import Image

    model, output, sample = flux_trained
    folder = tmp_path / "repo"
    publish.build_upload_folder(output, folder, repo_id="alice/flux-cat")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == FLUX_ID
    assert card.data.tags == ["text-to-image", "lora", "template:sd-lora", "flux", "diffusers",
                              "atelier"]
    text = card.text
    assert f"A LoRA of Flux.1 ([{FLUX_ID}]" in text
    # The family's part names and settings; nothing of SD's.
    assert "| Trained parts | transformer |" in text
    assert "| Learning rate | transformer 0.01 |" in text
    assert "| Guidance input (training) | 1 |" in text  # a dev model: it has the input
    assert "| T5 sequence length | 77 |" in text and "| Timesteps | UNIFORM |" in text
    assert "| a photo of a cat | 64×64 | 4 | 3 | 7 |" in text  # the gallery's settings
    assert "unet" not in text.lower() and "A1111" not in text and "AUTOMATIC" not in text
    recipe = diffusers_recipe(text)
    assert f'FluxPipeline.from_pretrained("{FLUX_ID}", torch_dtype=torch.bfloat16)' in recipe
    assert 'pipe.load_lora_weights("alice/flux-cat", weight_name="flux-cat.safetensors")' in recipe
    assert "max_sequence_length=77" in recipe  # the run's T5 length, not the pipeline's 512
    assert "ComfyUI/models/loras/" in text and "(LoraLoaderModelOnly)" in text

    # The recipe runs as written, on the local tiny model and the folder the repo would get
    # (float32 on the CPU), and draws the image training sampled at its last step.
    runnable = (recipe.replace(json.dumps(FLUX_ID), json.dumps(str(model)))
                .replace('"alice/flux-cat"', json.dumps(str(folder)))
                .replace("torch.bfloat16", "torch.float32").replace('.to("cuda")', ""))
    names: dict = {}
    with warnings.catch_warnings():
        # diffusers 0.42 deprecates `torch_dtype` for `dtype` (removed in 1.0); the card keeps
        # the name every diffusers version reads.
        warnings.simplefilter("ignore", FutureWarning)
        exec(compile(runnable, "recipe", "exec"), names)  # noqa: S102 - the card's own code
    drawn = np.asarray(names["image"], dtype=np.int16)
    trained = np.asarray(Image.open(sample).convert("RGB"), dtype=np.int16)
    assert np.abs(drawn - trained).max() <= 2


def test_a_flux_fine_tune_card_loads_the_transformer_beside_its_base(tmp_path):
    base = {"base_model_name": "black-forest-labs/FLUX.1-schnell", "model_type": "FLUX_DEV_1",
            "training_method": "FINE_TUNE", "output_model_format": "ORIGINAL_SINGLE_FILE",
            "text_encoder": {"train": False}, "timestep_shift": 3.0,
            "workspace_dir": str(tmp_path / "ws")}
    single = fake_output(tmp_path / "a", base, diffusers=False)
    publish.build_upload_folder(single, tmp_path / "up-a", repo_id="bob/flux-tune")
    card = ModelCard.load(tmp_path / "up-a" / "README.md")
    assert card.data.base_model == "black-forest-labs/FLUX.1-schnell"
    assert "flux" in card.data.tags and "lora" not in card.data.tags
    text = card.text
    assert "A full fine-tune of Flux.1 (" in text and "| Trained parts | transformer |" in text
    assert "| Timesteps | UNIFORM, shift 3 |" in text
    url = "https://huggingface.co/bob/flux-tune/blob/main/flux-tune.safetensors"
    # The file is the transformer alone: its class reads it, the base model gives the rest.
    assert (f'transformer = FluxTransformer2DModel.from_single_file("{url}", '
            'config="black-forest-labs/FLUX.1-schnell", subfolder="transformer", '
            "torch_dtype=torch.bfloat16)") in text
    assert ('pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", '
            "transformer=transformer, torch_dtype=torch.bfloat16)") in text
    assert "`ComfyUI/models/diffusion_models/`" in text and "*Load Diffusion Model*" in text
    assert "*DualCLIPLoader* (type flux: clip_l and t5xxl)" in text
    assert "checkpoints/" not in text and "A1111" not in text

    folder = fake_output(tmp_path / "b", dict(base, output_model_format="DIFFUSERS"),
                         diffusers=True)
    publish.build_upload_folder(folder, tmp_path / "up-b", repo_id="bob/flux-folder")
    text = (tmp_path / "up-b" / "README.md").read_text()
    assert ('FluxPipeline.from_pretrained("bob/flux-folder", torch_dtype=torch.bfloat16)'
            in text)


def test_each_transformer_family_gets_its_pipeline_tags_and_loaders(tmp_path):
    """Chroma and SD 3.5 cards name their own pipeline and tags; SD 3's loader reads only
    diffusers' own LoRA names, so its KOHYA_LORA card offers ComfyUI alone and says so."""
    cards = {}
    for name, model_type, output_format in (("chroma", "CHROMA_1", "KOHYA_LORA"),
                                            ("sd35", "STABLE_DIFFUSION_35", "KOHYA_LORA")):
        config = {"base_model_name": f"org/{name}", "model_type": model_type,
                  "output_model_format": output_format, "workspace_dir": str(tmp_path / "ws")}
        output = fake_output(tmp_path / name, config, diffusers=False)
        publish.build_upload_folder(output, tmp_path / f"up-{name}", repo_id=f"bob/{name}")
        cards[name] = ModelCard.load(tmp_path / f"up-{name}" / "README.md")
    chroma, sd35 = cards["chroma"], cards["sd35"]
    assert "chroma" in chroma.data.tags and {"sd3", "sd3.5"} <= set(sd35.data.tags)
    assert 'ChromaPipeline.from_pretrained("org/chroma"' in chroma.text
    assert "converts them to diffusers' itself" in chroma.text  # kohya names, read by diffusers
    assert "| T5 sequence length | 512 |" in chroma.text
    assert "Guidance input" not in chroma.text  # Chroma has no guidance input
    assert "### diffusers" not in sd35.text and "### ComfyUI" in sd35.text
    assert "diffusers do not load this file (a LoRA in the `KOHYA_LORA` layout)" in sd35.text


def test_every_family_has_card_facts_naming_real_diffusers_classes():
    import diffusers

    from trainer.model_card import family_card
    from trainer.models import registry
    for model_type, facts in registry.FAMILIES.items():
        card = family_card(model_type)
        for name in (card.pipeline, card.single_file, card.inpaint_pipeline,
                     card.inpaint_single_file):
            assert not name or hasattr(diffusers, name), (model_type, name)
        assert card.transformer_only == (facts.denoiser == "transformer"), model_type


def test_a_qwen_image_card_draws_its_sample_with_true_cfg_on_the_empty_negative(tmp_path):
    """QwenImagePipeline guides with true_cfg_scale on a negative prompt (its guidance_scale
    is for guidance-distilled models): the recipe passes the sample's CFG as true_cfg_scale
    with the empty negative prompt the run's samples used."""
    config = {"base_model_name": "Qwen/Qwen-Image", "model_type": "QWEN",
              "output_model_format": "DIFFUSERS_LORA", "workspace_dir": str(tmp_path / "ws"),
              "samples": [{"prompt": "a cat", "cfg_scale": 4.0, "seed": 3}]}
    output = fake_output(tmp_path / "qwen", config, diffusers=False)
    publish.build_upload_folder(output, tmp_path / "up", repo_id="bob/qwen")
    text = (tmp_path / "up" / "README.md").read_text()
    assert 'QwenImagePipeline.from_pretrained("Qwen/Qwen-Image"' in text
    assert '    negative_prompt="",\n' in text and "    true_cfg_scale=4.0,\n" in text
    assert "guidance_scale=" not in text
