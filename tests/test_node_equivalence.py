"""The node graphs give the library's images: a wrong wiring in nodes/ (a swapped or rescaled weight,
an inverted switch) changes the result and fails here.

Each chain is wired as workflows/*.json wires it (LoadDDPM / LoadDINO / LoadCLIPGuidance -> loss nodes
-> Guided Sampler [-> Color Match | Background Blend, CLIP Rank]) on the tiny random models, and run
next to the library function (``diffuseit_text``, ``diffuseit_image``, ``blended_edit``) with the same
models, settings and seed. Both run the same float32 computation in the same process, so they agree to
a few float32 epsilons at the image's scale; every weight below is non-zero and distinct and the step
count lets each gradient reach the image, so a miswired weight moves it by far more than that.
"""

import pytest
import torch

from conftest import assert_close, float32_atol
from test_nodes import _run, _tiny_ddpm_node_output, _tiny_models_folder

ULPS = 64  # reassociation slack only; the computation is the same on both sides

# distinct non-zero weights (a swap of any two changes the loss)
TEXT = dict(lambda_ssim=1000.0, lambda_contra=200.0, lambda_dir_cls=100.0, lambda_clip=2000.0, lambda_range=200.0)
IMAGE = dict(lambda_ssim=1000.0, lambda_contra=200.0, lambda_dir_cls=100.0, lambda_trg=2000.0, lambda_mse=3000.0,
             lambda_range=200.0)
RUN = dict(respacing="10", skip_timesteps=6, resample_steps=2, max_restarts=1)  # 2 repeats + 3 steps (+ restarts)
DIFF_ITER = 1  # semantic divergence active at t = 3, 2 of the 0..3 that run
SEED, SAMPLES = 5, 1


@pytest.fixture(scope="module")
def models(pack):
    _, folder = pack
    ddpm = _tiny_ddpm_node_output(folder)
    _tiny_models_folder(folder)
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance, LoadDINO
    (dino,) = _run(LoadDINO, dino_name="tiny_dino_vit.safetensors", antialias=False)
    (clip,) = _run(LoadCLIPGuidance, models="tiny-clip", dtype="fp32")
    return ddpm, dino, clip


def _image(h, w, seed):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _model(image):
    from diffuseit_pack.core.io import to_model
    return to_model(image)


def _from_model(x):
    from diffuseit_pack.core.io import from_model
    return from_model(x)


def _sampler(ddpm, image, guidance, **kw):
    from diffuseit_pack.nodes.sampling import GuidedSampler
    args = dict(respacing=RUN["respacing"], skip_timesteps=RUN["skip_timesteps"], resample_steps=RUN["resample_steps"],
                sampler="ddpm", seed=SEED, samples=SAMPLES, range_restart=True, max_restarts=RUN["max_restarts"])
    args.update(kw)
    return _run(GuidedSampler, ddpm=ddpm, image=image, guidance=guidance, **args)[0]


def test_diffuseit_text_graph_equals_diffuseit_text(models):
    ddpm, dino, clip = models
    from diffuseit_pack.nodes import guidance as g
    from diffuseit_pack.core.diffuseit import diffuseit_text
    image = _image(32, 32, 1)  # model size: the sampler's resize is the identity
    # workflows/DiffuseIT text-guided translation.json: Structure (regularize_content) -> Semantic Divergence -> CLIP -> Range
    (chain,) = _run(g.DINOStructureLossNode, dino=dino, lambda_ssim=TEXT["lambda_ssim"],
                    lambda_contra=TEXT["lambda_contra"], contrast_schedule="regularize_content", noise_mix=True)
    (chain,) = _run(g.SemanticDivergenceNode, dino=dino, lambda_dir_cls=TEXT["lambda_dir_cls"], diff_iter=DIFF_ITER,
                    noise_mix=True, guidance=chain)
    (chain,) = _run(g.CLIPDirectionalLossNode, clip=clip, source_text="Lion", target_text="Black Leopard",
                    lambda_clip=TEXT["lambda_clip"], ncuts=2, guidance=chain)
    (chain,) = _run(g.RangeLossNode, weight=TEXT["lambda_range"], guidance=chain)
    out = _sampler(ddpm, image, chain)
    lib = diffuseit_text(ddpm.value, dino.value, clip.value, _model(image), "Lion", "Black Leopard", samples=SAMPLES,
                         seed=SEED, preset="text", ncuts=2, diff_iter=DIFF_ITER, noise_mix_all=True,
                         range_restart=True, **RUN, **TEXT)
    expected = _from_model(lib.images)
    assert_close(out, expected, float32_atol(expected, ULPS), rtol=0, what="text graph vs diffuseit_text")


