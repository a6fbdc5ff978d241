"""The single-pass guided sampler: gradient through the UNet, resampling, restarts, NaN handling, batching."""

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_close, fixture_path, float32_atol
from core.diffusion.guidance import StepContext
from core.diffusion.finite_watch import GuidanceError
from core.diffusion.guided_loop import GuidedSamplerOptions, guidance_gradient, guided_sample, program, renoise_one_step
from core.diffusion.schedule import DiffusionSchedule

GROUP = "guided_diffusion"


@dataclass(frozen=True)
class Linear:
    """loss = sum(weight * x0) per row: the official grad_pred_xstart fixture's loss."""
    weight: torch.Tensor
    name: str = "linear"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        return (self.weight * x0).flatten(1).sum(1)


@dataclass(frozen=True)
class ToTarget:
    target: float = 0.5
    scale: float = 50.0
    name: str = "to_target"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        return self.scale * ((x0 - self.target) ** 2).flatten(1).mean(1)


@dataclass(frozen=True)
class Poison:
    name: str = "poison"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        return x0.flatten(1).sum(1) * float("nan")


def test_single_pass_gradient_matches_official(ref, unet):
    t = load_file(fixture_path(GROUP, "diffusion_reference.safetensors"))
    entry = ref["grad_pred_xstart"]
    sched = DiffusionSchedule.create(1000, "linear", entry["spacing"])
    x, ti = t["grad_pred_xstart.x_t"], t["grad_pred_xstart.t"]
    ctx = StepContext(t_index=ti, t=sched.model_timesteps(ti), x_t=x, schedule=sched, source=x)
    mv, grad, losses = guidance_gradient(unet, sched, x, ti, [Linear(t["grad_pred_xstart.weight"])], ctx,
                                         clip_denoised=entry["clip_denoised"])
    tol = ref["float64_shadow_vs_float32_reference"]["outputs"]["grad_pred_xstart.grad_x_t"]["recommended_atol_at_rtol_1e-5"]
    assert_close(-grad, t["grad_pred_xstart.grad_x_t"], tol, what="grad")  # cond_fn returns -d loss / d x_t
    # the gradient fixture's x_t and t are p_mean_variance's, so the x0 it was taken through is recorded too
    assert torch.equal(x, t["p_mean_variance.x_t"]) and torch.equal(ti, t["p_mean_variance.t"])
    x0_tol = ref["float64_shadow_vs_float32_reference"]["outputs"]["p_mean_variance.noclip.pred_xstart"]
    assert_close(mv.pred_xstart, t["p_mean_variance.noclip.pred_xstart"], x0_tol["recommended_atol_at_rtol_1e-5"],
                 what="pred_xstart")
    assert not mv.mean.requires_grad


def test_program_resampling_and_renoise_beta():
    sched = DiffusionSchedule.create(1000, "linear", "20")
    steps = program(sched, GuidedSamplerOptions(skip_timesteps=12, resample_steps=10))
    assert [s for s, _ in steps] == [7] * 10 + list(range(6, -1, -1))
    assert [r for _, r in steps] == [True] * 9 + [False] * 8
    x, z = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    ti = torch.tensor([7])
    up = renoise_one_step(sched, x, ti, z, GuidedSamplerOptions())
    assert torch.allclose(up, torch.sqrt(1 - sched.betas[6]).float() * x)  # upstream's beta_{K-1}
    exact = renoise_one_step(sched, x, ti, z, GuidedSamplerOptions(resample_beta="exact"))
    assert torch.allclose(exact, torch.sqrt(1 - sched.betas[7]).float() * x)


