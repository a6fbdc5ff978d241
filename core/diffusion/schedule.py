"""Gaussian diffusion schedules and the closed-form quantities of DDPM (Ho et al., 2020).

Everything is computed in float64 (a float32 cumulative product drifts at large t) and every
lookup casts the coefficient to float32 before it touches an image, as guided-diffusion does.
Indices passed to these functions are *respaced* indices (0..N-1); the UNet itself is called with
``schedule.timestep_map[index]``, the original timestep (Nichol & Dhariwal, 2021, respacing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

Spacing = Union[str, int, Sequence[int], None]


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """Linear betas of Ho et al. (2020), scaled so any step count spans the same noise range."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule, Nichol & Dhariwal (2021) eq. 17: abar(t) = cos^2((t/T + s)/(1 + s) pi/2)."""

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def named_betas(name: str, num_timesteps: int) -> torch.Tensor:
    if name == "linear":
        return linear_betas(num_timesteps)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"noise_schedule must be 'linear' or 'cosine', got {name!r}")


MIN_STEPS = 2  # the first step's variance is read from the second step's (beta~_1), as upstream does


class RespacingError(ValueError):
    """A timestep respacing that guided-diffusion's rules cannot turn into a schedule of at least two steps."""

    def __init__(self, spacing: object, num_timesteps: int) -> None:
        super().__init__(
            f"respacing {spacing!r} is not a valid timestep respacing for a {num_timesteps}-step model; accepted: a "
            f"step count from {MIN_STEPS} to {num_timesteps} (e.g. \"100\"), \"ddimN\" with N >= {MIN_STEPS} (e.g. "
            f"\"ddim50\"), comma-separated section counts each >= 1 (e.g. \"10,10,5\"), or empty for all steps")


def _whole_number(text: str) -> Optional[int]:
    """``int(text)`` for plain decimal digits (no sign, no spaces inside), else None."""
    text = text.strip()
    return int(text) if text.isdigit() and text.isascii() else None


def space_timesteps(num_timesteps: int, section_counts: Spacing) -> list[int]:
    """The original timesteps kept by a respacing, ascending, exactly as guided-diffusion picks them.

    ``"ddimN"`` takes the smallest integer stride giving N steps from 0. Otherwise a string of
    comma-separated counts splits the range into equal sections (the first ``T mod k`` get one
    extra step) and walks each with a float stride accumulated by repeated addition and rounded
    with Python's ``round`` (halves to even) -- "25" therefore keeps 166, not 167. An int is the
    same as its string; a sequence of ints is taken as the explicit list of timesteps.
    """
    if section_counts is None or section_counts == "":
        return list(range(num_timesteps))
    if isinstance(section_counts, bool):
        raise RespacingError(section_counts, num_timesteps)
    if isinstance(section_counts, int):
        section_counts = str(section_counts)
    if not isinstance(section_counts, str):
        steps = sorted({int(s) for s in section_counts})
        if len(steps) < MIN_STEPS or steps[0] < 0 or steps[-1] >= num_timesteps:
            raise ValueError(f"explicit timesteps must be at least {MIN_STEPS} distinct values in "
                             f"[0, {num_timesteps - 1}], got {steps[:3]}...")
        return steps
    spec = section_counts.strip()
    if spec.startswith("ddim"):
        wanted = _whole_number(spec[len("ddim"):])
        if wanted is None or wanted < MIN_STEPS:
            raise RespacingError(section_counts, num_timesteps)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"respacing {section_counts!r}: cannot create exactly {wanted} steps with an integer stride "
                         f"from {num_timesteps}")
    counts = [_whole_number(c) for c in spec.split(",")]
    if any(c is None or c < 1 for c in counts) or sum(counts) < MIN_STEPS:
        raise RespacingError(section_counts, num_timesteps)
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing {section_counts!r}: cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class DiffusionSchedule:
    """All per-step arrays of a (possibly respaced) diffusion, float64, plus the timestep map."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    timestep_map: torch.Tensor  # int64, original timestep of each respaced index

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    # Tables derived from the ones above, computed once per schedule (float64, CPU) so that each is one
    # persistent tensor: its device copy is then made once too (see on_device), not rebuilt every step.
    @cached_property
    def log_betas(self) -> torch.Tensor:
        """log beta_t: the upper end of the learned-range variance (Nichol & Dhariwal eq. 15)."""
        return torch.log(self.betas)

    @cached_property
    def fixed_large_variance(self) -> torch.Tensor:
        """The fixed-large variance beta_t, with beta~_1 at the first step (guided-diffusion's FIXED_LARGE)."""
        return torch.cat([self.posterior_variance[1:2], self.betas[1:]])

    @cached_property
    def log_fixed_large_variance(self) -> torch.Tensor:
        return torch.log(self.fixed_large_variance)

    TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
              "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
              "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
              "timestep_map", "log_betas", "fixed_large_variance", "log_fixed_large_variance")

    def to_device(self, device: Union[str, torch.device]) -> "DiffusionSchedule":
        """Copy every table to ``device`` now (once per schedule and device; later lookups find the copies).
        Optional: a lookup copies a table on first use anyway. Returns self."""
        device = torch.device(device)
        for name in self.TABLES:
            on_device(getattr(self, name), device)
        return self

    @classmethod
    def from_betas(cls, betas: torch.Tensor, timestep_map: Iterable[int] | None = None) -> "DiffusionSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        # the posterior variance is 0 at the first step; its log is clipped to the next value
        log_var = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        tmap = torch.arange(len(betas)) if timestep_map is None else torch.tensor(list(timestep_map))
        return cls(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=log_var,
            posterior_mean_coef1=betas * prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            timestep_map=tmap.to(torch.int64),
        )

    @classmethod
    def create(cls, num_timesteps: int = 1000, noise_schedule: str = "linear",
               timestep_respacing: Spacing = None) -> "DiffusionSchedule":
        return cls.from_betas(named_betas(noise_schedule, num_timesteps)).respace(timestep_respacing)

    def respace(self, spacing: Spacing) -> "DiffusionSchedule":
        """Keep a subset of steps: beta'_k = 1 - abar[s_k] / abar[s_{k-1}] (Nichol & Dhariwal, sec. 4)."""
        if spacing is None or spacing == "":
            return self
        kept = space_timesteps(self.num_timesteps, spacing)
        abar = self.alphas_cumprod[torch.tensor(kept)]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return DiffusionSchedule.from_betas(1.0 - abar / abar_prev, self.timestep_map[torch.tensor(kept)].tolist())

    def model_timesteps(self, t_index: torch.Tensor) -> torch.Tensor:
        """Original timesteps (what the UNet is called with) for respaced indices."""
        return on_device(self.timestep_map, t_index.device)[t_index]


