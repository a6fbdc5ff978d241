"""Blended Diffusion (Avrahami et al., CVPR 2022) assembled from the core pieces.

``blended_sample`` runs the guided sampler with a :class:`~.blending.BackgroundBlend` on crops
around the mask (:mod:`.geometry`); ``blended_edit`` is the script-level pipeline: any
image size (crop a square around the mask, edit at model resolution, stitch back with a feathered
seam), many samples as batches, CLIP ranking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..diffusion.batching import ProgressRelay, planned_steps, sample_many
from ..diffusion.guided_loop import GuidedSamplerOptions
from .blending import BLEND_MODES, BackgroundBlend
from .geometry import extract_crop, plan_crop, stitch_back
from .losses import blended_guidance
from .masks import prepare_mask
from .rank_criteria import RankingCriteria
from .ranking import rank_results


@dataclass
class BlendedResult:
    """``images``: all edits in rank order (best first) at the input's full resolution, [-1, 1];
    ``scores``: their ranking scores (the CLIP distances under the paper's criteria; lower is better);
    ``order``: indices into the unranked batch; ``edits``: the unranked model-resolution edits;
    ``components``: each ranking component of the returned images (rank order)."""

    images: torch.Tensor
    scores: torch.Tensor
    order: torch.Tensor
    edits: torch.Tensor = field(repr=False, default=None)
    components: Optional[dict] = None


@dataclass(frozen=True, eq=False)
class BlendSpec:
    """What a Background Blend node hands the sampler: the full-resolution mask and how to use it.

    ``mask`` is (1 or B, 1, H, W) or (B, H, W) at the *image's* resolution (1 = edit; soft values are
    kept for blending); the sampler crops around it, edits at model resolution and stitches back.
    """

    mask: torch.Tensor
    mode: str = "official"
    enforce_background: bool = True
    crop_margin: float = 0.25
    feather: int = 0
    invert: bool = False
    soft: bool = False
    dilate: int = 0

    def __post_init__(self) -> None:
        if self.mode not in BLEND_MODES:
            raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {self.mode!r}")

    def full_mask(self, image: torch.Tensor, index: int = 0, batch: Optional[int] = None) -> torch.Tensor:
        """Mask of image ``index`` (of ``batch`` images) at that image's resolution, checked (empty = error)."""
        mask = self.mask if self.mask.dim() == 4 else self.mask[:, None]
        batch = image.shape[0] if batch is None else batch
        if mask.shape[0] not in (1, batch):
            raise ValueError(f"mask batch {mask.shape[0]} does not match image batch {batch}: give one mask "
                             "for all images or one per image")
        one = mask[index if mask.shape[0] > 1 else 0][None]
        return prepare_mask(one, image.shape[-2], image.shape[-1], invert=self.invert, soft=self.soft,
                            dilate=self.dilate, allow_full=True)


def crop_to_model(image: torch.Tensor, spec: BlendSpec, size: int, index: int = 0,
                  batch: Optional[int] = None) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """The crop geometry of image ``index`` (of ``batch``): ``(full_mask, box, crop, crop_mask)``.

    ``image`` is ``(rows, 3, H, W)`` (rows of that image share its mask); the mask is prepared by
    ``spec`` (invert, dilate), the box is a square around it with ``spec.crop_margin`` context (at least
    ``size``), and the crop and its mask are resampled to ``size``. :func:`blended_sample` edits these
    crops; :func:`ranking_crops` cuts the same crops out of stitched results for CLIP ranking.
    """
    full_mask = spec.full_mask(image, index, batch).to(image.device)
    box = plan_crop(full_mask, model_size=size, margin=spec.crop_margin)
    crop, crop_mask = extract_crop(image, full_mask, box, size, soft_mask=spec.soft)
    return full_mask, box, crop, crop_mask


