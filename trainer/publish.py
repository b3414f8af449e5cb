"""Publish an output to the Hugging Face Hub: build the folder the repo gets, then upload it.

The folder holds the output (a LoRA or single-file checkpoint as `<repo name>.safetensors`,
or a diffusers folder's contents at the repo's root), its config JSON (`<repo name>.json`),
the run's samples (`samples/`: for each sample prompt the newest image drawn at or before the
output's step), the grid of all of them up to that step (`sample-grid.png`,
trainer/sample_grid.py) and a README.md model card (trainer/model_card.py).

The token comes from the caller (the page's password field), else `HF_TOKEN`, else the
login `hf auth login` saved. It is handed to huggingface_hub and nowhere else: it is never
written to disk, a config, a log or a message (messages are scrubbed of it as well). A shared
server lends its own token only for repos under the namespaces it names
(`check_server_namespace`); a visitor publishing elsewhere types theirs.

`may_read` (a shared server's ownership rule) keeps files the caller may not read (a sample
or an embedding file a config points at) out of the upload.

Errors: PublishError for input the user must fix (the CLI exits 2), UploadError when the
upload itself failed, the network included (the CLI exits 1).
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.config import PromptSource, TrainConfig, config_from_dict, read_json
from trainer.errors import AtelierError
from trainer.embedding_files import embedding_file_paths
from trainer.io import MODEL_MARKER
from trainer.model_card import CardEmbedding, CardFacts, CardSample, build_model_card
from trainer.sample_grid import GRID_NAME, read_grid, write_grid_image

SAMPLE_NAME = re.compile(r"step(\d+)-(\d+)\.png")
# A model downloaded by huggingface_hub lives at <cache>/models--OWNER--NAME/snapshots/<rev>.
HUB_CACHE_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+$")


class PublishError(AtelierError):
    """Bad input: no such output, no config beside it, a bad repo id, no token."""


class UploadError(AtelierError):
    """The upload failed: no network, the Hub refused it, a bad token."""


@dataclass(frozen=True)
class Output:
    """An output of a run and what it was trained with."""
    path: Path
    config: TrainConfig
    config_file: Path

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    def run_path(self, value: str) -> Path:
        """A path of the config as the run meant it. Relative ones (a preset's
        `workspace/demo`) were taken from the folder the run started in: the output's
        ancestor that holds the config's workspace_dir, when the output lies inside it."""
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        workspace = Path(self.config.workspace_dir)
        if not workspace.is_absolute():
            output = self.path.resolve()
            for folder in output.parents:
                if (folder / workspace).resolve() in (output, *output.parents):
                    return folder / path
        return path


def config_path(output: Path) -> Path:
    """The config JSON beside an output: the rule of `trainer.finetune.config_path`, which
    is not imported here because finetune pulls torch and diffusers (5 s for a CLI command
    that needs neither); tests/test_publish.py checks the two agree."""
    output = Path(output)
    if output.suffix == ".safetensors":
        return output.with_suffix(".json")
    return output.with_name(output.name + ".json")


def read_output(path: str | Path) -> Output:
    """The output at `path` (a .safetensors file or a diffusers folder) and its config."""
    path = Path(path)
    if not path.exists():
        raise PublishError(f"'{path}' does not exist; give a LoRA or checkpoint .safetensors "
                           "or a diffusers folder that a run wrote.")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise PublishError(f"'{path}' is a folder without model_index.json, not a diffusers "
                           "model folder.")
    if path.is_file() and path.suffix != ".safetensors":
        raise PublishError(f"'{path}' is not a .safetensors file.")
    config_file = config_path(path)
    if not config_file.is_file():
        raise PublishError(f"'{config_file}' is missing: every output of a run has its config "
                           "beside it, and the model card is written from it.")
    try:
        config = config_from_dict(read_json(config_file), warn=lambda message: None)
    except AtelierError as error:
        raise PublishError(f"'{config_file}': {error}") from None
    return Output(path=path, config=config, config_file=config_file)


def check_repo_id(repo_id: str) -> str:
    """`USER/NAME` (or ORG/NAME), as the Hub allows it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    repo_id = (repo_id or "").strip()
    if repo_id.count("/") != 1:
        raise PublishError(f"Repo id '{repo_id}': write it as USER/NAME (or ORG/NAME).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"Repo id '{repo_id}': {error}") from None
    return repo_id


def check_server_namespace(repo_id: str, namespaces) -> str:
    """`repo_id` when the server's own token may publish there: its namespace (the user or
    organization before '/') is one of `namespaces`. PublishError naming repo_id otherwise,
    which asks for the visitor's own token."""
    repo_id = check_repo_id(repo_id)
    owner = repo_id.split("/", 1)[0].casefold()
    if any(owner == name.casefold() for name in namespaces):
        return repo_id
    where = (f"only under {', '.join(namespaces)}" if namespaces
             else "under no namespace")
    raise PublishError(f"Repo id '{repo_id}': this server publishes with its own token "
                       f"{where}; type your own Hugging Face token (one with write access) "
                       "to publish there.")


