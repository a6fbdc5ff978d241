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


class DeviceError(ValueError):
    """A device name that does not parse or names a device this machine does not have."""


def available_devices() -> list[str]:
    """The device names this machine can run on, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def check_device(name: Union[str, torch.device], option: str = "device") -> torch.device:
    """``torch.device(name)`` if this machine has that device, else :class:`DeviceError` listing those it has
    (``option`` names the input in the message, e.g. ``"--device"``).

    Checked before any model is loaded: torch itself only fails at the first allocation, with a driver
    message ("Found no NVIDIA driver", "invalid device ordinal") that does not name the option.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"{option} {str(name)!r} is not a device name; available here: "
                          f"{', '.join(available_devices())}") from None
    available = available_devices()
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        if f"cuda:{index}" in available:
            return device
    elif device.type == "mps" and device.index in (None, 0) and "mps" in available:
        return device
    raise DeviceError(f"{option} {str(name)!r} is not available on this machine; available: {', '.join(available)}")
