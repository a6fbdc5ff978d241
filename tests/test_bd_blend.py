"""Background blending, the final paste, crop / stitch-back, and one full sampler step."""

from __future__ import annotations

import math

import pytest
import torch

from bd_toys import fixture, fixture_json, seeded_lpips, step_context, toy_models
from core.blended import blending as blend
from core.blended import geometry
from core.io import to_uint8
from core.blended.losses import blended_guidance
from core.blended.masks import mask_bbox
from core.diffusion.guided_loop import guidance_gradient
from core.diffusion.sampling import ddim_step, ddpm_step
from core.diffusion.schedule import DiffusionSchedule

BLEND = fixture("blend")
META = fixture_json()
BLEND_ATOL = META["blend"]["recommended_atol"]
SCHED_META = META["blend"]["schedule"]
SCHEDULE = DiffusionSchedule.create(SCHED_META["diffusion_steps"], SCHED_META["noise_schedule"],
                                    SCHED_META["timestep_respacing"])


def test_schedule_matches_the_blend_fixture():
    assert torch.equal(SCHEDULE.timestep_map, BLEND["timestep_map"])
    assert torch.allclose(SCHEDULE.alphas_cumprod, BLEND["alphas_cumprod"], rtol=0, atol=1e-12)
    assert torch.equal(SCHEDULE.timestep_map[BLEND["t_index"]], torch.tensor(META["blend"]["t_original"]))


@pytest.mark.parametrize("k", range(len(META["blend"]["t_index"])))
def test_official_blend_matches_upstream(k):
    t = int(BLEND["t_index"][k])
    noise = BLEND["background_noise"][k]
    bg = blend.background_at_level(BLEND["init_image"], SCHEDULE, t, noise)
    assert (bg - BLEND["background_stage_t"][k]).abs().max().item() <= BLEND_ATOL
    sample_in = BLEND["sample_in"][k].clone()
    out = blend.blend_background(sample_in, BLEND["init_image"], BLEND["mask"], SCHEDULE, t, noise)
    assert (out - BLEND["sample_out"][k]).abs().max().item() <= BLEND_ATOL
    assert torch.equal(sample_in, BLEND["sample_in"][k])  # input untouched
    # inside the mask the sample passes through; one background draw serves both samples
    inside = BLEND["mask"].bool().expand_as(out)
    assert torch.equal(out[inside], BLEND["sample_in"][k][inside])
    assert torch.equal(out[0][~inside[0]], out[1][~inside[1]])


def test_next_level_and_fixed_noise_use_the_level_of_x_prev():
    src, noise = BLEND["init_image"], BLEND["background_noise"][0]
    for t in BLEND["t_index"].tolist():
        for mode in ("next_level", "fixed_noise"):
            bg = blend.background_at_level(src, SCHEDULE, t, noise, mode)
            expected = src if t == 0 else blend.background_at_level(src, SCHEDULE, t - 1, noise, "official")
            assert torch.equal(bg, expected)
    with pytest.raises(ValueError, match="blend mode must be one of"):
        blend.background_at_level(src, SCHEDULE, 3, noise, "before_step")


def test_soft_mask_blends_linearly():
    t = int(BLEND["t_index"][2])
    noise = BLEND["background_noise"][2]
    sample = BLEND["sample_in"][2]
    bg = blend.background_at_level(BLEND["init_image"], SCHEDULE, t, noise)
    soft = torch.full_like(BLEND["mask"], 0.25)
    out = blend.blend_background(sample, BLEND["init_image"], soft, SCHEDULE, t, noise)
    assert torch.allclose(out, 0.25 * sample + 0.75 * bg, atol=BLEND_ATOL)


def test_background_noise_draw_is_shared_and_reproducible():
    src = BLEND["init_image"]
    a = blend.draw_background_noise(src, torch.Generator().manual_seed(3))
    b = blend.draw_background_noise(src, torch.Generator().manual_seed(3))
    assert a.shape == src.shape and torch.equal(a, b)