def hub_id_of(base_model_name: str, local: Path | None = None) -> str | None:
    """The hub id of the base model: the name itself when it is one (the engine's rule,
    and not a path that exists where the run took it from, `local`), or the repo a local
    folder was downloaded from (the hub cache's `models--OWNER--NAME/snapshots/REV`)."""
    from trainer.security import names_local_path
    name = base_model_name.strip()
    cached = HUB_CACHE_SNAPSHOT.search(name.rstrip("/\\"))
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if names_local_path(name) or (local is not None and local.exists()):
        return None
    return name


def output_header(output: Output) -> dict[str, str]:
    """The safetensors header metadata of the output (for a diffusers folder, of its first
    weight file that has some): the steps and epochs the run recorded."""
    from safetensors import safe_open
    files = ([output.path] if not output.is_folder
             else sorted(output.path.glob("*/*.safetensors")))
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as handle:
                metadata = handle.metadata() or {}
        except (OSError, ValueError, RuntimeError):
            continue
        if metadata:
            return metadata
    return {}


def _as_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def pick_samples(config: TrainConfig, workspace: Path,
                 up_to_step: int | None) -> list[tuple[Path, int]]:
    """For each sample prompt of the config, the newest image the run drew for it in
    `<workspace>/samples` (at or before `up_to_step` when known): [(file, prompt index)],
    in prompt order."""
    folder = workspace / "samples"
    newest: dict[int, tuple[int, Path]] = {}
    if folder.is_dir():
        for file in folder.iterdir():
            match = SAMPLE_NAME.fullmatch(file.name)
            if not match or not file.is_file():
                continue
            step, index = int(match.group(1)), int(match.group(2))
            if index >= len(config.samples) or (up_to_step is not None and step > up_to_step):
                continue
            if index not in newest or step > newest[index][0]:
                newest[index] = (step, file)
    return [(newest[i][1], i) for i in sorted(newest)]


def instance_prompt_of(config: TrainConfig) -> str | None:
    """A concept's own prompt (caption source 'concept'): the words every image was
    trained with, so the words that call it up."""
    for concept in config.concepts:
        if (concept.enabled and concept.prompt_source == PromptSource.CONCEPT
                and concept.prompt.strip()):
            return concept.prompt.strip()
    return None


def build_upload_folder(output: str | Path, folder: str | Path, *, repo_id: str,
                        base_model: str | None = None, instance_prompt: str | None = None,
                        link: bool = False,
                        may_read: Callable[[Path], bool] | None = None) -> list[str]:
    """Write the folder the repo gets to `folder` (which must not exist or be empty):
    built in a staging folder beside it, then renamed into place, so it is whole or absent.
    `link` hard-links the weights where the filesystem allows (a temporary upload folder),
    instead of copying them. Returns the files written, relative to the folder."""
    repo_id = check_repo_id(repo_id)
    found = read_output(output)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PublishError(f"'{folder}' exists and is not an empty folder; choose a new one.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:12]}.staging")
    staging.mkdir()
    try:
        _fill(staging, found, repo_id=repo_id, base_model=base_model,
              instance_prompt=instance_prompt, link=link,
              may_read=may_read or (lambda path: True))
        if folder.exists():
            folder.rmdir()  # empty (checked above); rename does not replace a folder elsewhere
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _fill(staging: Path, output: Output, *, repo_id: str, base_model: str | None,
          instance_prompt: str | None, link: bool,
          may_read: Callable[[Path], bool]) -> None:
    config = output.config
    name = repo_id.split("/", 1)[1]
    copy = _link_or_copy if link else shutil.copy2
    if output.is_folder:
        # A diffusers folder's files at the repo's root: from_pretrained(repo_id) loads it.
        # (Not Atelier's own marker file: it says only that a later save may replace it.)
        shutil.copytree(output.path, staging, dirs_exist_ok=True, copy_function=copy,
                        ignore=shutil.ignore_patterns(MODEL_MARKER))
        weights = ""
    else:
        weights = f"{name}.safetensors"
        copy(output.path, staging / weights)
    # Trained embeddings' own files (textual inversion, or pivotal tuning beside a LoRA),
    # named after the repo as the output is.
    embeddings = []
    for placeholder, file in embedding_file_paths(config, output.path):
        if file == output.path:
            embeddings.append(CardEmbedding(placeholder, weights))
        elif file.is_file() and may_read(file):
            target = f"{name}{file.name.removeprefix(output.path.stem)}"
            copy(file, staging / target)
            embeddings.append(CardEmbedding(placeholder, target))
    config_file = f"{name}.json"
    if (staging / config_file).exists():
        config_file = "atelier_config.json"  # a diffusers folder's own file of that name
    shutil.copy2(output.config_file, staging / config_file)

    header = output_header(output)
    steps = _as_int(header.get("ss_steps"))
    samples = []
    for file, index in pick_samples(config, output.run_path(config.workspace_dir), steps):
        if not may_read(file):
            continue
        (staging / "samples").mkdir(exist_ok=True)
        shutil.copy2(file, staging / "samples" / file.name)
        spec = config.samples[index]
        samples.append(CardSample(f"samples/{file.name}", spec.prompt, spec.negative_prompt,
                                  width=spec.width, height=spec.height,
                                  steps=spec.diffusion_steps, cfg_scale=spec.cfg_scale,
                                  seed=spec.seed))
    # The run's samples as one picture (a row per prompt, a column per sampling point, up to
    # the output's step), when it drew any: how the LoRA learned, at a glance.
    grid = read_grid(output.run_path(config.workspace_dir), up_to_step=steps, may_read=may_read)
    if grid:
        write_grid_image(grid, staging / GRID_NAME)
    facts = CardFacts(
        repo_id=repo_id, weights=weights, config_file=config_file,
        base_model=(base_model.strip() if base_model and base_model.strip()
                    else hub_id_of(config.base_model_name,
                                   output.run_path(config.base_model_name))),
        base_model_label=config.base_model_name,
        instance_prompt=(instance_prompt.strip() if instance_prompt and instance_prompt.strip()
                         else instance_prompt_of(config)
                         or ", ".join(e.placeholder for e in embeddings) or None),
        samples=tuple(samples), steps=steps, epochs=_as_int(header.get("ss_num_epochs")),
        embeddings=tuple(embeddings),
        architecture=header.get("modelspec.architecture", ""))
    build_model_card(config, facts).save(staging / "README.md")


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem, or links not allowed: a copy
        shutil.copy2(source, destination)


