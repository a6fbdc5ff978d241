"""Blended Diffusion (Avrahami et al., CVPR 2022): masks, per-step background blending, crop /
stitch-back geometry, augmented cutouts, masked CLIP and background losses, CLIP ranking, pipeline."""

from .blending import BackgroundBlend
from .losses import BackgroundPreservationLoss, MaskedCLIPLoss, blended_guidance
from .pipeline import BlendedResult, BlendSpec, blended_edit, blended_sample, crop_to_model, ranking_crops
from .rank_criteria import IMPROVED_CRITERIA, PAPER_CRITERIA, RankingCriteria
from .ranking import rank_results

__all__ = ["BackgroundBlend", "BackgroundPreservationLoss", "MaskedCLIPLoss", "blended_guidance", "BlendedResult",
           "BlendSpec", "blended_edit", "blended_sample", "crop_to_model", "ranking_crops", "rank_results",
           "RankingCriteria", "PAPER_CRITERIA", "IMPROVED_CRITERIA"]
