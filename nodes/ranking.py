"""CLIP Rank: sort a batch of edits by masked CLIP distance to the prompt (best first).

With a mask (or a Background Blend) it scores what Blended Diffusion edited and what upstream and
``core.blended.blended_edit`` rank: the model-size crop around the mask (``core.blended.ranking_crops``),
not the whole stitched photo, so the same samples come out in the same order from the node and the library.

``criteria`` "paper" (the default) ranks by that distance alone, as the paper does; "improved" ranks by a
weighted sum of it, the whole view's distance to the prompt, a typography penalty and the seam's consistency
(``core.blended.rank_criteria``). ``scores`` reports every component of every sample either way.
"""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from ..core.blended import BlendSpec, ranking_crops
from ..core.blended.rank_criteria import COMPONENTS, CRITERIA_PRESETS, IMPROVED_CRITERIA, RankingCriteria
from ..core.blended.ranking import rank_results
from ..core.io import to_model
from . import checks, comfy_bridge as bridge
from .schema_features import advanced, schema
from .types import BlendType, CLIPType

CATEGORY = "DiffuseIT-Blended/blended diffusion"
IMPROVED = "[improved ranking] "  # tooltip prefix of the inputs that only criteria "improved" uses
# optional: prompts and workflows saved before these inputs existed still run (the paper's ranking)
WEIGHT = dict(min=0.0, max=100.0, step=0.05, optional=True)


def ranking_criteria(criteria: str, weights: dict[str, float], seam_width: int) -> RankingCriteria:
    """The criteria a CLIP Rank run ranks by: the paper's (the weights are not used), or the given weights."""
    if criteria not in CRITERIA_PRESETS:
        raise ValueError(f"CLIP Rank: criteria must be one of {list(CRITERIA_PRESETS)}, got {criteria!r}")
    try:
        if criteria == "paper":
            return RankingCriteria(seam_width=seam_width)  # the seam width still shapes the reported seam term
        return RankingCriteria(**weights, seam_width=seam_width)
    except ValueError as error:
        raise ValueError(f"CLIP Rank: {error}") from None


def scores_report(result) -> str:
    """JSON list, best first: per sample its batch index, ranking score and every component."""
    return json.dumps([{"index": i, "score": round(float(result.scores[i]), 6),
                        **{name: round(float(result.components[name][i]), 6) for name in COMPONENTS}}
                       for i in result.order.tolist()])


