"""Training state on disk as safetensors + JSON, never pickle (issue 23).

A backup's optimizer, schedule, EMA and RNG states are trees of dicts, lists, tuples,
numbers, strings, None and tensors. `write_state(folder, name, tree)` splits one into
    <name>.safetensors   every tensor, under a key made of its path in the tree
                         ("state/0/exp_avg", "ema/shadow/3")
    <name>.json          the tree, each tensor replaced by a reference to its key
and `read_state` puts it back together. Values that JSON cannot hold as themselves are
written as tagged objects ({"$t": ...}) so they come back with the same type and value:
tuples (Adam's betas), dicts whose keys are not all strings (an optimizer's per-parameter
state is keyed by int), Counter and OrderedDict (torch LR schedulers), non-finite floats
(Prodigy's growth_rate = inf; bit for bit), numpy scalars, torch dtypes and sizes.

Anything else is refused when writing, naming where it sits. Reading therefore only ever
builds those few types: unlike unpickling, no file can make it construct an object of its
choosing or call a function.
"""
from __future__ import annotations

import json
import struct
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import AtelierError

FORMAT = "atelier-training-state"
VERSION = 1
TAG = "$t"

# torch dtype <-> safetensors dtype name (the safetensors format's own spelling).
_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
           torch.uint16: "U16", torch.int32: "I32", torch.uint32: "U32", torch.int64: "I64",
           torch.uint64: "U64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float32: "F32", torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3",
           torch.float8_e5m2: "F8_E5M2"}
# numpy scalars whose .item() gives back exactly the same value
_NUMPY_SCALARS = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                  "uint64", "float16", "float32", "float64"}


class StateFileError(AtelierError):
    """A state cannot be written without pickle, or a state file is damaged."""


def write_state(folder: Path, name: str, tree: Any) -> None:
    """Write `tree` as `<name>.json` + `<name>.safetensors` in `folder` (a staging folder:
    the caller makes the whole backup appear at once)."""
    tensors = _TensorTable()
    document = {"format": FORMAT, "version": VERSION, "tensors": f"{name}.safetensors",
                "value": _encode(tree, (), tensors)}
    _write_safetensors(folder / f"{name}.safetensors", tensors.by_key)
    # allow_nan=False: every non-finite float went through _encode's tag; a bare NaN here
    # would be a bug, not something to write.
    (folder / f"{name}.json").write_text(json.dumps(document, allow_nan=False),
                                         encoding="utf-8")


def read_state(folder: Path, name: str) -> Any:
    """The tree `write_state` wrote; tensors come back on the CPU (callers move them)."""
    path = folder / f"{name}.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise StateFileError(f"{path.name} cannot be read ({type(error).__name__})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise StateFileError(f"{path.name} is not an Atelier training state")
    if document.get("version") != VERSION:
        raise StateFileError(f"{path.name} has format version {document.get('version')!r}; "
                             f"this Atelier reads version {VERSION}")
    from safetensors import safe_open

    tensor_path = folder / f"{name}.safetensors"
    try:
        with safe_open(str(tensor_path), framework="pt", device="cpu") as file:
            return _Decoder(file, tensor_path.name).decode(document.get("value"), ())
    except StateFileError:
        raise
    except RecursionError:
        raise StateFileError(f"{path.name} is nested too deeply") from None
    except Exception as error:  # safetensors' own errors for a missing or damaged file
        raise StateFileError(f"{tensor_path.name} cannot be read "
                             f"({type(error).__name__})") from None


# --- writing -------------------------------------------------------------------------------

class _TensorTable:
    """Tensors by file key. The same tensor object met twice is stored once and referred to
    twice (bitsandbytes shares its quantization maps between parameters)."""

    def __init__(self) -> None:
        self.by_key: dict[str, torch.Tensor] = {}
        self._key_of: dict[int, str] = {}

    def add(self, tensor: torch.Tensor, path: tuple) -> str:
        if id(tensor) in self._key_of:
            return self._key_of[id(tensor)]
        if tensor.layout != torch.strided or tensor.dtype not in _DTYPES or tensor.is_quantized:
            raise StateFileError(f"'{_where(path)}' is a {tensor.dtype} {tensor.layout} "
                                 "tensor, which a safetensors file cannot hold")
        base = "/".join(str(part) for part in path) or "value"
        key, number = base, 1
        while key in self.by_key or key == "__metadata__":
            number += 1
            key = f"{base}~{number}"
        self.by_key[key] = tensor
        self._key_of[id(tensor)] = key
        return key


def _where(path: tuple) -> str:
    return "/".join(str(part) for part in path) or "(top)"


