"""Background blending after every step and the final paste (Blended Diffusion spec 5.3, 6).

:class:`BackgroundBlend` is the value the sampler applies after every step and at the end.

Pure functions over NCHW tensors in [-1, 1]; masks are ``(1 or B, 1, H, W)``, 1 = edit.
Nothing here draws random numbers unless asked to through :func:`draw_background_noise`:
the sampler owns the draw order.

Blend modes (spec 5.3 step 6, section 9 quirk 1, section 12-13), applied *after* each reverse
step that turned ``x`` at respaced level ``i`` into ``x_prev`` at level ``i - 1``:

* ``official``: background = source noised to level **i** (the step's *input* level) with
  fresh noise each step, one ``(1, 3, H, W)`` draw shared by the whole batch. At ``i = 0`` it
  still adds ``sqrt(1 - abar_0) = 0.01`` noise. Upstream's behaviour.
* ``next_level``: background noised to level **i - 1** (the level of ``x_prev``), the clean
  source at ``i = 0``; fresh noise each step (diffusers' level).
* ``fixed_noise``: as ``next_level`` but with one noise tensor drawn once per run and reused
  (diffusers' inpainting / ComfyUI's ``noise_scaling`` convention).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, Optional, Union

import torch

from ..diffusion.schedule import DiffusionSchedule, q_sample

BlendMode = Literal["official", "next_level", "fixed_noise"]
BLEND_MODES: tuple[str, ...] = ("official", "next_level", "fixed_noise")
TIndex = Union[int, torch.Tensor]


def _t_vector(t_index: TIndex, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t_index, dtype=torch.long, device=device).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def draw_background_noise(source: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One Gaussian draw shaped like ``source`` (``(1, 3, H, W)`` upstream: shared by the batch).

    Upstream draws it with ``randn_like(init_image)`` after the step's own noise (spec 5.3).
    With ``generator=None`` this is torch's global generator, as upstream.
    """
    return torch.randn(source.shape, generator=generator, dtype=source.dtype,
                       device=generator.device if generator is not None else source.device).to(source.device)


def background_at_level(source: torch.Tensor, schedule: DiffusionSchedule, t_index: TIndex,
                        noise: torch.Tensor, mode: BlendMode = "official") -> torch.Tensor:
    """The noised source that replaces ``x_prev`` outside the mask after step ``t_index``.

    ``official``: ``q_sample(source, i, noise)``; ``next_level`` / ``fixed_noise``:
    ``q_sample(source, i - 1, noise)`` and the clean source where ``i = 0``. ``t_index`` is
    the respaced index of the step's input (int or per-sample ``[B]``).
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {mode!r}")
    batch = max(source.shape[0], noise.shape[0])
    t = _t_vector(t_index, batch, source.device)
    if mode == "official":
        return q_sample(schedule, source, t, noise)
    noised = q_sample(schedule, source, (t - 1).clamp(min=0), noise)
    clean = (t == 0).view(-1, 1, 1, 1)
    return torch.where(clean, source, noised)  # no `if clean.any()`: that would wait for the GPU every step


def blend_background(sample: torch.Tensor, source: torch.Tensor, mask: torch.Tensor,
                     schedule: DiffusionSchedule, t_index: TIndex, noise: torch.Tensor,
                     mode: BlendMode = "official") -> torch.Tensor:
    """Upstream ``postprocess_fn`` (spec 5.3 step 6): ``sample * m + bg * (1 - m)``.

    ``sample`` is the step's output ``x_prev`` (B, 3, H, W); ``source`` the clean source
    (1 or B, 3, H, W); ``noise`` the background noise (``(1, 3, H, W)`` upstream, i.e. shared
    by all samples; pass ``(B, 3, H, W)`` for per-sample noise). Soft masks blend linearly.
    Returns a new tensor; the ``pred_xstart`` of the step is not touched (upstream yields the
    unblended x0 prediction).
    """
    bg = background_at_level(source, schedule, t_index, noise, mode)
    return sample * mask + bg * (1 - mask)


def enforce_background(x0: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final paste (spec 6): ``source * (1 - m) + x0 * m``. With a binary mask the kept pixels
    equal the source exactly (``s * 1 + x * 0``) for finite ``x0``."""
    return source * (1 - mask) + x0 * mask


@dataclass(frozen=True, eq=False)
class BackgroundBlend:
    """Keep everything outside ``mask`` from the source (``mask`` (1 or rows, 1, H, W), 1 = edit).

    ``mode``: ``official`` (source noised to the step's input level with fresh noise, upstream),
    ``next_level`` (the output's level), ``fixed_noise`` (one noise for the whole run).
    ``shared_noise``: upstream draws one background noise for the whole batch; off by default so a
    batch equals serial runs (each row draws from its own stream).
    ``enforce_background``: paste the source outside the mask into the final x0 (upstream default).
    """

    mask: torch.Tensor
    mode: str = "official"
    enforce_background: bool = True
    shared_noise: bool = False

    def __post_init__(self) -> None:
        if self.mode not in BLEND_MODES:
            raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {self.mode!r}")

    def select(self, lo: int, hi: int) -> "BackgroundBlend":
        """The rows lo:hi of a batch (a mask of batch 1 serves every row)."""
        return self if self.mask.shape[0] == 1 else replace(self, mask=self.mask[lo:hi])

    def prepare(self, source: torch.Tensor) -> "PreparedBlend":
        return PreparedBlend(self, source.detach(), self.mask.to(source.device, source.dtype))


@dataclass(eq=False)
class PreparedBlend:
    blend: BackgroundBlend
    source: torch.Tensor
    mask: torch.Tensor
    fixed: Optional[torch.Tensor] = None

    def after_step(self, x_prev: torch.Tensor, t_index: torch.Tensor, noise: Any, schedule: Any) -> torch.Tensor:
        if self.blend.mode == "fixed_noise":
            if self.fixed is None:
                self.fixed = noise.randn(self.source.shape[1:], kind="background")
            z = self.fixed
        else:
            z = noise.randn(self.source.shape[1:], kind="background")
        if self.blend.shared_noise:
            z = z[:1]
        return blend_background(x_prev, self.source, self.mask, schedule, t_index, z, self.blend.mode)

    def finalize(self, x0: torch.Tensor) -> torch.Tensor:
        return enforce_background(x0, self.source, self.mask) if self.blend.enforce_background else x0
