"""Sample prompts encoded once: what a sampling pipeline's text encoders made of each sample's
prompts, kept on disk beside the text cache.

Why: once the text cache holds every caption, the frozen text encoders run only for samples.
A flow family's T5-XXL or Qwen language model (5 to 16 GB) was then read from disk again, or
brought back to the GPU beside the transformer, at every sampling event, to encode the same
few prompts. With their encodings on disk, a sampling event whose samples are all there leaves
the text encoders where they are (dropped, parked) and draws with a pipeline that has none:
the second run on the same prompts reads no text encoder at all, and the first reads them
once: while the caches fill before training where it fills them first (on a GPU: before the
denoiser comes, `sampling.record_sample_prompts`), else for its first sampling event.

How: the pipeline's own `encode_prompt` is wrapped, so any family's pipeline works as it is.
While a sample is drawn, each call it makes (the prompt; the negative prompt where the
pipeline encodes it apart) is recorded in order with its arguments and its outputs, and the
record is saved once the image is drawn. A later draw of the same sample replays the record:
the same tensors, so the same image. Each replayed call's arguments are checked against the
recorded ones; a record that does not match is removed and the sample fails with a message
(the next sampling event records it again). A call given precomputed embeddings runs as it is
(it needs no encoder); a draw with a call whose arguments are not plain data is not recorded.

Keys: the text cache's identity (the encoders' files, dtypes, clip skips, sequence lengths),
the family, diffusers' version, and what of a sample reaches the encoders (its prompt,
negative prompt and CFG scale, and the family's extra sampling arguments); not its seed,
size or steps. The entries live beside the text cache's (`prompts/`), and a shared cache
folder is pruned of them as of the others (trainer/data/cache.py).
"""
from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors import safe_open

from trainer.data.cache import CACHE_VERSION, _atomic_save, _digest, touch

STRUCTURE_KEY = "atelier.sample_prompt_calls"


class PromptRecordMismatch(RuntimeError):
    """A replayed call's arguments are not those recorded."""