# --- The upload ---------------------------------------------------------------------------

def resolve_token(token: str | None = None) -> str:
    """The token typed in the page, else HF_TOKEN (a Space secret), else the saved login."""
    from huggingface_hub import get_token
    token = (token or "").strip() or os.environ.get("HF_TOKEN", "").strip() or get_token()
    if not token:
        raise PublishError("No Hugging Face token: set HF_TOKEN (on a Space, as a secret), "
                           "type one, or run `hf auth login`. Create a token with write "
                           "access at https://huggingface.co/settings/tokens.")
    return token


OFFLINE = ("No network: Atelier is offline (HF_HUB_OFFLINE is set), so the Hub cannot be "
           "reached. Start the app with --online (or unset HF_HUB_OFFLINE) to publish, or "
           "write the folder with `python -m trainer publish ... --dry-run FOLDER` and upload "
           "it yourself.")


def check_online() -> None:
    from huggingface_hub import constants
    if constants.is_offline_mode():
        raise UploadError(OFFLINE)


def publish(output: str | Path, repo_id: str, *, private: bool = False,
            token: str | None = None, endpoint: str | None = None,
            base_model: str | None = None, instance_prompt: str | None = None,
            on_status: Callable[[str], None] = lambda message: None,
            may_read: Callable[[Path], bool] | None = None) -> str:
    """Create the repo (if needed) and upload the output's folder; returns the repo's URL."""
    import tempfile

    repo_id = check_repo_id(repo_id)
    read_output(output)  # bad input is reported before anything else
    check_online()
    token = resolve_token(token)
    # Beside the output: same filesystem, so the weights are linked, not copied.
    with tempfile.TemporaryDirectory(prefix=".publish-", dir=Path(output).parent) as temp:
        folder = Path(temp) / "repo"
        on_status("Building the model card")
        files = build_upload_folder(output, folder, repo_id=repo_id, base_model=base_model,
                                    instance_prompt=instance_prompt, link=True,
                                    may_read=may_read)
        on_status(f"Uploading {len(files)} files to {repo_id}")
        return upload_folder(folder, repo_id, private=private, token=token, endpoint=endpoint)


def upload_folder(folder: Path, repo_id: str, *, private: bool, token: str,
                  endpoint: str | None = None) -> str:
    import httpx2  # huggingface_hub's HTTP client: its network errors
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(endpoint=endpoint, token=token, library_name="atelier")
    where = endpoint or "the Hugging Face Hub"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder,
                          commit_message="Upload a model trained with Atelier")
    except OfflineModeIsEnabled:
        raise UploadError(OFFLINE) from None
    except httpx2.TransportError as error:
        raise UploadError(_scrub(f"No network: {where} could not be reached "
                                 f"({type(error).__name__}: {error}). Check the connection "
                                 "and try again.", token)) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        hint = {401: " The token is not valid.",
                403: " The token cannot write there (it needs write access to that "
                     "user or organization)."}.get(status, "")
        raise UploadError(_scrub(f"The Hub refused the upload to {repo_id}: "
                                 f"{str(error).splitlines()[0]}.{hint}", token)) from None
    except ValueError as error:  # huggingface_hub's own checks (the card's metadata, ...)
        raise UploadError(_scrub(f"The upload to {repo_id} failed: {error}", token)) from None
    return str(url)


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "hf_***") if token else text
