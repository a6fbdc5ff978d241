"""Blended Diffusion's guidance losses as guidance terms (see ``core/diffusion/guidance.py``).

Spec 5.4 - 5.5 (``optimization/image_editor.py:104-210``, ``optimization/losses.py``). Upstream
``cond_fn`` returns ``-d/dx_t`` of

    1000 * L_clip(x_in) + 50 * range(x0_hat) [+ 1000 * LPIPS + 10000 * L2 on x_in * (1 - m)]

with ``x_in = x0_hat * fac + x_t * (1 - fac)``, ``fac = sqrt(1 - abar_i)``. The range term is
``vit_losses.RangeLoss`` (same formula as DiffuseIT's, on x0_hat). Each term here
returns the *weighted per-sample* losses; their batch sum is upstream's total loss (the L2 term
in its ``batch_mean`` mode; see :class:`BackgroundPreservationLoss`). The sampler differentiates
that sum with respect to ``x_t`` through the UNet, exactly as ``cond_fn`` does.

CLIP is duck-typed: any object with ``image_size: int``, ``mean``, ``std`` (3 values each),
``encode_image(pixels_already_clip_normalised)`` and ``encode_text(list_of_prompts)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from ..devices import constant
from .cutouts import FAITHFUL_TRANSLATE, AugmentParams, AugmentSettings, make_cutouts
from ..diffusion.guidance import StepContext, noise_mixed_input
from ..diffusion.range import RangeLoss

# --------------------------------------------------------------------------- functional pieces


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2 * arcsin(|a^ - b^| / 2)^2`` of L2-normalised embeddings (spec 5.5 step 4), over the
    last dim; the squared great-circle distance / 2, in [0, pi^2 / 2]. Broadcasts."""
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    return (a - b).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` (upstream's unused ``use_cosine=True`` variant)."""
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    return 1 - (a * b).sum(dim=-1)


def clip_normalize(pixels01: torch.Tensor, clip: Any) -> torch.Tensor:
    """CLIP mean / std normalisation of [0, 1] images (spec 3.3)."""
    mean = constant(clip.mean, pixels01.device, pixels01.dtype).view(1, -1, 1, 1)  # made once, not per step
    std = constant(clip.std, pixels01.device, pixels01.dtype).view(1, -1, 1, 1)
    return (pixels01 - mean) / std


def masked_clip_distances(x_in: torch.Tensor, mask: torch.Tensor, clip: Any, text_embed: torch.Tensor,
                          settings: AugmentSettings = AugmentSettings(), cut_size: Optional[int] = None,
                          generator: Optional[torch.Generator] = None, params: Optional[AugmentParams] = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, AugmentParams]:
    """Per-sample unweighted CLIP loss on augmented cutouts (spec 5.5).

    ``x_in * mask`` (masked pixels 0 = mid-grey) -> cutouts (warped in [-1, 1]) -> ``(c + 1) / 2``
    -> CLIP normalisation -> ``encode_image(...).float()`` -> spherical distance to the text
    embedding -> mean over the ``n_cuts`` cutouts of each sample. Returns ``(loss [B], cutouts,
    params)``; upstream's batch loss is ``loss.sum()``.
    """
    batch = x_in.shape[0]
    if isinstance(generator, (list, tuple)):
        # one generator per row: each sample draws its own warps, so a batch equals serial runs
        # (upstream draws the whole batch from one stream; pass a single generator for that)
        rows = [masked_clip_distances(x_in[b:b + 1], mask[b:b + 1] if mask.shape[0] > 1 else mask, clip, text_embed,
                                      settings, cut_size, generator[b]) for b in range(batch)]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]), None
    cuts, params = make_cutouts(x_in * mask, cut_size or int(clip.image_size), settings, generator, params)
    embeds = clip.encode_image(clip_normalize((cuts + 1) / 2, clip)).float()
    dists = spherical_distance(embeds, text_embed.float())
    return dists.view(settings.n_cuts, batch).mean(dim=0), cuts, params


def masked_background(x_in: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x_in * (1 - m)``: the part the background losses compare (spec 5.4 step 4)."""
    return x_in * (1 - mask)


def background_l2(background: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean_{c,h,w} (background - target)^2``; upstream's ``F.mse_loss`` is the
    mean of these over the batch."""
    return (background - target).pow(2).flatten(1).mean(dim=1)


# --------------------------------------------------------------------------- guidance terms


def edit_mask(mask: Optional[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    """The term's own mask, or (``mask=None``) the one the sampler's background blend published in
    ``ctx.blend_mask``: in a graph the mask is wired once, into Background Blend."""
    if mask is not None:
        return mask
    published = ctx.blend_mask
    if published is None:
        raise ValueError("this masked loss has no mask: give it one, or use it together with a Background Blend "
                         "(whose mask it then follows)")
    return published


@dataclass(frozen=True, eq=False)
class _PreparedMaskedCLIP:
    name: str
    term: "MaskedCLIPLoss"
    text_embed: Optional[torch.Tensor]
    generator: Optional[torch.Generator]

    def __call__(self, predicted_x0: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        term = self.term
        if self.text_embed is None or term.lambda_clip == 0:
            # upstream: an empty prompt makes cond_fn return zeros
            return predicted_x0.new_zeros(predicted_x0.shape[0])
        x_in = noise_mixed_input(predicted_x0, ctx) if term.mix_noisy_input \
            else predicted_x0
        mask = edit_mask(term.mask, ctx).to(device=x_in.device, dtype=x_in.dtype)
        generator = ctx.generators if ctx.generators is not None else self.generator
        loss, _, params = masked_clip_distances(
            x_in, mask, term.clip, self.text_embed.to(x_in.device), term.settings, term.cut_size,
            generator, ctx.replay.cutout_params)
        ctx.state.cutout_params[self.name] = params
        return loss * term.lambda_clip


@dataclass(frozen=True, eq=False)
class MaskedCLIPLoss:
    """``lambda_clip * mean_k d(CLIP(cutout_k(x_in * m)), CLIP(prompt))`` per sample (spec 5.5).

    ``mask`` is ``(1 or B, 1, H, W)`` at model resolution, 1 = edit. ``n_cuts`` cutouts (1 plain
    + ``n_cuts - 1`` warped) at ``cut_size`` (default ``clip.image_size``); ``translate`` is the
    cutouts' (x, y) shift range, upstream's vertical-only quirk by default. Random warps come
    from the context's per-row ``generators`` if the sampler sets them, else a generator seeded
    with ``seed``, else torch's global RNG (upstream). ``ctx.replay.cutout_params`` replays
    recorded warps; the warps used are written to ``ctx.state.cutout_params[name]``.
    ``mix_noisy_input=False`` scores the plain x0 prediction instead of x_in (a deviation).
    An empty prompt contributes 0 (upstream returns a zero gradient for it).
    """

    needs_source = False  # scores x0 alone: guiding a latent model needs no source image

    clip: Any
    prompt: str
    mask: Optional[torch.Tensor] = None
    lambda_clip: float = 1000.0
    n_cuts: int = 8
    cut_size: Optional[int] = None
    translate: tuple[float, float] = FAITHFUL_TRANSLATE
    degrees: float = 15.0
    p_affine: float = 0.7
    distortion_scale: float = 0.7
    p_perspective: float = 0.7
    mix_noisy_input: bool = True
    seed: Optional[int] = None
    name: str = "masked_clip"

    def __post_init__(self) -> None:
        self.settings  # validates n_cuts / distortion early, with AugmentSettings' messages

    @property
    def settings(self) -> AugmentSettings:
        return AugmentSettings(self.n_cuts, self.degrees, tuple(self.translate), self.p_affine,
                               self.distortion_scale, self.p_perspective)

    def prepare(self, source: torch.Tensor) -> _PreparedMaskedCLIP:
        text = None
        if self.prompt != "":
            with torch.no_grad():
                text = self.clip.encode_text([self.prompt]).float().detach()
        generator = torch.Generator().manual_seed(int(self.seed)) if self.seed is not None else None
        return _PreparedMaskedCLIP(self.name, self, text, generator)


@dataclass(frozen=True, eq=False)
class _PreparedBackground:
    name: str
    term: "BackgroundPreservationLoss"
    source: torch.Tensor

    def __call__(self, predicted_x0: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        term = self.term
        x_in = noise_mixed_input(predicted_x0, ctx)
        mask = edit_mask(term.mask, ctx).to(device=x_in.device, dtype=x_in.dtype)
        background = masked_background(x_in, mask)
        target = self.source.to(device=x_in.device, dtype=x_in.dtype)
        if term.mask_target:
            target = masked_background(target, mask)
        total = x_in.new_zeros(x_in.shape[0])
        if term.lambda_lpips:
            total = total + term.lpips_model(background, target).reshape(-1) * term.lambda_lpips
        if term.lambda_l2:
            l2 = background_l2(background, target)
            if term.l2_reduction == "batch_mean":
                l2 = l2 / x_in.shape[0]
            total = total + l2 * term.lambda_l2
        return total


@dataclass(frozen=True, eq=False)
class BackgroundPreservationLoss:
    """Upstream's ``--background_preservation_loss`` (off by default there; spec 5.4 step 4):
    ``lambda_lpips * LPIPS(x_in (1 - m), src) + lambda_l2 * L2(x_in (1 - m), src)`` per sample.

    The target is the full, *unmasked* source as upstream (``mask_target=True`` masks it too).
    ``l2_reduction="per_sample"`` (default) gives each sample its own mean, so a batch equals
    serial runs; ``"batch_mean"`` divides by the batch size so the sum equals upstream's
    ``F.mse_loss`` over the whole batch (faithful; its per-sample gradient shrinks with B).
    ``lpips_model`` (e.g. ``lpips.LPIPS(net="vgg")``, inputs in [-1, 1]) is needed only when
    ``lambda_lpips`` is non-zero.
    """

    mask: Optional[torch.Tensor] = None
    lambda_lpips: float = 1000.0
    lambda_l2: float = 10000.0
    lpips_model: Optional[torch.nn.Module] = None
    l2_reduction: Literal["per_sample", "batch_mean"] = "per_sample"
    mask_target: bool = False
    name: str = "background_preservation"

    def __post_init__(self) -> None:
        if self.lambda_lpips and self.lpips_model is None:
            raise ValueError("BackgroundPreservationLoss: lambda_lpips is non-zero but no lpips_model "
                             "was given (use lpips.LPIPS(net='vgg'), or set lambda_lpips=0)")
        if self.l2_reduction not in ("per_sample", "batch_mean"):
            raise ValueError(f"l2_reduction must be 'per_sample' or 'batch_mean', got {self.l2_reduction!r}")

    def prepare(self, source: torch.Tensor) -> _PreparedBackground:
        return _PreparedBackground(self.name, self, source.detach())


def blended_guidance(clip: Any, prompt: str, mask: torch.Tensor, *, lambda_clip: float = 1000.0,
                     lambda_range: float = 50.0, background_preservation: bool = False,
                     lambda_lpips: float = 1000.0, lambda_l2: float = 10000.0,
                     lpips_model: Optional[torch.nn.Module] = None, n_cuts: int = 8,
                     seed: Optional[int] = None,
                     l2_reduction: Literal["per_sample", "batch_mean"] = "per_sample") -> tuple:
    """Upstream's guidance as a tuple of terms, in cond_fn's order (spec 5.4, defaults of 2):
    :class:`MaskedCLIPLoss`, ``vit_losses.RangeLoss`` (identical formula, weight ``lambda_range``),
    :class:`BackgroundPreservationLoss`.

    Terms with a zero weight are left out, as upstream skips them; ``clip`` may be None when
    ``lambda_clip`` is 0.
    """
    terms: list = []
    if lambda_clip:
        terms.append(MaskedCLIPLoss(clip, prompt, mask, lambda_clip=lambda_clip, n_cuts=n_cuts, seed=seed))
    if lambda_range:
        # the same L_range as DiffuseIT's (mean_CHW (x0 - clamp(x0))^2 on x0, not x_in), weight 50
        terms.append(RangeLoss(weight=float(lambda_range)))
    if background_preservation and (lambda_lpips or lambda_l2):
        terms.append(BackgroundPreservationLoss(mask, lambda_lpips, lambda_l2, lpips_model, l2_reduction))
    return tuple(terms)
