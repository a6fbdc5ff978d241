"""Per-row bookkeeping of the guided loop: NaN reports name the bad row's own timestep; sample_many keeps
the per-step losses."""

from dataclasses import dataclass

import pytest
import torch

from core.guided import GuidanceError, GuidedSamplerOptions, guided_sample, program, sample_many
from core.schedule import DiffusionSchedule


@dataclass(frozen=True)
class RangeForRow0:
    """A 'range' loss over the restart threshold for row 0 only: row 0 restarts, row 1 runs on."""
    name: str = "range"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        return torch.tensor([1.0 if b == 0 else 0.0 for b in range(x0.shape[0])]) + 0 * x0.flatten(1).sum(1)


@dataclass(frozen=True)
class PoisonRowAt:
    """NaN for ``row`` from guided step ``step`` on; records every step's per-row t_index."""
    step: int
    row: int
    seen: list
    name: str = "late_poison"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        self.seen.append(ctx.t_index.tolist())
        loss = x0.flatten(1).square().mean(1)
        if ctx.step >= self.step:
            loss = loss * torch.tensor([float("nan") if b == self.row else 1.0 for b in range(len(loss))])
        return loss


def test_nan_report_names_the_bad_rows_timestep_after_a_restart(unet):
    sched = DiffusionSchedule.create(1000, "linear", "10")
    opts = GuidedSamplerOptions(skip_timesteps=4, range_restart_threshold=0.01, max_restarts=1)
    top = program(sched, opts)[0][0]
    seen: list = []
    with pytest.raises(GuidanceError) as err:
        guided_sample(unet, sched, torch.zeros(2, 3, 32, 32), [RangeForRow0(), PoisonRowAt(2, 1, seen)], seed=0,
                      options=opts)
    # step 1 (t = top - 1 for both) restarted row 0: at step 2 row 0 is back at the top, row 1 one level lower
    assert seen[2] == [top, top - 2]
    message = str(err.value)
    assert f"late_poison became NaN/inf at guided step 2 (respaced t={top - 2}) in row 1" in message
    assert f"t={top})" not in message


def test_nan_in_several_rows_names_each(unet):
    sched = DiffusionSchedule.create(1000, "linear", "10")
    seen: list = []

    @dataclass(frozen=True)
    class PoisonAll(PoisonRowAt):
        def __call__(self, x0, ctx):
            return x0.flatten(1).sum(1) * float("nan")

    with pytest.raises(GuidanceError, match=r"step 0 \(respaced t=\d+\) in row 0 \(also row 1 at t=\d+\)"):
        guided_sample(unet, sched, torch.zeros(2, 3, 32, 32), [PoisonAll(0, 0, seen)],
                      options=GuidedSamplerOptions(skip_timesteps=5))