def test_guidance_moves_the_result_and_batch_equals_serial(unet):
    sched = DiffusionSchedule.create(1000, "linear", "10")
    source = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    opts = GuidedSamplerOptions(skip_timesteps=4, resample_steps=2)
    guided = guided_sample(unet, sched, source, [ToTarget()], seed=5, options=opts)
    plain = guided_sample(unet, sched, source, [], seed=5, options=opts)
    assert guided.images.shape == source.shape
    assert ((guided.images - 0.5) ** 2).mean() < ((plain.images - 0.5) ** 2).mean()
    again = guided_sample(unet, sched, source, [ToTarget()], seed=5, options=opts)
    assert torch.equal(again.images, guided.images)
    row1 = guided_sample(unet, sched, source[1:], [ToTarget()], seed=5, first_row=1, options=opts)
    # A batch of 2 vs a batch of 1: the UNet's convs and matmuls reassociate with the batch size, and the
    # guided loop carries that round-off on; relative to the row's scale (|x| up to ~21 with the random
    # UNet): measured 18 float32 eps x max|ref| (4.4e-5), bound 128 eps (3.1e-4). Row 1 drawn from
    # another row's stream instead moves it by ~1.
    assert_close(row1.images[0], guided.images[1], float32_atol(guided.images[1], 128), rtol=0,
                 what="batch row 1 vs serial first_row=1")


def test_ddim_and_progress_callback(unet):
    sched = DiffusionSchedule.create(1000, "linear", "10")
    seen = []
    res = guided_sample(unet, sched, torch.zeros(1, 3, 32, 32), [ToTarget()], seed=1,
                        options=GuidedSamplerOptions(sampler="ddim", skip_timesteps=5, resample_steps=3),
                        callback=lambda d: seen.append((d["i"], d["total"], d["t_index"])))
    assert seen == [(0, 7, 4), (1, 7, 4), (2, 7, 4), (3, 7, 3), (4, 7, 2), (5, 7, 1), (6, 7, 0)]
    assert torch.isfinite(res.images).all()


def test_nan_guidance_names_the_term_and_step(unet):
    sched = DiffusionSchedule.create(1000, "linear", "10")
    with pytest.raises(GuidanceError, match=r"poison.*step 0"):
        guided_sample(unet, sched, torch.zeros(1, 3, 32, 32), [Poison()], options=GuidedSamplerOptions(skip_timesteps=5))


@dataclass(frozen=True)
class PoisonFrom:
    """Finite until guided step ``step``, NaN for row ``row`` from then on."""
    step: int
    row: int = 1
    name: str = "late_poison"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        loss = x0.flatten(1).square().mean(1)
        if ctx.step >= self.step:
            loss = loss * torch.tensor([float("nan") if b == self.row else 1.0 for b in range(len(loss))])
        return loss


def test_late_nan_is_reported_with_its_step_within_the_check_interval(unet):
    from core.diffusion.finite_watch import FiniteWatch
    sched = DiffusionSchedule.create(1000, "linear", "30")
    options, seen = GuidedSamplerOptions(skip_timesteps=5), []
    t5 = program(sched, options)[5][0]
    with pytest.raises(GuidanceError, match=rf"late_poison became NaN/inf at guided step 5 \(respaced t={t5}\)"):
        guided_sample(unet, sched, torch.zeros(2, 3, 32, 32), [PoisonFrom(5)], seed=0, options=options,
                      callback=lambda d: seen.append(d["i"]))
    assert 5 <= max(seen) < 5 + FiniteWatch.every  # stopped at the next read-back, not at the end


def test_schedule_arrays_are_copied_to_a_device_once():
    import gc

    from core.diffusion.schedule import _DEVICE_COPIES, on_device
    sched = DiffusionSchedule.create(1000, "linear", "10")
    meta = torch.device("meta")
    first = on_device(sched.betas, meta)
    assert first.device == meta and first.shape == sched.betas.shape
    assert on_device(sched.betas, meta) is first and on_device(sched.betas, sched.betas.device) is sched.betas
    key = id(sched.betas)
    del sched, first
    gc.collect()
    assert key not in _DEVICE_COPIES  # the copies go with their schedule


