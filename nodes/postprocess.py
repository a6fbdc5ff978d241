"""Color Match (MKL): DiffuseIT's image-guided colour transfer of the output onto the style image.

The node id is ``ColorMatchMKL``: several popular packs (KJNodes, ...) already register ``ColorMatch``, and
ComfyUI's node ids are global.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..core.blended.geometry import paste_into_source
from ..core.diffuseit.pipeline import match_colors
from ..core.io import from_model, to_model
from .schema_features import schema

CATEGORY = "DiffuseIT-Blended/sampling"


class ColorMatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ColorMatchMKL", display_name="Color Match (MKL)", category=CATEGORY,
            search_aliases=["DiffuseIT", "color transfer", "colour match"],
            description="Maps each image's colour distribution (RGB mean and covariance) onto the reference's with "
                        "the Monge-Kantorovich linear transfer, as the official DiffuseIT image-guided command does "
                        "(--use_colormatch) with the style image as reference.",
            inputs=[
                io.Image.Input("image", tooltip="The images to recolour (e.g. Guided Sampler's output); each image "
                                                "of the batch is matched on its own."),
                io.Image.Input("reference", tooltip="The colour target (DiffuseIT: the style image). Only its first "
                                                    "image is used; any size."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The images with the reference's colour statistics, "
                                                                   "same size as the input.")],
        )

    @classmethod
    def execute(cls, image, reference) -> io.NodeOutput:
        x = to_model(image)
        ref = to_model(reference[:1]).to(x.device)
        return io.NodeOutput(from_model(match_colors(x, ref)).to(image.device))


class PasteIntoSource(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="PasteIntoSource", display_name="Paste Edit into Source (feathered)", category=CATEGORY,
            search_aliases=["Blended Diffusion", "inpainting", "paste back", "composite"],
            description="The last step of a masked edit on a latent model: keeps the edited pixels inside the mask "
                        "and the source's own pixels everywhere else (the VAE round trip changes every pixel), with "
                        "an optional feather inside the mask. Nothing outside the mask changes.",
            inputs=[
                io.Image.Input("edited", tooltip="The edited images (e.g. VAE Decode or CLIP Rank's output); resized "
                                                 "to the source's size if the VAE cropped them."),
                io.Image.Input("source", tooltip="The original image (1, or one per edited image)."),
                io.Mask.Input("mask", tooltip="1 = edited region (the mask given to Set Latent Noise Mask)."),
                io.Int.Input("feather", default=8, min=0, max=256,
                             tooltip="Soft ramp in pixels, inside the mask only (0 = hard edge)."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The edits pasted into the source.")],
        )

    @classmethod
    def execute(cls, edited, source, mask, feather=8) -> io.NodeOutput:
        m = mask if mask.dim() == 3 else mask.reshape(-1, *mask.shape[-2:])
        out = paste_into_source(source.movedim(-1, 1).float(), edited.movedim(-1, 1).float().to(source.device),
                                m.unsqueeze(1).float().to(source.device), feather)
        return io.NodeOutput(out.movedim(1, -1).clamp(0, 1))
