"""Framework-free core of the DiffuseIT / Blended Diffusion pack.

Everything here works as a plain Python library (scripts, notebooks, tests) and inside ComfyUI.
Nothing in ``core`` imports ``comfy``, ``folder_paths`` or ``server``; imports inside are relative
so the package works both as ``core`` (from the repository root) and as
``comfyui_diffuseit.core`` (after ``pip install -e .``).

Layout (one concern per sub-package; each sub-package's ``__init__`` exports its public names):

* :mod:`.diffusion`: UNet, checkpoints, schedules, reverse steps, the guided loop, the term protocol
* :mod:`.encoders`: DINO, CLIP, LPIPS loaders and feature extractors
* :mod:`.diffuseit`, :mod:`.blended`: each paper's losses, presets / geometry, and pipelines
* :mod:`.latent`: x0 guidance through a decoder, for samplers the pack does not own
* :mod:`.io`: images in and out; :mod:`.cli`: the command line; :mod:`.tiny_models`: test checkpoints
"""

from .blended import BackgroundBlend, BlendSpec, MaskedCLIPLoss, blended_edit, blended_sample
from .diffuseit import (CLIPDirectionalLoss, DINOStructureLoss, DINOStyleLoss, SemanticDivergence, diffuseit_image,
                        diffuseit_text)
from .diffusion import (DDPM, CheckpointError, DiffusionSchedule, GuidanceError, GuidedSamplerOptions, RangeLoss,
                        guided_sample, load_ddpm, sample, sample_many, space_timesteps)
from .encoders import load_clip, load_clip_ensemble, load_dino_extractor, load_lpips
from .io import load_image, save_image

__all__ = ["BackgroundBlend", "BlendSpec", "MaskedCLIPLoss", "blended_edit", "blended_sample", "CLIPDirectionalLoss",
           "DINOStructureLoss", "DINOStyleLoss", "SemanticDivergence", "diffuseit_image", "diffuseit_text", "DDPM",
           "CheckpointError", "DiffusionSchedule", "GuidanceError", "GuidedSamplerOptions", "RangeLoss", "guided_sample",
           "load_ddpm", "sample", "sample_many", "space_timesteps", "load_clip", "load_clip_ensemble",
           "load_dino_extractor", "load_lpips", "load_image", "save_image"]
__version__ = "0.1.0"