def test_enforce_background_keeps_source_exactly_and_to_uint8_truncates():
    src, mask = BLEND["init_image"], BLEND["mask"]
    x0 = BLEND["pred_xstart_in"][0]
    out = blend.enforce_background(x0, src, mask)
    keep = ~mask.bool().expand_as(out)
    assert torch.equal(out[keep], src.expand_as(out)[keep])
    assert torch.equal(out[~keep], x0[~keep])
    value = torch.tensor([[-1.0, 0.0, 0.999, 1.5]])
    assert to_uint8(value).tolist() == [[0, 127, 254, 255]]
    assert to_uint8(value, "round").tolist() == [[0, 128, 255, 255]]


# ------------------------------------------------------------------ crop / stitch-back

def _big_case(h: int = 90, w: int = 140, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 3:h * 4 // 7, w // 2:w * 5 // 7] = 1  # a block and a thin line left of it
    mask[..., h * 4 // 9, w * 3 // 7:w // 2] = 1
    return image, mask


def test_plan_crop_contains_the_mask_with_margin():
    image, mask = _big_case()
    top, left, bottom, right = mask_bbox(mask)
    box = geometry.plan_crop(mask, model_size=32, margin=0.25)
    assert box.size == math.ceil(max(bottom - top, right - left) * 1.5)
    t, l, b, r = box.inside()
    assert (t, l, b, r) == (box.top, box.left, box.top + box.size, box.left + box.size)
    assert mask[..., t:b, l:r].sum() == mask.sum()
    big = geometry.plan_crop(mask, model_size=256)  # wants 256 px of context: capped, padded
    assert big.size == max(image.shape[-2:]) and big.top < 0 and big.left == 0


@pytest.mark.parametrize("feather", [0, 3])
def test_stitch_back_leaves_everything_outside_the_mask_byte_for_byte(feather):
    image, mask = _big_case()
    box = geometry.plan_crop(mask, model_size=64, margin=0.2, min_size=0)
    crop, crop_mask = geometry.extract_crop(image, mask, box, 64)
    assert crop.shape == (1, 3, 64, 64) and crop_mask.shape == (1, 1, 64, 64)
    edited = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = geometry.stitch_back(image, edited, mask, box, feather=feather)
    assert out.shape == (2, 3) + tuple(image.shape[-2:])
    keep = (mask == 0).expand_as(out)
    full = image.expand_as(out)
    assert torch.equal(out[keep].view(torch.int32), full[keep].view(torch.int32))
    changed = (out != full).any(dim=1, keepdim=True)
    assert changed.any() and not bool((changed & (mask == 0)).any())
    if feather:
        weight = geometry.stitch_weight(mask, feather)
        assert weight.max() == 1 and bool(((weight > 0) & (weight < 1)).any())
        assert bool((weight[mask == 0] == 0).all())


def test_upscale_small_image_path_round_trips():
    image, mask = _big_case(20, 24)
    box = geometry.plan_crop(mask, model_size=64)
    assert box.size == 24 and box.top == -2  # the whole image, padded to a square
    crop, crop_mask = geometry.extract_crop(image, mask, box, 64)
    assert crop.shape[-1] == 64 and crop.min() >= -1 and crop.max() <= 1
    # outside the image the crop mask is 0 (keep), so padding is never edited
    assert crop_mask[..., :4, :].sum() == 0
    out = geometry.stitch_back(image, crop, mask, box)
    assert out.shape == image.shape
    assert torch.equal(out[(mask == 0).expand_as(out)], image[(mask == 0).expand_as(image)])


def test_stitch_back_errors():
    image, mask = _big_case()
    box = geometry.plan_crop(mask, model_size=32, margin=0.0, min_size=0)
    other = torch.zeros_like(mask)
    other[..., 0, 0] = 1
    with pytest.raises(ValueError, match="reaches outside the crop box"):
        geometry.stitch_back(image, torch.zeros(1, 3, 32, 32), other, box)
    with pytest.raises(ValueError, match="crop box was planned for"):
        geometry.stitch_back(image[..., :50], torch.zeros(1, 3, 32, 32), mask[..., :50], box)


# ------------------------------------------------------------------ one sampler step

class _RecordedBackgroundNoise:
    """The noise source the sampler hands ``PreparedBlend.after_step``: row 0 draws the recorded
    background noise (upstream's one ``randn_like(init_image)``); the other rows draw something
    else (its negative), which ``shared_noise`` must discard."""

    def __init__(self, noise: torch.Tensor, batch: int):
        self.noise, self.batch = noise, batch

    def randn(self, shape, kind="step", rows=None):
        assert kind == "background" and tuple(shape) == tuple(self.noise.shape[1:])
        return torch.cat([self.noise, -self.noise.expand(self.batch - 1, -1, -1, -1)])


def _blend_after_step(step: dict, x_prev: torch.Tensor) -> torch.Tensor:
    """The pack's Background Blend as the guided loop applies it after a step (official mode,
    one background draw shared by the batch, as upstream)."""
    prepared = blend.BackgroundBlend(step["mask"], shared_noise=True).prepare(step["init_image"])
    return prepared.after_step(x_prev, step["t_index"], _RecordedBackgroundNoise(step["background_noise"],
                                                                                 x_prev.shape[0]), SCHEDULE)


@pytest.fixture(scope="module")
def step_setup():
    """The pack's one differentiable pass (``guided_loop.guidance_gradient``) at the fixture step."""
    step = fixture("step")
    model, _ = toy_models()
    case = META["cond_fn"]["cases"][META["step"]["case"]]["lambdas"]
    terms = blended_guidance(None, META["prompt"], step["mask"], lambda_clip=case["clip"],
                             lambda_range=case["range"],
                             background_preservation=case["background_preservation_loss"],
                             lambda_lpips=case["lpips"], lambda_l2=case["l2"], lpips_model=seeded_lpips(),
                             l2_reduction="batch_mean")
    source = step["init_image"]
    x, t = step["x_t"], step["t_index"]
    prepared = [term.prepare(source.expand(x.shape[0], -1, -1, -1)) for term in terms]
    mv, grad, per_term = guidance_gradient(model, SCHEDULE, x, t, prepared, step_context(SCHEDULE, x, t, source))
    assert grad is not None and set(per_term) == {term.name for term in terms}
    return step, mv, grad


def test_step_ddpm_matches_upstream(step_setup):
    """Spec 5.3: p_mean_variance -> noise -> cond_fn -> mean + var * g -> + sigma * noise -> blend,
    through the pack's guidance_gradient, ddpm_step and BackgroundBlend."""
    step, mv, grad = step_setup
    atol = META["step"]["recommended_atol"]
    x, t = step["x_t"], step["t_index"]
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert (getattr(mv, key) - step[f"p_mean_variance.{key}"]).abs().max().item() <= atol
    conditioned = ddpm_step(SCHEDULE, mv, x, t, torch.zeros_like(x), grad)  # no noise: the guided mean
    assert (conditioned - step["conditioned_mean"]).abs().max().item() <= atol
    sample = ddpm_step(SCHEDULE, mv, x, t, step["p_sample.noise"], grad)
    assert (sample - step["p_sample.sample"]).abs().max().item() <= atol
    blended = _blend_after_step(step, sample)
    assert (blended - step["p_sample.blended"]).abs().max().item() <= atol
    assert (mv.pred_xstart - step["p_sample.pred_xstart"]).abs().max().item() <= atol


def test_step_ddim_matches_upstream(step_setup):
    """Spec 5.6: condition_score then DDIM with eta = 0, blend as DDPM; through the pack's
    ddim_step (which applies the score correction) and BackgroundBlend."""
    step, mv, grad = step_setup
    atol = META["step"]["recommended_atol"]
    x, t = step["x_t"], step["t_index"]
    sample, x0 = ddim_step(SCHEDULE, mv, x, t, step["p_sample.noise"], META["step"]["ddim_eta"], grad)
    assert (x0 - step["ddim.condition_score.pred_xstart"]).abs().max().item() <= atol
    assert (x0 - step["ddim.pred_xstart"]).abs().max().item() <= atol
    assert (sample - step["ddim.sample"]).abs().max().item() <= atol
    blended = _blend_after_step(step, sample)
    assert (blended - step["ddim.blended"]).abs().max().item() <= atol