def test_diffuseit_text_graph_keeps_aspect_like_diffuseit_text(models):
    """keep_aspect + upscale_to_source in the node are the library's: a 24x40 image is sampled at 32x52
    and returned at 24x40 by both."""
    ddpm, dino, clip = models
    from diffuseit_pack.nodes import guidance as g
    from diffuseit_pack.core.diffuseit import diffuseit_text
    image = _image(24, 40, 6)
    (chain,) = _run(g.DINOStructureLossNode, dino=dino, lambda_ssim=TEXT["lambda_ssim"],
                    lambda_contra=TEXT["lambda_contra"], contrast_schedule="regularize_content", noise_mix=True)
    (chain,) = _run(g.CLIPDirectionalLossNode, clip=clip, source_text="Lion", target_text="Black Leopard",
                    lambda_clip=TEXT["lambda_clip"], ncuts=2, guidance=chain)
    (chain,) = _run(g.RangeLossNode, weight=TEXT["lambda_range"], guidance=chain)
    out = _sampler(ddpm, image, chain, keep_aspect=True, upscale_to_source=True)
    lib = diffuseit_text(ddpm.value, dino.value, clip.value, _model(image), "Lion", "Black Leopard", samples=SAMPLES,
                         seed=SEED, preset="text", ncuts=2, noise_mix_all=True, range_restart=True,
                         keep_aspect=True, upscale_to_source=True, **RUN,
                         **dict(TEXT, lambda_dir_cls=0.0))
    assert lib.samples.shape[-2:] == (32, 52) and out.shape == (1, 24, 40, 3)
    expected = _from_model(lib.images)
    assert_close(out, expected, float32_atol(expected, ULPS), rtol=0, what="keep_aspect graph vs diffuseit_text")


def test_diffuseit_image_graph_equals_diffuseit_image(models):
    ddpm, dino, _ = models
    from diffuseit_pack.nodes import guidance as g
    from diffuseit_pack.nodes.postprocess import ColorMatch
    from diffuseit_pack.core.diffuseit import diffuseit_image
    image, style = _image(32, 32, 2), _image(32, 32, 3)
    # workflows/DiffuseIT image-guided translation.json: Structure -> Semantic Divergence -> Style -> Range -> sampler -> Color Match
    (chain,) = _run(g.DINOStructureLossNode, dino=dino, lambda_ssim=IMAGE["lambda_ssim"],
                    lambda_contra=IMAGE["lambda_contra"], contrast_schedule="constant", noise_mix=True)
    (chain,) = _run(g.SemanticDivergenceNode, dino=dino, lambda_dir_cls=IMAGE["lambda_dir_cls"], diff_iter=DIFF_ITER,
                    noise_mix=True, guidance=chain)
    (chain,) = _run(g.DINOStyleLossNode, dino=dino, style_image=style, lambda_trg=IMAGE["lambda_trg"],
                    lambda_mse=IMAGE["lambda_mse"], noise_mix=True, guidance=chain)
    (chain,) = _run(g.RangeLossNode, weight=IMAGE["lambda_range"], guidance=chain)
    sampled = _sampler(ddpm, image, chain)
    (out,) = _run(ColorMatch, image=sampled, reference=style)
    lib = diffuseit_image(ddpm.value, dino.value, _model(image), _model(style), samples=SAMPLES, seed=SEED,
                          preset="image", diff_iter=DIFF_ITER, noise_mix_all=True, range_restart=True,
                          colormatch=True, **RUN, **IMAGE)
    expected = _from_model(lib.images)
    # Color Match re-reads the sampler's [0,1] image: one [0,1] <-> [-1,1] round trip more than the library
    assert_close(out, expected, float32_atol(expected, ULPS), rtol=0, what="image graph vs diffuseit_image")


def test_blended_graph_equals_blended_edit(models):
    ddpm, _, clip = models
    from diffuseit_pack.nodes import guidance as g
    from diffuseit_pack.nodes.blending import BackgroundBlend
    from diffuseit_pack.nodes.ranking import CLIPRank
    from diffuseit_pack.core.blended import blended_edit
    prompt, samples = "a red ball", 3
    for h, w in ((32, 32), (48, 64)):  # model size (ranked on the same pixels), and a crop + stitch-back
        image = _image(h, w, 4)
        mask = torch.zeros(1, h, w)
        mask[:, h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 1
        # workflows/Blended Diffusion local edit.json: Masked CLIP -> Range; Background Blend; sampler; CLIP Rank
        (chain,) = _run(g.MaskedCLIPLossNode, clip=clip, prompt=prompt, lambda_clip=1000.0, n_cuts=3)
        (chain,) = _run(g.RangeLossNode, weight=50.0, guidance=chain)
        (blend,) = _run(BackgroundBlend, mask=mask)
        out = _sampler(ddpm, image, chain, blend=blend, respacing="10", skip_timesteps=5, resample_steps=1, seed=1,
                       samples=samples, range_restart=False)
        lib = blended_edit(ddpm.value, clip.value[0], _model(image), mask[:, None], prompt, samples=samples, seed=1,
                           respacing="10", skip_timesteps=5, lambda_clip=1000.0, lambda_range=50.0, n_cuts=3)
        expected = _from_model(lib.images)  # ranked; lib.order indexes the unranked batch
        assert_close(out[lib.order], expected, float32_atol(expected, ULPS), rtol=0,
                     what=f"blended graph vs blended_edit at {h}x{w}")
        if (h, w) == (32, 32):
            ranked, _, scores = _run(CLIPRank, images=out, clip=clip, prompt=prompt, top_k=samples, mask=mask)
            assert_close(ranked, expected, float32_atol(expected, ULPS), rtol=0, what="CLIP Rank vs blended_edit")
