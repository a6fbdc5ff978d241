"""core.latent.LatentGuide: runs, sampler-neutral step context, noise mixing in latent space, inputs."""

import pytest
import torch

from conftest import assert_close, float32_atol
from core.diffuseit.dino_losses import SemanticDivergence, divergence_gate_level
from core.diffusion.finite_watch import GuidanceError
from core.diffusion.guidance import StepContext, noise_mixed_input
from core.diffusion.schedule import DiffusionSchedule
from core.latent import GuidanceBand
from core.latent.model_guidance import DenoiserCall, LatentGuidanceError, LatentGuide
from test_x0_guidance import toy_decoder

SIGMAS = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.0])


class Recorder:
    """A term that records what it saw; loss = mean((mixed or x0) - 0.2)^2 per row."""

    name = "recorder"

    def __init__(self, mix: bool = True):
        self.mix, self.prepared_with, self.seen = mix, [], []

    def prepare(self, source):
        self.prepared_with.append(source.clone())
        return self

    def __call__(self, x0, ctx):
        x = noise_mixed_input(x0, ctx) if self.mix else x0
        self.seen.append({"x0": x0.detach().clone(), "x": x.detach().clone(), "progress": ctx.progress,
                          "noise_level": ctx.noise_level.clone(), "step": ctx.step, "mask": ctx.blend_mask,
                          "source": ctx.source})
        return (x - 0.2).pow(2).flatten(1).mean(1) * 10


def call(x0, sigma, sigmas=SIGMAS, x_t=None, flow=False):
    s = torch.full((x0.shape[0],), float(sigma))
    a, b = (1 - s, s) if flow else (torch.ones_like(s), s)
    x_t = x_t if x_t is not None else x0 + sigma * torch.ones_like(x0)
    return DenoiserCall(x0=x0, x_t=x_t, sigma=s, sigmas=sigmas, reference=x0, signal_scale=a, noise_scale=b)


def latents(batch=2, seed=0):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_noise_mixing_happens_in_latent_space_with_the_vp_state():
    decoder = toy_decoder()
    term = Recorder()
    guide = LatentGuide([term], decoder, torch.zeros(1, 3, 16, 16), strength=0.5)
    x0 = latents()
    x_t = latents(seed=1) * 3
    sigma = float(SIGMAS[1])
    guide(call(x0, sigma, x_t=x_t))
    f = sigma / (1 + sigma ** 2) ** 0.5
    expected = decoder(x0 * f + x_t / (1 + sigma ** 2) ** 0.5 * (1 - f))
    seen = term.seen[-1]
    assert_close(seen["x"], expected, float32_atol(expected, 64), rtol=0, what="decoded latent mixture")
    assert_close(seen["noise_level"], torch.full((2,), f), 1e-6, rtol=0, what="noise level")
    assert seen["progress"] == pytest.approx(0.2)


def test_flow_models_use_their_own_variance_preserving_state():
    decoder = toy_decoder()
    term = Recorder()
    LatentGuide([term], decoder, torch.zeros(1, 3, 16, 16), strength=0.5)(call(latents(), 0.6, flow=True))
    norm = (0.4 ** 2 + 0.6 ** 2) ** 0.5
    assert_close(term.seen[-1]["noise_level"], torch.full((2,), 0.6 / norm), 1e-6, rtol=0, what="flow noise level")


def test_terms_are_prepared_once_per_run_at_the_decoded_size_and_a_new_schedule_starts_a_new_run():
    term = Recorder(mix=False)
    source = torch.rand(1, 3, 40, 24) * 2 - 1
    guide = LatentGuide([term], toy_decoder(), source, mask=torch.ones(1, 1, 5, 7), strength=0.5)
    x0 = latents()
    for s in SIGMAS[:-1]:
        guide(call(x0, s))
    assert len(term.prepared_with) == 1 and term.prepared_with[0].shape == (2, 3, 16, 16)
    assert term.seen[-1]["mask"].shape == (2, 1, 16, 16) and [s["step"] for s in term.seen] == [0, 1, 2, 3, 4]
    guide(call(x0, SIGMAS[0], sigmas=SIGMAS.clone()))  # a new KSampler run publishes a new schedule object
    assert len(term.prepared_with) == 2 and term.seen[-1]["step"] == 0


