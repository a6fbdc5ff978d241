"""Guidance on the predicted x0 of any denoiser: decode, evaluate the terms, step x0 against their gradient.

This is the math the pack needs to steer samplers it does not own (ComfyUI's KSampler over SD1.5,
SDXL, SD3, Flux): the sampler hands over its (post-CFG) x0 prediction in latent space; a
differentiable ``decode`` (TAESD, the VAE decoder, or any callable latent -> RGB in [-1, 1]) turns it
into an image; the guidance terms -- the same values the pixel sampler uses -- score it; the gradient
is taken w.r.t. the latent x0 only, through the decoder and the terms' encoders, never through the
diffusion model (MPGD, He et al., ICLR 2024, §4). The sampler then steps from the moved x0.

Step size. A raw gradient has no natural scale (a loss weight of 2000 on one model is a nudge on
another), which is why packs without normalisation get "no effect" or "destroyed image" reports.
Following MPGD / FreeDoM, the step is normalised to the size of the sampler's own correction:
``rho = strength * rms(reference) / rms(g)``, where ``reference`` is what CFG added to the
unconditional x0 (``cond_scale * (cond - uncond)``), or x0 itself when the sampler ran without CFG
(cfg 1, BasicGuider). ``strength`` is then a fraction of the CFG update (of x0), comparable across
models, resolutions and loss weights.

Zero guidance -- strength 0, no terms, or a gradient that is exactly zero -- returns the
sampler's x0 itself (bit for bit, no division by a zero norm, no extra randomness).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..diffusion.finite_watch import GuidanceError


@dataclass
class X0GuidanceResult:
    """``x0``: the guided prediction (detached; the input object itself when nothing was applied);
    ``losses``: each term's weighted per-row loss on the decoded input x0 (detached);
    ``step_size``: rho per row (0 where nothing was applied)."""

    x0: torch.Tensor
    losses: dict = field(default_factory=dict)
    step_size: Optional[torch.Tensor] = None
    image: Optional[torch.Tensor] = None  # the decoded input x0 (detached), when guidance ran


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square per row, shape [B]."""
    return x.detach().float().pow(2).flatten(1).mean(1).sqrt()


def normalised_step(gradient: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """``rho = strength * rms(reference) / rms(gradient)`` per row; 0 where the gradient is zero
    (a zero gradient moves nothing instead of turning into NaN)."""
    g_rms, ref_rms = rms(gradient), rms(reference)
    safe = torch.where(g_rms > 0, g_rms, torch.ones_like(g_rms))
    return torch.where(g_rms > 0, strength * ref_rms / safe, torch.zeros_like(g_rms))


def guide_x0(x0: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], prepared: Sequence[Any], ctx: Any,
             strength: float, reference: torch.Tensor,
             mix: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> X0GuidanceResult:
    """One guided correction of a latent x0 prediction ``[B, C, h, w]``.

    ``decode(latent) -> RGB [B, 3, H, W] in [-1, 1]`` must be differentiable; ``prepared`` are
    prepared guidance terms (``term.prepare(source)``), called as ``term(rgb, ctx)`` and returning
    weighted per-row losses; ``reference`` is the sampler's own correction that sets the step's size
    (see the module docstring). Returns ``x0 - rho * d(sum of losses)/d x0`` with ``rho`` from
    :func:`normalised_step`. Runs with autograd on and outside inference mode whatever the caller's
    mode (ComfyUI runs nodes under ``torch.inference_mode``); the result is a new detached tensor made in the
    caller's mode (an inference tensor inside a ComfyUI sampler, as the sampler expects).
    A NaN/inf loss or gradient raises :class:`GuidanceError` naming the term.

    ``mix(latent) -> latent`` (optional) forms the noise-mixed latent; terms that score the noise-mixed
    input (:func:`core.diffusion.guidance.noise_mixed_input`) then get ``decode(mix(latent))``, decoded
    once per call and shared, through ``ctx.mixed_input``. Terms with a ``before_step(ctx)`` hook are
    called first, as in the pixel sampler.
    """
    if strength == 0 or not prepared:
        return X0GuidanceResult(x0=x0)
    with torch.inference_mode(False), torch.enable_grad():
        latent = x0.detach().clone().requires_grad_(True)  # a normal tensor even if x0 is an inference tensor
        image = decode(latent)
        if mix is not None and ctx is not None:
            ctx.mixed_input = _shared_decode(decode, mix, latent)
        for p in prepared:
            if hasattr(p, "before_step"):
                p.before_step(ctx)
        per_term = {p.name: p(image, ctx) for p in prepared}
        losses = {k: v.detach() for k, v in per_term.items()}
        total = sum(v.float().sum() for v in per_term.values())
        if not total.requires_grad:  # terms that ignore the image (all weights 0): nothing to follow
            return X0GuidanceResult(x0=x0, losses=losses, image=image.detach())
        gradient = torch.autograd.grad(total, latent)[0]
    rho = normalised_step(gradient, reference, strength)
    # one host read per guided call: every term's and the gradient's finiteness, and whether any row moves
    flags = torch.stack([torch.isfinite(v).all() for v in losses.values()]
                        + [torch.isfinite(gradient).all(), (rho > 0).any()]).tolist()
    if not all(flags[:-1]):
        bad = [name for name, ok in zip(losses, flags) if not ok]
        what = f"loss term(s) {', '.join(bad)}" if bad else f"the guidance gradient (terms: {', '.join(losses)})"
        raise GuidanceError(f"{what} became NaN/inf on the decoded x0; lower the weight or the guidance strength, "
                            "or use fp32")
    if not flags[-1]:
        return X0GuidanceResult(x0=x0, losses=losses, step_size=rho, image=image.detach())
    moved = x0.detach() - rho.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1))) * gradient.to(x0.dtype)
    return X0GuidanceResult(x0=moved, losses=losses, step_size=rho, image=image.detach())


def _shared_decode(decode: Callable, mix: Callable, latent: torch.Tensor) -> Callable[[], torch.Tensor]:
    cache: list = []

    def mixed() -> torch.Tensor:
        if not cache:
            cache.append(decode(mix(latent)))
        return cache[0]
    return mixed


def schedule_progress(sigma: float, sigmas: Sequence[float]) -> float:
    """Fraction of the sampling schedule done at noise level ``sigma``: 0 at the first sigma, 1 at the
    last, linear in the step index (interpolated between steps, e.g. for a second-order sampler's
    intermediate call). ``sigmas`` is the sampler's descending schedule (ComfyUI's
    ``transformer_options["sample_sigmas"]``)."""
    values = [float(s) for s in sigmas]
    if len(values) < 2:
        return 1.0
    steps = len(values) - 1
    if sigma >= values[0]:
        return 0.0
    for k in range(steps):
        hi, lo = values[k], values[k + 1]
        if hi >= sigma >= lo:
            return (k + (hi - sigma) / (hi - lo if hi != lo else 1.0)) / steps
    return 1.0


@dataclass(frozen=True)
class GuidanceBand:
    """Where in the schedule guidance acts: ``start <= progress <= end``, and on every ``every_n``-th
    sampler step counted from the first step inside the band. MPGD guides the middle 30-70 %; the
    early steps decide layout, the last ones only detail."""

    start: float = 0.0
    end: float = 1.0
    every_n: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got {self.start} and {self.end}")
        if self.every_n < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n}")

    def active(self, progress: float, step_in_band: int) -> bool:
        """Whether the call at ``progress`` (the ``step_in_band``-th step inside the band, from 0) is guided."""
        return self.start <= progress <= self.end and step_in_band % self.every_n == 0
