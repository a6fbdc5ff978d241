"""DiffuseIT at the source's aspect ratio (``keep_aspect``): the size rule, DINO and CLIP on non-square
images, the pipelines' shapes and determinism, and that a square source is sampled exactly as before."""

import pytest
import torch
import torch.nn.functional as F

from core.diffuseit.clip_direction import (eval_preprocess, image_embedding, mean_unit_embedding, random_cuts,
                                           square_window_offsets)
from core.diffuseit.pipeline import diffuseit_image, diffuseit_text
from core.diffusion.checkpoints import load_ddpm
from core.encoders.dino import DINOExtractor, DINOViTConfig, build_dino_vit, resample_position_grid
from core.io import MAX_ASPECT, model_size_for, resize_for_model, resize_to, resize_to_model
from core.tiny_models import TINY_UNET, smooth_image, tiny_clip, tiny_unet_state_dict

# (source height, width), model image_size, size multiple -> sampled (height, width), worked out by hand
SIZE_CASES = [
    ((900, 1600), 256, 32, (256, 448)),   # 16:9: 256 * 16/9 = 455.1 -> 14 * 32
    ((1600, 900), 256, 32, (448, 256)),   # 9:16
    ((256, 256), 256, 32, (256, 256)),    # square: upstream's size
    ((1000, 1000), 256, 32, (256, 256)),
    ((257, 256), 256, 32, (256, 256)),    # within half a multiple of square
    ((300, 451), 256, 32, (256, 384)),    # assets/chelsea.png: 385.0 -> 12 * 32
    ((10, 1000), 256, 32, (256, 1024)),   # 100:1 capped at 4:1
    ((24, 40), 32, 4, (32, 52)),          # the tests' tiny UNet (32 px, multiple 4): 53.3 -> 13 * 4
    ((3, 5), 64, 8, (64, 104)),           # 106.7 -> 13 * 8
]


@pytest.mark.parametrize("source_hw, image_size, multiple, expected", SIZE_CASES)
def test_model_size_for(source_hw, image_size, multiple, expected):
    assert model_size_for(source_hw, image_size, multiple) == expected


def test_model_size_rule_over_many_sizes():
    """Short side = image_size, both sides multiples, long side the nearest multiple to the (capped) ratio."""
    g = torch.Generator().manual_seed(0)
    for h, w in torch.randint(1, 4000, (300, 2), generator=g).tolist():
        out_h, out_w = model_size_for((h, w), 256, 32)
        assert out_h % 32 == 0 and out_w % 32 == 0
        assert min(out_h, out_w) == 256 and (out_h >= out_w) == (h > w or out_h == out_w)
        ideal = 256 * min(max(h, w) / min(h, w), MAX_ASPECT)
        assert abs(max(out_h, out_w) - ideal) <= 16


def test_model_size_errors():
    with pytest.raises(ValueError, match="image_size 100 must be a positive multiple of its size multiple 32"):
        model_size_for((90, 160), 100, 32)
    with pytest.raises(ValueError, match="source size must be positive, got 0x160"):
        model_size_for((0, 160), 256, 32)


def test_size_multiple_of_the_unets():
    assert TINY_UNET.size_multiple == 2 ** (len(TINY_UNET.channel_mult) - 1) == 32
    ddpm = load_ddpm(tiny_unet_state_dict(0), device="cpu", image_size=64, num_head_channels=64)
    assert ddpm.size_multiple == 32
    x = torch.zeros(1, 3, 64, 96)
    out = ddpm.unet(x, torch.tensor([10]))
    assert out.shape == (1, 6, 64, 96)


def test_square_resize_is_the_same_tensor_either_way():
    x = smooth_image(0, 40)
    assert torch.equal(resize_for_model(x, 32, 4, keep_aspect=True), resize_to_model(x, 32))
    assert torch.equal(resize_for_model(x, 32, 4, keep_aspect=False), resize_to_model(x, 32))
    wide = F.interpolate(x, size=(24, 40), mode="bilinear")
    assert resize_for_model(wide, 32, 4, keep_aspect=True).shape[-2:] == (32, 52)
    assert resize_for_model(wide, 32, 4, keep_aspect=False).shape[-2:] == (32, 32)


# ------------------------------------------------------------------ DINO on non-square images