def test_batches_that_match_neither_one_nor_the_latents_are_refused():
    guide = LatentGuide([Recorder()], toy_decoder(), torch.zeros(3, 3, 16, 16), strength=0.5)
    with pytest.raises(LatentGuidanceError, match="the source image has 3 images but the latent batch has 2"):
        guide(call(latents(), 6.0))
    with pytest.raises(LatentGuidanceError, match="compare with a source image"):
        LatentGuide([Recorder()], toy_decoder(), None)


def test_semantic_divergence_gates_on_the_noise_level_without_a_schedule():
    level = divergence_gate_level(50, 100)
    schedule = DiffusionSchedule.create(1000, "linear", "100")
    assert level == pytest.approx(float(schedule.sqrt_one_minus_alphas_cumprod[50]))
    assert divergence_gate_level(100, 200) == pytest.approx(float(
        DiffusionSchedule.create(1000, "linear", "200").sqrt_one_minus_alphas_cumprod[100]))

    class CLS:
        def __init__(self, cls):
            self.cls = cls

    class Extractor:
        def __call__(self, x):
            return CLS(x.flatten(1)[:, :8])

    torch.manual_seed(0)
    term = SemanticDivergence(Extractor(), 100.0, diff_iter=50, noise_mix=False)
    from core.diffuseit import dino_losses
    prepared = term.prepare(torch.rand(2, 3, 8, 8))
    original = dino_losses._features
    dino_losses._features = lambda extractor, x0, ctx, mix: (x0, extractor(x0))
    try:
        x0 = torch.rand(2, 3, 8, 8)
        above = StepContext(None, None, x_t=x0, schedule=None, source=x0, noise_level=torch.tensor([level + 0.01] * 2))
        below = StepContext(None, None, x_t=x0, schedule=None, source=x0, noise_level=torch.tensor([level - 0.01] * 2))
        assert bool((prepared(x0, above) != 0).all())
        assert bool((prepared(x0 + 0.1, below) == 0).all())
    finally:
        dino_losses._features = original


def test_band_outside_returns_x0_itself_and_nan_names_the_step():
    guide = LatentGuide([Recorder()], toy_decoder(), torch.zeros(1, 3, 16, 16), strength=0.5,
                        band=GuidanceBand(0.5, 1.0))
    x0 = latents()
    assert guide(call(x0, SIGMAS[0])) is x0  # progress 0 is outside the band
    assert guide(call(x0, SIGMAS[3])) is not x0
    bad = x0.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(GuidanceError, match=r"sampler step 4 of 5 \(sigma 1\).*recorder"):
        guide(call(bad, SIGMAS[3]))


def test_runs_on_inference_tensors_inside_inference_mode_as_comfyui_calls_it():
    decoder = toy_decoder()
    with torch.inference_mode():
        decoder_copy = toy_decoder()  # weights built under inference mode, as ComfyUI builds its models
        guide = LatentGuide([Recorder()], decoder_copy, torch.zeros(1, 3, 16, 16), strength=0.5, modules=[decoder_copy])
        x0 = latents()
        out = guide(call(x0, SIGMAS[1], x_t=latents(seed=3)))
    assert bool(torch.isfinite(out).all()) and not torch.equal(out, x0)
    reference = LatentGuide([Recorder()], decoder, torch.zeros(1, 3, 16, 16), strength=0.5)(
        call(latents(), SIGMAS[1], x_t=latents(seed=3)))
    assert torch.equal(out, reference)


def test_a_source_and_mask_made_under_inference_mode_can_take_part_in_the_backward_pass():
    class MaskedToSource:  # uses both the mask and the source in the graph, as masked / style losses do
        name = "masked_to_source"

        def prepare(self, source):
            self.source = source
            return self

        def __call__(self, x0, ctx):
            return ((x0 - ctx.source) * ctx.blend_mask).pow(2).flatten(1).mean(1)

    with torch.inference_mode():
        source, mask = torch.rand(1, 3, 16, 16) * 2 - 1, torch.ones(1, 1, 16, 16)
        decoder = toy_decoder()
        guide = LatentGuide([MaskedToSource()], decoder, source, mask=mask, strength=0.5, modules=[decoder])
        out = guide(call(latents(), SIGMAS[1]))
    assert bool(torch.isfinite(out).all())
