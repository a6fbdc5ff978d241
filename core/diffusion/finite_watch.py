"""NaN/inf detection that does not make the host wait for the device at every step.

Guidance weights that are too large, fp16 overflow or a degenerate input (an all-black image makes
normalised features undefined) turn a loss into NaN; every later step is then garbage. The sampler
records one "all finite" flag per term and for the gradient on the device each step and reads them
back only every few steps, naming the first bad step, row and term.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


MODEL_OUTPUT = "<model output>"  # the name under which the diffusion model's own output is watched


class GuidanceError(RuntimeError):
    """A guidance loss, its gradient or the diffusion model's output stopped being finite."""


class FiniteWatch:
    """Collects per-step "is every loss and the gradient finite" flags on the device and reads them
    back every ``every`` steps (and at the end), so the step loop does not wait for the GPU each step.

    A NaN is still reported with the first guided step, the term it appeared in, the row that went bad
    and *that row's* timestep (rows restart alone, so rows of one step can be at different timesteps);
    at most ``every`` steps run on after it. Flags are kept per row: ``(terms [+ gradient], rows)``.
    """

    every = 8

    def __init__(self, model_name: Optional[str] = None) -> None:
        self.pending: list = []
        self.model_name = model_name  # the checkpoint, named when the model's own output goes bad

    @staticmethod
    def _per_row(finite: torch.Tensor) -> torch.Tensor:
        return finite.reshape(1) if finite.dim() == 0 else finite.reshape(finite.shape[0], -1).all(1)

    def record(self, per_term: dict, grad: Optional[torch.Tensor], step: int,
               t_index: Union[int, Sequence[int]], model_out: Sequence[torch.Tensor] = ()) -> None:
        """Queue this step's finiteness flags; ``t_index`` is the respaced index of every row (or one int).

        ``model_out`` are the diffusion model's own outputs of this step (its eps and variance): when they are
        already NaN/inf, the losses computed from them are too, and the report blames the model, not the weights.
        """
        names = list(per_term)
        flags = [self._per_row(torch.isfinite(v.detach())) for v in per_term.values()]
        if len(model_out):
            names.insert(0, MODEL_OUTPUT)
            flags.insert(0, torch.stack([self._per_row(torch.isfinite(v.detach())) for v in model_out]).all(0))
        if grad is not None:
            flags.append(self._per_row(torch.isfinite(grad.detach())))
        if flags:
            rows = max(f.shape[0] for f in flags)
            t_rows = [int(t_index)] * rows if isinstance(t_index, int) else [int(t) for t in t_index]
            self.pending.append((step, t_rows, names, torch.stack([f.expand(rows) for f in flags])))

    def check(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        ok = torch.stack([flags.all() for *_, flags in pending]).cpu()  # the one host sync
        if bool(ok.all()):
            return
        step, t_rows, names, flags = pending[int((~ok).nonzero()[0])]
        flags = flags.cpu()
        if names[:1] == [MODEL_OUTPUT] and not bool(flags[0].all()):
            flags = flags[:1]  # the model's output went bad: the losses and gradient only follow it
        bad = [name for name, good in zip(names, flags.all(1).tolist()) if not good]
        what = f"loss term(s) {', '.join(bad)}" if bad else "the guidance gradient"
        rows = (~flags.all(0)).nonzero().flatten().tolist()
        row = rows[0]
        where = f"(respaced t={t_rows[row] if row < len(t_rows) else t_rows[0]})"
        if len(t_rows) > 1:
            where += f" in row {row}"
            if len(rows) > 1:
                where += " (also " + ", ".join(f"row {r} at t={t_rows[r]}" for r in rows[1:] if r < len(t_rows)) + ")"
        if bad == [MODEL_OUTPUT]:
            model = f" ({self.model_name})" if self.model_name else ""
            raise GuidanceError(f"the diffusion model{model} produced NaN/inf at guided step {step} {where}, before "
                                "any guidance loss: the loss weights are not the cause. Check the checkpoint (NaN/inf "
                                "weights, a damaged file) or run the UNet in fp32 (fp16 can overflow).")
        raise GuidanceError(f"{what} became NaN/inf at guided step {step} {where}. "
                            "Lower that term's weight, use fp32, or check the inputs (an all-black or constant "
                            "image can make normalised features undefined).")
