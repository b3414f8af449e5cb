"""Presets, export and import: the page's settings as JSON files.

- Built-in presets are the partial configs in `presets/*.json`, layered over the defaults;
  they are read-only for every visitor.
- A user's presets are full configs saved under `<workspace>/presets/` on a local server. On
  a shared server each visitor's live in their own folder, `<workspace>/users/<name>/presets/`
  (trainer/ownership.py), listed, loaded and overwritten by them only; an admin also sees the
  older shared `<workspace>/presets/`.
- Export writes the full config (plus `optimizer_defaults`) as a file that
  `python -m trainer train --config FILE` accepts.
- Import reads an Atelier or a OneTrainer JSON config. OneTrainer's keys are Atelier's keys;
  where its shape differs (concept captions under `text`, samples with `enabled`, unset
  optimizer parameters as null) it is adapted. Unknown keys and values Atelier cannot use are
  reported and dropped, never fatal: the rest of the file still loads.
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainer.config import TrainConfig, unknown_keys
from trainer.errors import ConfigError
from trainer.onetrainer import FULL_FORMATS, LORA_FORMATS, is_onetrainer, translate
from trainer.io import atomic_write_text
from trainer.ownership import Access
from ui import paths
from ui.optimizers import parameter_names

BUILTIN = "builtin:"
USER = "user:"
SHARED = "shared:"  # an admin's view of the shared <workspace>/presets/ of a shared server
DEFAULT_PRESET = BUILTIN + "demo"
# Lists that describe the user's data, not the training recipe: a preset that does not set
# them leaves the page's own.
DATA_KEYS = ("concepts", "samples")
OPTIMIZER_DEFAULTS = "optimizer_defaults"


# --- Listing and reading ----------------------------------------------------------------------

# Titles of built-in presets that do not carry a "__name".
BUILTIN_TITLES = {"demo": "Demo (tiny model, CPU, about a minute)"}


def _title(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("__name"), str):
            return data["__name"]
    except (OSError, ValueError):
        pass
    return BUILTIN_TITLES.get(path.stem, path.stem)


def builtin_presets() -> dict[str, Path]:
    found = {p.stem: p for p in sorted(paths.PRESETS_DIR.glob("*.json"))}
    ordered = {"demo": found.pop("demo")} if "demo" in found else {}
    ordered.update(found)
    return ordered


def _access(access: Access | None) -> Access:
    if access is not None:
        return access
    from ui import state  # the visitor of a request-less call (a test, a local page)
    return state.access()


def user_presets_dir(access: Access | None = None) -> Path:
    """Where the visitor's saved presets live: `<workspace>/presets` on a local server, their
    own `<workspace>/users/<name>/presets` on a shared one."""
    access = _access(access)
    if not access.realm.shared:
        return paths.user_presets_dir()
    return access.user_folder() / "presets"


def _presets_in(folder: Path, access: Access) -> dict[str, Path]:
    if not folder.is_dir() or not access.can_read(folder):
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.json")) if access.can_read(p)}


def user_presets(access: Access | None = None) -> dict[str, Path]:
    access = _access(access)
    return _presets_in(user_presets_dir(access), access)


def shared_presets(access: Access | None = None) -> dict[str, Path]:
    """The older shared `<workspace>/presets/` of a shared server: an admin's only."""
    access = _access(access)
    if not access.realm.shared or not access.viewer.admin:
        return {}
    return _presets_in(paths.user_presets_dir(), access)


def builtin_choices() -> list[tuple[str, str]]:
    """The built-in presets only (what a shared server's page is built with: a visitor's own
    come with their page load)."""
    return [(_title(path), BUILTIN + name) for name, path in builtin_presets().items()]


def choices(access: Access | None = None) -> list[tuple[str, str]]:
    """Dropdown choices: (label, value) with value 'builtin:NAME', 'user:NAME' (the
    visitor's own) or, for an admin of a shared server, 'shared:NAME'."""
    items = builtin_choices()
    items += [(f"{name} (saved)", USER + name) for name in user_presets(access)]
    items += [(f"{name} (shared folder)", SHARED + name) for name in shared_presets(access)]
    return items


def preset_path(value: str, access: Access | None = None) -> Path:
    if value.startswith(BUILTIN):
        table, name = builtin_presets(), value[len(BUILTIN):]
    elif value.startswith(USER):
        table, name = user_presets(access), value[len(USER):]
    elif value.startswith(SHARED):
        table, name = shared_presets(access), value[len(SHARED):]
    else:
        raise ConfigError(f"Unknown preset '{value}'.")
    if name not in table:
        raise ConfigError(f"Preset '{name}' does not exist (any more).")
    return table[name]


