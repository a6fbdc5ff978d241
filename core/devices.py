"""Moving small per-step tensors to the model's device without stalling the host."""

from __future__ import annotations

import functools
from typing import Sequence, Union

import torch


def to_device(cpu_tensor: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """Host-to-device copy that does not wait for the GPU: pinned staging + non_blocking on CUDA.

    A plain ``.to("cuda")`` of pageable memory synchronises the stream; per-step noise drawn on CPU
    generators would otherwise stall the host once per draw.
    """
    device = torch.device(device)
    if device.type == "cuda" and cpu_tensor.device.type == "cpu":
        return cpu_tensor.pin_memory().to(device, non_blocking=True)
    return cpu_tensor.to(device)


def constant(values: Sequence[float], device: Union[str, torch.device], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.tensor(values, dtype, device)`` made once per (values, device, dtype) and reused.

    For small constants used every step (CLIP's mean / std): building them with ``torch.tensor(...,
    device=cuda)`` each call is a blocking host-to-device copy each call. Treat the result as read-only.
    """
    return _constant(tuple(float(v) for v in values), torch.device(device), dtype)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)
