"""Ranking criteria beyond the paper (core.blended.rank_criteria): each component on constructed cases,
the weighted total, and the paper's criteria reproducing the paper's ranking number for number."""

from __future__ import annotations

import math

import pytest
import torch

from bd_toys import fixture, fixture_json, toy_models
from conftest import float32_atol
from core.blended import ranking as rank
from core.blended.blending import enforce_background
from core.blended.losses import spherical_distance
from core.blended.rank_criteria import (COMPONENTS, IMPROVED_CRITERIA, PAPER_CRITERIA, RankingCriteria,
                                        clip_embeddings, render_prompt_text, seam_inconsistency, weighted_total)
from core.tiny_models import tiny_clip

PROMPT = "a red ball"


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return tiny_clip()


def _gradient(size: int = 64) -> torch.Tensor:
    """A smooth source in [-1, 1]: a horizontal ramp in red, vertical in green, flat blue."""
    ramp = torch.linspace(-0.8, 0.8, size)
    return torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size), torch.full((size, size), 0.1)])[None]


def _square_mask(size: int = 64, lo: int = 16, hi: int = 48) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., lo:hi, lo:hi] = 1
    return mask


# --------------------------------------------------------------------------- the paper's criteria


@pytest.mark.parametrize("faithful", [True, False])
def test_paper_criteria_are_the_papers_ranking_exactly(faithful):
    """criteria=PAPER_CRITERIA (also with every component reported) gives today's distances, order and
    upstream's ranked file names, bit for bit."""
    loop, meta, stub = fixture("loop"), fixture_json(), toy_models()[1]
    for variant, info in meta["loop"]["variants"].items():
        x0 = loop[f"{variant}.pred_xstart"][-1]
        images = enforce_background(x0, loop["init_image"], loop["mask"])
        plain = rank.rank_results(images, loop["mask"], stub, prompt=meta["prompt"], faithful=faithful)
        text = stub.encode_text([meta["prompt"]])
        assert torch.equal(plain.scores, rank.ranking_distances(images, loop["mask"], stub, text, faithful=faithful))
        for report_all in (False, True):
            paper = rank.rank_results(images, loop["mask"], stub, prompt=meta["prompt"], faithful=faithful,
                                      criteria=PAPER_CRITERIA, report_all=report_all)
            assert torch.equal(paper.scores, plain.scores) and torch.equal(paper.order, plain.order)
            assert torch.equal(paper.components["masked_prompt"], plain.scores)
            assert list(paper.components) == (list(COMPONENTS) if report_all else ["masked_prompt"])
        if faithful and "--local_clip_guided_diffusion" not in info["argv_extra"] \
                and "--no_enforce_background" not in info["argv_extra"]:
            names = [rank.ranked_file_name(float(paper.scores[i]), "output", 0, i) for i in paper.order.tolist()]
            assert names == info["ranked_files"]


# --------------------------------------------------------------------------- typography


def test_prompt_rendering_is_deterministic_black_text_on_white():
    first, second = render_prompt_text(PROMPT, 224), render_prompt_text(PROMPT, 224)
    assert first.shape == (1, 3, 224, 224) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert torch.equal(first[:, 0], first[:, 1]) and torch.equal(first[:, 0], first[:, 2])  # grey
    assert first[..., :8, :].min() == 1 and first[..., -8:, :].min() == 1  # blank margins
    ink = (first[0, 0] < 0.5).float().mean().item()
    assert 0.02 < ink < 0.5, ink  # words drawn, large
    assert not torch.equal(first, render_prompt_text("a blue cube", 224))
    small = render_prompt_text(PROMPT, 32)  # drawn at 224, resized for a small CLIP
    assert small.shape == (1, 3, 32, 32) and small.min() < 0.5 and small.max() == 1
    with pytest.raises(ValueError, match="non-empty prompt"):
        render_prompt_text("  ", 32)


