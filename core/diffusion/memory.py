"""How many sample rows fit in memory at once, and a clear error naming ``chunk_size`` when they do not.

``chunk_size`` 0 (all rows at once) is the default; with many samples that can need more memory than
the device has (32 tiny-model samples at 256 px take 16 GB on a CPU). :func:`sample_many` then picks
a chunk from the device's free memory and the measured cost of one row: one guided step of a single
row runs with autograd's saved-tensor hooks counting what the backward keeps (the bulk of a step's
memory), times :data:`PEAK_PER_SAVED` for what a step holds on top (gradients, the model output,
allocator slack; measured by ``bench/row_memory.py``, numbers in the README's Memory section). Rows
are independent runs, so the chunking does not change any result. An out-of-memory error that still
happens becomes :class:`ChunkMemoryError`, which names ``chunk_size`` and a value to try.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

PEAK_PER_SAVED = 1.25  # peak step memory per saved-for-backward byte (CPU, tiny presets at 256 px: 1.0-1.12)
USABLE_FRACTION = 0.8  # of the free memory: leaves room for the allocator, other tensors, the OS
FreeMemory = Optional[Union[int, Callable[[torch.device], Optional[int]]]]


class ChunkMemoryError(RuntimeError):
    """The device ran out of memory for the rows sampled at once."""


def free_memory(device: Union[str, torch.device]) -> Optional[int]:
    """Bytes the device can still give to tensors, or None when unknown (MPS, meta, other backends).

    CUDA: the driver's free memory plus what PyTorch's cache holds unused; CPU: the system's available
    memory (``psutil``, else ``MemAvailable`` of ``/proc/meminfo``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            pass
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def saved_bytes(step: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for the backward while ``step()`` runs (each storage once)."""
    storages: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def pick_chunk_size(rows: int, row_bytes: int, free_bytes: Optional[int]) -> int:
    """Rows to run at once: all of them when they fit in :data:`USABLE_FRACTION` of ``free_bytes`` (or when
    the free memory is unknown), else as many as fit, at least 1."""
    if free_bytes is None or row_bytes <= 0:
        return rows
    fit = int(free_bytes * USABLE_FRACTION // row_bytes)
    return max(1, min(rows, fit))


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS/CPU allocator failures (their messages differ by backend)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                               or "failed to allocate" in text)


def memory_error(chunk: int, rows: int, row_bytes: Optional[int] = None) -> ChunkMemoryError:
    """The message for an out-of-memory error while ``chunk`` of ``rows`` rows ran at once."""
    cost = f" (about {row_bytes / 2**30:.2f} GiB per row)" if row_bytes else ""
    if chunk > 1:
        advice = (f"set chunk_size to {max(1, chunk // 2)} (or lower; 1 = one sample at a time, results do not "
                  "change), or turn on gradient checkpointing")
    else:
        advice = ("even one row does not fit (chunk_size 1): turn on gradient checkpointing, use a fp16/bf16 "
                  "model or free memory used by other work")
    return ChunkMemoryError(f"out of memory while sampling {chunk} of {rows} rows at once{cost}: {advice}")
