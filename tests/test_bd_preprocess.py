"""Blended Diffusion preprocessing: upstream's PIL path (exact) and the ComfyUI tensor path."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from bd_toys import fixture, fixture_json, readme_tolerances
from core import io
from core.blended import masks
from core.encoders.clip import ClipModel

PRE = fixture("preprocess")
META = fixture_json()["preprocess"]
EXACT = readme_tolerances()["preprocess (PIL path)"][0]
SIZE = META["image_size"][0]


def _pil(key: str) -> Image.Image:
    return Image.fromarray(PRE[key].numpy())


def test_image_pil_path_matches_upstream_exactly():
    image = io.load_image_pil(_pil("image_input_uint8"), SIZE)
    assert image.shape == PRE["init_image"].shape and image.dtype == torch.float32
    assert (image - PRE["init_image"]).abs().max().item() <= EXACT


@pytest.mark.parametrize("invert,key", [(False, "mask_plain"), (True, "mask_inverted")])
def test_mask_pil_path_matches_upstream_exactly(invert, key):
    mask = io.load_mask_pil(_pil("mask_input_uint8"), SIZE, invert=invert)
    assert mask.shape == PRE[key].shape
    assert (mask - PRE[key]).abs().max().item() <= EXACT
    assert mask.mean().item() == pytest.approx(META["mask_plain_fraction"] if not invert
                                               else 1 - META["mask_plain_fraction"])


def test_tensor_mask_path_equals_pil_nearest():
    """Red channel of the 8-bit mask as a float ComfyUI MASK: nearest-exact is PIL's NEAREST."""
    raw = PRE["mask_input_uint8"]
    comfy_mask = raw[..., 0].float().div(255).unsqueeze(0)  # [1, H, W]: the red channel as a MASK
    out = masks.prepare_mask(comfy_mask, SIZE, SIZE)
    assert (out - PRE["mask_plain"]).abs().max().item() <= EXACT
    inverted = masks.prepare_mask(comfy_mask, SIZE, SIZE, invert=True)
    assert (inverted - PRE["mask_inverted"]).abs().max().item() <= EXACT


def test_green_only_values_are_ignored_and_red_value_one_counts():
    """The fixture mask has a value-1 patch in R (counts) and one in G only (ignored)."""
    raw = PRE["mask_input_uint8"]
    red_one = (raw[..., 0] == 1)
    green_only = (raw[..., 0] == 0) & (raw[..., 1] > 0)
    assert red_one.any() and green_only.any()
    height, width = raw.shape[:2]
    tensor_path = masks.prepare_mask(raw[..., 0].float().div(255), height, width)[0, 0]
    assert bool(tensor_path[red_one].eq(1).all()) and bool(tensor_path[green_only].eq(0).all())
    # the PIL path at the input's own size (no resize) agrees pixel for pixel
    pil_path = io.load_mask_pil(_pil("mask_input_uint8").crop((0, 0, height, height)), height)[0, 0]
    assert torch.equal(pil_path, tensor_path[:, :height])


def test_clip_model_default_tokenizer_matches_the_official_tokenizer():
    """ClipModel's default tokenizer (a wrapped module without its own) gives upstream's clip.tokenize ids."""
    class Towers(torch.nn.Module):
        def encode_image(self, x):
            return x

        def encode_text(self, tokens):
            return tokens

    tokens = ClipModel(Towers(), 224).tokenize([fixture_json()["prompt"]])
    assert torch.equal(tokens.long(), PRE["clip_tokens"])


# ------------------------------------------------------------------ tensor path edge cases

def _square_mask(size: int, lo: int, hi: int, value: float = 1.0) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[:, lo:hi, lo:hi] = value
    return m


def test_any_nonzero_8bit_value_is_edit_but_float_dust_is_not():
    m = _square_mask(8, 2, 4, value=1 / 255)
    m[0, 6, 6] = masks.EDIT_THRESHOLD / 10  # below half an 8-bit step: float round-off, not paint
    out = masks.prepare_mask(m, 8, 8)
    assert out[0, 0, 2:4, 2:4].eq(1).all() and out.sum().item() == 4


