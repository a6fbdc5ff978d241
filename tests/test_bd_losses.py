"""Blended Diffusion losses, cutouts and the guidance gradient against the official fixtures."""

from __future__ import annotations

import math

import pytest
import torch

from bd_toys import (fixture, fixture_json, prefixed, readme_relative_total_tolerance, readme_tolerances,
                     seeded_lpips, step_context, toy_models)
from core.blended import losses as bl
from core.blended.cutouts import AugmentParams, AugmentSettings, make_cutouts, sample_augment_params
from core.diffusion.guidance import StepContext, noise_mixed_input
from core.diffusion.guided_loop import guidance_gradient
from core.diffusion.schedule import DiffusionSchedule, p_mean_variance, upstream_timestep_index
from core.diffusion.range import range_loss

META = fixture_json()
LOSSES = fixture("losses")
DIST_ATOL, _ = readme_tolerances()["losses: distances, range, MSE / LPIPS"]
LPIPS_ATOL = META["losses"]["lpips_recommended_atol"]
SCHED = META["blend"]["schedule"]
SCHEDULE = DiffusionSchedule.create(SCHED["diffusion_steps"], SCHED["noise_schedule"], SCHED["timestep_respacing"])
N_CUTS = META["augment"]["augmentations_number"]


@pytest.fixture(scope="module")
def lpips_model():
    return seeded_lpips()


@pytest.fixture(scope="module")
def toys():
    return toy_models()


# ------------------------------------------------------------------ losses.safetensors

class _RecordedEmbeddingsClip:
    """A CLIP stand-in whose image encoder returns the fixture's 16 cutout embeddings, so the
    pack's masked_clip_distances aggregates exactly the distances upstream aggregated."""

    def __init__(self, embeds: torch.Tensor):
        self.embeds = embeds
        self.image_size = int(META["toy_models"]["stub_clip_input_resolution"])
        self.mean, self.std = META["toy_models"]["clip_normalize_mean"], META["toy_models"]["clip_normalize_std"]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.shape == (self.embeds.shape[0], 3, self.image_size, self.image_size)
        return self.embeds


def test_distances():
    image, text = LOSSES["clip_image_embeds"], LOSSES["clip_text_embed"]
    assert (bl.spherical_distance(image, text) - LOSSES["d_clip_spherical"]).abs().max().item() <= DIST_ATOL
    assert (bl.cosine_distance(image, text) - LOSSES["d_clip_cosine"]).abs().max().item() <= DIST_ATOL
    # upstream batch aggregation (sum over samples of the mean over the cutouts) through the pack's
    # masked_clip_distances, whose loss.sum() is upstream's batch loss
    batch = META["batch_size"]
    x_in = torch.zeros(batch, 3, 32, 32)
    per_sample, _, _ = bl.masked_clip_distances(x_in, torch.ones(1, 1, 32, 32), _RecordedEmbeddingsClip(image), text,
                                                AugmentSettings(n_cuts=image.shape[0] // batch),
                                                generator=torch.Generator().manual_seed(0))
    assert per_sample.shape == (batch,)
    assert per_sample.sum().item() == pytest.approx(META["losses"]["clip_aggregated_for_batch_of_2"], abs=DIST_ATOL)


def test_range_and_l2():
    per_sample = range_loss(LOSSES["range_input"])
    assert (per_sample - LOSSES["range_loss_per_sample"]).abs().max().item() <= DIST_ATOL
    assert per_sample.sum().item() == pytest.approx(META["losses"]["range_loss_sum"], abs=DIST_ATOL)
    # blended_guidance's range term (vit_losses.RangeLoss with upstream's weight)
    (term,) = bl.blended_guidance(None, META["prompt"], LOSSES["bg_mask"], lambda_clip=0)
    weighted = term.prepare(LOSSES["range_input"])(LOSSES["range_input"], None).sum().item()  # ignores ctx
    assert weighted == pytest.approx(META["losses"]["range_loss_sum_times_lambda"], rel=DIST_ATOL)
    background = bl.masked_background(LOSSES["bg_x_in"], LOSSES["bg_mask"])
    assert (background - LOSSES["bg_masked_background"]).abs().max().item() <= DIST_ATOL
    mse = bl.background_l2(background, LOSSES["bg_init_image"]).mean()
    assert abs(mse.item() - LOSSES["mse"].item()) <= DIST_ATOL
    assert mse.item() == pytest.approx(META["losses"]["mse_mean"], abs=DIST_ATOL)


def _seeded_vgg16_file(folder) -> str:
    """torchvision's VGG16 trunk drawn right after the fixture's LPIPS seed (what
    ``lpips.LPIPS(pnet_rand=True)`` draws after it), saved as a torchvision ``features.*`` state
    dict: a stand-in for ``vgg16-397923af.pth``. The global RNG state is restored."""
    import torchvision
    from safetensors.torch import save_file

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(META["losses"]["lpips_construction"]["seed"]))
        features = torchvision.models.vgg16(weights=None).features.state_dict()
    finally:
        torch.random.set_rng_state(state)
    path = str(folder / "vgg16.safetensors")
    save_file({f"features.{k}": v.contiguous() for k, v in features.items()}, path)
    return path


