"""The pack's guidance terms steering a sampler it does not own, one denoiser call at a time.

A sampler such as ComfyUI's KSampler calls its denoiser once per step (twice for second-order
samplers) and steps with the returned x0. :class:`LatentGuide` sits right after CFG: it receives
the post-CFG x0 (a latent in the model's own space), the sampler's state x_t, the noise level and
the schedule, and returns the guided x0 (:func:`guide_x0`). It owns everything a run needs -- the
prepared terms, their shared :class:`StepState`, the previous decoded x0, per-row random generators --
and starts a fresh run whenever the sampler's schedule object changes (a new KSampler run).

Nothing here knows ComfyUI: the decoder is any differentiable latent -> RGB callable and the caller
describes each call with a :class:`DenoiserCall` (``nodes/model_guidance.py`` builds it from
ComfyUI's post-CFG arguments).

Sampler-neutral step description (``StepContext.progress`` / ``noise_level``):
- ``progress``: fraction of the sampled schedule done (:func:`schedule_progress`), which the
  guidance band and ``every_n_steps`` use;
- ``noise_level``: ``b / sqrt(a^2 + b^2)`` for a state ``x_t = a x0 + b eps`` -- eps / v models
  (``a = 1, b = sigma``) give ``sigma / sqrt(1 + sigma^2) = sqrt(1 - abar)``, flow models
  (``a = 1 - sigma, b = sigma``) their own variance-preserving equivalent. Semantic divergence's
  ``diff_iter`` gate and the noise-mixed inputs read it;
- noise mixing happens in latent space: ``x_t / sqrt(a^2 + b^2)`` is the variance-preserving state,
  mixed with the latent x0 by ``noise_level`` and decoded (``core.diffusion.guidance.noise_mixed_input``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..diffusion.finite_watch import GuidanceError
from ..diffusion.guidance import StepContext, StepState
from ..diffusion.sampling import STREAM_AUGMENT, row_seed
from .x0_guidance import GuidanceBand, guide_x0, schedule_progress


class LatentGuidanceError(ValueError):
    """Inputs that cannot guide this model (decoder/latent mismatch, batch sizes, missing source)."""


@dataclass
class DenoiserCall:
    """One call of the sampler's denoiser, as the guide sees it.

    ``x0``: the post-CFG prediction ``[B, C, h, w]`` in the model's latent space; ``x_t``: the sampler's
    state; ``sigma``: ``[B]`` noise levels; ``sigmas``: the run's schedule (descending; the same object
    for every call of one run, or None when the sampler does not publish it); ``reference``: the
    correction that sets the step size (see ``core.latent.x0_guidance``); ``signal_scale`` /
    ``noise_scale``: ``a`` and ``b`` of ``x_t = a x0 + b eps`` per row."""

    x0: torch.Tensor
    x_t: torch.Tensor
    sigma: torch.Tensor
    sigmas: Optional[torch.Tensor]
    reference: torch.Tensor
    signal_scale: torch.Tensor
    noise_scale: torch.Tensor


@dataclass
class _Run:
    sigmas: Any
    sigma_list: list
    batch: int
    prepared: list
    state: StepState
    source: torch.Tensor
    mask: Optional[torch.Tensor]
    generators: list
    first_band_step: Optional[int] = None
    guided_calls: int = 0
    prev_x0: Optional[torch.Tensor] = None


def rows_of(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``x`` with ``batch`` rows: 1 row is repeated, ``batch`` rows kept, anything else refused."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise LatentGuidanceError(f"{what} has {x.shape[0]} images but the latent batch has {batch}: give 1 "
                              f"(shared by every latent) or {batch} (one per latent)")


def fit_to(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` to the decoded image's ``size`` (aspect not kept, like VAE Encode's crop-free
    input): bilinear with antialias (a mask's edges stay soft), clamped to [-1, 1] for images, [0, 1] for masks."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    low = 0.0 if mode == "mask" else -1.0
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(low, 1.0)


def make_autograd_safe(modules: Sequence[torch.nn.Module]) -> None:
    """Replace weights created under ``torch.inference_mode`` (ComfyUI loads and moves every model there)
    with equal normal tensors, so a backward pass through them can save them. Only flagged tensors are
    copied, so this is a cheap check when nothing changed since the last run."""
    with torch.inference_mode(False), torch.no_grad():
        for module in modules:
            for sub in module.modules():
                # a new Parameter object: one made under inference mode keeps an inference version counter
                # even after its .data is replaced
                for name, param in list(sub._parameters.items()):
                    if param is not None and param.is_inference():
                        sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad)
                for name, buffer in list(sub._buffers.items()):
                    if buffer is not None and buffer.is_inference():
                        sub._buffers[name] = buffer.clone()


class LatentGuide:
    """Guidance terms + a differentiable decoder, applied to every denoiser call of a sampler run.

    ``terms``: guidance terms (``prepare(source)`` once per run); ``decode``: latent -> RGB in [-1, 1];
    ``source``: ``[1 or B, 3, H, W]`` in [-1, 1] (resized to the decoded size), or None when no term
    needs one; ``mask``: ``[1 or B, 1, H, W]`` in [0, 1], 1 = edit (masked terms without their own mask
    follow it); ``strength``, ``band``: step size and where guidance acts; ``seed``: the terms' random
    augmentations (row r draws from ``row_seed(seed, r, STREAM_AUGMENT)``, as the pixel sampler's rows
    do); ``modules``: the models taking part in the backward pass (made autograd-safe once per run).
    """

    def __init__(self, terms: Sequence[Any], decode: Callable[[torch.Tensor], torch.Tensor],
                 source: Optional[torch.Tensor], *, mask: Optional[torch.Tensor] = None, strength: float = 0.3,
                 band: GuidanceBand = GuidanceBand(), seed: int = 0, modules: Sequence[torch.nn.Module] = ()) -> None:
        if source is None:
            needing = [t.name for t in terms if getattr(t, "needs_source", True)]
            if needing:
                raise LatentGuidanceError(f"guidance term(s) {', '.join(needing)} compare with a source image: wire "
                                          "the image being translated (the picture that went into VAE Encode)")
        self.terms, self.decode, self.source, self.mask = tuple(terms), decode, source, mask
        self.strength, self.band, self.seed = float(strength), band, int(seed)
        self.modules = tuple(modules)
        self.run: Optional[_Run] = None
        self.total_guided_calls = 0  # over every run: what tests and benchmarks count
        self.guided_steps: set = set()  # sampler step indices of the latest run that were guided
        self._max_rho: Optional[torch.Tensor] = None  # kept on the device: no extra host read per call

    @property
    def max_step_size(self) -> float:
        """The largest step size (rho) applied so far; 0 when guidance never moved x0."""
        return 0.0 if self._max_rho is None else float(self._max_rho)

    @property
    def enabled(self) -> bool:
        return self.strength != 0 and bool(self.terms)

    def __call__(self, call: DenoiserCall) -> torch.Tensor:
        if not self.enabled:
            return call.x0
        run = self._run_for(call)
        sigma = float(call.sigma.reshape(-1)[0])
        schedule = run.sigma_list if run.sigma_list else [sigma, 0.0]
        progress = schedule_progress(sigma, schedule)
        steps = len(schedule) - 1
        step = min(int(progress * steps + 1e-9), steps - 1)  # the sampler step this call belongs to
        if not (self.band.start <= progress <= self.band.end):
            return call.x0
        if run.first_band_step is None:
            run.first_band_step = step
        if (step - run.first_band_step) % self.band.every_n:
            return call.x0
        return self._guide(run, call, progress, step, steps)

    def _run_for(self, call: DenoiserCall) -> _Run:
        batch = call.x0.shape[0]
        run = self.run
        if run is not None and run.batch == batch and (call.sigmas is None or run.sigmas is call.sigmas):
            return run
        make_autograd_safe(self.modules)
        self.guided_steps = set()
        sigma_list = [float(s) for s in call.sigmas.reshape(-1).tolist()] if call.sigmas is not None else []
        self.run = _Run(sigmas=call.sigmas, sigma_list=sigma_list, batch=batch, prepared=[], state=StepState(), source=None, mask=None,
                        generators=[torch.Generator("cpu").manual_seed(row_seed(self.seed, r, STREAM_AUGMENT))
                                    for r in range(batch)])
        return self.run

    def _prepare(self, run: _Run, size: tuple[int, int], device: torch.device) -> None:
        """Terms are prepared at the first guided call, when the decoded size is known. Everything made here
        is a normal tensor (copied outside inference mode): losses save the source and the mask for backward."""
        with torch.inference_mode(False), torch.no_grad():
            self._fill_run(run, size, device)

    def _fill_run(self, run: _Run, size: tuple[int, int], device: torch.device) -> None:
        if self.source is not None:
            source = fit_to(self.source.to(device=device, dtype=torch.float32), size, "image")
            run.source = rows_of(source, run.batch, "the source image").clone()
        else:
            run.source = torch.zeros(run.batch, 3, *size, device=device)
        if self.mask is not None:
            mask = fit_to(self.mask.to(device=device, dtype=torch.float32), size, "mask")
            run.mask = rows_of(mask, run.batch, "the mask").clone()
        run.prepared = [t.prepare(run.source) for t in self.terms]

    def _guide(self, run: _Run, call: DenoiserCall, progress: float, step: int, steps: int) -> torch.Tensor:
        with torch.inference_mode(False):  # normal tensors: the mixture saves them for backward
            a = call.signal_scale.reshape(-1, 1, 1, 1).to(call.x0)
            b = call.noise_scale.reshape(-1, 1, 1, 1).to(call.x0)
            norm = (a * a + b * b).sqrt()
            noise_level, vp_state = (b / norm), (call.x_t / norm).detach()

        def mix(latent: torch.Tensor) -> torch.Tensor:
            return latent * noise_level + vp_state * (1 - noise_level)

        if not run.prepared:
            with torch.inference_mode(False), torch.no_grad():
                probe = self.decode(call.x0[:1].detach().clone())
            self._prepare(run, tuple(probe.shape[-2:]), call.x0.device)
        ctx = StepContext(t_index=None, t=None, x_t=call.x_t, schedule=None, source=run.source,
                          prev_x0=run.prev_x0, step=run.guided_calls, generators=run.generators,
                          blend_mask=run.mask, state=run.state, progress=progress,
                          noise_level=noise_level.reshape(-1).float())
        try:
            result = guide_x0(call.x0, self.decode, run.prepared, ctx, self.strength, call.reference, mix=mix)
        except GuidanceError as error:
            raise GuidanceError(f"guidance at sampler step {step + 1} of {steps} (sigma {float(call.sigma.reshape(-1)[0]):.4g}): "
                                f"{error}") from None
        run.guided_calls += 1
        self.total_guided_calls += 1
        self.guided_steps.add(step)
        run.prev_x0 = result.image
        if result.step_size is not None:
            rho = result.step_size.max()
            self._max_rho = rho if self._max_rho is None else torch.maximum(self._max_rho, rho)
        return result.x0
