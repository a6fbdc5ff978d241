"""Guidance as values: the term protocol shared by DiffuseIT and Blended Diffusion.

A guidance term is an immutable description (weights, settings, models) that is *prepared* once
per run from the source image (DINO keys of the source, CLIP text directions, ...) and then
evaluated on the predicted x0 at every guided step. Terms know nothing about the UNet or the
sampler; the sampler knows nothing about DINO or CLIP. Terms combine by summing.

Contract
--------
``term.prepare(source) -> PreparedTerm`` is called once per run, outside the step loop.
``source`` is the source image batch, NCHW float32 in [-1, 1] at model resolution, already
expanded to the sampling batch (one row per sample).

``prepared(predicted_x0, ctx) -> Tensor[B]`` returns the *weighted* loss of every sample. The
sampler sums the rows and differentiates w.r.t. x_t. Returning per-sample values (rather than a
batch mean) is what makes a batch of N samples equal N serial runs with the same seeds; where an
upstream reduction mixes the batch, the term documents how it reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import torch

from .schedule import DiffusionSchedule, on_device


@dataclass
class StepState:
    """What guidance terms hand each other, for the whole of one run (the sampler creates one and never
    reads it). Every field names its one writer and its readers, so a coupling between two terms is
    visible in both of them and here.
    """

    clip_loss_prev: Optional[torch.Tensor] = None
    """Upstream's ``loss_prev`` (diffuseit_spec §3.5 step 1), per row. Writer:
    :meth:`CLIPDirectionalLoss <core.diffuseit.clip_direction.PreparedCLIPDirectional.before_step>`
    before each step (its previous call's unweighted loss; the source's at the first call). Reader:
    :class:`~core.diffuseit.dino_losses.DINOStructureLoss` with ``regularize_content`` /
    ``use_prog_contrast``, whose contrastive weight follows it."""
    clip_loss: Optional[torch.Tensor] = None
    """Writer: the CLIP directional term, this call's unweighted loss (detached). Readers: inspection."""
    dino_features: dict = field(default_factory=dict)
    """Writers and readers: the DINO terms, which share one DINO forward of this step's input
    (keyed by extractor and input rule; only the latest step is kept)."""
    cutout_params: dict = field(default_factory=dict)
    """Writer: each masked CLIP term, the warps it drew this step, by term name. Readers: inspection."""


@dataclass(frozen=True)
class Replay:
    """Recorded values that replace what terms would compute themselves: how the fixture tests
    and the bench's upstream-structure baseline reproduce a recorded official run."""

    frac_cont: Any = None
    """DINOStructureLoss's contrastive weight (float or Tensor[B]) instead of its schedule."""
    prev_vit_input: Optional[torch.Tensor] = None
    """SemanticDivergence's reference image batch instead of its own previous input."""
    cutout_params: Any = None
    """MaskedCLIPLoss's cutout warps (``AugmentParams``) instead of fresh draws."""