def _encode(value: Any, path: tuple, tensors: _TensorTable) -> Any:
    # Exact types, not isinstance: an Enum that is also a str (or a bool, an int subclass)
    # would come back as a plain str or int, which is not the value that was saved.
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        if value != value or value in (float("inf"), float("-inf")):
            return {TAG: "float", "bits": struct.pack(">d", value).hex()}
        return value  # json writes repr(float), which reads back as the same float
    if isinstance(value, torch.Tensor):
        return {TAG: "tensor", "key": tensors.add(value, path)}
    if kind is list:
        return [_encode(item, (*path, index), tensors) for index, item in enumerate(value)]
    if kind is tuple:
        return {TAG: "tuple", "items": [_encode(item, (*path, index), tensors)
                                        for index, item in enumerate(value)]}
    if kind is torch.Size:
        return {TAG: "size", "items": list(value)}
    if kind is dict and all(type(key) is str for key in value) and TAG not in value:
        return {key: _encode(item, (*path, key), tensors) for key, item in value.items()}
    if kind in (dict, OrderedDict, Counter):
        tag = {dict: "dict", OrderedDict: "ordered_dict", Counter: "counter"}[kind]
        items = []
        for key, item in value.items():
            if isinstance(key, torch.Tensor):
                raise StateFileError(f"'{_where(path)}' has a tensor as a key")
            items.append([_encode(key, (*path, "key"), tensors),
                          _encode(item, (*path, key), tensors)])
        return {TAG: tag, "items": items}
    if isinstance(value, np.generic) and value.dtype.name in _NUMPY_SCALARS:
        return {TAG: "numpy", "dtype": value.dtype.name,
                "value": _encode(value.item(), path, tensors)}
    if kind is torch.dtype:
        return {TAG: "dtype", "name": str(value).removeprefix("torch.")}
    raise StateFileError(f"'{_where(path)}' holds a {kind.__module__}.{kind.__qualname__}, "
                         "which a backup cannot store without pickle")


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data),
    written one tensor at a time: `safetensors.torch.save_file` wants every tensor in host
    memory at once, and a fine-tune's optimizer state on the GPU is twice the model."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(raw)))
        file.write(raw)
        for tensor in tensors.values():
            if tensor.numel():
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                file.write(memoryview(data.numpy()))


# --- reading -------------------------------------------------------------------------------

class _Decoder:
    def __init__(self, file, file_name: str) -> None:
        self.file, self.file_name = file, file_name
        self.keys = set(file.keys())
        self.loaded: dict[str, torch.Tensor] = {}  # one tensor per key, as it was written

    def decode(self, value: Any, path: tuple) -> Any:
        if value is None or type(value) in (bool, int, float, str):
            return value
        if type(value) is list:
            return [self.decode(item, (*path, index)) for index, item in enumerate(value)]
        if type(value) is not dict:
            raise self.damaged(path)
        if TAG not in value:
            return {key: self.decode(item, (*path, key)) for key, item in value.items()}
        tag = value[TAG]
        if tag == "tensor":
            return self.tensor(value.get("key"), path)
        if tag == "float":
            bits = value.get("bits")
            if type(bits) is not str or len(bits) != 16:
                raise self.damaged(path)
            try:
                return struct.unpack(">d", bytes.fromhex(bits))[0]
            except ValueError:
                raise self.damaged(path) from None
        if tag in ("tuple", "size"):
            items = [self.decode(item, (*path, index))
                     for index, item in enumerate(self.items(value, path))]
            if tag == "tuple":
                return tuple(items)
            if not all(type(item) is int for item in items):
                raise self.damaged(path)
            return torch.Size(items)
        if tag in ("dict", "ordered_dict", "counter"):
            result = {"dict": dict, "ordered_dict": OrderedDict, "counter": Counter}[tag]()
            for pair in self.items(value, path):
                if type(pair) is not list or len(pair) != 2:
                    raise self.damaged(path)
                key = self.decode(pair[0], (*path, "key"))
                try:
                    result[key] = self.decode(pair[1], (*path, key))
                except TypeError:  # an unhashable key (a list)
                    raise self.damaged(path) from None
            return result
        if tag == "numpy" and value.get("dtype") in _NUMPY_SCALARS:
            item = self.decode(value.get("value"), path)
            if type(item) not in (bool, int, float):
                raise self.damaged(path)
            try:
                return np.dtype(value["dtype"]).type(item)
            except (OverflowError, ValueError):
                raise self.damaged(path) from None
        if tag == "dtype":
            dtype = getattr(torch, str(value.get("name")), None)
            if isinstance(dtype, torch.dtype):
                return dtype
        raise self.damaged(path)

    def items(self, value: dict, path: tuple) -> list:
        items = value.get("items")
        if type(items) is not list:
            raise self.damaged(path)
        return items

    def tensor(self, key: Any, path: tuple) -> torch.Tensor:
        if type(key) is not str or key not in self.keys:
            raise StateFileError(f"'{_where(path)}' refers to a tensor that "
                                 f"{self.file_name} does not hold")
        if key not in self.loaded:
            self.loaded[key] = self.file.get_tensor(key)
        return self.loaded[key]

    def damaged(self, path: tuple) -> StateFileError:
        return StateFileError(f"'{_where(path)}' is damaged")
