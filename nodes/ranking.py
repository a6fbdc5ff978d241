"""CLIP Rank: sort a batch of edits by masked CLIP distance to the prompt (best first)."""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from ..core.io import to_model
from ..core.blended.masks import prepare_mask
from ..core.blended.ranking import rank_results
from . import comfy_bridge as bridge
from .types import CLIPType

CATEGORY = "DiffuseIT-Blended/blended diffusion"


class CLIPRank(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CLIPRank", display_name="CLIP Rank", category=CATEGORY,
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
            ],
            outputs=[
                io.Image.Output(display_name="ranked", tooltip="All images, best first."),
                io.Image.Output(display_name="top_k", tooltip="The best top_k images."),
                io.String.Output(display_name="scores", tooltip="JSON list of distances, best first."),
            ],
        )

    @classmethod
    def execute(cls, images, clip, prompt, top_k=1, faithful=False, mask=None) -> io.NodeOutput:
        if not prompt or not prompt.strip():
            raise ValueError("CLIP Rank: prompt is empty")
        model = clip.value[0]
        bridge.load_to_device([clip])
        with torch.inference_mode(False):
            x = to_model(images.clone()).to(model.device)
            h, w = x.shape[-2:]
            m = torch.ones(1, 1, h, w) if mask is None else prepare_mask(mask.clone().float(), h, w, allow_full=True)
            result = rank_results(x, m.to(x.device), model, prompt, top_k=min(top_k, x.shape[0]), faithful=faithful)
        ranked = images[result.order.to(images.device)]
        best = images[result.top_k.to(images.device)]
        return io.NodeOutput(ranked, best, json.dumps([round(float(s), 6) for s in result.sorted_scores]))
