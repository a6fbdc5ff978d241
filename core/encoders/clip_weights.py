"""Reading CLIP weight files without executing pickled code.

Weights are read from ``.safetensors``; from torch pickles (``.bin``/``.pth``/``.pt`` state
dicts, open_clip training checkpoints) with ``torch.load(weights_only=True)``; and from OpenAI's
published TorchScript archives (``RN50.pt``, ``ViT-B-16.pt``, ...). For those ``torch.load``
refuses ``weights_only=True`` and open_clip's OpenAI loader calls ``torch.jit.load``, which
deserialises and runs the archive's code; :func:`read_torchscript_weights` instead unpickles
``data.pkl`` with an allow-list (tensor rebuilds and storages become our own functions, each
``__torch__.*`` class an inert attribute holder, anything else is refused) and only *reads* the
``code/`` text for its ``__parameters__``/``__buffers__`` lists, so plain tensor attributes are
not mistaken for weights.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

import torch

from ..weights_file import check_weights_file

PathLike = Union[str, os.PathLike]
# Extra tensors of OpenAI's archives (hyper-parameters kept as buffers); not weights.
OPENAI_ARCHIVE_METADATA = ("input_resolution", "context_length", "vocab_size")


class ClipLoadError(ValueError):
    """An unknown architecture, or a file that is not usable CLIP weights for it."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_DECLARATIONS = re.compile(r"^class (\w+)\(.*\):\n  __parameters__ = \[(.*)\]\n  __buffers__ = \[(.*)\]", re.M)


class _ScriptObject:
    """Inert stand-in for a TorchScript class instance: it only keeps its pickled attributes."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["attributes"] = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Sequence[int], stride: Sequence[int], *_: Any) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _ArchiveUnpickler(pickle.Unpickler):
    """Allow-list unpickler for a TorchScript ``data.pkl``; storages come from the archive's ``data/``."""

    _SAFE = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): OrderedDict,
        ("torch.jit._pickle", "restore_type_tag"): lambda value, *_: value,
        **{("torch.jit._pickle", f"build_{k}list"): list for k in ("int", "float", "bool", "double", "tensor")},
    }

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._SAFE:
            return self._SAFE[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            return self._classes.setdefault(qualname, type(name, (_ScriptObject,), {"qualname": qualname}))
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' from a TorchScript archive")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._prefix}/data/{key}"))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise pickle.UnpicklingError(f"storage {key}: {flat.numel()} elements, expected {numel}")
            self._storages[key] = flat
        return self._storages[key]


def _torchscript_prefix(archive: zipfile.ZipFile) -> Optional[str]:
    names = set(archive.namelist())
    for n in names:
        if n.endswith("/data.pkl") and n.count("/") == 1 and f"{n[:-9]}/constants.pkl" in names:
            return n[:-9]
    return None


def read_torchscript_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive (e.g. OpenAI's ``ViT-B-16.pt``), never running it.

    Keys are the module paths of the scripted model (``visual.conv1.weight``, ...); tensors keep
    the archive's dtype (fp16 for OpenAI's). See the module docstring for why not ``torch.jit.load``.
    """
    with zipfile.ZipFile(path) as archive:
        prefix = _torchscript_prefix(archive)
        if prefix is None:
            raise ClipLoadError(f"{os.fspath(path)!r} is not a TorchScript archive")
        names = archive.namelist()
        order = archive.read(f"{prefix}/byteorder").decode().strip() if f"{prefix}/byteorder" in names else "little"
        if order != "little":  # older archives have no byteorder record: little-endian
            raise ClipLoadError(f"{os.fspath(path)!r} stores {order}-endian tensors; only little-endian is supported")
        declared: dict[str, set[str]] = {}
        for n in names:
            if n.startswith(f"{prefix}/code/") and n.endswith(".py"):
                module = n[len(prefix) + 6:-3].replace("/", ".")
                for cls, params, buffers in _DECLARATIONS.findall(archive.read(n).decode("utf-8", "replace")):
                    declared[f"{module}.{cls}"] = set(re.findall(r'"(\w+)"', params + buffers))
        root = _ArchiveUnpickler(archive, prefix).load()
    out: dict[str, torch.Tensor] = {}

    def walk(obj: _ScriptObject, where: str) -> None:
        names = declared.get(obj.qualname)  # None: no declaration found, keep every tensor attribute
        for attr, value in getattr(obj, "attributes", {}).items():
            if isinstance(value, torch.Tensor) and (names is None or attr in names):
                out[where + attr] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{where}{attr}.")

    if not isinstance(root, _ScriptObject):
        raise ClipLoadError(f"{os.fspath(path)!r}: the archive's root is not a module")
    walk(root, "")
    return out


def read_clip_weights(path: PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a CLIP weights file into a flat tensor dict; returns (state dict, is_openai_archive).

    ``is_openai_archive`` is True for OpenAI-format weights (their archives carry the
    ``input_resolution``/``context_length``/``vocab_size`` buffers), which need QuickGELU.
    """
    where = os.fspath(path)
    kind = check_weights_file(where, "CLIP weights", ClipLoadError)  # a folder, empty or text file: by name
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file
            loaded: Any = load_file(where)
        elif zipfile.is_zipfile(where) and _torchscript_prefix(zipfile.ZipFile(where)) is not None:
            loaded = read_torchscript_weights(where)
        else:
            loaded = torch.load(where, map_location="cpu", weights_only=True)
    except ClipLoadError:
        raise
    except Exception as exc:  # refused pickles; truncated zips, text files, bad safetensors headers, ...
        found = re.search(r"GLOBAL (\S+)|refusing to load global '(\S+)'", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and found:
            raise ClipLoadError(f"refused to load {where!r}: it contains pickled objects other than tensors "
                                f"({found.group(1) or found.group(2)}), which could run arbitrary code. Use a "
                                ".safetensors file, a plain state dict or OpenAI's original .pt archive.") from None
        detail = next((ln for ln in str(exc).splitlines() if "Unsupported" in ln), str(exc).split("\n")[0])
        raise ClipLoadError(f"{where!r} could not be read as CLIP weights (wrong or truncated file?): "
                            f"{type(exc).__name__}: {detail.strip()}") from None
    for key in ("state_dict", "model"):  # open_clip training checkpoints and similar wrappers
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ClipLoadError(f"{where!r} holds no state dict (found {type(loaded).__name__})")
    sd = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    is_openai = all(k in sd for k in OPENAI_ARCHIVE_METADATA)
    for k in OPENAI_ARCHIVE_METADATA:
        sd.pop(k, None)
    return sd, is_openai