def read_json_file(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"File '{path}' does not exist.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"File '{Path(path).name}' is not a text (JSON) file.") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"File '{Path(path).name}' is not valid JSON: {error}") from None


def read_preset(value: str, access: Access | None = None) -> dict:
    data = read_json_file(preset_path(value, access))
    if not isinstance(data, dict):
        raise ConfigError(f"Preset '{value}' is not a JSON object of keys and values.")
    return paths.localize_config(data)


# --- From a (partial) dict to the page --------------------------------------------------------

def _drop_path(data: dict, loc: tuple) -> bool:
    """Remove the value at a pydantic error location; True if something was removed."""
    node: Any = data
    for part in loc[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    last = loc[-1] if loc else None
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    if isinstance(node, list) and isinstance(last, int) and last < len(node):
        del node[last]
        return True
    return False


# Settings that decide what a job is: a bad value stops the import, it never falls back.
# (An embedding's bad value too: its default, e.g. an input embedding for an output one, would
# train something else.)
JOB_KEYS = ("model_type", "training_method", "base_model_name", "output_model_format",
            "additional_embeddings", "peft_type", "lokr_decompose_factor", "lora_model_name",
            "concepts")


def _defines_the_job(loc: tuple) -> bool:
    """A JOB_KEYS value, or the optimizer's choice (its parameters are tuning values)."""
    return bool(loc) and (loc[0] in JOB_KEYS or tuple(loc[:2]) == ("optimizer", "optimizer"))


def lenient_config(data: dict) -> tuple[TrainConfig, list[str]]:
    """Validate what can be validated: each bad value is reported and dropped (its default
    kept), so one bad key does not lose the rest of an imported file."""
    data, messages = translate(data)  # OneTrainer's names, both generations (a copy)
    messages += [f"Unknown key '{key}' ignored." for key in unknown_keys(data, TrainConfig)]
    for _ in range(200):
        try:
            config = TrainConfig.model_validate(data)
            return config.model_copy(update={
                key: paths.localize(getattr(config, key)) for key in paths.PATH_KEYS}), messages
        except ValidationError as error:
            removed = False
            for item in error.errors():
                loc = tuple(item["loc"])
                key = ".".join(str(p) for p in loc)
                message = item["msg"].removeprefix("Value error, ")
                if _defines_the_job(loc):  # what the job is: never a default instead
                    raise ConfigError(f"{key}: {message} (got {item.get('input')!r}). This "
                                      "decides what the job is, so nothing was imported.")
                if _drop_path(data, loc):
                    removed = True
                    messages.append(f"{key}: {message} (got {item.get('input')!r}); "
                                    "the default is kept.")
            if not removed:
                raise ConfigError("Invalid config — " + "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                    for e in error.errors())) from None
    raise ConfigError("The config could not be read.")


def optimizer_defaults_of(data: dict) -> dict[str, dict]:
    """`optimizer_defaults` of a config file: {OPTIMIZER: {param: value}}, known params only."""
    raw = data.get(OPTIMIZER_DEFAULTS)
    if not isinstance(raw, dict):
        return {}
    names = set(parameter_names())
    out = {}
    for optimizer, params in raw.items():
        if isinstance(params, dict):
            kept = {k: v for k, v in params.items() if k in names and v is not None}
            if kept:
                out[str(optimizer)] = kept
    return out


def layered(preset: dict, page_data: dict | None = None) -> dict:
    """A partial preset over the defaults; the page's concepts/samples kept when it has none."""
    data = {key: value for key, value in preset.items() if not str(key).startswith("__")}
    if page_data:
        for key in DATA_KEYS:
            if key not in data and key in page_data:
                data[key] = page_data[key]
    return data


# --- OneTrainer -------------------------------------------------------------------------------

# An exported Atelier config says so; its presets have a name.
ATELIER_MARKS = ("__atelier", "__name")


def looks_like_onetrainer(data: dict) -> bool:
    """A file OneTrainer wrote (trainer/onetrainer.py's markers), or one of its current partial
    presets (which carry none of them, but OneTrainer's current format names)."""
    if is_onetrainer(data):
        return True
    if any(key in data for key in ATELIER_MARKS):  # both now share their format names
        return False
    return data.get("output_model_format") in (*LORA_FORMATS, *FULL_FORMATS)


# --- Import and export ------------------------------------------------------------------------

MAX_LISTED = 12


def summarize(messages: list[str]) -> list[str]:
    """Long lists of unknown keys (a OneTrainer file has dozens) folded into one line."""
    unknown = [m for m in messages if m.startswith("Unknown key")]
    other = [m for m in messages if not m.startswith("Unknown key")]
    if len(unknown) > MAX_LISTED:
        names = [m.split("'")[1] for m in unknown]
        unknown = [f"{len(names)} unknown keys ignored: " + ", ".join(names[:MAX_LISTED])
                   + f", … and {len(names) - MAX_LISTED} more."]
    return other + unknown


def import_config(raw: Any, page_data: dict | None = None, beside=None
                  ) -> tuple[TrainConfig, dict[str, dict], list[str], str]:
    """An imported file's contents -> (config, optimizer_defaults, messages, kind). A OneTrainer
    file goes through the engine's translation, as on the CLI and the API (trainer/
    onetrainer.py): what Atelier cannot honour stops the import with the key and value;
    `beside` finds the files uploaded with it (a Save config's concepts)."""
    if not isinstance(raw, dict):
        raise ConfigError("The imported file must hold a JSON object of config keys.")
    kind = "OneTrainer" if looks_like_onetrainer(raw) else "Atelier"
    data, notes = translate(raw, beside)
    opt_defaults = optimizer_defaults_of(data)
    data = {k: v for k, v in data.items() if k != OPTIMIZER_DEFAULTS}
    config, messages = lenient_config(layered(data, page_data))
    return config, opt_defaults, notes + messages, kind


def import_files(files: list[str | Path], page_data: dict | None = None
                 ) -> tuple[TrainConfig, dict[str, dict], list[str], str, Path]:
    """The page's Import of one or more files: the config (the one JSON object among them)
    and the files it names, uploaded with it and found by their file names (a OneTrainer Save
    config's concepts and samples, a concept's prompt file). Returns import_config's answer
    and the config file's path."""
    files = [Path(f) for f in files]
    readable = [f for f in files if f.suffix.lower() == ".json"]
    configs = [(f, data) for f in readable if isinstance(data := read_json_file(f), dict)]
    if len(configs) != 1:
        names = ", ".join(f.name for f, _ in configs) or "none of the files"
        raise ConfigError(f"Import: select one config file (a JSON object) and the files it "
                          f"names; found {len(configs)} configs ({names}).")
    path, raw = configs[0]
    by_name = {f.name: f for f in files if f != path}

    def beside(name: str) -> Path | None:
        return by_name.get(Path(str(name).replace("\\", "/")).name)
    config, memory, messages, kind = import_config(raw, page_data, beside)
    return config, memory, messages, kind, path


def export_dict(config: TrainConfig, optimizer_defaults: dict[str, dict]) -> dict:
    """The full config as JSON data, with the page's remembered optimizer edits."""
    data = {ATELIER_MARKS[0]: 1, **config.model_dump(mode="json")}
    data[OPTIMIZER_DEFAULTS] = json_safe(optimizer_defaults)
    return data


def json_safe(value: Any) -> Any:
    """inf/nan (Prodigy's growth rate) as the strings the config reads back."""
    import math
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_export(config: TrainConfig, optimizer_defaults: dict[str, dict]) -> Path:
    """The exported config as a file in a fresh temp folder (the browser downloads it)."""
    folder = Path(tempfile.mkdtemp(prefix="atelier-export-"))
    path = folder / f"atelier-config-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(export_dict(config, optimizer_defaults), indent=2),
                    encoding="utf-8")
    return path


def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9 ._-]+", "", (name or "").strip()).strip(" .")
    if not cleaned:
        raise ConfigError("Give the preset a name (letters, digits, space, . _ -).")
    return cleaned[:80]


def save_user_preset(name: str, config: TrainConfig, optimizer_defaults: dict[str, dict],
                     access: Access | None = None) -> tuple[str, Path]:
    """Save the page's full config as the visitor's preset (in their own folder on a shared
    server); returns (dropdown value, path)."""
    access = _access(access)
    name = safe_name(name)
    path = access.check_write(user_presets_dir(access) / f"{name}.json", "Preset name")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(export_dict(config, optimizer_defaults), indent=2))
    return USER + name, path


def merge_preset(preset: dict, page_data: dict | None) -> tuple[TrainConfig, dict, list[str]]:
    """Load a preset (built-in partial or saved full) into (config, optimizer_defaults, notes)."""
    opt_defaults = optimizer_defaults_of(preset)
    data = {k: v for k, v in preset.items() if k != OPTIMIZER_DEFAULTS}
    config, messages = lenient_config(layered(data, page_data))
    return config, opt_defaults, messages