def test_empty_mask_raises_clear_error():
    with pytest.raises(ValueError, match=r"mask is empty .*batch item\(s\) \[0\].*LoadImage"):
        masks.prepare_mask(torch.zeros(1, 64, 64), 32, 32)
    two = torch.stack([_square_mask(8, 2, 4)[0], torch.zeros(8, 8)])
    with pytest.raises(ValueError, match=r"batch item\(s\) \[1\]"):
        masks.prepare_mask(two, 8, 8, batch=2)


def test_full_mask_allowed_by_default_and_rejected_on_request():
    full = torch.ones(1, 8, 8)
    assert masks.prepare_mask(full, 8, 8).eq(1).all()
    with pytest.raises(ValueError, match="mask is full"):
        masks.prepare_mask(full, 8, 8, allow_full=False)
    with pytest.raises(ValueError, match="mask is empty"):
        masks.prepare_mask(full, 8, 8, invert=True)


def test_size_mismatch_resizes_nearest_or_errors():
    m = _square_mask(8, 2, 6)
    out = masks.prepare_mask(m, 16, 16)
    assert out.shape == (1, 1, 16, 16)
    assert torch.equal(out, m.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None])
    with pytest.raises(ValueError, match="differs from image size"):
        masks.prepare_mask(m, 16, 16, on_size_mismatch="error")


def test_batch_rules():
    m1 = _square_mask(8, 2, 6)
    assert masks.prepare_mask(m1, 8, 8, batch=3).shape == (1, 1, 8, 8)  # broadcast over the batch
    assert masks.prepare_mask(m1.expand(3, -1, -1), 8, 8, batch=3).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="mask batch 2 does not match image batch 3"):
        masks.prepare_mask(m1.expand(2, -1, -1), 8, 8, batch=3)
    with pytest.raises(ValueError, match="MASK must be"):
        masks.prepare_mask(torch.ones(1, 1, 1, 8, 8), 8, 8)


def test_soft_mask_kept_dilation_and_feather():
    soft = _square_mask(9, 3, 6, value=0.25)
    assert torch.equal(masks.prepare_mask(soft, 9, 9, soft=True)[0], soft)
    assert masks.prepare_mask(soft, 9, 9)[0].eq((soft > 0).float()).all()  # binary by default
    binary = _square_mask(9, 4, 5)
    grown = masks.prepare_mask(binary, 9, 9, dilate=1)
    assert grown.sum().item() == 9 and grown[0, 0, 3:6, 3:6].eq(1).all()
    feathered = masks.prepare_mask(binary, 9, 9, feather=2)
    assert feathered[0, 0, 4, 4].item() == 1  # the binary region stays fully editable
    ring = feathered[0, 0, 3, 4].item()
    assert 0 < ring < 1 and feathered.max().item() <= 1 and not masks.is_binary(feathered)


def test_prepare_mask_does_not_modify_its_input():
    m = _square_mask(8, 2, 6, value=0.5)
    before = m.clone()
    masks.prepare_mask(m, 16, 16, invert=True, dilate=1, feather=1)
    assert torch.equal(m, before)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_comfy_image_channels(channels):
    rgb = torch.rand(2, 5, 7, 3)
    if channels in (1, 2):
        image = torch.cat([rgb[..., :1], rgb[..., :channels - 1]], dim=-1)
        expected = rgb[..., :1].expand(-1, -1, -1, 3)
    else:
        image = torch.cat([rgb, torch.rand(2, 5, 7, 1)], dim=-1)[..., :channels]
        expected = rgb
    x = io.to_model(image)
    assert x.shape == (2, 3, 5, 7)
    assert torch.allclose(x, expected.movedim(-1, 1) * 2 - 1)
    assert torch.allclose(io.from_model(x), expected)


def test_comfy_image_rejects_bad_shapes():
    with pytest.raises(ValueError, match="1, 2, 3 or 4 channels"):
        io.to_model(torch.rand(1, 4, 4, 5))
    with pytest.raises(ValueError, match=r"image must be \[B,H,W,C\]"):
        io.to_model(torch.rand(4, 4))


def test_mask_bbox_and_coverage():
    m = torch.zeros(2, 1, 10, 12)
    m[0, 0, 2:4, 3:5] = 1
    m[1, 0, 6, 9] = 1
    assert masks.mask_bbox(m) == (2, 3, 7, 10)
    assert masks.mask_coverage(m) == pytest.approx(5 / 240)
    with pytest.raises(ValueError, match="mask is empty"):
        masks.mask_bbox(torch.zeros(1, 4, 4))
