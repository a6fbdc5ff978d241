"""DiffuseIT's text-mode contrastive schedule (``--regularize_content``, on in the official text command;
``--use_prog_contrast``), spec 3.5 step 1 and 4.2:

    frac_cont = 1.0; 0.5 if use_prog_contrast and loss_prev > -0.5 (the following "elif loss_prev > -0.4
    -> 0.25" is unreachable); 2.0 if regularize_content and loss_prev < -0.5;
    L_ViT = 1000 L_ssim + 200 frac_cont L_cont + [t > diff_iter] 100 L_sem

``loss_prev`` is the previous cond_fn call's CLIP loss (the source's, ncuts 0, at the first call).
Expected totals come from the official-code fixture (vit_losses: text_early / text_early_regularize
recorded by upstream's Loss_vit.forward with frac_cont 1 and 2) and its recorded unweighted losses.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURES
from core.diffusion.guidance import Replay, StepContext, StepState
from core.diffusion.schedule import DiffusionSchedule
from core.diffuseit.dino_losses import DINOStructureLoss, SemanticDivergence, frac_cont_schedule

from test_vit_losses import LAMBDAS, LOOP, TOTAL_ATOL, VIT, ext, fx, schedule  # noqa: F401 (fixtures)

F32 = torch.float32


def _just(x: float, toward: float) -> float:
    """The float32 neighbour of x towards ``toward`` (exact in float64 too)."""
    return torch.nextafter(torch.tensor(x, dtype=F32), torch.tensor(toward, dtype=F32)).item()


BREAK = -0.5
BELOW, ABOVE = _just(BREAK, -1.0), _just(BREAK, 0.0)


@pytest.mark.parametrize("regularize, prog, loss_prev, expected", [
    # regularize_content alone: 2 strictly below -0.5, 1 at and above
    (True, False, -0.9, 2.0), (True, False, BELOW, 2.0), (True, False, BREAK, 1.0), (True, False, ABOVE, 1.0),
    (True, False, 0.3, 1.0),
    # use_prog_contrast alone: 0.5 strictly above -0.5 (also above -0.4: the 0.25 branch is unreachable)
    (False, True, -0.9, 1.0), (False, True, BELOW, 1.0), (False, True, BREAK, 1.0), (False, True, ABOVE, 0.5),
    (False, True, -0.3, 0.5),
    # both: they never overlap; exactly -0.5 is neither
    (True, True, -0.9, 2.0), (True, True, BREAK, 1.0), (True, True, -0.3, 0.5),
    # neither: constant 1
    (False, False, -0.9, 1.0), (False, False, -0.3, 1.0),
])
def test_frac_cont_breakpoints(regularize, prog, loss_prev, expected):
    assert frac_cont_schedule(loss_prev, use_prog_contrast=prog, regularize_content=regularize) == expected
    per_row = frac_cont_schedule(torch.tensor([loss_prev, loss_prev], dtype=torch.float64), prog, regularize)
    assert per_row.tolist() == [expected, expected]


def _text_terms(ext, **schedule_flags):
    structure = DINOStructureLoss(ext, lambda_ssim=LAMBDAS["lambda_ssim"], lambda_contra=LAMBDAS["lambda_contra_ssim"],
                                  noise_mix=False, **schedule_flags)
    semantic = SemanticDivergence(ext, lambda_dir_cls=LAMBDAS["lambda_dir_cls"],
                                  diff_iter=LOOP["config"]["diff_iter"], noise_mix=False)
    return structure, semantic


def _text_loss(ext, fx, schedule, loss_prev: torch.Tensor, **schedule_flags) -> torch.Tensor:
    """Structure + semantic divergence (t > diff_iter) on the fixture's output image, rows with their own
    previous CLIP loss, the schedule driven by ``ctx.state.clip_loss_prev`` (what the CLIP term publishes)."""
    rows = loss_prev.shape[0]
    source, output = fx["image.source"].expand(rows, -1, -1, -1), fx["image.output"].expand(rows, -1, -1, -1)
    prepared = [term.prepare(source) for term in _text_terms(ext, **schedule_flags)]
    t_index = torch.full((rows,), next(e["t"] for e in LOOP["sequence"] if e["use_dir"]))
    ctx = StepContext(t_index=t_index, t=schedule.model_timesteps(t_index), x_t=output, schedule=schedule, source=source,
                      state=StepState(clip_loss_prev=loss_prev),
                      replay=Replay(prev_vit_input=fx["image.prev"].expand(rows, -1, -1, -1)))
    with torch.no_grad():
        return sum(p(output, ctx) for p in prepared)


def test_regularize_content_doubles_the_contrastive_weight_as_upstream(ext, fx, schedule):
    """Upstream's recorded totals: frac 2 (text_early_regularize) below -0.5, frac 1 (text_early) at/above."""
    regularized = VIT["forward"]["text_early_regularize"]["loss_G"]
    plain = VIT["forward"]["text_early"]["loss_G"]
    assert VIT["forward"]["text_early_regularize"]["frac_cont"] == 2.0 and VIT["forward"]["text_early"]["frac_cont"] == 1.0
    loss_prev = torch.tensor([-0.9, BELOW, BREAK, ABOVE, 0.2], dtype=F32)
    got = _text_loss(ext, fx, schedule, loss_prev, regularize_content=True).tolist()
    expected = [regularized, regularized, plain, plain, plain]
    assert got == pytest.approx(expected, abs=TOTAL_ATOL), (got, expected)
    # off: the same inputs give the plain total whatever loss_prev is
    assert _text_loss(ext, fx, schedule, loss_prev).tolist() == pytest.approx([plain] * 5, abs=TOTAL_ATOL)