def test_an_image_of_the_prompt_as_text_scores_worst_on_typography(clip):
    """A sample that *is* the rendered prompt has similarity 1 to it, above a sample showing other words and
    a sample without text; the typography-only ranking puts it last."""
    size = clip.image_size
    text_image = render_prompt_text(PROMPT, size) * 2 - 1
    other_words = render_prompt_text("zebra stripes on grass", size) * 2 - 1
    plain = _gradient(size)
    images = torch.cat([plain, text_image, other_words])
    mask = torch.ones(1, 1, size, size)
    embed = clip.encode_text([PROMPT])
    values = rank.ranking_components(images, mask, clip, embed, prompt=PROMPT, components=("typography",))
    typography = values["typography"]
    assert typography[1].item() == pytest.approx(1.0, abs=1e-5)
    assert typography[1] > typography[0] and typography[1] > typography[2]
    only_text = RankingCriteria(masked_prompt=0, typography=1)
    result = rank.rank_results(images, mask, clip, PROMPT, criteria=only_text)
    assert result.order[-1].item() == 1 and torch.equal(result.scores, typography)
    with pytest.raises(ValueError, match="typography term needs the prompt text"):
        rank.rank_results(images, mask, clip, text_embed=embed, criteria=only_text)


# --------------------------------------------------------------------------- seam


def test_seam_sees_a_changed_border_and_nothing_deeper():
    source, mask = _gradient(), _square_mask()
    k = 1  # the automatic width on a 64 px view: round(64 / 64)
    deep = source.clone()
    deep[..., 16 + k:48 - k, 16 + k:48 - k] = -source[..., 16 + k:48 - k, 16 + k:48 - k]  # all but the band
    shifted = source.clone()
    shifted[..., 16:48, 16:48] += 0.4  # the whole edit brighter: a visible seam
    seam = seam_inconsistency(torch.cat([source, deep, shifted]), mask)
    assert torch.equal(seam[0], seam[1])  # only the band next to the border counts
    assert seam[2] > seam[0] + 0.15  # a 0.2 jump in [0, 1] units, less the ramp's own slope
    assert seam[0] < 0.05  # the smooth source itself is nearly seamless
    # wider band: the same change two pixels inside the border is seen with width 3, not width 1
    ring = source.clone()
    ring[..., 18, 18:46] += 0.5
    wide = seam_inconsistency(torch.cat([source, ring]), mask, width=3)
    narrow = seam_inconsistency(torch.cat([source, ring]), mask, width=1)
    assert torch.equal(narrow[0], narrow[1]) and wide[1] > wide[0]


def test_seam_value_on_a_flat_source_is_the_jump():
    flat = torch.full((1, 3, 40, 40), -0.2)
    mask = _square_mask(40, 10, 30)
    edit = flat.clone()
    edit[..., 10:30, 10:30] = torch.tensor([0.6, -0.2, 0.2]).view(1, 3, 1, 1)  # jumps 0.4, 0, 0.2 in [0, 1] units
    seam = seam_inconsistency(torch.cat([flat, edit]), mask, width=2)
    atol = float32_atol(torch.tensor(1.0), 8)  # the window means round: values in [0, 1]
    assert seam[0].item() == pytest.approx(0, abs=atol)
    assert seam[1].item() == pytest.approx((0.4 + 0 + 0.2) / 3, abs=atol)
    # a cut-off object (touching the border) breaks the seam; the same object inside the mask does not
    touching, inside = flat.clone(), flat.clone()
    touching[..., 10:16, 14:20] = 0.9
    inside[..., 16:22, 14:20] = 0.9
    seam = seam_inconsistency(torch.cat([touching, inside]), mask, width=2)
    band = 20 * 20 - 16 * 16  # the 2 px inner band of the 20 px square
    cut = 2 * 6  # the object's pixels in that band, each (0.9 + 1) / 2 - (-0.2 + 1) / 2 = 0.55 off
    assert seam[0].item() == pytest.approx(cut * 0.55 / band, abs=atol)
    assert seam[1].item() == pytest.approx(0, abs=atol)
    # no border: a full mask, and per-image masks are each their own
    assert seam_inconsistency(edit, torch.ones(1, 1, 40, 40)).item() == 0
    both = seam_inconsistency(torch.cat([edit, edit]), torch.cat([mask, torch.ones_like(mask)]), width=2)
    assert both[0].item() == pytest.approx((0.4 + 0.2) / 3, abs=atol) and both[1].item() == 0


