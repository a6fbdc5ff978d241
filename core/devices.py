"""Moving small per-step tensors to the model's device without stalling the host."""

from __future__ import annotations

from typing import Union

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
