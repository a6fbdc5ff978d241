"""core.latent: x0 guidance through a differentiable decoder (the math of guiding ComfyUI's own models)."""

import pytest
import torch

from conftest import assert_close, float32_atol
from core.diffusion.finite_watch import GuidanceError
from core.diffusion.range import RangeLoss
from core.latent import GuidanceBand, guide_x0, normalised_step, schedule_progress
from test_guided import Poison, ToTarget  # scale * mean((x - target)^2) per row; NaN


def toy_decoder(seed: int = 0) -> torch.nn.Module:
    """A fixed random latent (4 ch) -> RGB decoder with 2x upsampling, like a tiny TAESD."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(8, 3, 3, padding=1)).requires_grad_(False)


def _latents(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g) * 2, torch.randn(batch, 4, 8, 8, generator=g) * 0.1


@pytest.mark.parametrize("case", ["strength 0", "no terms", "all weights 0"])
def test_zero_guidance_returns_the_samplers_x0_itself(case):
    x0, ref = _latents()
    decoder = toy_decoder()
    terms = {"strength 0": [RangeLoss(200.0)], "no terms": [], "all weights 0": [RangeLoss(0.0), ToTarget(scale=0.0)]}[case]
    out = guide_x0(x0, decoder, [t.prepare(None) for t in terms], None, 0.0 if case == "strength 0" else 0.5, ref)
    assert out.x0 is x0  # bit for bit: the object itself, no arithmetic, no NaN from a zero norm


def test_guidance_lowers_its_own_loss_and_the_step_is_normalised():
    x0, ref = _latents()
    decoder = toy_decoder()
    terms = [RangeLoss(200.0).prepare(None), ToTarget(target=0.3, scale=1.0).prepare(None)]
    before = sum(t(decoder(x0), None) for t in terms)
    out = guide_x0(x0, decoder, terms, None, 0.05, ref)
    after = sum(t(decoder(out.x0), None) for t in terms)
    assert bool((after < before).all()), f"loss did not fall: {before.tolist()} -> {after.tolist()}"
    # the move is strength x rms(reference) per row, whatever the loss weights
    moved = (out.x0 - x0).flatten(1).pow(2).mean(1).sqrt()
    target = 0.05 * ref.flatten(1).pow(2).mean(1).sqrt()
    assert_close(moved, target, float32_atol(target, 64), rtol=1e-5, what="rms of the step")
    # scaling every weight by 1000 changes the gradient's size, not the step
    heavy = guide_x0(x0, decoder, [RangeLoss(200000.0).prepare(None), ToTarget(target=0.3, scale=1000.0).prepare(None)], None, 0.05, ref)
    assert_close(heavy.x0, out.x0, float32_atol(out.x0, 256), rtol=0, what="weight-invariant step")


def test_rows_are_independent_and_a_row_without_gradient_stays_put():
    x0, ref = _latents()
    x0[1] = 0.0  # decodes near the target of no term below: range loss 0 and zero gradient for row 1
    decoder = toy_decoder()
    out = guide_x0(x0, decoder, [RangeLoss(200.0).prepare(None)], None, 0.1, ref)
    assert out.step_size[1].item() == 0.0 and torch.equal(out.x0[1], x0[1])
    assert out.step_size[0].item() > 0 and not torch.equal(out.x0[0], x0[0])
    single = guide_x0(x0[:1].clone(), decoder, [RangeLoss(200.0).prepare(None)], None, 0.1, ref[:1])
    assert_close(single.x0[0], out.x0[0], float32_atol(out.x0[0], 64), rtol=0, what="row 0 alone")


def test_runs_under_inference_mode_like_the_sampler():
    decoder = toy_decoder()
    plain = guide_x0(*_latents()[:1], decoder, [ToTarget(target=0.3, scale=1.0).prepare(None)], None, 0.1, _latents()[1])
    with torch.inference_mode():  # how ComfyUI runs every node and its sampler
        x0, ref = _latents()
        out = guide_x0(x0, decoder, [ToTarget(target=0.3, scale=1.0).prepare(None)], None, 0.1, ref)
    # the gradient is taken outside inference mode; the result is a new tensor of the caller's mode
    assert out.x0.is_inference() and not out.x0.requires_grad
    assert torch.equal(out.x0, plain.x0)


def test_nan_names_the_term():
    x0, ref = _latents()
    with pytest.raises(GuidanceError, match="poison"):
        guide_x0(x0, toy_decoder(), [ToTarget(target=0.3, scale=1.0).prepare(None), Poison()], None, 0.1, ref)


def test_normalised_step_is_zero_for_a_zero_gradient():
    rho = normalised_step(torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3), 0.5)
    assert rho.tolist() == [0.0, 0.0]


def test_schedule_progress_and_band():
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]  # 4 steps
    assert [schedule_progress(s, sigmas) for s in sigmas] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert schedule_progress(5.0, sigmas) == pytest.approx(0.25 + 0.25 * 0.5)  # a mid-step call (2nd-order sampler)
    assert schedule_progress(20.0, sigmas) == 0.0
    band = GuidanceBand(0.3, 0.7, every_n=2)
    assert [band.active(p, k) for p, k in [(0.2, 0), (0.3, 0), (0.5, 1), (0.5, 2), (0.71, 2)]] == \
        [False, True, False, True, False]
    with pytest.raises(ValueError, match="start_percent"):
        GuidanceBand(0.8, 0.2)
    with pytest.raises(ValueError, match="every_n_steps"):
        GuidanceBand(every_n=0)