def _small_dino() -> DINOExtractor:
    """A 2-block DINO-layout ViT (patch 8, 224 px), features of block 1: the tiny preset's DINO, shorter."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vit = build_dino_vit(DINOViTConfig(8, 32, 2, 2)).eval().requires_grad_(False)
    return DINOExtractor(vit, layer=1)


@pytest.mark.parametrize("hw, grid", [((256, 448), (28, 49)), ((448, 256), (49, 28)), ((256, 256), (28, 28)),
                                      ((256, 768), (20, 60))])  # 1:3: Resize(224, max_size=480) -> 160x480
def test_dino_token_grid_follows_the_aspect_ratio(hw, grid):
    dino = _small_dino()
    x = smooth_image(2, 64)
    x = F.interpolate(x, size=hw, mode="bilinear").requires_grad_()
    feats = dino(x)
    assert feats.keys.shape == (1, 1 + grid[0] * grid[1], 32) and feats.cls.shape == (1, 32)
    again = dino(x.detach())
    assert torch.equal(feats.keys.detach(), again.keys) and torch.equal(feats.cls.detach(), again.cls)
    (grad,) = torch.autograd.grad(feats.keys.square().mean() + feats.cls.square().mean(), x)
    assert grad.shape == x.shape and grad.abs().amax().item() > 0


def test_position_grid_keeps_rows_and_columns_apart():
    """Resampled to 4 x 10 patches, an embedding that varies only down the rows still does: the flattened
    tokens run row by row, as the patch tokens do (a transposed grid would mix the two)."""
    n, dim = 28, 3
    rows = torch.linspace(-1, 1, n).view(n, 1, 1).expand(n, n, dim)
    pos = torch.cat([torch.full((1, 1, dim), 7.0), rows.reshape(1, n * n, dim)], dim=1)
    out = resample_position_grid(pos, 4, 10)
    assert out.shape == (1, 41, dim) and torch.equal(out[:, 0], pos[:, 0])
    grid = out[0, 1:].reshape(4, 10, dim)
    assert torch.allclose(grid, grid[:, :1].expand_as(grid), atol=1e-6)
    assert (grid[1:, 0, 0] > grid[:-1, 0, 0]).all()
    const = torch.full((1, 1 + n * n, dim), 0.25)
    assert torch.allclose(resample_position_grid(const, 5, 9), torch.full((1, 46, dim), 0.25), atol=1e-6)


# ------------------------------------------------------------------ CLIP on non-square images


@pytest.mark.parametrize("hw, offsets", [((32, 32), [0]), ((32, 64), [0, 32]), ((32, 57), [0, 25]),
                                         ((100, 40), [0, 30, 60]), ((40, 100), [0, 30, 60])])
def test_square_window_offsets(hw, offsets):
    assert square_window_offsets(*hw) == offsets


def test_clip_eval_embedding_of_a_wide_image_averages_its_windows():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100)
        clip = tiny_clip("vit")
    x01 = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(3))
    got = image_embedding(clip, x01, 0)
    left = clip.encode_image(clip.normalize(x01[..., :, :32]))
    right = clip.encode_image(clip.normalize(x01[..., :, 32:]))
    expected = mean_unit_embedding(torch.stack([left, right], dim=1))
    assert torch.allclose(got, expected, atol=1e-6 * expected.abs().max().item())
    square = x01[..., :32]
    assert torch.equal(image_embedding(clip, square, 0),
                       mean_unit_embedding(clip.encode_image(eval_preprocess(clip, square)).unsqueeze(1)))


def test_random_cuts_of_a_wide_image_reach_both_ends():
    """Left half black, right half white: upstream's crop could only take the centre; the windows see both."""
    x = torch.zeros(3, 32, 96)
    x[..., 48:] = 1
    cuts = random_cuts(x, 24, 16, torch.Generator().manual_seed(0))
    assert cuts.shape == (24, 3, 16, 16)
    means = cuts.mean(dim=(1, 2, 3))
    assert means.min().item() < 0.1 and means.max().item() > 0.9
    assert torch.equal(cuts, random_cuts(x, 24, 16, torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------ the pipelines on tiny models

RUN = dict(respacing="10", skip_timesteps=7, resample_steps=1, diff_iter=1, ncuts=2, range_restart=False)


@pytest.fixture(scope="module")
def tiny():
    """Tiny UNet sampled at 64 px (multiple 32), the 2-block DINO and one tiny CLIP."""
    ddpm = load_ddpm(tiny_unet_state_dict(0), device="cpu", image_size=64, num_head_channels=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100)
        clip = [tiny_clip("vit")]
    return ddpm, _small_dino(), clip


def _source(h, w, seed=0):
    return F.interpolate(smooth_image(seed, 64), size=(h, w), mode="bilinear", align_corners=False)


def test_text_16_9_shapes_and_determinism(tiny):
    ddpm, dino, clip = tiny
    source = _source(90, 160)
    a = diffuseit_text(ddpm, dino, clip, source, "Lion", "Black Leopard", keep_aspect=True, **RUN)
    b = diffuseit_text(ddpm, dino, clip, source, "Lion", "Black Leopard", keep_aspect=True, **RUN)
    assert a.images.shape == a.samples.shape == (1, 3, 64, 128)  # 64 * 16/9 = 113.8 -> 4 * 32
    assert torch.equal(a.images, b.images) and torch.isfinite(a.images).all()
    up = diffuseit_text(ddpm, dino, clip, source, "Lion", "Black Leopard", keep_aspect=True,
                        upscale_to_source=True, **RUN)
    assert up.images.shape == (1, 3, 90, 160)
    assert torch.equal(up.images, resize_to(a.images, (90, 160)))


def test_image_9_16_shapes(tiny):
    ddpm, dino, _ = tiny
    style = _source(50, 30, seed=3)  # any size: the style term resizes it to the sampled size
    out = diffuseit_image(ddpm, dino, _source(160, 90), style, keep_aspect=True, samples=2, **RUN)
    assert out.images.shape == (2, 3, 128, 64) and torch.isfinite(out.images).all()
    assert not torch.equal(out.images[0], out.images[1])


def test_square_source_is_sampled_exactly_as_before(tiny):
    ddpm, dino, clip = tiny
    source = _source(64, 64, seed=4)
    upstream = diffuseit_text(ddpm, dino, clip, source, "Lion", "Black Leopard", keep_aspect=False, **RUN)
    kept = diffuseit_text(ddpm, dino, clip, source, "Lion", "Black Leopard", keep_aspect=True,
                          upscale_to_source=True, **RUN)
    assert torch.equal(upstream.images, kept.images) and torch.equal(upstream.samples, kept.samples)


def test_faithful_call_still_wants_the_model_size(tiny):
    ddpm, dino, clip = tiny
    with pytest.raises(ValueError, match=r"source is \(90, 160\); resize it to the model's 64x64 first .*keep_aspect"):
        diffuseit_text(ddpm, dino, clip, _source(90, 160), "Lion", "Black Leopard", **RUN)
