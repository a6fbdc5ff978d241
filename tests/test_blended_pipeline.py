"""blended_edit / blended_sample on tiny real models: any size in, only the masked pixels change."""

import json

import pytest
import torch

from conftest import assert_close, fixture_path, load_json
from core import load_ddpm
from core.blended import BlendSpec, blended_edit, blended_sample
from core.blended_losses import blended_guidance
from core.clip import load_clip, tiny_open_clip_config
from core.guided import GuidedSamplerOptions


@pytest.fixture(scope="module")
def ddpm():
    kw = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]
    return load_ddpm(fixture_path("guided_diffusion", "tiny_unet.safetensors"),
                     num_head_channels=kw["num_head_channels"], image_size=kw["image_size"])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tinyclip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_open_clip_config("vit")}))
    torch.manual_seed(0)
    return load_clip(f"local-dir:{folder}", pretrained=None)


def image_and_mask(h=40, w=72):
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, h, w, generator=gen) * 2 - 1
    mask = torch.zeros(1, 1, h, w)
    mask[..., 10:22, 30:50] = 1
    return image, mask


def test_edit_changes_only_the_masked_region_and_ranks(ddpm, clip):
    image, mask = image_and_mask()
    out = blended_edit(ddpm, clip, image, mask, "a red ball", samples=3, seed=4, respacing="10", skip_timesteps=5,
                       n_cuts=2)
    assert out.images.shape == (3, 3, 40, 72)
    outside = (mask == 0).expand_as(out.images)
    assert torch.equal(out.images[outside], image.expand_as(out.images)[outside])  # byte for byte
    assert not torch.equal(out.images[~outside], image.expand_as(out.images)[~outside])
    assert torch.all(out.scores[1:] >= out.scores[:-1])  # best (lowest distance) first
    assert sorted(out.order.tolist()) == [0, 1, 2]
    top = blended_edit(ddpm, clip, image, mask, "a red ball", samples=3, seed=4, respacing="10", skip_timesteps=5,
                       n_cuts=2, top_k=1)
    assert torch.equal(top.images[0], out.images[0])


def test_batch_equals_serial_with_clip_cutouts(ddpm, clip):
    image, mask = image_and_mask(32, 32)
    spec = BlendSpec(mask)
    opts = GuidedSamplerOptions(skip_timesteps=5)
    terms = blended_guidance(clip, "a red ball", None, n_cuts=3)
    # same shapes, same seeds: chunked rows are bit-identical to single runs with first_row=r
    chunked = blended_sample(ddpm, image, spec, terms, samples=2, seed=9, respacing="10", options=opts, chunk_size=1)
    for r in range(2):
        alone = blended_sample(ddpm, image, spec, terms, samples=1, seed=9, first_row=r, respacing="10", options=opts)
        assert torch.equal(alone.images[0], chunked.images[r])
    # one batch of 2 differs only by batched-kernel round-off (random tiny CLIP: keep its pull moderate,
    # since guidance amplifies round-off by its weight)
    mild = blended_guidance(clip, "a red ball", None, n_cuts=3, lambda_clip=20)
    both = blended_sample(ddpm, image, spec, mild, samples=2, seed=9, respacing="10", options=opts)
    serial = blended_sample(ddpm, image, spec, mild, samples=2, seed=9, respacing="10", options=opts, chunk_size=1)
    assert_close(both.images, serial.images, 2e-3, what="batch of 2 vs serial")


def test_soft_mask_blends_partially(ddpm, clip):
    image, mask = image_and_mask(32, 32)
    soft = mask * 0.5
    spec = BlendSpec(soft, soft=True, enforce_background=True)
    res = blended_sample(ddpm, image, spec, (), samples=1, seed=1, respacing="10",
                         options=GuidedSamplerOptions(skip_timesteps=5))
    inside = mask.bool().expand_as(res.images)
    # half-weight pixels are a mix: neither the source nor free
    assert not torch.equal(res.images[inside], image.expand_as(res.images)[inside])
    assert torch.equal(res.images[~inside], image.expand_as(res.images)[~inside])


def test_bad_inputs(ddpm, clip):
    image, mask = image_and_mask()
    with pytest.raises(ValueError, match="prompt is empty"):
        blended_edit(ddpm, clip, image, mask, "  ")
    with pytest.raises(ValueError, match="(?i)empty"):
        blended_edit(ddpm, clip, image, torch.zeros_like(mask), "a red ball", respacing="10", skip_timesteps=5)
    with pytest.raises(ValueError, match="batch"):
        blended_sample(ddpm, torch.cat([image, image, image]), BlendSpec(torch.ones(2, 1, 40, 72)), (),
                       respacing="10", options=GuidedSamplerOptions(skip_timesteps=5))