class SamplePromptCache:
    def __init__(self, folder: Path | str, identity: Any):
        self.folder = Path(folder)
        self.identity = identity
        self.records: dict[str, list[tuple[str, Any]]] = {}  # key -> [(call, outputs)]

    @classmethod
    def beside(cls, text_cache) -> SamplePromptCache | None:
        """The cache for a run's samples: where its text cache is (none without one: a
        trained encoder or embedding changes the encodings every step)."""
        if text_cache is None:
            return None
        return cls(text_cache.folder.parent / "prompts", text_cache.identity)

    def key(self, family, spec) -> str:
        extra = {k: v for k, v in family.sample_inputs().items() if _plain(v)}
        return _digest([CACHE_VERSION, "sample-prompts", self.identity, type(family).__name__,
                        family.inpainting, diffusers.__version__, spec.prompt,
                        spec.negative_prompt, float(spec.cfg_scale), extra])

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def covers(self, family, samples) -> bool:
        """Whether every sample's encodings are recorded (read into memory now, so that
        pruning of a shared cache cannot take them away before the draw)."""
        return all(self._record(self.key(family, spec)) is not None for spec in samples)

    @contextlib.contextmanager
    def serving(self, pipeline, family, spec, finished_by: tuple[type, ...] = ()):
        """While drawing `spec` with `pipeline`: its prompt encodings replayed from the
        record, or recorded (and saved when the draw ends well, or with an exception of
        `finished_by`: one that stops a draw once its prompts are encoded)."""
        key = self.key(family, spec)
        recorded = self._record(key)
        fresh: list[tuple[str, Any]] = []
        unrecorded = []  # calls run as they are: a record without them would be incomplete
        original = pipeline.encode_prompt
        signature = inspect.signature(original)

        def run(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except finished_by:  # stopped inside the call: its outputs are not known
                unrecorded.append("stopped")
                raise

        def encode_prompt(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            if _given_embeddings(bound.arguments):  # needs no encoder: runs as it is
                return run(*args, **kwargs)
            call = _call_key(pipeline, bound.arguments)
            if call is None:
                unrecorded.append(call)
                return run(*args, **kwargs)
            if recorded is None:
                outputs = run(*args, **kwargs)
                fresh.append((call, _to_cpu(outputs)))
                return outputs
            index = len(fresh)
            if index >= len(recorded) or recorded[index][0] != call:
                self._forget(key)
                raise PromptRecordMismatch(
                    "the recorded encodings of this sample's prompts do not match the "
                    "pipeline's call; they are removed and recorded again at the next sample")
            fresh.append(recorded[index])
            device = bound.arguments.get("device") or pipeline._execution_device
            return _to_device(recorded[index][1], device)

        pipeline.encode_prompt = encode_prompt
        complete = False
        try:
            yield
            complete = True
        except finished_by:
            complete = True
            raise
        finally:
            del pipeline.encode_prompt  # the class's method again
            if complete and recorded is None and fresh and not unrecorded:
                self._save(key, fresh)

    # -- storage --------------------------------------------------------------------------

    def _record(self, key: str) -> list[tuple[str, Any]] | None:
        if key not in self.records:
            record = _read(self.path(key))
            if record is None:
                return None
            self.records[key] = record
        return self.records[key]

    def _forget(self, key: str) -> None:
        self.records.pop(key, None)
        self.path(key).unlink(missing_ok=True)

    def _save(self, key: str, calls: list[tuple[str, Any]]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        structure = [[call, _flatten(outputs, f"{i}", tensors)]
                     for i, (call, outputs) in enumerate(calls)]
        _atomic_save(tensors, self.path(key),
                     metadata={STRUCTURE_KEY: json.dumps(structure)})
        self.records[key] = calls


def without_text_encoders(pipeline) -> None:
    """Take the text encoders out of `pipeline` (the family keeps them): a pipeline decides
    its device from its modules, and a dropped or parked encoder would say meta or CPU."""
    for name, component in list(pipeline.components.items()):
        if name.startswith("text_encoder") and component is not None:
            setattr(pipeline, name, None)


def _given_embeddings(arguments: dict[str, Any]) -> bool:
    """A call given precomputed embeddings (Flux.2's pipeline passes the negative prompt's
    so): diffusers' pipelines then run no text encoder."""
    return any(isinstance(value, torch.Tensor) for value in arguments.values())


def _call_key(pipeline, arguments: dict[str, Any]) -> str | None:
    """The call's arguments but its device, as text; None where one is not plain data (an
    object, which may print differently in the next process): such a call is not recorded."""
    kept = {name: value for name, value in arguments.items()
            if name != "device" and value is not None}
    if not all(_plain(value) for value in kept.values()):
        return None
    return json.dumps([type(pipeline).__qualname__, kept], sort_keys=True)


def _plain(value: Any) -> bool:
    """Text, numbers, None and lists or dicts of them: the same text in every process."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


# -- nested outputs (tensors, None, lists and tuples of them) as named tensors ----------------

def _flatten(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[name] = value
        return {"tensor": name}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list":
                [_flatten(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot record a {type(value).__name__} among prompt encodings")


def _unflatten(structure: dict, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in structure:
        return tensors[structure["tensor"]]
    if "tuple" in structure:
        return tuple(_unflatten(s, tensors) for s in structure["tuple"])
    if "list" in structure:
        return [_unflatten(s, tensors) for s in structure["list"]]
    return structure["value"]


def _map_tensors(value: Any, convert) -> Any:
    if isinstance(value, torch.Tensor):
        return convert(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, convert) for v in value)
    return value


def _to_cpu(value: Any) -> Any:
    return _map_tensors(value, lambda t: t.detach().to("cpu", copy=True))


def _to_device(value: Any, device) -> Any:
    # a copy: the record is replayed again, whatever the pipeline does to what it is given
    return _map_tensors(value, lambda t: t.to(device, copy=True))


def _read(path: Path) -> list[tuple[str, Any]] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as entry:
            structure = json.loads(entry.metadata()[STRUCTURE_KEY])
            tensors = {name: entry.get_tensor(name) for name in entry.keys()}
    except Exception:  # noqa: BLE001 - a damaged entry is recorded again, never fatal
        path.unlink(missing_ok=True)
        return None
    touch(path)
    return [(call, _unflatten(outputs, tensors)) for call, outputs in structure]
