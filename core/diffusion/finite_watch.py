"""NaN/inf detection that does not make the host wait for the device at every step.

Guidance weights that are too large, fp16 overflow or a degenerate input (an all-black image makes
normalised features undefined) turn a loss into NaN; every later step is then garbage. The sampler
records one "all finite" flag per term and for the gradient on the device each step and reads them
back only every few steps, naming the first bad step, row and term.
"""

from __future__ import annotations

from typing import Optional

import torch


class GuidanceError(RuntimeError):
    """A guidance loss or its gradient stopped being finite."""


class FiniteWatch:
    """Collects per-step "is every loss and the gradient finite" flags on the device and reads them
    back every ``every`` steps (and at the end), so the step loop does not wait for the GPU each step.

    A NaN is still reported with the first guided step and the term it appeared in; at most ``every``
    steps run on after it.
    """

    every = 8

    def __init__(self) -> None:
        self.pending: list = []

    def record(self, per_term: dict, grad: Optional[torch.Tensor], step: int, t_index: int) -> None:
        flags = [torch.isfinite(v).all() for v in per_term.values()]
        if grad is not None:
            flags.append(torch.isfinite(grad).all())
        if flags:
            self.pending.append((step, t_index, list(per_term), torch.stack(flags)))

    def check(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        ok = torch.stack([flags.all() for *_, flags in pending]).cpu()  # the one host sync
        if bool(ok.all()):
            return
        step, t_index, names, flags = pending[int((~ok).nonzero()[0])]
        flags = flags.cpu().tolist()
        bad = [name for name, good in zip(names, flags) if not good]
        what = f"loss term(s) {', '.join(bad)}" if bad else "the guidance gradient"
        raise GuidanceError(f"{what} became NaN/inf at guided step {step} (respaced t={t_index}). "
                            "Lower that term's weight, use fp32, or check the inputs (an all-black or constant "
                            "image can make normalised features undefined).")
