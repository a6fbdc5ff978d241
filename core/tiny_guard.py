"""Which files tiny-models wrote, so it never replaces (or writes among) real checkpoints.

Every tiny file is recorded with its SHA-256 in ``.tiny-models.json`` in its folder; a file counts as
tiny only while its content still matches that record, so a real checkpoint later saved under the
same name (or an edited file) is never treated as replaceable.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]
MANIFEST = ".tiny-models.json"  # per folder: {file name: sha256} of the tiny files written there
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class TinyModelsRefused(ValueError):
    """A tiny model would replace (or sit among) files that tiny-models did not write."""


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def is_tiny_file(path: PathLike) -> bool:
    """Whether ``path`` is a file tiny-models wrote and nobody changed since (its SHA-256 is on record)."""
    path = Path(path)
    recorded = _manifest(path.parent).get(path.name)
    return recorded is not None and path.is_file() and file_sha256(path) == recorded


def record(path: Path) -> Path:
    entries = _manifest(path.parent)
    entries[path.name] = file_sha256(path)
    (path.parent / MANIFEST).write_text(json.dumps(entries, indent=1, sort_keys=True))
    return path


def claim(path: Path, force: bool) -> Path:
    """Refuse to replace ``path`` unless it is a tiny file on record (or ``force``); creates its folder."""
    if not force and path.exists() and not is_tiny_file(path):
        raise TinyModelsRefused(f"{path} exists and is not a tiny model written by tiny-models (a real checkpoint?); "
                                "nothing was written. Use an empty folder, or --force (force=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def foreign_weights(folder: Path) -> list[Path]:
    """Weights files under ``folder`` that tiny-models did not write."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file()
                  and not is_tiny_file(p))