@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13:UserWarning")  # lpips' torchvision call
@pytest.mark.parametrize("construction", ["vgg16_file", "random_trunk"])
def test_load_lpips_reproduces_the_fixture_lpips(construction, lpips_model, tmp_path):
    """The pack's core.encoders.lpips.load_lpips builds the fixture's LPIPS: from a VGG16 file
    (torchvision's trunk drawn after the fixture's seed; the product path: key mapping into lpips'
    slices, linear heads, eval) and with ``random_trunk=True`` after the seed (``seeded_lpips``,
    which the cond_fn / step / loop tests use). Fingerprint, then the values on the fixture's inputs."""
    from core.encoders.lpips import load_lpips

    model = load_lpips(_seeded_vgg16_file(tmp_path)) if construction == "vgg16_file" else lpips_model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    state = model.state_dict()
    for name, fp in META["losses"]["lpips_construction"]["fingerprint"].items():
        tensor = state[name].double()
        assert list(tensor.shape) == fp["shape"]
        assert tensor.sum().item() == pytest.approx(fp["sum"], rel=1e-6, abs=1e-6)
        assert tensor.abs().sum().item() == pytest.approx(fp["abs_sum"], rel=1e-6)
    with torch.no_grad():
        values = model(LOSSES["bg_masked_background"], LOSSES["bg_init_image"]).reshape(-1)
    assert (values - LOSSES["lpips_per_sample"]).abs().max().item() <= LPIPS_ATOL
    assert values.sum().item() == pytest.approx(META["losses"]["lpips_sum"], abs=LPIPS_ATOL * 2)


# ------------------------------------------------------------------ augment.safetensors

AUG = fixture("augment")
AUG_ATOL = META["augment"]["recommended_atol_given_params"]
CUT = META["augment"]["output_size"]


def test_cutouts_replay_recorded_kornia_params():
    params = AugmentParams.from_kornia(prefixed(AUG, "affine"), prefixed(AUG, "perspective"))
    assert params.affine_applied.tolist() == META["augment"]["affine_applied"]
    assert params.perspective_applied.tolist() == META["augment"]["perspective_applied"]
    out, _ = make_cutouts(AUG["input"], CUT, AugmentSettings(n_cuts=N_CUTS), params=params)
    assert out.shape == AUG["output"].shape
    assert (out - AUG["output"]).abs().max().item() <= AUG_ATOL
    batch = AUG["input"].shape[0]
    pooled = torch.nn.functional.adaptive_avg_pool2d(AUG["input"], CUT)
    assert torch.equal(out[:batch], pooled) == META["augment"]["non_augmented_rows_equal_adaptive_avg_pool"]


def test_cutouts_from_a_seeded_generator_reproduce_kornia_090():
    """Our sampler draws in kornia 0.9.0's order: the same seed gives the same warps."""
    g = torch.Generator().manual_seed(META["augment"]["seed"])
    out, params = make_cutouts(AUG["input"], CUT, AugmentSettings(n_cuts=N_CUTS), generator=g)
    recorded = AugmentParams.from_kornia(prefixed(AUG, "affine"), prefixed(AUG, "perspective"))
    for key in ("affine_applied", "angle", "translations", "center", "scale", "perspective_applied",
                "start_points", "end_points"):
        assert torch.equal(getattr(params, key), getattr(recorded, key)), key
    assert (out - AUG["output"]).abs().max().item() <= AUG_ATOL