class CLIPRank(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="CLIPRank", display_name="CLIP Rank", category=CATEGORY,
            search_aliases=["Blended Diffusion", "CLIP ranking", "CLIP score", "rerank"],
            description="Ranks results by the unaugmented CLIP distance between the masked image and the prompt "
                        "(Blended Diffusion's selection; lower is better).",
            inputs=[
                io.Image.Input("images", tooltip="The batch to rank (e.g. Guided Sampler's samples)."),
                CLIPType.Input("clip", tooltip="CLIP from Load CLIP (first model of the list is used)."),
                io.String.Input("prompt", default="a red ball", multiline=True, tooltip="The edit's prompt."),
                io.Int.Input("top_k", default=1, min=1, max=4096, tooltip="How many of the best to return on top_k."),
                io.Boolean.Input("faithful", default=False,
                                 tooltip="Reproduce the official ranking exactly (no CLIP normalisation, black "
                                         "background, no antialias, sort by 4-decimal string). Off: the cleaner "
                                         "variant that scores what the guidance saw."),
                io.Mask.Input("mask", optional=True, tooltip="The edit mask (Background Blend's); none = whole image."),
                advanced(io.Int.Input, "crop_size", default=256, min=0, max=4096,
                         tooltip="The model's resolution (256 for the ImageNet model). Each image is scored on the "
                                 "square around the mask that Guided Sampler edited (crop_margin context, at least "
                                 "this size), resized to this size, as the official ranking does. 0 = score the "
                                 "whole image."),
                advanced(io.Float.Input, "crop_margin", default=0.25, min=0.0, max=4.0, step=0.05,
                         tooltip="Background Blend's crop_margin (ignored when a blend is wired)."),
                BlendType.Input("blend", optional=True,
                                tooltip="The Background Blend given to Guided Sampler: its mask, invert, dilate and "
                                        "crop_margin are used (instead of mask / crop_margin)."),
                io.Combo.Input("criteria", options=list(CRITERIA_PRESETS), default="paper", optional=True,
                               tooltip="paper: the masked CLIP distance alone (Blended Diffusion's ranking). "
                                       "improved: a weighted sum of it, the whole view's CLIP distance, a penalty for "
                                       "looking like the prompt written as text, and the seam's consistency with the "
                                       "surroundings (the weight_* inputs). scores reports every term either way."),
                io.Float.Input("weight_masked_prompt", default=IMPROVED_CRITERIA.masked_prompt, **WEIGHT,
                               tooltip=IMPROVED + "Weight of the masked region's CLIP distance to the prompt (the "
                                                  "paper's term)."),
                io.Float.Input("weight_whole_image", default=IMPROVED_CRITERIA.whole_image_prompt, **WEIGHT,
                               tooltip=IMPROVED + "Weight of the whole scored view's (crop or image, unmasked) CLIP "
                                                  "distance to the prompt: the edit judged in its context."),
                io.Float.Input("weight_typography", default=IMPROVED_CRITERIA.typography, **WEIGHT,
                               tooltip=IMPROVED + "Penalty weight of the masked region's CLIP similarity to the prompt "
                                                  "rendered as text (CLIP's typographic bias)."),
                io.Float.Input("weight_seam", default=IMPROVED_CRITERIA.seam, **WEIGHT,
                               tooltip=IMPROVED + "Weight of the seam term: mean RGB difference (0..1) between the "
                                                  "band just inside the mask and the pixels just outside it."),
                io.Int.Input("seam_width", default=0, min=0, max=256, optional=True,
                             tooltip="Width in pixels (of the scored view) of the seam band; 0 = side / 64 (4 px on a "
                                     "256 px crop)."),
            ],
            outputs=[
                io.Image.Output(display_name="ranked", tooltip="All images, best first."),
                io.Image.Output(display_name="top_k", tooltip="The best top_k images."),
                io.String.Output(display_name="scores",
                                 tooltip="JSON list, best first: per sample its batch index, score (the masked "
                                         "distance with criteria paper, the weighted total with improved) and every "
                                         "component (masked_prompt, whole_image_prompt, typography, seam)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, criteria: str | None = None) -> bool | str:
        return checks.validation_result("CLIPRank", {"criteria": criteria}, {"criteria": list(CRITERIA_PRESETS)})

    @classmethod
    def execute(cls, images, clip, prompt, top_k=1, faithful=False, mask=None, crop_size=256, crop_margin=0.25,
                blend=None, criteria="paper", weight_masked_prompt=IMPROVED_CRITERIA.masked_prompt,
                weight_whole_image=IMPROVED_CRITERIA.whole_image_prompt, weight_typography=IMPROVED_CRITERIA.typography,
                weight_seam=IMPROVED_CRITERIA.seam, seam_width=0) -> io.NodeOutput:
        checks.check_inputs("CLIPRank", {"criteria": criteria}, {"criteria": list(CRITERIA_PRESETS)})
        if not prompt or not prompt.strip():
            raise ValueError("CLIP Rank: prompt is empty")
        weights = ranking_criteria(criteria, dict(masked_prompt=weight_masked_prompt,
                                                  whole_image_prompt=weight_whole_image, typography=weight_typography,
                                                  seam=weight_seam), seam_width)
        model = clip.value[0]
        bridge.load_to_device([clip])
        with torch.inference_mode(False):
            x = to_model(images.clone()).to(model.device)
            spec = blend if blend is not None else (
                BlendSpec(mask.clone().float(), crop_margin=crop_margin) if mask is not None else None)
            if spec is None:  # nothing to crop around: the whole image
                m = torch.ones(1, 1, *x.shape[-2:])
            elif crop_size > 0:  # the model-size crop around the mask, as Guided Sampler edited it
                x, m = ranking_crops(x, spec, crop_size)
            else:  # the whole image under its full-resolution mask, one mask per source image
                groups = spec.mask.shape[0]
                if x.shape[0] % groups:
                    raise ValueError(f"CLIP Rank: {x.shape[0]} images cannot be split among {groups} masks")
                m = torch.cat([spec.full_mask(x, i, groups) for i in range(groups)])
                m = m.repeat_interleave(x.shape[0] // groups, dim=0)
            result = rank_results(x, m.to(x.device), model, prompt, top_k=min(top_k, x.shape[0]), faithful=faithful,
                                  criteria=weights, report_all=True)
        ranked = images[result.order.to(images.device)]
        best = images[result.top_k.to(images.device)]
        return io.NodeOutput(ranked, best, scores_report(result))