# --------------------------------------------------------------------------- whole image, weights


def test_whole_image_term_sees_the_context(clip):
    size = clip.image_size
    source, mask = _gradient(size), _square_mask(size, size // 4, 3 * size // 4)
    other_context = source.clone()
    other_context[..., : size // 8, :] = 0.9  # differs only outside the mask
    images = torch.cat([source, other_context])
    embed = clip.encode_text([PROMPT])
    values = rank.ranking_components(images, mask, clip, embed, prompt=PROMPT)
    for name in ("masked_prompt", "typography", "seam"):  # the context change is away from the border
        assert torch.equal(values[name][0], values[name][1]), name
    assert values["whole_image_prompt"][0] != values["whole_image_prompt"][1]
    expected = spherical_distance(clip_embeddings((images + 1) / 2, clip), embed.float())
    assert torch.equal(values["whole_image_prompt"], expected)
    # with a full mask the whole view is the default (normalised) masked view
    full = rank.ranking_components(images, torch.ones_like(mask), clip, embed, components=("masked_prompt",
                                                                                           "whole_image_prompt"))
    assert torch.allclose(full["whole_image_prompt"], full["masked_prompt"], rtol=0,
                          atol=float32_atol(full["masked_prompt"], 16))


def test_improved_total_is_the_weighted_sum_and_orders_the_batch(clip):
    size = clip.image_size
    gen = torch.Generator().manual_seed(3)
    source, mask = _gradient(size), _square_mask(size, size // 4, 3 * size // 4)
    images = source.repeat(4, 1, 1, 1)
    images[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = torch.rand(4, 3, size // 2, size // 2,
                                                                                generator=gen) * 2 - 1
    result = rank.rank_results(images, mask, clip, PROMPT, criteria=IMPROVED_CRITERIA, top_k=2)
    parts = result.components
    assert list(parts) == list(COMPONENTS)
    expected = sum(getattr(IMPROVED_CRITERIA, name) * parts[name] for name in COMPONENTS)
    assert torch.allclose(result.scores, expected, rtol=0, atol=float32_atol(expected, 8))
    assert result.order.tolist() == torch.sort(result.scores, stable=True).indices.tolist()
    assert result.top_k.tolist() == result.order[:2].tolist()
    assert all(torch.isfinite(parts[name]).all() for name in COMPONENTS)
    assert torch.equal(weighted_total({"masked_prompt": parts["masked_prompt"]}, PAPER_CRITERIA),
                       parts["masked_prompt"])  # a lone weight of 1 is the component itself


@pytest.mark.parametrize("kwargs, message", [
    (dict(seam=-1.0), "ranking weight seam must be a finite number >= 0, got -1.0"),
    (dict(typography=math.nan), "ranking weight typography must be a finite number >= 0, got nan"),
    (dict(masked_prompt=0.0), "ranking criteria need at least one weight > 0 (all four are 0)"),
    (dict(seam_width=-2), "seam_width must be an integer >= 0 (0 = automatic), got -2"),
])
def test_criteria_errors(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        RankingCriteria(**kwargs)


def test_unknown_component_is_an_error(clip):
    images = _gradient(clip.image_size)
    with pytest.raises(ValueError, match=r"unknown ranking component\(s\) \['shadow'\]"):
        rank.ranking_components(images, torch.ones(1, 1, *images.shape[-2:]), clip, clip.encode_text([PROMPT]),
                                components=("shadow",))
