"""Background Blend: the mask and blending rules Guided Sampler applies for Blended Diffusion."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.blended.pipeline import BlendSpec
from . import checks
from .schema_features import advanced, schema
from .types import BlendType

CATEGORY = "DiffuseIT-Blended/blended diffusion"
BLEND_MODES = ["official", "next_level", "fixed_noise"]


class BackgroundBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="BackgroundBlend", display_name="Background Blend (Blended Diffusion)", category=CATEGORY,
            search_aliases=["Blended Diffusion", "local edit", "inpainting", "mask"],
            description="Marks the region to edit. After every step Guided Sampler replaces everything outside the "
                        "mask with the source noised to that step's level, and pastes the source back at the end. "
                        "Large images are cropped around the mask, edited at the model's resolution and stitched "
                        "back: pixels outside the mask are returned unchanged.",
            inputs=[
                io.Mask.Input("mask", tooltip="1 (white) = edit, as ComfyUI masks (LoadImage gives 1 where the "
                                              "image is transparent). Any size: resized to the image (nearest). "
                                              "One mask for all images or one per image."),
                io.Combo.Input("mode", options=BLEND_MODES, default="official",
                               tooltip="official: background noised to the step's input level with fresh noise "
                                       "(the paper's code); next_level: to the output's level; fixed_noise: one "
                                       "noise for the whole run."),
                advanced(io.Boolean.Input, "enforce_background", default=True,
                         tooltip="Paste the source outside the mask into the final result (official default)."),
                io.Boolean.Input("invert_mask", default=False, tooltip="Edit outside the mask instead."),
                advanced(io.Boolean.Input, "soft_mask", default=False,
                         tooltip="Keep grey mask values as partial blending (an extension; the official "
                                 "code binarises at 0.5)."),
                advanced(io.Int.Input, "dilate", default=0, min=0, max=256,
                         tooltip="Grow the mask by this many pixels."),
                advanced(io.Float.Input, "crop_margin", default=0.25, min=0.0, max=4.0, step=0.05,
                         tooltip="Context around the mask's bounding box, as a fraction of its size, when "
                                 "cropping large images (at least the model's resolution is kept)."),
                advanced(io.Int.Input, "feather", default=0, min=0, max=128,
                         tooltip="Soften the stitch seam inside the mask by this many pixels (outside stays exact)."),
            ],
            outputs=[BlendType.Output(display_name="blend", tooltip="Wire into Guided Sampler's blend input.")],
        )

    @classmethod
    def validate_inputs(cls, mode: str | None = None) -> bool | str:
        return checks.validation_result("BackgroundBlend", {"mode": mode}, {"mode": BLEND_MODES})

    @classmethod
    def execute(cls, mask, mode="official", enforce_background=True, invert_mask=False, soft_mask=False, dilate=0,
                crop_margin=0.25, feather=0) -> io.NodeOutput:
        checks.check_inputs("BackgroundBlend", {"mode": mode}, {"mode": BLEND_MODES})
        with torch.inference_mode(False):  # a clone made outside inference mode can enter autograd
            mask = mask.clone().float()
        spec = BlendSpec(mask, mode=mode, enforce_background=enforce_background,
                         crop_margin=crop_margin, feather=feather, invert=invert_mask, soft=soft_mask, dilate=dilate)
        return io.NodeOutput(spec)