@dataclass(frozen=True)
class AlwaysOutOfRange:
    name: str = "range"

    def prepare(self, source):
        return self

    def __call__(self, x0, ctx):
        return torch.full((x0.shape[0],), 1.0) + 0 * x0.flatten(1).sum(1)


def test_range_restart_is_per_row_and_bounded(unet):
    sched = DiffusionSchedule.create(1000, "linear", "10")
    opts = GuidedSamplerOptions(skip_timesteps=6, range_restart_threshold=0.01, max_restarts=2)
    seen = []
    res = guided_sample(unet, sched, torch.zeros(2, 3, 32, 32), [AlwaysOutOfRange()], options=opts,
                        callback=lambda d: seen.append((d["i"], d["total"])))
    assert res.restarts == [2, 2]
    assert [i for i, _ in seen] == list(range(len(seen)))
    assert seen[-1][0] + 1 == seen[-1][1]  # the bar ends exactly full despite the restarts
    assert all(b >= a for (_, a), (_, b) in zip(seen, seen[1:]))
    assert torch.isfinite(res.images).all()


def test_single_forward_equals_upstream_two_forward_step(ref, tensors, unet):
    """Upstream: a no-grad forward for the step plus a grad forward inside cond_fn. One pass gives both."""
    from core.diffusion.sampling import ddpm_step, model_output
    from core.diffusion.schedule import p_mean_variance
    entry = ref["p_sample_cond"]
    sched = DiffusionSchedule.create(1000, "linear", entry["spacing"])
    x, ti, z = tensors["p_sample_cond.x_t"], tensors["p_sample_cond.t"], tensors["p_sample_cond.noise"]
    term = ToTarget()
    with torch.no_grad():  # upstream pass 1
        mv_plain = p_mean_variance(sched, model_output(unet, x, ti, sched), x, ti, clip_denoised=False)
    x_grad = x.clone().requires_grad_(True)  # upstream pass 2 (cond_fn)
    mv_grad = p_mean_variance(sched, model_output(unet, x_grad, ti, sched), x_grad, ti, clip_denoised=False)
    ctx = StepContext(t_index=ti, t=sched.model_timesteps(ti), x_t=x_grad, schedule=sched, source=x)
    (g_two,) = torch.autograd.grad(-term(mv_grad.pred_xstart, ctx).sum(), x_grad)
    two = ddpm_step(sched, mv_plain, x, ti, z, g_two)
    ctx1 = StepContext(t_index=ti, t=sched.model_timesteps(ti), x_t=x, schedule=sched, source=x)
    mv_one, g_one, _ = guidance_gradient(unet, sched, x, ti, [term], ctx1)
    one = ddpm_step(sched, mv_one, x, ti, z, g_one)
    assert torch.equal(g_one, g_two)
    assert torch.equal(one, two)


def test_terms_compose_by_summing(ref, tensors, unet):
    sched = DiffusionSchedule.create(1000, "linear", ref["grad_pred_xstart"]["spacing"])
    x, ti = tensors["grad_pred_xstart.x_t"], tensors["grad_pred_xstart.t"]
    a, b = Linear(tensors["grad_pred_xstart.weight"]), ToTarget(target=-0.2, scale=500.0)

    def grad_of(terms):
        ctx = StepContext(t_index=ti, t=sched.model_timesteps(ti), x_t=x, schedule=sched, source=x)
        return guidance_gradient(unet, sched, x, ti, terms, ctx)[1]

    grad_a, grad_b = grad_of([a]), grad_of([b])
    both, summed = grad_of([a, b]), grad_a + grad_b
    # Both terms' gradients are of the same size (~17), so neither can hide under the other's round-off.
    # One backward of the sum vs two backwards: the same float32 sums reassociated, a few epsilons at
    # the gradient's scale on any CPU (measured up to 2.1e-5, ~10 eps x the scale, on AVX-512); a term dropped or
    # mis-weighted by 0.1% (1.7e-2) is a hundred times outside the bound.
    assert_close(both, summed, float32_atol(summed, 64), rtol=0, what="sum of gradients")
