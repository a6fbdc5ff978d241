"""The range loss and the range restart it drives (diffuseit_spec §3.6, §4.6).

``L_range`` penalises the part of the predicted x0 outside [-1, 1]; both papers guide with it
(DiffuseIT weight 200, Blended Diffusion 50). DiffuseIT also restarts a sample from fresh noise
when its weighted range loss exceeds a threshold below the top step: upstream's guard against a
diverging translation. The restart decision is the one per-step host read-back the guided loop
makes by design, and only while some row can still restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

RESTART_THRESHOLD = 0.01  # upstream's flag on the lambda-weighted range loss (ImageNet; FFHQ uses 0.1)


def range_loss(x: torch.Tensor) -> torch.Tensor:
    """L_range per row, §4.6: ``mean_CHW (x - clamp(x, -1, 1))^2`` (applied to x0, not x_in)."""
    return (x - x.clamp(-1.0, 1.0)).pow(2).flatten(1).mean(dim=1)


class _PreparedRange:
    def __init__(self, term: "RangeLoss") -> None:
        self.name, self.weight = term.name, term.weight

    def __call__(self, predicted_x0: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.weight * range_loss(predicted_x0)


@dataclass(frozen=True)
class RangeLoss:
    """``weight * L_range`` on x0 (never the noise-mixed input), §4.6; upstream weight 200.
    Upstream's restart threshold (§3.6) applies to this weighted value."""

    needs_source = False  # scores x0 alone: guiding a latent model needs no source image

    weight: float = 200.0
    name: str = "range"

    def prepare(self, source: torch.Tensor) -> _PreparedRange:
        return _PreparedRange(self)


def rows_to_restart(range_losses: torch.Tensor, threshold: float, t_list: Sequence[int], top: int,
                    active: torch.Tensor, restarts: list, max_restarts: int) -> Optional[torch.Tensor]:
    """Below the top step, a row whose weighted range loss is above ``threshold`` starts over (§3.6),
    at most ``max_restarts`` times. Counts the restarts into ``restarts``; returns the rows to restart
    as a CPU bool tensor, or None."""
    values = range_losses.detach().cpu()  # the decision needs the values on the host
    over = (values > threshold) & (torch.tensor(list(t_list)) < top) & active
    over &= torch.tensor([n < max_restarts for n in restarts])
    if not bool(over.any()):
        return None
    for b in over.nonzero().flatten().tolist():
        restarts[b] += 1
    return over