def test_structure_loss_is_the_weighted_combination(ext, fx, schedule):
    """L = 1000 L_ssim + 200 frac L_cont + 100 L_sem with upstream's recorded unweighted losses, for
    frac = 2 (regularize, loss_prev < -0.5), 1, and 0.5 (prog_contrast, loss_prev > -0.5)."""
    lv = VIT["forward"]["text_early"]["losses_val"]

    def total(frac):
        return (LAMBDAS["lambda_ssim"] * lv["loss_global_ssim"] + LAMBDAS["lambda_contra_ssim"] * frac * lv["loss_contra_ssim"]
                + LAMBDAS["lambda_dir_cls"] * lv["loss_dir_cls"])

    tol = 2e-5 * total(2.0)  # the recorded losses are float32 values (LOSS_RTOL 1e-5 each)
    loss_prev = torch.tensor([-0.7, -0.3], dtype=F32)
    assert _text_loss(ext, fx, schedule, loss_prev, regularize_content=True).tolist() == \
        pytest.approx([total(2.0), total(1.0)], abs=tol)
    assert _text_loss(ext, fx, schedule, loss_prev, use_prog_contrast=True).tolist() == \
        pytest.approx([total(1.0), total(0.5)], abs=tol)
    assert _text_loss(ext, fx, schedule, loss_prev, use_prog_contrast=True, regularize_content=True).tolist() == \
        pytest.approx([total(2.0), total(0.5)], abs=tol)


def test_loss_prev_is_the_previous_calls_clip_loss(tmp_path):
    """Through the sampler: before every guided call (resampling repeats included) the CLIP term publishes the
    previous call's unweighted CLIP loss as clip_loss_prev -- the source's (ncuts 0) before the first call."""
    from core import load_ddpm
    from core.encoders.clip import load_clip, tiny_open_clip_config
    from core.diffuseit.clip_direction import CLIPDirectionalLoss, clip_text_loss
    from core.diffusion.guided_loop import GuidedSamplerOptions, guided_sample
    from conftest import fixture_path, load_json

    kw = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]
    ddpm = load_ddpm(fixture_path("guided_diffusion", "tiny_unet.safetensors"),
                     num_head_channels=kw["num_head_channels"], image_size=kw["image_size"])
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_open_clip_config("vit")}))
    torch.manual_seed(0)
    clip = load_clip(f"local-dir:{tmp_path}", pretrained=None)
    source = torch.rand(2, 3, kw["image_size"], kw["image_size"], generator=torch.Generator().manual_seed(1)) * 2 - 1
    seen = []

    class Spy:
        name = "spy"

        def prepare(self, src):
            return self

        def __call__(self, x0, ctx):  # runs after the CLIP term (term order) in each call
            seen.append((ctx.state.clip_loss_prev.clone(), ctx.state.clip_loss.clone()))
            return 0 * x0.flatten(1).sum(1)

    term = CLIPDirectionalLoss([clip], "Lion", "Black Leopard", lambda_clip=2000.0, ncuts=0)
    opts = GuidedSamplerOptions(skip_timesteps=6, resample_steps=3)
    guided_sample(ddpm.unet, ddpm.schedule("10"), source, [term, Spy()], seed=3, options=opts)
    assert len(seen) == 3 + 3
    prepared = term.prepare(source)
    first = clip_text_loss(term.ensemble, source, prepared.targets, 0)
    assert torch.equal(seen[0][0], first)
    for (prev, _), (_, current_before) in zip(seen[1:], seen[:-1]):
        assert torch.equal(prev, current_before)
    assert not torch.equal(seen[1][0], seen[0][0])  # it really moves from call to call

