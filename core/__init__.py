"""Framework-free core of the DiffuseIT / Blended Diffusion pack.

Everything here works as a plain Python library (scripts, notebooks, tests) and inside ComfyUI.
Nothing in ``core`` imports ``comfy``, ``folder_paths`` or ``server``; imports inside are relative
so the package works both as ``core`` (from the repository root) and as
``comfyui_diffuseit.core`` (after ``pip install -e .``).
"""

from .diffusion.checkpoints import DDPM, CheckpointError, load_ddpm
from .diffusion.schedule import DiffusionSchedule, space_timesteps
from .diffusion.sampling import sample

__all__ = ["DDPM", "CheckpointError", "load_ddpm", "DiffusionSchedule", "space_timesteps", "sample"]
__version__ = "0.1.0"
