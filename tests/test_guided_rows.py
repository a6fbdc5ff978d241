"""Per-row bookkeeping of the guided loop: NaN reports name the bad row's own timestep; sample_many keeps
the per-step losses."""

from dataclasses import dataclass

import pytest
import torch

from core.diffusion.finite_watch import GuidanceError
from core.diffusion.guided_loop import GuidedSamplerOptions, guided_sample, program
from core.diffusion.batching import sample_many
from core.diffusion.schedule import DiffusionSchedule


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


@dataclass(frozen=True)
class PerRow:
    """A loss whose value tells the rows apart (the source's mean, per row)."""
    name: str = "per_row"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        return ctx.source.flatten(1).mean(1) + 0 * x0.flatten(1).sum(1)


def test_sample_many_keeps_the_losses_in_row_order(unet):
    sched = DiffusionSchedule.create(1000, "linear", "10")
    opts = GuidedSamplerOptions(skip_timesteps=7)
    sources = torch.stack([torch.full((3, 32, 32), v) for v in (-0.5, 0.25)])
    expected = torch.tensor([-0.5, -0.5, 0.25, 0.25])  # rows are image-major: 2 samples of image 0, then 1
    steps = len(program(sched, opts))
    for chunk in (0, 1, 3):
        res = sample_many(unet, sched, sources, [PerRow()], samples_per_image=2, seed=0, chunk_size=chunk, options=opts)
        assert list(res.losses) == ["per_row"] and len(res.losses["per_row"]) == steps
        for value in res.losses["per_row"]:
            assert torch.allclose(value, expected), (chunk, value)


def test_concat_losses_pads_shorter_chunks_with_nan():
    from core.diffusion.batching import concat_losses
    a = (2, {"range": [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])]})
    b = (1, {"range": [torch.tensor([7.0]), torch.tensor([8.0])]})  # one step fewer
    out = concat_losses([a, b])["range"]
    assert [v.tolist()[:2] for v in out] == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert [v[2].item() for v in out[:2]] == [7.0, 8.0] and torch.isnan(out[2][2])
