"""CLIP Rank (node) and blended_edit's ranking (library) score the same thing: the model-size crop
around the mask, so the same samples come out in the same order with the same distances."""

import json
import os

import pytest
import torch

from conftest import ROOT


def _run(node, **kwargs):
    with torch.inference_mode():
        return node.execute(**kwargs).result


def _workflow_geometry():
    """Image size, edit mask and Background Blend settings of workflows/Blended Diffusion with core nodes.json."""
    with open(os.path.join(ROOT, "workflows", "Blended Diffusion with core nodes.json")) as f:
        nodes = {n["type"] if n["type"] not in ("SolidMask",) else n["title"]: n for n in json.load(f)["nodes"]}
    _, width, height, _ = nodes["ImageScale"]["widgets_values"]
    value, cw, ch = nodes["Canvas (keep)"]["widgets_values"]
    box_value, bw, bh = nodes["Edit box"]["widgets_values"]
    x, y, op = nodes["MaskComposite"]["widgets_values"]
    assert (cw, ch) == (width, height) and op == "add"
    mask = torch.full((1, height, width), float(value))
    mask[:, y:y + bh, x:x + bw] = (mask[:, y:y + bh, x:x + bw] + box_value).clamp(0, 1)
    mode, enforce, invert, soft, dilate, crop_margin, feather = nodes["BackgroundBlend"]["widgets_values"]
    blend = dict(mode=mode, enforce_background=enforce, invert_mask=invert, soft_mask=soft, dilate=dilate,
                 crop_margin=crop_margin, feather=feather)
    prompt = nodes["MaskedCLIPLoss"]["widgets_values"][0]
    return width, height, mask, blend, prompt, (x, y, bw, bh)


