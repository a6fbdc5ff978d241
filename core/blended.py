"""Blended Diffusion (Avrahami et al., CVPR 2022) assembled from the core pieces.

``BackgroundBlend`` is the value the sampler applies after every step (spec 5.3 step 6) and at the
end (the ``enforce_background`` paste, spec 6). ``blended_edit`` is the script-level pipeline: any
image size (crop a square around the mask, edit at model resolution, stitch back with a feathered
seam), many samples as batches, CLIP ranking.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from .blend import BLEND_MODES, blend_background, enforce_background, extract_crop, plan_crop, stitch_back
from .blended_losses import blended_guidance
from .guided import GuidedSamplerOptions, sample_many
from .masks import prepare_mask
from .rank import rank_results


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


@dataclass
class BlendedResult:
    """``images``: all edits in rank order (best first) at the input's full resolution, [-1, 1];
    ``scores``: their CLIP distances (lower is better); ``order``: indices into the unranked batch;
    ``edits``: the unranked model-resolution edits."""

    images: torch.Tensor
    scores: torch.Tensor
    order: torch.Tensor
    edits: torch.Tensor = field(repr=False, default=None)


def blended_edit(ddpm: Any, clip: Any, image: torch.Tensor, mask: torch.Tensor, prompt: str, *,
                 samples: int = 8, seed: int = 0, respacing: str = "100", skip_timesteps: int = 25,
                 sampler: str = "ddpm", lambda_clip: float = 1000.0, lambda_range: float = 50.0,
                 background_preservation: bool = False, lambda_lpips: float = 1000.0, lambda_l2: float = 10000.0,
                 lpips_model: Optional[torch.nn.Module] = None, n_cuts: int = 8, blend_mode: str = "official",
                 enforce: bool = True, crop_margin: float = 0.25, feather: int = 0, chunk_size: int = 0,
                 faithful_rank: bool = False, invert_mask: bool = False,
                 callback: Optional[Callable[[dict], None]] = None) -> BlendedResult:
    """Edit the masked region of ``image`` ([1,3,H,W] in [-1,1], any size) towards ``prompt``.

    The image is cropped to a square around the mask's bounding box (``crop_margin`` of context on
    each side, at least the model's resolution when the image allows), edited at model resolution,
    and stitched back: pixels outside the mask are returned unchanged, byte for byte. Returns every
    sample ranked by the unaugmented masked CLIP distance.
    """
    if not prompt or not prompt.strip():
        raise ValueError("prompt is empty: Blended Diffusion needs a text describing the edit")
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be [1,3,H,W], got {tuple(image.shape)} (edit one image per call)")
    size = ddpm.image_size
    device = ddpm.device
    full_mask = prepare_mask(mask, image.shape[-2], image.shape[-1], invert=invert_mask, allow_full=True)
    box = plan_crop(full_mask, model_size=size, margin=crop_margin)
    crop, crop_mask = extract_crop(image, full_mask, box, size)
    crop, crop_mask = crop.to(device), crop_mask.to(device)
    terms = blended_guidance(clip, prompt, crop_mask, lambda_clip=lambda_clip, lambda_range=lambda_range,
                             background_preservation=background_preservation, lambda_lpips=lambda_lpips,
                             lambda_l2=lambda_l2, lpips_model=lpips_model, n_cuts=n_cuts)
    blend = BackgroundBlend(crop_mask, blend_mode, enforce)
    options = GuidedSamplerOptions(sampler=sampler, skip_timesteps=skip_timesteps, resample_steps=1)
    result = sample_many(ddpm.unet, ddpm.schedule(respacing), crop, terms, samples_per_image=samples, seed=seed,
                         chunk_size=chunk_size, options=options, blend=blend, callback=callback,
                         learn_sigma=ddpm.learn_sigma)
    edits = result.images
    ranking = rank_results(edits, crop_mask, clip, prompt, faithful=faithful_rank)
    ranked = edits[ranking.order.to(edits.device)]
    full = torch.cat([stitch_back(image.to(device), e[None], full_mask.to(device), box, feather=feather)
                      for e in ranked])
    return BlendedResult(images=full, scores=ranking.sorted_scores if hasattr(ranking, "sorted_scores")
                         else ranking.scores[ranking.order], order=ranking.order, edits=edits)
