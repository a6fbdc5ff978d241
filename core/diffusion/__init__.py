"""The diffusion side: OpenAI's UNet and its checkpoints, schedules, reverse steps, and the guided loop.

Nothing here knows DINO or CLIP: guidance terms are values that follow the protocol in
:mod:`.guidance` and see only the predicted x0 and a :class:`~.guidance.StepContext`.
"""

from .batching import sample_many
from .checkpoints import DDPM, CheckpointError, load_ddpm
from .finite_watch import GuidanceError
from .guidance import StepContext, StepState, combine
from .guided_loop import GuidedResult, GuidedSamplerOptions, guided_sample
from .range import RangeLoss
from .sampling import sample
from .schedule import DiffusionSchedule, space_timesteps

__all__ = ["sample_many", "DDPM", "CheckpointError", "load_ddpm", "GuidanceError", "StepContext", "StepState",
           "combine", "GuidedResult", "GuidedSamplerOptions", "guided_sample", "RangeLoss", "sample",
           "DiffusionSchedule", "space_timesteps"]