def test_clip_rank_node_orders_like_the_library_on_the_workflow_geometry(pack):
    _, models = pack
    from core.blended import blended_sample
    from core.diffusion.guided_loop import GuidedSamplerOptions
    from core.io import from_model
    from core.blended.ranking import rank_results
    from core.tiny_models import write_tiny_models
    from diffuseit_pack.nodes.blending import BackgroundBlend
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance, LoadDDPM
    from diffuseit_pack.nodes.ranking import CLIPRank

    # the 256 px DDPM: the workflow's crop geometry; force: the session's stub models folder also holds
    # the other node tests' fixture copies, which tiny-models would otherwise refuse to write among
    write_tiny_models(models, dino=False, lpips=False, force=True)
    width, height, mask, blend_args, prompt, (x, y, bw, bh) = _workflow_geometry()
    (ddpm,) = _run(LoadDDPM, ckpt_name="256x256_diffusion_uncond.pt", dtype="fp32", overrides="")
    (clip,) = _run(LoadCLIPGuidance, models="tiny-clip-vit", dtype="fp32")
    (spec,) = _run(BackgroundBlend, mask=mask, **blend_args)
    gen = torch.Generator().manual_seed(0)
    photo = torch.nn.functional.interpolate(torch.rand(1, 3, height // 16, width // 16, generator=gen) * 2 - 1,
                                            size=(height, width), mode="bicubic").clamp(-1, 1)
    samples = 4
    result = blended_sample(ddpm.value, photo, spec, (), samples=samples, seed=0, respacing="10",
                            options=GuidedSamplerOptions(skip_timesteps=8))
    assert result.images.shape == (samples, 3, height, width)
    outside = torch.ones(height, width, dtype=torch.bool)
    outside[y:y + bh, x:x + bw] = False
    assert torch.equal(result.images[..., outside], photo.expand(samples, -1, -1, -1)[..., outside])

    # the library: blended_edit ranks the model-size edits under their crop masks
    library = rank_results(result.edits, result.masks, clip.value[0], prompt)
    # the node: the stitched full-resolution images, with the same mask (or the same blend)
    images = from_model(result.images)
    for wiring in (dict(mask=mask, crop_margin=blend_args["crop_margin"]), dict(blend=spec)):
        ranked, best, scores = _run(CLIPRank, images=images, clip=clip, prompt=prompt, top_k=samples, **wiring)
        order = [next(i for i in range(samples) if torch.equal(images[i], r)) for r in ranked]
        assert order == library.order.tolist()
        rows = json.loads(scores)
        assert [row["index"] for row in rows] == order
        assert torch.allclose(torch.tensor([row["score"] for row in rows]), library.sorted_scores, atol=1e-5)


def test_clip_rank_criteria_and_the_scores_report(pack):
    """criteria "paper" (the default) ranks by the masked distance; "improved" by the weighted components;
    scores reports every component of every sample, best first, either way."""
    _, models = pack
    from core.blended.rank_criteria import COMPONENTS
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance
    from diffuseit_pack.nodes.ranking import CLIPRank
    from test_nodes import _tiny_models_folder

    _tiny_models_folder(models)
    (clip,) = _run(LoadCLIPGuidance, models="tiny-clip", dtype="fp32")
    height, width = 40, 48
    ramp = torch.linspace(0.1, 0.9, width).expand(height, width)
    source = torch.stack([ramp, torch.full((height, width), 0.5), ramp.flip(1)], -1)
    mask = torch.zeros(1, height, width)
    mask[:, 10:30, 12:36] = 1
    gen = torch.Generator().manual_seed(5)
    images = source.repeat(4, 1, 1, 1)
    images[:, 12:28, 14:34] = torch.rand(4, 16, 20, 3, generator=gen)  # the edits stay off the border ...
    images[2, 10:30, 12:36] = (images[2, 10:30, 12:36] + 0.45).clamp(0, 1)  # ... but one sample's seam breaks
    common = dict(images=images, clip=clip, prompt="a red ball", top_k=4, mask=mask, crop_size=0)

    _, _, default = _run(CLIPRank, **common)
    ranked, _, paper = _run(CLIPRank, criteria="paper", **common)
    assert paper == default
    rows = json.loads(paper)
    assert [set(row) for row in rows] == [{"index", "score", *COMPONENTS}] * 4
    assert [row["score"] for row in rows] == [row["masked_prompt"] for row in rows]
    assert [row["score"] for row in rows] == sorted(row["score"] for row in rows)
    assert all(torch.equal(ranked[k], images[row["index"]]) for k, row in enumerate(rows))
    worst_seam = max(rows, key=lambda row: row["seam"])
    assert worst_seam["index"] == 2 and all(row["seam"] < worst_seam["seam"] / 4 for row in rows if row["index"] != 2)

    weights = dict(weight_masked_prompt=1.0, weight_whole_image=0.5, weight_typography=0.25, weight_seam=2.0)
    ranked, best, improved = _run(CLIPRank, criteria="improved", **weights, **common)
    rows = json.loads(improved)
    names = dict(zip(COMPONENTS, weights.values()))
    for row in rows:
        assert row["score"] == pytest.approx(sum(w * row[name] for name, w in names.items()), abs=1e-5)
    assert [row["score"] for row in rows] == sorted(row["score"] for row in rows)
    assert rows[-1]["index"] == 2  # the broken seam ranks last
    assert torch.equal(ranked[-1], images[2]) and torch.equal(best, ranked)
    # the components do not depend on the weights
    assert [{n: r[n] for n in COMPONENTS} for r in sorted(rows, key=lambda r: r["index"])] == \
        [{n: r[n] for n in COMPONENTS} for r in sorted(json.loads(paper), key=lambda r: r["index"])]

    zero = dict.fromkeys(weights, 0.0)
    with pytest.raises(ValueError, match=r"^CLIP Rank: ranking criteria need at least one weight > 0"):
        _run(CLIPRank, criteria="improved", **zero, **common)
    with pytest.raises(ValueError, match=r"^CLIPRank criteria: 'best' is not one of paper, improved$"):
        _run(CLIPRank, criteria="best", **common)