# Device copies of the schedule's CPU tables, made once: a blocking host-to-device copy per lookup would
# make the host wait for all queued GPU work ~10 times per step. Keyed by the table's identity, weakly
# (an entry goes with its table, so a new tensor can never find a dead one's copy); the schedule's tables,
# derived ones included, are persistent tensors, so each is copied once per schedule and device.
_DEVICE_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def upstream_timestep_index(t: torch.Tensor, num_steps: int, diffusion_steps: int = 1000) -> torch.Tensor:
    """Both official codes' round trip from the original timestep the UNet saw back to the respaced
    index inside ``cond_fn``: ``floor(t * N / T)`` (diffuseit_spec §3.5, §9.2; blended_diffusion_spec
    5.4 step 1). Exact when N divides T (e.g. the default 100); for other N (e.g. 55, 150) it can give
    ``i - 1``, an upstream quirk a faithful term may reproduce."""
    return torch.floor(t.to(torch.float64) * num_steps / diffusion_steps).to(torch.int64)


def on_device(array: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """``array`` on ``device``, copied at most once per (array, device) for as long as ``array`` lives.

    Pass persistent tables (a schedule's attributes), never temporaries: a temporary is a new key each
    call and would be copied each time.
    """
    device = torch.device(device)
    if array.device == device:
        return array
    copies = _DEVICE_COPIES.get(array)
    if copies is None:
        copies = _DEVICE_COPIES[array] = {}
    copy = copies.get(device)
    if copy is None:
        copy = copies[device] = array.to(device)
    return copy


def extract(array: torch.Tensor, t_index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Look up float64 coefficients at ``t_index``, cast to float32, broadcastable to ``like``."""
    values = on_device(array, t_index.device)[t_index].to(torch.float32)
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.device)


def q_sample(schedule: DiffusionSchedule, x_start: torch.Tensor, t_index: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """Forward process, Ho et al. eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (extract(schedule.sqrt_alphas_cumprod, t_index, x_start) * x_start
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t_index, x_start) * noise)


def q_posterior_mean(schedule: DiffusionSchedule, x_start: torch.Tensor, x_t: torch.Tensor,
                     t_index: torch.Tensor) -> torch.Tensor:
    """Mean of q(x_{t-1} | x_t, x_0), Ho et al. eq. 7."""
    return (extract(schedule.posterior_mean_coef1, t_index, x_t) * x_start
            + extract(schedule.posterior_mean_coef2, t_index, x_t) * x_t)


def predict_x0_from_eps(schedule: DiffusionSchedule, x_t: torch.Tensor, t_index: torch.Tensor,
                        eps: torch.Tensor) -> torch.Tensor:
    """x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps (inverse of eq. 4)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t_index, x_t) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t_index, x_t) * eps)


def eps_from_x0(schedule: DiffusionSchedule, x_t: torch.Tensor, t_index: torch.Tensor,
                x0: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`predict_x0_from_eps`."""
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t_index, x_t) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t_index, x_t))


class MeanVariance(NamedTuple):
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor
    eps: torch.Tensor


def p_mean_variance(schedule: DiffusionSchedule, model_output: torch.Tensor, x_t: torch.Tensor,
                    t_index: torch.Tensor, clip_denoised: bool = False,
                    learn_sigma: bool = True) -> MeanVariance:
    """p(x_{t-1} | x_t) from an epsilon-predicting UNet's output.

    With learned range variance (Nichol & Dhariwal eq. 15) the extra channels v in [-1, 1]
    interpolate log-variances: log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v+1)/2.
    Without, the fixed-large variance beta_t is used (with beta~_1 at the first step), as upstream.
    """
    channels = x_t.shape[1]
    if learn_sigma:
        eps, v = model_output[:, :channels], model_output[:, channels:]
        min_log = extract(schedule.posterior_log_variance_clipped, t_index, x_t)
        max_log = extract(schedule.log_betas, t_index, x_t)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = torch.exp(log_variance)
    else:
        eps = model_output[:, :channels]
        variance = extract(schedule.fixed_large_variance, t_index, x_t).expand_as(x_t)
        log_variance = extract(schedule.log_fixed_large_variance, t_index, x_t).expand_as(x_t)
    pred_xstart = predict_x0_from_eps(schedule, x_t, t_index, eps)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    mean = q_posterior_mean(schedule, pred_xstart, x_t, t_index)
    return MeanVariance(mean, variance, log_variance, pred_xstart, eps)
