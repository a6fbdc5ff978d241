"""Guided sampling: one differentiable UNet pass per step serves both the step and the gradient.

Both papers guide a DDPM by the gradient of losses on the predicted x0 taken w.r.t. x_t through the
UNet (manifold-constrained gradient), applied as a mean shift scaled by the step's variance (DDPM,
Dhariwal & Nichol eq. 10) or as a score correction (DDIM, eq. 14). The official code runs the UNet
twice per step (once without grad for the step, once with grad inside cond_fn); both passes give the
same values, so here a single forward with grad provides the posterior *and* the gradient.

Options cover both methods: DiffuseIT's resampling start (repeat the first guided step N times,
re-noising in between) and range restart; Blended Diffusion's background blend after every step.
Rows of a batch are independent runs (their own noise streams, their own restarts): row r draws from
generators seeded by ``core.diffusion.sampling.row_seed(seed, r)`` (a SplitMix64 mix of seed and row, so nearby
seeds share no row), and a batch of N equals N serial runs with the same seed and ``first_row`` 0..N-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..devices import to_device
from .finite_watch import FiniteWatch
from .guidance import StepContext, StepState
from .range import rows_to_restart
from .sampling import STREAM_AUGMENT, NoiseSource, ddim_step, ddpm_step, model_output, row_seed
from .schedule import DiffusionSchedule, MeanVariance, extract, p_mean_variance, q_sample


@dataclass(frozen=True)
class GuidedSamplerOptions:
    """How the guided loop runs. Defaults are the official DDPM settings shared by both papers."""

    sampler: str = "ddpm"  # "ddpm" or "ddim"
    skip_timesteps: int = 0  # respaced steps skipped at the start; the loop starts at N-1-skip
    resample_steps: int = 1  # DiffuseIT: the first guided step runs this many times (10 upstream)
    resample_beta: str = "previous"  # upstream re-noises with beta_{K-1} ("previous"); "exact" uses beta_K
    eta: float = 0.0
    clip_denoised: bool = False
    range_restart_threshold: Optional[float] = None  # DiffuseIT: restart a row when its weighted range loss exceeds this
    max_restarts: int = 3  # upstream restarts without limit; a random or diverging model would never finish

    def __post_init__(self) -> None:
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        if self.resample_steps < 1:
            raise ValueError(f"resample_steps must be >= 1, got {self.resample_steps}")
        if self.resample_beta not in ("previous", "exact"):
            raise ValueError(f"resample_beta must be 'previous' or 'exact', got {self.resample_beta!r}")


@dataclass
class GuidedResult:
    """``images``: the last step's x0 prediction (what both official codes save, after the background
    paste for Blended Diffusion); ``samples``: the final x; ``restarts``: per-row restart counts."""

    images: torch.Tensor
    samples: torch.Tensor
    restarts: list = field(default_factory=list)
    losses: dict = field(default_factory=dict)


def program(schedule: DiffusionSchedule, options: GuidedSamplerOptions) -> list[tuple[int, bool]]:
    """The step list: (respaced index, re-noise afterwards). The top step repeats resample_steps times."""
    top = schedule.num_timesteps - 1 - options.skip_timesteps
    if not 0 <= top < schedule.num_timesteps:
        raise ValueError(f"skip_timesteps must be in [0, {schedule.num_timesteps - 1}], got {options.skip_timesteps}")
    steps = [(top, r < options.resample_steps - 1) for r in range(options.resample_steps)]
    return steps + [(k, False) for k in range(top - 1, -1, -1)]


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def renoise_one_step(schedule: DiffusionSchedule, x: torch.Tensor, t_index: torch.Tensor, noise: torch.Tensor,
                     options: GuidedSamplerOptions) -> torch.Tensor:
    """Go back up one level: x <- sqrt(1 - beta) x + sqrt(beta) z (DiffuseIT's resampling, spec 3.3).

    Upstream passes t-1, i.e. uses beta_{K-1} to climb from level K-1 to K; ``resample_beta="exact"``
    uses beta_K instead.
    """
    idx = t_index - 1 if options.resample_beta == "previous" else t_index
    beta = extract(schedule.betas, idx.clamp(min=0), x)
    return torch.sqrt(1 - beta) * x + torch.sqrt(beta) * noise


def guided_sample(unet: torch.nn.Module, schedule: DiffusionSchedule, source: torch.Tensor, terms: Sequence[Any], *,
                  seed: int = 0, options: GuidedSamplerOptions = GuidedSamplerOptions(), blend: Any = None,
                  y: Optional[torch.Tensor] = None, noise_source: Any = None,
                  callback: Optional[Callable[[dict], None]] = None, learn_sigma: bool = True,
                  first_row: int = 0) -> GuidedResult:
    """Translate/edit ``source`` ([B,3,H,W] in [-1,1], one row per sample) under the guidance ``terms``.

    ``terms`` are guidance-term values (see ``core.diffusion.guidance``); each is prepared once here. ``blend``
    (optional) has ``prepare(source) -> prepared`` with ``prepared.after_step(x, t_index, noise_source, schedule)``
    and ``prepared.finalize(x0)`` (Blended Diffusion). ``callback`` gets ``{i, total, t_index, t, x,
    predicted_x0, losses}`` after each step and may raise to stop (Cancel).

    Seeds: row b is row ``first_row + b`` of the run seeded with ``seed``; its noise comes from
    ``row_seed(seed, first_row + b)`` and its augmentations from ``row_seed(seed, first_row + b, STREAM_AUGMENT)``
    (``core.diffusion.sampling.row_seed``). Row r of a batch is therefore reproduced alone by
    ``guided_sample(unet, schedule, source[r:r + 1], terms, seed=seed, first_row=r)``.
    """
    device = next(unet.parameters()).device
    source = source.to(device, torch.float32)
    batch = source.shape[0]
    noise = noise_source if noise_source is not None else NoiseSource(seed, batch, device, first_row)
    steps = program(schedule, options)
    prepared = [term.prepare(source) for term in terms]
    blender = blend.prepare(source) if blend is not None else None
    top = steps[0][0]
    state = StepState()
    # per-row generators for random augmentations (CLIP cuts, cutouts): row b depends on (seed, first_row + b) only
    generators = None if noise_source is not None else [
        torch.Generator("cpu").manual_seed(row_seed(seed, first_row + b, STREAM_AUGMENT)) for b in range(batch)]
    blend_mask = getattr(blender, "mask", None)  # masked losses without a mask of their own follow the blend
    prev_x0: Optional[torch.Tensor] = None

    def start(rows: torch.Tensor, x: Optional[torch.Tensor]) -> torch.Tensor:  # rows: CPU bool [B]
        eps = noise.randn(source.shape[1:], kind="start", rows=rows)
        fresh = q_sample(schedule, source, torch.full((batch,), top, device=device, dtype=torch.long), eps)
        return fresh if x is None else torch.where(_rows(to_device(rows, device), x).bool(), fresh, x)

    x = start(torch.ones(batch, dtype=torch.bool), None)
    position = torch.zeros(batch, dtype=torch.long)  # index into `steps`, per row (rows restart alone)
    restarts = [0] * batch
    image = torch.zeros_like(source)
    total, i = len(steps), 0
    loss_log: dict = {}
    finite = FiniteWatch(getattr(unet, "checkpoint", ""))
    while bool((position < len(steps)).any()):  # `position` lives on the CPU: no device sync
        active_cpu = position < len(steps)
        t_list = [steps[min(p, len(steps) - 1)][0] for p in position.tolist()]
        renoise_list = [p < len(steps) and steps[p][1] for p in position.tolist()]
        active, t_index = to_device(active_cpu, device), to_device(torch.tensor(t_list), device)
        ctx = StepContext(t_index=t_index, t=schedule.model_timesteps(t_index), x_t=x, schedule=schedule,
                          source=source, prev_x0=prev_x0, step=i, generators=generators, blend_mask=blend_mask,
                          state=state)
        mv, grad, per_term = guidance_gradient(unet, schedule, x, t_index, prepared, ctx, active,
                                               options.clip_denoised, y, learn_sigma)
        finite.record(per_term, grad, i, t_list, model_output=mv.pred_xstart)
        x_t = x
        z = noise.randn(source.shape[1:], kind="step")
        if options.sampler == "ddpm":
            nxt, x0 = ddpm_step(schedule, mv, x_t, t_index, z, grad), mv.pred_xstart
        else:
            nxt, x0 = ddim_step(schedule, mv, x_t, t_index, z, options.eta, grad)
        if blender is not None:
            nxt = blender.after_step(nxt, t_index, noise, schedule)
        if any(renoise_list):
            renoise = to_device(torch.tensor(renoise_list), device)
            up = renoise_one_step(schedule, nxt, t_index, noise.randn(source.shape[1:], kind="resample"), options)
            nxt = torch.where(_rows(renoise, nxt).bool(), up, nxt)
        keep = _rows(active, x)
        x = nxt * keep + x * (1 - keep)
        image = x0 * keep + image * (1 - keep)
        prev_x0 = x0
        for name, value in per_term.items():
            loss_log.setdefault(name, []).append(value.detach())
        position = position + active_cpu.long()
        # only read the range loss back when some row could restart: not during the resampling repeats
        # at the top step, and never again once every row has used its restarts
        restart_armed = (options.range_restart_threshold is not None and "range" in per_term
                         and any(t < top and a and n < options.max_restarts
                                 for t, a, n in zip(t_list, active_cpu.tolist(), restarts)))
        if restart_armed or i % FiniteWatch.every == FiniteWatch.every - 1:
            finite.check()  # a restart decision reads the losses back anyway; otherwise every few steps
        restart = rows_to_restart(per_term["range"], options.range_restart_threshold, t_list, top, active_cpu,
                                  restarts, options.max_restarts) if restart_armed else None
        if restart is not None:
            x = start(restart, x)
            position = torch.where(restart, torch.zeros_like(position), position)
        total = i + 1 + int((len(steps) - position).clamp(min=0).max())  # grows only when a row restarts
        if callback is not None:
            callback({"i": i, "total": total, "t_index": t_list[0], "t": int(schedule.timestep_map[t_list[0]]),
                      "x": x, "predicted_x0": x0, "losses": per_term})
        i += 1
    finite.check()
    if blender is not None:
        image = blender.finalize(image)
    return GuidedResult(images=image, samples=x, restarts=restarts, losses=loss_log)


def guidance_gradient(unet: torch.nn.Module, schedule: DiffusionSchedule, x: torch.Tensor, t_index: torch.Tensor,
                      prepared: Sequence[Any], ctx: StepContext, active: Optional[torch.Tensor] = None,
                      clip_denoised: bool = False, y: Optional[torch.Tensor] = None,
                      learn_sigma: bool = True) -> tuple[MeanVariance, Optional[torch.Tensor], dict]:
    """One UNet forward with grad: p(x_{t-1}|x_t) statistics (detached) and g = -d(sum of losses)/d x_t.

    ``ctx.x_t`` is replaced by the grad-tracking copy of ``x`` so terms that mix x_t into their input
    (Blended Diffusion, DiffuseIT's noise mix) differentiate through it too. Returns the per-term
    per-row losses as well.
    """
    x_in = x.detach().requires_grad_(True)
    ctx.x_t = x_in
    for p in prepared:  # terms publish what the previous step left them (e.g. DiffuseIT's loss_prev)
        if hasattr(p, "before_step"):
            p.before_step(ctx)
    with torch.enable_grad():
        out = model_output(unet, x_in, t_index, schedule, y).float()
        mv = p_mean_variance(schedule, out, x_in, t_index, clip_denoised, learn_sigma)
        per_term = {p.name: p(mv.pred_xstart, ctx) for p in prepared}
        grad = None
        if per_term:
            weights = active.to(torch.float32) if active is not None else 1.0
            total = sum((v.float() * weights).sum() for v in per_term.values())
            if total.requires_grad:
                grad = -torch.autograd.grad(total, x_in)[0]
    ctx.x_t = x_in.detach()
    return MeanVariance(*(v.detach() for v in mv)), grad, {k: v.detach() for k, v in per_term.items()}


