"""Guided Sampler's keep_aspect / upscale_to_source on the tiny models (32 px UNet, sides multiples of 4)."""

import torch

from test_node_hardening import graph, sampler  # noqa: F401  (graph is a fixture)


def test_output_sizes(graph):  # noqa: F811
    _, ddpm, _, chain = graph
    wide = torch.rand(1, 24, 40, 3, generator=torch.Generator().manual_seed(0))
    kept = sampler(ddpm=ddpm, image=wide, guidance=chain)  # keep_aspect is on by default
    assert kept.shape == (1, 32, 52, 3)  # 32 * 40/24 = 53.3 -> 13 * 4
    tall = sampler(ddpm=ddpm, image=wide.transpose(1, 2).contiguous(), guidance=chain)
    assert tall.shape == (1, 52, 32, 3)
    up = sampler(ddpm=ddpm, image=wide, guidance=chain, upscale_to_source=True)
    assert up.shape == wide.shape and 0 <= up.min() and up.max() <= 1
    assert torch.equal(kept, sampler(ddpm=ddpm, image=wide, guidance=chain))  # same seed, same pixels
    squashed = sampler(ddpm=ddpm, image=wide, guidance=chain, keep_aspect=False)
    assert squashed.shape == (1, 32, 32, 3)
    assert sampler(ddpm=ddpm, image=wide, guidance=chain, keep_aspect=False, upscale_to_source=True).shape == wide.shape


def test_square_image_is_unchanged_by_keep_aspect(graph):  # noqa: F811
    _, ddpm, _, chain = graph
    for size in (32, 48):  # at the model size, and resized to it
        image = torch.rand(2, size, size, 3, generator=torch.Generator().manual_seed(size))
        upstream = sampler(ddpm=ddpm, image=image, guidance=chain, keep_aspect=False, samples=2)
        kept = sampler(ddpm=ddpm, image=image, guidance=chain, keep_aspect=True, samples=2)
        assert upstream.shape == (4, 32, 32, 3) and torch.equal(upstream, kept)