def ranking_crops(images: torch.Tensor, spec: BlendSpec, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model-size crops (and their masks) that :func:`blended_sample` edited, cut out of its
    full-resolution results ``images`` (``(rows, 3, H, W)``, image-major: with a mask per image, rows
    ``i * samples .. (i + 1) * samples - 1`` belong to image ``i``).

    Blended Diffusion ranks the edit at the model's resolution (upstream and :func:`blended_edit`), not
    the whole photo: for a small mask in a large image the full image shrunk to CLIP's input would show
    the edit at a few dozen pixels. CLIP Rank scores these crops, so it orders the same samples as
    :func:`blended_edit` (identically when the crop box is ``size`` wide, e.g. any mask whose box with
    margin fits in ``size`` pixels; otherwise up to the stitch's resampling).
    """
    mask = spec.mask if spec.mask.dim() == 4 else spec.mask[:, None]
    groups, rows = mask.shape[0], images.shape[0]
    if groups > 1 and rows % groups:
        raise ValueError(f"{rows} images cannot be split among {groups} masks: give one mask, or one per source "
                         "image (samples of image 0 first, then image 1, ...)")
    per = rows if groups == 1 else rows // groups
    crops, masks = [], []
    for index in range(groups):
        part = images[index * per:(index + 1) * per]
        _, _, crop, crop_mask = crop_to_model(part, spec, size, index, groups)
        crops.append(crop)
        masks.append(crop_mask.expand(part.shape[0], -1, -1, -1))
    return torch.cat(crops), torch.cat(masks)


@dataclass
class BlendedSampleResult:
    images: torch.Tensor  # full resolution, [-1, 1], image-major rows (all samples of image 0, then 1, ...)
    edits: torch.Tensor  # the model-resolution crops that were edited
    masks: torch.Tensor  # the crops' masks, one per row
    restarts: list = field(default_factory=list)


def blended_sample(ddpm: Any, images: torch.Tensor, spec: BlendSpec, terms: tuple, *, samples: int = 1,
                   seed: int = 0, respacing: str = "100", options: GuidedSamplerOptions = GuidedSamplerOptions(),
                   chunk_size: int = 0, callback: Optional[Callable[[dict], None]] = None,
                   first_row: int = 0) -> BlendedSampleResult:
    """Blended Diffusion on images of any size: per image, crop a square around its mask (with
    ``crop_margin`` of context; small images are upscaled), run the guided sampler with the
    background blend at model resolution, and stitch the edits back (pixels outside the mask are
    returned unchanged). Row r of the result is row ``first_row + r`` of the run seeded with ``seed``
    (``core.diffusion.sampling.row_seed``), as in :func:`sample_many`: a one-sample call with ``first_row=r``
    reproduces it."""
    size, device = ddpm.image_size, ddpm.device
    outputs, edits, masks, restarts = [], [], [], []
    schedule = ddpm.schedule(respacing)
    relay = ProgressRelay(callback, runs=images.shape[0], steps_per_run=planned_steps(schedule, options, samples, chunk_size))
    for index in range(images.shape[0]):
        image = images[index:index + 1].to(device)
        full_mask, box, crop, crop_mask = crop_to_model(image, spec, size, index, images.shape[0])
        blend = BackgroundBlend(crop_mask, spec.mode, spec.enforce_background)
        result = sample_many(ddpm.unet, schedule, crop, terms, samples_per_image=samples,
                             seed=seed, first_row=first_row + index * samples, chunk_size=chunk_size,
                             options=options, blend=blend, callback=relay.next_run(), learn_sigma=ddpm.learn_sigma)
        outputs.append(stitch_back(image, result.images, full_mask, box, feather=spec.feather))
        edits.append(result.images)
        masks.append(crop_mask.expand(samples, -1, -1, -1))
        restarts.extend(result.restarts)
    return BlendedSampleResult(torch.cat(outputs), torch.cat(edits), torch.cat(masks), restarts)


def blended_edit(ddpm: Any, clip: Any, image: torch.Tensor, mask: torch.Tensor, prompt: str, *,
                 samples: int = 8, seed: int = 0, respacing: str = "100", skip_timesteps: int = 25,
                 sampler: str = "ddpm", lambda_clip: float = 1000.0, lambda_range: float = 50.0,
                 background_preservation: bool = False, lambda_lpips: float = 1000.0, lambda_l2: float = 10000.0,
                 lpips_model: Optional[torch.nn.Module] = None, n_cuts: int = 8, blend_mode: str = "official",
                 enforce: bool = True, crop_margin: float = 0.25, feather: int = 0, chunk_size: int = 0,
                 faithful_rank: bool = False, invert_mask: bool = False, top_k: Optional[int] = None,
                 callback: Optional[Callable[[dict], None]] = None,
                 rank_criteria: Optional[RankingCriteria] = None) -> BlendedResult:
    """Edit the masked region of ``image`` ([1,3,H,W] in [-1,1], any size) towards ``prompt``.

    Defaults are the official ones (spec 2, 10): respacing "100", 25 skipped steps, CLIP weight 1000,
    range 50, 8 cutouts, background losses off. Every sample is returned, ranked by the unaugmented
    masked CLIP distance of its model-resolution edit (``top_k`` keeps the best k), or by ``rank_criteria``
    (:mod:`.rank_criteria`; default the paper's).
    """
    if not prompt or not prompt.strip():
        raise ValueError("prompt is empty: Blended Diffusion needs a text describing the edit")
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be [1,3,H,W], got {tuple(image.shape)} (edit one image per call)")
    spec = BlendSpec(mask, blend_mode, enforce, crop_margin, feather, invert_mask)
    terms = blended_guidance(clip, prompt, None, lambda_clip=lambda_clip, lambda_range=lambda_range,
                             background_preservation=background_preservation, lambda_lpips=lambda_lpips,
                             lambda_l2=lambda_l2, lpips_model=lpips_model, n_cuts=n_cuts)
    options = GuidedSamplerOptions(sampler=sampler, skip_timesteps=skip_timesteps, resample_steps=1)
    result = blended_sample(ddpm, image, spec, terms, samples=samples, seed=seed, respacing=respacing,
                            options=options, chunk_size=chunk_size, callback=callback)
    ranking = rank_results(result.edits, result.masks, clip, prompt, faithful=faithful_rank, top_k=top_k,
                           criteria=rank_criteria)
    keep = ranking.top_k.to(result.images.device)
    return BlendedResult(images=result.images[keep], scores=ranking.scores[ranking.top_k], order=ranking.top_k,
                         edits=result.edits,
                         components={name: value[ranking.top_k] for name, value in ranking.components.items()})