@dataclass
class StepContext:
    """What a guidance term may look at during one guided step.

    ``t_index`` is the respaced index (0..N-1) and ``t`` the original timestep the UNet sees
    (``schedule.timestep_map[t_index]``), both shape [B]. ``x_t`` is the noisy sample the gradient
    is taken against (it requires grad). ``prev_x0`` is the previous step's detached x0 prediction
    (None at the first guided step). ``source`` is the (batch-expanded) source image in [-1, 1].
    ``step`` counts guided steps taken so far in this run (resampling repeats included).
    ``generators``: one CPU generator per row for random augmentations (CLIP cuts, cutouts), so a
    row's draws depend on its own seed only (the sampler's choice); a single generator serves the
    whole batch; None = the term's own seed or torch's global RNG.
    ``blend_mask``: the Background Blend's mask, followed by masked terms that have none of their own.

    Under a sampler the pack does not own (ComfyUI's KSampler over a latent model, ``core.latent``)
    there is no respaced index: ``t_index``, ``t`` and ``schedule`` are None, ``x_t`` is the sampler's
    latent state, and the step is described sampler-neutrally by ``progress`` (fraction of the sampled
    schedule done, 0 at the first step, 1 at the last) and ``noise_level`` (per row, the noise standard
    deviation of the variance-preserving x_t, ``sqrt(1 - abar)`` = ``sigma / sqrt(1 + sigma^2)``; the
    same quantity the pixel schedule has at ``t_index``). ``mixed_input`` then supplies the noise-mixed
    image (see :func:`noise_mixed_input`).
    """

    t_index: Optional[torch.Tensor]
    t: Optional[torch.Tensor]
    x_t: torch.Tensor
    schedule: Optional[DiffusionSchedule]
    source: torch.Tensor
    prev_x0: Optional[torch.Tensor] = None
    step: int = 0
    generators: Union[torch.Generator, Sequence[torch.Generator], None] = None
    blend_mask: Optional[torch.Tensor] = None
    state: StepState = field(default_factory=StepState)
    replay: Replay = Replay()
    progress: Optional[float] = None
    noise_level: Optional[torch.Tensor] = None
    mixed_input: Optional[Callable[[], torch.Tensor]] = None

    @property
    def num_steps(self) -> int:
        """Length of the respaced schedule (e.g. 100 for "100"); 0 under a sampler without one."""
        return self.schedule.num_timesteps if self.schedule is not None else 0

    def current_noise_level(self) -> torch.Tensor:
        """``sqrt(1 - abar)`` per row: the pixel schedule's value at ``t_index``, else ``noise_level``."""
        if self.schedule is not None and self.t_index is not None:
            return on_device(self.schedule.sqrt_one_minus_alphas_cumprod, self.t_index.device)[self.t_index]
        if self.noise_level is None:
            raise ValueError("this step context has neither a respaced index nor a noise level")
        return self.noise_level


class PreparedTerm(Protocol):
    name: str

    def __call__(self, predicted_x0: torch.Tensor, ctx: StepContext) -> torch.Tensor: ...


class GuidanceTerm(Protocol):
    name: str

    def prepare(self, source: torch.Tensor) -> PreparedTerm: ...


Guidance = Sequence[Any]  # an ordered tuple of GuidanceTerm values; see combine()


def combine(*parts: Optional[Sequence[Any]]) -> tuple:
    """Concatenate guidance tuples (None = no guidance yet) into a new tuple."""
    out: list = []
    for p in parts:
        if p:
            out.extend(p)
    return tuple(out)


def noise_mixed_input(predicted_x0: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Upstream's "noisy augmentation" x_mix, §3.5 step 3: ``x0 * f_t + x_t * (1 - f_t)``,
    ``f_t = sqrt(1 - abar_t)`` at the respaced index. ``f_t`` and ``1 - f_t`` are formed in
    float64 and cast separately, as upstream multiplies by a float64 numpy scalar (the float64 table's
    device copy is made once per schedule, not per call).

    Under a latent sampler (``ctx.mixed_input`` set, see ``core.latent``) the same mixture is formed in
    latent space -- ``decode(x0_latent * f + x_t_vp * (1 - f))`` with the variance-preserving latent
    ``x_t_vp`` and ``f = ctx.noise_level`` -- since x_t is not an image there; ``predicted_x0`` is then the
    decoded x0 and the context supplies the (shared, differentiable) decoded mixture."""
    if ctx.mixed_input is not None:
        return ctx.mixed_input()
    f64 = on_device(ctx.schedule.sqrt_one_minus_alphas_cumprod, ctx.t_index.device)[ctx.t_index]
    shape = (-1,) + (1,) * (predicted_x0.dim() - 1)
    f = f64.to(predicted_x0.dtype).view(shape).to(predicted_x0.device)
    g = (1.0 - f64).to(predicted_x0.dtype).view(shape).to(predicted_x0.device)
    return predicted_x0 * f + ctx.x_t * g
