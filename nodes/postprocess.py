"""Color Match (MKL): DiffuseIT's image-guided colour transfer of the output onto the style image.

The node id is ``ColorMatchMKL``: several popular packs (KJNodes, ...) already register ``ColorMatch``, and
ComfyUI's node ids are global.
"""

from __future__ import annotations

from comfy_api.latest import io

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
