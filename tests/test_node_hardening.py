"""Bad and unusual input through the nodes: each gets a clear message naming the input, or a tested behaviour."""

import os

import pytest
import torch

from conftest import fixture_path
from test_nodes import _run, _tiny_ddpm_node_output, _tiny_models_folder


@pytest.fixture(scope="module")
def graph(pack):
    _, models = pack
    ddpm = _tiny_ddpm_node_output(models)
    _tiny_models_folder(models)
    from diffuseit_pack.nodes import guidance as g
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance
    (clip,) = _run(LoadCLIPGuidance, models="tiny-clip", dtype="fp32")
    (chain,) = _run(g.RangeLossNode, weight=50.0)
    return models, ddpm, clip, chain


def sampler(**kw):
    from diffuseit_pack.nodes.sampling import GuidedSampler
    args = dict(respacing="10", skip_timesteps=7, resample_steps=1, seed=0, samples=1)
    args.update(kw)
    return _run(GuidedSampler, **args)[0]


# the tiny UNet samples 32 px with sides multiples of 4: keep_aspect (the default) gives these sizes
@pytest.mark.parametrize("shape, sampled", [((1, 20, 30, 1), (32, 48)), ((1, 20, 30, 4), (32, 48)),
                                            ((1, 8, 8, 3), (32, 32)), ((1, 300, 40, 3), (128, 32))])  # 7.5:1 -> 4:1
def test_unusual_images_are_accepted(graph, shape, sampled):
    _, ddpm, _, chain = graph
    out = sampler(ddpm=ddpm, image=torch.rand(*shape), guidance=chain)
    assert out.shape == (1, *sampled, 3) and torch.isfinite(out).all()
    size = ddpm.value.image_size
    square = sampler(ddpm=ddpm, image=torch.rand(*shape), guidance=chain, keep_aspect=False)
    assert square.shape == (1, size, size, 3) and torch.isfinite(square).all()


def test_seed_extremes(graph):
    _, ddpm, _, chain = graph
    image = torch.rand(1, 32, 32, 3)
    top = 0xFFFFFFFFFFFFFFFF
    a = sampler(ddpm=ddpm, image=image, guidance=chain, seed=top, samples=2)
    b = sampler(ddpm=ddpm, image=image, guidance=chain, seed=top, samples=2)
    c = sampler(ddpm=ddpm, image=image, guidance=chain, seed=0, samples=2)
    assert torch.equal(a, b)
    assert not any(torch.equal(a[i], c[j]) for i in range(2) for j in range(2))  # row seeds mix (seed, row): no shared rows


def test_masks_of_other_size_full_and_empty(graph):
    _, ddpm, clip, chain = graph
    from diffuseit_pack.nodes.blending import BackgroundBlend
    image = torch.rand(1, 40, 60, 3)
    small = torch.zeros(1, 20, 30)
    small[:, 5:10, 10:20] = 1
    (blend,) = _run(BackgroundBlend, mask=small)
    out = sampler(ddpm=ddpm, image=image, guidance=chain, blend=blend)
    assert out.shape == (1, 40, 60, 3)
    big_mask = torch.nn.functional.interpolate(small[None], size=(40, 60), mode="nearest-exact")[0]
    keep = (big_mask == 0)[..., None].expand_as(out)
    assert torch.equal(out[keep], image[keep])
    (full,) = _run(BackgroundBlend, mask=torch.ones(1, 40, 60))
    assert sampler(ddpm=ddpm, image=image, guidance=chain, blend=full).shape == out.shape
    (empty,) = _run(BackgroundBlend, mask=torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="(?i)empty"):
        sampler(ddpm=ddpm, image=image, guidance=chain, blend=empty)


def test_batch_mismatch_between_images_and_masks(graph):
    _, ddpm, _, chain = graph
    from diffuseit_pack.nodes.blending import BackgroundBlend
    (blend,) = _run(BackgroundBlend, mask=torch.ones(2, 32, 32))
    with pytest.raises(ValueError, match="mask batch 2 does not match image batch 3"):
        sampler(ddpm=ddpm, image=torch.rand(3, 32, 32, 3), guidance=chain, blend=blend)


def test_nan_guidance_is_reported(graph):
    _, ddpm, _, _ = graph
    from diffuseit_pack.nodes import guidance as g
    from diffuseit_pack.core.diffusion.finite_watch import GuidanceError
    (chain,) = _run(g.RangeLossNode, weight=float("inf"))
    with pytest.raises(GuidanceError, match="range"):
        sampler(ddpm=ddpm, image=torch.rand(1, 32, 32, 3) * 4, guidance=chain)


def test_loaders_reject_wrong_truncated_and_pickled_files(pack):
    _, models = pack
    from diffuseit_pack.nodes.loaders import LoadDDPM, LoadDINO
    from safetensors.torch import save_file
    gd = models / "guided_diffusion"
    gd.mkdir(exist_ok=True)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(gd / "sd.safetensors"))
    with pytest.raises(ValueError, match="Stable Diffusion"):
        _run(LoadDDPM, ckpt_name="sd.safetensors", dtype="fp32", overrides="")
    data = open(fixture_path("guided_diffusion", "tiny_unet.pt"), "rb").read()
    (gd / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _run(LoadDDPM, ckpt_name="cut.pt", dtype="fp32", overrides="")

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("true",))

    dino = models / "dino"
    dino.mkdir(exist_ok=True)
    torch.save({"cls_token": torch.zeros(1), "evil": RunsCode()}, dino / "evil.pth")
    with pytest.raises(ValueError) as err:
        _run(LoadDINO, dino_name="evil.pth", antialias=False)
    assert "evil.pth" in str(err.value)
    with pytest.raises(FileNotFoundError, match="dino_vitbase8_pretrain"):
        _run(LoadDINO, dino_name="dino_vitbase8_pretrain.pth", antialias=False)


def test_missing_clip_weights_name_the_file_and_folder(pack):
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance
    with pytest.raises(FileNotFoundError) as err:
        _run(LoadCLIPGuidance, models="ViT-B-16", dtype="fp32")
    msg = str(err.value)
    assert "ViT-B-16.pt" in msg and "clip_guidance" in msg and "https://" in msg
    with pytest.raises(ValueError, match="models is empty"):
        _run(LoadCLIPGuidance, models=" , ", dtype="fp32")
