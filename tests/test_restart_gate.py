"""DiffuseIT's range-restart gate (spec 3.5 step 11: restart when ``t < K`` and ``r > 0.01``).

Pinned at exactly the threshold and one float32 step either side, both on ``rows_to_restart`` and
through the sampler; and restarts happen only below the top step K (never during its resampling
repeats). The threshold is a power of two so "exactly at it" is exact in float32 and float64.
"""

from dataclasses import dataclass

import torch

from core.diffusion.guided_loop import GuidedSamplerOptions, guided_sample, program
from core.diffusion.range import rows_to_restart
from core.diffusion.schedule import DiffusionSchedule

THRESHOLD = 2.0 ** -7  # exactly representable; the gate's rule, not upstream's 0.01, is under test
AT = torch.tensor(THRESHOLD, dtype=torch.float32)
ABOVE = torch.nextafter(AT, torch.tensor(1.0)).item()
BELOW = torch.nextafter(AT, torch.tensor(0.0)).item()


def test_gate_is_strictly_greater_than_the_threshold_below_the_top_step():
    opts = GuidedSamplerOptions(range_restart_threshold=THRESHOLD, max_restarts=3)
    top = 5
    values = [BELOW, THRESHOLD, ABOVE, ABOVE, 1.0]
    t_list = [top - 1, top - 1, top - 1, top, 0]  # row 3: at the top step (resampling repeats): never restarts
    restarts = [0] * len(values)
    rows = rows_to_restart(torch.tensor(values, dtype=torch.float32), opts.range_restart_threshold, t_list, top,
                           torch.ones(len(values), dtype=torch.bool), restarts, opts.max_restarts)
    assert rows is not None
    assert rows.tolist() == [False, False, True, False, True]  # r > threshold and t < K
    assert restarts == [0, 0, 1, 0, 1]
    # exactly at the threshold everywhere: no restart at all
    none = rows_to_restart(torch.full((3,), THRESHOLD), opts.range_restart_threshold, [0, 1, 2], top,
                           torch.ones(3, dtype=torch.bool), [0, 0, 0], opts.max_restarts)
    assert none is None
    # inactive rows and rows out of restarts stay put
    rows = rows_to_restart(torch.full((3,), 1.0), opts.range_restart_threshold, [0, 0, 0], top,
                           torch.tensor([True, False, True]), [0, 0, 3], opts.max_restarts)
    assert rows.tolist() == [True, False, False]


@dataclass(frozen=True)
class ScriptedRange:
    """A "range" term of a constant value (at every step, or only at respaced step ``only_at``)."""
    value: float
    only_at: int = -1
    name: str = "range"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        on = (ctx.t_index == self.only_at) if self.only_at >= 0 else torch.ones_like(ctx.t_index, dtype=torch.bool)
        return torch.where(on, torch.tensor(self.value, dtype=torch.float32), torch.tensor(0.0)) + 0 * x0.flatten(1).sum(1)


def _restarts(unet, term, **kw):
    sched = DiffusionSchedule.create(1000, "linear", "10")
    opts = GuidedSamplerOptions(skip_timesteps=6, resample_steps=3, range_restart_threshold=THRESHOLD, max_restarts=2,
                                **kw)
    seen = []
    res = guided_sample(unet, sched, torch.zeros(1, 3, 32, 32), [term], options=opts,
                        callback=lambda d: seen.append(d["t_index"]))
    return res.restarts[0], seen, program(sched, opts)


def test_sampler_restarts_only_above_the_threshold(unet):
    n, seen, steps = _restarts(unet, ScriptedRange(THRESHOLD))
    assert n == 0 and len(seen) == len(steps)
    n, _, _ = _restarts(unet, ScriptedRange(BELOW))
    assert n == 0
    n, seen, steps = _restarts(unet, ScriptedRange(ABOVE))
    assert n == 2  # every step below K fires, until max_restarts
    top = steps[0][0]
    # each pass: the top step's repeats (no restart there), then one step below K that restarts
    assert seen[:4] == [top, top, top, top - 1] and seen[4:8] == [top, top, top, top - 1]
    assert len(seen) == 2 * 4 + len(steps)


def test_no_restart_at_the_top_step(unet):
    # far over the threshold, but only while t = K (the resampling repeats): no restart
    top = 10 - 1 - 6
    n, seen, steps = _restarts(unet, ScriptedRange(1.0, only_at=top))
    assert steps[0][0] == top and n == 0 and len(seen) == len(steps)
    n, _, _ = _restarts(unet, ScriptedRange(1.0, only_at=top - 1))  # the same one step lower: restarts
    assert n == 2
