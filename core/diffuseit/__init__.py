"""DiffuseIT (Kwon & Ye, ICLR 2023): DINO structure / style / semantic-divergence losses, the
input-aware directional CLIP loss, the official presets and the two pipelines."""

from .clip_direction import CLIPDirectionalLoss
from .dino_losses import DINOStructureLoss, DINOStyleLoss, SemanticDivergence
from .pipeline import PRESETS, DiffuseITSettings, diffuseit_guidance, diffuseit_image, diffuseit_text, match_colors

__all__ = ["CLIPDirectionalLoss", "DINOStructureLoss", "DINOStyleLoss", "SemanticDivergence", "PRESETS",
           "DiffuseITSettings", "diffuseit_guidance", "diffuseit_image", "diffuseit_text", "match_colors"]
