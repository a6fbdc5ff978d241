"""Guidance for samplers the pack does not own (ComfyUI's KSampler over latent models): the guidance
terms act on a decoded x0 prediction and move the latent x0 against their gradient."""

from .x0_guidance import GuidanceBand, X0GuidanceResult, guide_x0, normalised_step, schedule_progress

__all__ = ["GuidanceBand", "X0GuidanceResult", "guide_x0", "normalised_step", "schedule_progress"]