def test_augmentation_distribution_at_224():
    """Vertical-only translation, inward perspective, both gates at p (spec 5.5 quirk)."""
    dist = META["augment"]["parameter_distribution_at_224"]
    size, n = dist["size"], dist["samples"]
    p = sample_augment_params(n, size, AugmentSettings(), torch.Generator().manual_seed(0))
    settings = AugmentSettings()
    shift_bound = settings.translate[1] * size
    corner_bound = settings.distortion_scale * size / 2
    # the extreme of ~n/2 uniform draws lies within a relative 50/n of the bound, but with
    # probability < exp(-25)
    slack = 50 / n
    assert p.translations[:, 0].abs().max().item() == dist["translate_x_px_max"] == dist["translate_x_px_min"]
    for observed in (p.translations[:, 1].abs().max().item(), -dist["translate_y_px_min"], dist["translate_y_px_max"]):
        assert shift_bound * (1 - slack) < observed <= shift_bound
    for observed in (p.angle.abs().max().item(), -dist["angle_deg_min"], dist["angle_deg_max"]):
        assert settings.degrees * (1 - slack) < observed <= settings.degrees
    assert p.scale.unique().tolist() == dist["scale_unique"]
    assert p.center[0].tolist() == dist["center"] and p.start_points[0].tolist() == dist["perspective_start_points"]
    offsets = (p.end_points - p.start_points).abs()
    for observed in (offsets.max().item(), dist["perspective_abs_offset_x_max"], dist["perspective_abs_offset_y_max"]):
        assert corner_bound * (1 - slack) < observed <= corner_bound + AUG_ATOL
    inward = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    assert bool(((p.end_points - p.start_points) * inward >= 0).all()) == dist["perspective_inward_only"]
    four_sigma = 4 * math.sqrt(0.7 * 0.3 / n)
    assert p.affine_applied.float().mean().item() == pytest.approx(dist["affine_applied_fraction"], abs=2 * four_sigma)
    assert p.perspective_applied.float().mean().item() == pytest.approx(dist["perspective_applied_fraction"],
                                                                        abs=2 * four_sigma)


def test_fixed_translate_option_shifts_both_axes():
    p = sample_augment_params(64, 28, AugmentSettings(translate=(0.1, 0.1)), torch.Generator().manual_seed(1))
    assert p.translations[:, 0].abs().max() > 0
    with pytest.raises(ValueError, match="n_cuts must be >= 1"):
        AugmentSettings(n_cuts=0)


# ------------------------------------------------------------------ cond_fn.safetensors

COND = fixture("cond_fn")
CASES = META["cond_fn"]["cases"]


def _terms(case: dict, clip, lpips_model, l2_reduction="batch_mean"):
    lam = case["lambdas"]
    return bl.blended_guidance(clip, META["prompt"], COND["mask"], lambda_clip=lam["clip"],
                               lambda_range=lam["range"], background_preservation=lam["background_preservation_loss"],
                               lambda_lpips=lam["lpips"], lambda_l2=lam["l2"], lpips_model=lpips_model,
                               n_cuts=N_CUTS, seed=META["cond_fn"]["seed_before_call"], l2_reduction=l2_reduction)


def test_upstream_timestep_index():
    for case in CASES:
        t = COND[f"{case}.t_received"]
        assert torch.equal(t, SCHEDULE.model_timesteps(COND["t_index"]).float())
        assert torch.equal(upstream_timestep_index(t, SCHEDULE.num_timesteps), COND[f"{case}.t_unscaled"])
    # exact for the default respacing at every step
    all_steps = torch.arange(SCHEDULE.num_timesteps)
    assert torch.equal(upstream_timestep_index(SCHEDULE.model_timesteps(all_steps).float(), SCHEDULE.num_timesteps),
                       all_steps)


@pytest.mark.parametrize("case", list(CASES))
def test_cond_fn_gradient(case, toys, lpips_model):
    model, clip = toys
    info = CASES[case]
    source = COND["init_image"]
    x_t = COND["x_t"]
    terms = _terms(info, clip, lpips_model)
    prepared = [term.prepare(source.expand(x_t.shape[0], -1, -1, -1)) for term in terms]
    ctx = step_context(SCHEDULE, x_t, COND["t_index"], source)
    _, grad, per_term = guidance_gradient(model, SCHEDULE, x_t, COND["t_index"], prepared, ctx)
    assert list(per_term) == [term.name for term in terms]
    assert (grad - COND[f"{case}.gradient"]).abs().max().item() <= info["recommended_gradient_atol"]
    # upstream's total: the batch sums of the weighted per-sample terms guidance_gradient reports
    total = sum(value.sum() for value in per_term.values())
    assert total.item() == pytest.approx(info["total_loss"], rel=readme_relative_total_tolerance())
    if info["uses_random_augmentations"]:
        recorded = AugmentParams.from_kornia(prefixed(COND, f"{case}.affine_params"),
                                             prefixed(COND, f"{case}.perspective_params"))
        used = ctx.state.cutout_params["masked_clip"]
        assert torch.equal(used.end_points, recorded.end_points) and torch.equal(used.angle, recorded.angle)


