"""ComfyUI nodes: thin classes that translate ComfyUI types into ``core`` calls."""

from comfy_api.latest import ComfyExtension, io

from . import comfy_bridge
from .blending import BackgroundBlend
from .guidance import NODES as GUIDANCE_NODES
from .loaders import LoadCLIPGuidance, LoadDDPM, LoadDINO, LoadLPIPS
from .model_guidance import ApplyGuidanceToModel
from .postprocess import ColorMatch, PasteIntoSource
from .ranking import CLIPRank
from .sampling import GuidedSampler

NODES: list[type[io.ComfyNode]] = [LoadDDPM, LoadDINO, LoadCLIPGuidance, LoadLPIPS, *GUIDANCE_NODES, BackgroundBlend,
                                   GuidedSampler, ApplyGuidanceToModel, CLIPRank, ColorMatch,
                                   PasteIntoSource]


class DiffuseITBlendedExtension(ComfyExtension):
    async def on_load(self) -> None:
        comfy_bridge.register_model_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


comfy_bridge.register_model_folders()  # before define_schema lists the folders' files
