"""Look at a weights file before reading it, so a wrong file gets a one-line error naming it.

Every loader of the pack (DDPM, DINO, CLIP, LPIPS, TAESD) reads safetensors or a torch file with
``weights_only=True``. Handed an empty file, a directory, an HTML page saved by a failed download,
a Git LFS pointer or any other text under a ``.pt`` name, ``torch.load`` fails deep inside its
unpickler (a ``KeyError``, an ``EOFError`` with no message, or "weights only load failed", which
reads like a refused pickle). :func:`check_weights_file` tells these apart from the first bytes,
and :func:`weights_format` says which reader a real file needs, whatever its extension.
"""

from __future__ import annotations

import os
import struct
from typing import Literal, Optional, Type, Union

PathLike = Union[str, os.PathLike]
Format = Literal["safetensors", "torch"]
EXTENSIONS = ".pt, .pth, .bin or .safetensors"


class NotAWeightsFileError(ValueError):
    """A path that exists but is not a weights file (a directory, an empty file, text, an unknown format)."""


def _describe_text(head: bytes) -> Optional[str]:
    """What a text file probably is, from its first bytes (None when they are not text)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(c < " " and c not in "\t\r\n" for c in text):
        return None
    low = text.lstrip().lower()
    if low.startswith("version https://git-lfs"):
        return ("a Git LFS pointer, not the weights themselves: fetch the real file (git lfs pull, or download "
                "it again from its page)")
    if low.startswith(("<!doctype html", "<html", "<?xml", "<head")):
        return "an HTML/XML page, not weights (a failed or redirected download?): download the file again"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file (it starts with {first!r}), not weights"


def weights_format(head: bytes) -> Optional[Format]:
    """The reader a file's first 16 bytes call for: a zip archive or a pickle (torch.save, old or new)
    is "torch"; an 8-byte little-endian header length followed by ``{`` is "safetensors"."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    return None


def check_weights_file(path: PathLike, what: str = "weights file",
                       error: Type[Exception] = NotAWeightsFileError) -> Format:
    """Refuse a path that cannot be a weights file, before any reading; return the format it holds.

    The path must exist (callers check that first, with their own "where to download it" message).
    ``error`` is the caller's exception type (e.g. ``CheckpointError``), so callers keep theirs.
    """
    where = os.fspath(path)
    if os.path.isdir(where):
        raise error(f"{what} {where!r} is a directory; expected a file ({EXTENSIONS})")
    size = os.path.getsize(where)
    if size == 0:
        raise error(f"{what} {where!r} is empty (0 bytes): an interrupted download or copy? Download it again")
    with open(where, "rb") as f:
        head = f.read(512)
    found = weights_format(head)
    if found is not None:
        return found
    text = _describe_text(head)
    raise error(f"{what} {where!r} is {text}; expected PyTorch or safetensors weights ({EXTENSIONS})" if text else
                f"{what} {where!r} is not a PyTorch or safetensors file ({size} bytes starting with "
                f"{head[:8]!r}); expected {EXTENSIONS} weights")
