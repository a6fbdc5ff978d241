"""Final paste, PNG quantisation and CLIP ranking against the end of the official loop."""

from __future__ import annotations

import pytest
import torch

from bd_toys import fixture, fixture_json, readme_tolerances, toy_models
from core.blended import ranking as rank
from core.blended.blending import enforce_background
from core.io import to_uint8
from core.blended.cutouts import AugmentSettings
from core.blended.losses import masked_clip_distances

LOOP = fixture("loop")
META = fixture_json()
VARIANTS = META["loop"]["variants"]
PNG_ATOL, DIST_ATOL = readme_tolerances()["loop PNG / ranking distance"]
# variants whose final output is pasted onto the source (spec 6): not the local baseline
# (no blending, no paste) and not --no_enforce_background
PASTED = {v for v, info in VARIANTS.items()
          if not {"--local_clip_guided_diffusion", "--no_enforce_background"} & set(info["argv_extra"])}


@pytest.fixture(scope="module")
def clip():
    return toy_models()[1]


def _final(variant: str) -> torch.Tensor:
    """Upstream's output: the last step's x0 prediction, pasted when enforce_background."""
    x0 = LOOP[f"{variant}.pred_xstart"][-1]
    return enforce_background(x0, LOOP["init_image"], LOOP["mask"]) if variant in PASTED else x0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_faithful_ranking_reproduces_upstream_file_names(variant, clip):
    info = VARIANTS[variant]
    result = rank.rank_results(_final(variant), LOOP["mask"], clip, prompt=META["prompt"], faithful=True)
    names = [rank.ranked_file_name(float(result.scores[i]), "output", 0, i) for i in result.order.tolist()]
    assert names == info["ranked_files"]
    for i, expected in zip(result.order.tolist(), info["ranked_distance_strings"]):
        assert abs(result.scores[i].item() - int(expected) / 10 ** 4) <= DIST_ATOL
    assert torch.equal(result.sorted_scores, result.scores[result.order])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_final_png_bytes(variant, clip):
    """Paste (when enforced), (x + 1) / 2, clamp, * 255, truncate: upstream's ranked PNGs."""
    final = _final(variant)
    order = rank.rank_results(final, LOOP["mask"], clip, prompt=META["prompt"], faithful=True).order
    pixels = to_uint8(final).permute(0, 2, 3, 1)
    for k, i in enumerate(order.tolist()):
        diff = (pixels[i].int() - LOOP[f"{variant}.ranked_png.{k}"].int()).abs().max().item()
        assert diff <= PNG_ATOL


def test_ranking_only_sees_the_masked_region(clip):
    pasted = _final("blended_ddpm")
    raw = LOOP["blended_ddpm.pred_xstart"][-1]
    text = clip.encode_text([META["prompt"]])
    for faithful in (True, False):
        a = rank.ranking_distances(pasted, LOOP["mask"], clip, text, faithful=faithful)
        b = rank.ranking_distances(raw, LOOP["mask"], clip, text, faithful=faithful)
        assert torch.equal(a, b)


class _NativeSizeClip:
    """The stub CLIP at the loop images' own size (16 px; the first 3 * 16 * 16 rows of its
    projection): ranking resizes nothing, and the guidance's plain cutout is the image itself."""

    def __init__(self, clip, size: int):
        self.image_size, self.mean, self.std = size, clip.mean, clip.std
        self.image_proj = clip.image_proj[: 3 * size * size]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.reshape(pixels.shape[0], -1) @ self.image_proj


def test_default_variant_is_the_normalised_guidance_view(clip):
    """Default ranking = the unaugmented view the guidance's masked CLIP loss scores (background
    mid-grey, CLIP-normalised): at the CLIP size it equals the plain cutout of the pack's
    masked_clip_distances; it resizes with antialias; and it is not the faithful variant."""
    images, mask = _final("blended_ddpm"), LOOP["mask"]
    assert images.abs().max() <= 1  # in range: ranking's clamp is then a no-op
    native = _NativeSizeClip(clip, images.shape[-1])
    text = clip.encode_text([META["prompt"]])
    scores = rank.ranking_distances(images, mask, native, text)
    guidance, _, _ = masked_clip_distances(images, mask, native, text, AugmentSettings(n_cuts=1))
    assert torch.allclose(scores, guidance, rtol=0, atol=DIST_ATOL)
    assert not torch.allclose(scores, rank.ranking_distances(images, mask, native, text, faithful=True),
                              rtol=0, atol=DIST_ATOL)
    # at the stub's CLIP size (16 -> 28) the default is still not the faithful variant
    assert not torch.allclose(rank.ranking_distances(images, mask, clip, text),
                              rank.ranking_distances(images, mask, clip, text, faithful=True), rtol=0, atol=DIST_ATOL)
    # shrinking (32 -> 28) it resizes with antialias, which matters there
    big = torch.nn.functional.interpolate(images, size=32, mode="nearest")
    big_mask = torch.nn.functional.interpolate(mask, size=32, mode="nearest")
    default = rank.ranking_distances(big, big_mask, clip, text)
    assert torch.equal(default, rank.ranking_distances(big, big_mask, clip, text, antialias=True))
    assert not torch.allclose(default, rank.ranking_distances(big, big_mask, clip, text, antialias=False),
                              rtol=0, atol=DIST_ATOL)


def test_rank_order_ties_top_k_and_errors(clip):
    scores = torch.tensor([0.5, 0.2, 0.5, 0.1, 0.20004])
    assert rank.rank_order(scores).tolist() == [3, 1, 4, 0, 2]  # stable: ties keep batch order
    assert rank.rank_order(scores, faithful=True).tolist() == [3, 1, 4, 0, 2]
    # faithful compares 4-decimal strings, so 0.20004 ties with 0.2 and the index decides
    assert rank.rank_order(torch.tensor([0.20004, 0.2]), faithful=True).tolist() == [0, 1]
    assert rank.rank_order(torch.tensor([0.20004, 0.2])).tolist() == [1, 0]
    images = LOOP["blended_ddpm.pred_xstart"][-1].repeat(2, 1, 1, 1)
    result = rank.rank_results(images, LOOP["mask"], clip, prompt=META["prompt"], top_k=2)
    assert result.top_k.tolist() == result.order[:2].tolist() and len(result.order) == 4
    assert sorted(result.order.tolist()) == [0, 1, 2, 3]
    assert bool((result.sorted_scores[1:] >= result.sorted_scores[:-1]).all())
    with pytest.raises(ValueError, match="needs a prompt or a text embedding"):
        rank.rank_results(images, LOOP["mask"], clip)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        rank.rank_results(images, LOOP["mask"], clip, prompt="x", top_k=0)