def test_cond_fn_pieces_x_in_cutouts_and_clip_loss(toys):
    """x_in, the augmented batch and the unweighted CLIP loss, with the recorded warps replayed."""
    model, clip = toys
    info = CASES["only_clip"]
    x_t, t = COND["x_t"], COND["t_index"]
    with torch.no_grad():
        x0 = model(x_t, SCHEDULE.model_timesteps(t).float())
        x0 = p_mean_variance(SCHEDULE, x0, x_t, t).pred_xstart
        x_in = noise_mixed_input(x0, StepContext(t_index=t, t=SCHEDULE.model_timesteps(t), x_t=x_t, schedule=SCHEDULE,
                                                 source=x_t))
        assert (x_in - COND["only_clip.x_in"]).abs().max().item() <= info["recommended_gradient_atol"]
        params = AugmentParams.from_kornia(prefixed(COND, "only_clip.affine_params"),
                                           prefixed(COND, "only_clip.perspective_params"))
        text = clip.encode_text([META["prompt"]])
        loss, cuts, _ = bl.masked_clip_distances(COND["only_clip.x_in"], COND["mask"], clip, text,
                                                 AugmentSettings(n_cuts=N_CUTS), params=params)
    assert (cuts - COND["only_clip.augmented_batch"]).abs().max().item() <= AUG_ATOL
    assert loss.sum().item() == pytest.approx(info["clip_loss_unweighted"], rel=readme_relative_total_tolerance())


def test_per_sample_default_equals_serial_runs(toys, lpips_model):
    """Default L2 reduction: a batch of 2 gives the same per-sample losses and gradients as
    two runs of 1; the faithful batch mean is exactly 1/B of it."""
    model, clip = toys
    info = CASES["no_clip_bg"]
    source, x_t, t = COND["init_image"], COND["x_t"], COND["t_index"]
    atol = info["recommended_gradient_atol"]
    def gradient(prepared, x, t_index):
        return guidance_gradient(model, SCHEDULE, x, t_index, prepared, step_context(SCHEDULE, x, t_index, source))[1]

    per_sample = [term.prepare(source.expand(2, -1, -1, -1)) for term in _terms(info, clip, lpips_model, "per_sample")]
    grad = gradient(per_sample, x_t, t)
    for b in range(x_t.shape[0]):
        single = [term.prepare(source) for term in _terms(info, clip, lpips_model, "per_sample")]
        grad_b = gradient(single, x_t[b:b + 1], t[b:b + 1])
        assert (grad_b - grad[b:b + 1]).abs().max().item() <= atol
    only_l2 = CASES["only_l2"]
    faithful = [term.prepare(source.expand(2, -1, -1, -1)) for term in _terms(only_l2, clip, lpips_model)]
    cleaner = [term.prepare(source.expand(2, -1, -1, -1)) for term in _terms(only_l2, clip, lpips_model, "per_sample")]
    g_faithful = gradient(faithful, x_t, t)
    g_cleaner = gradient(cleaner, x_t, t)
    assert (g_cleaner / x_t.shape[0] - g_faithful).abs().max().item() <= only_l2["recommended_gradient_atol"]


def test_term_contracts_and_errors(toys):
    model, clip = toys
    mask = COND["mask"]
    with pytest.raises(ValueError, match="no lpips_model"):
        bl.BackgroundPreservationLoss(mask)
    with pytest.raises(ValueError, match="l2_reduction must be"):
        bl.BackgroundPreservationLoss(mask, lambda_lpips=0, l2_reduction="sum")
    calls_before = len(clip.text_calls)
    prepared = bl.MaskedCLIPLoss(clip, META["prompt"], mask, n_cuts=N_CUTS, seed=0).prepare(COND["init_image"])
    assert len(clip.text_calls) == calls_before + 1  # the prompt is encoded once, at prepare
    ctx = StepContext(t_index=COND["t_index"], t=SCHEDULE.model_timesteps(COND["t_index"]), x_t=COND["x_t"],
                      schedule=SCHEDULE, source=COND["init_image"].expand(2, -1, -1, -1))
    out = prepared(COND["x_t"], ctx)
    assert out.shape == (2,) and len(clip.text_calls) == calls_before + 1
    empty = bl.MaskedCLIPLoss(clip, "", mask).prepare(COND["init_image"])
    assert torch.equal(empty(COND["x_t"], ctx), torch.zeros(2))
    defaults = META["preprocess"]["argument_defaults"]
    terms = bl.blended_guidance(clip, META["prompt"], mask)
    assert [term.name for term in terms] == ["masked_clip", "range"]  # background loss off by default
    assert terms[0].lambda_clip == defaults["clip_guidance_lambda"] and terms[0].n_cuts == defaults["aug_num"]
    assert terms[1].weight == defaults["range_lambda"]
    bg = bl.blended_guidance(clip, META["prompt"], mask, background_preservation=True,
                             lpips_model=torch.nn.Identity())[-1]
    assert (bg.lambda_lpips, bg.lambda_l2) == (defaults["lpips_sim_lambda"], defaults["l2_sim_lambda"])
