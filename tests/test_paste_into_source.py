"""paste_into_source / Paste Edit into Source: nothing outside the mask changes, the feather stays inside."""

import pytest
import torch

from core.blended.geometry import paste_into_source, stitch_weight


def _case(batch=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = torch.rand(1, 3, size, size, generator=g)
    edited = torch.rand(batch, 3, size, size, generator=g)
    mask = torch.zeros(1, 1, size, size)
    mask[..., 8:24, 10:26] = 1
    return source, edited, mask


@pytest.mark.parametrize("feather", [0, 4])
def test_outside_the_mask_is_the_source_bit_for_bit_and_inside_follows_the_weight(feather):
    source, edited, mask = _case()
    out = paste_into_source(source, edited, mask, feather)
    assert out.shape == (3, 3, 32, 32)
    outside = (mask == 0).expand_as(out)
    assert torch.equal(out[outside], source.expand_as(out)[outside])
    w = stitch_weight(mask, feather)
    expected = source * (1 - w) + edited * w
    inside = (w > 0).expand_as(out)
    assert torch.allclose(out[inside], expected[inside], atol=1e-6)
    if feather:  # the ramp is inside: the mask's border pixels keep part of the source
        assert 0 < float(w[0, 0, 8, 17]) < 1


def test_an_edit_of_another_size_and_a_mask_of_another_size_are_resized():
    source, edited, mask = _case()
    small = torch.nn.functional.interpolate(edited, size=(24, 24), mode="bilinear", align_corners=False)
    big_mask = torch.nn.functional.interpolate(mask, size=(64, 64), mode="nearest")
    out = paste_into_source(source, small, big_mask, 0)
    assert out.shape == (3, 3, 32, 32)
    far = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    far[..., :4, :] = True  # rows far from the mask stay the source's
    assert torch.equal(out[far.expand_as(out)], source.expand_as(out)[far.expand_as(out)])


def test_batches_that_do_not_match_are_refused():
    source, edited, mask = _case()
    with pytest.raises(ValueError, match="source has 2 images; give 1 or 3"):
        paste_into_source(source.repeat(2, 1, 1, 1), edited, mask)
