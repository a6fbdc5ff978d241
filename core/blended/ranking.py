"""CLIP ranking of Blended Diffusion results (spec 6, section 9 quirk 4).

Upstream scores every final image by an *unaugmented* masked CLIP distance and saves it under
a file name starting with the distance to 4 decimals, so the folder listing is the ranking
(lower = better). Two variants:

* ``faithful=True`` (upstream, ``image_editor.py:123-128, 281-285``): ``m * clamp((x + 1) / 2)``
  (background black in [0, 1]), bilinear resize to the CLIP size **without antialias** (the
  pinned torchvision 0.10), ``encode_image`` **without** CLIP normalisation, spherical distance;
  order = file-name order, i.e. by the 4-decimal string, ties by sample index.
* default (cleaner): the image CLIP saw during guidance, ``(x * m + 1) / 2`` (background
  mid-grey), bilinear resize with antialias when shrinking, CLIP normalisation, spherical
  distance; order = stable ascending sort of the exact distances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .losses import clip_normalize, spherical_distance


@dataclass(frozen=True)
class RankResult:
    """``order``: sample indices best first; ``scores``: distance of each sample (input order);
    ``top_k``: the first ``k`` of ``order`` (all when k is None)."""

    order: torch.Tensor
    scores: torch.Tensor
    top_k: torch.Tensor

    @property
    def sorted_scores(self) -> torch.Tensor:
        return self.scores[self.order]


def _resize(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def ranking_distances(images: torch.Tensor, mask: torch.Tensor, clip: Any, text_embed: torch.Tensor,
                      faithful: bool = False, antialias: Optional[bool] = None) -> torch.Tensor:
    """Masked, unaugmented CLIP distance of each image (``(B, 3, H, W)`` in [-1, 1]) to
    ``text_embed`` (``(1, D)``); see the module docstring for the two variants. ``antialias``
    overrides the variant's resize setting. Returns float32 ``[B]``."""
    size = int(clip.image_size)
    mask = mask.to(device=images.device, dtype=images.dtype)
    with torch.no_grad():
        if faithful:
            pixels = mask * ((images + 1) / 2).clamp(0, 1)
            pixels = _resize(pixels, size, False if antialias is None else antialias)
        else:
            pixels = ((images * mask + 1) / 2).clamp(0, 1)
            pixels = clip_normalize(_resize(pixels, size, True if antialias is None else antialias), clip)
        embeds = clip.encode_image(pixels).float()
        return spherical_distance(embeds, text_embed.to(embeds.device).float())


def rank_order(scores: torch.Tensor, faithful: bool = False) -> torch.Tensor:
    """Indices best (lowest) first. Faithful: by ``f"{d:.4f}"`` as upstream's file names sort,
    ties by index; otherwise a stable sort of the exact values."""
    if faithful:
        keys = [(float(f"{float(d):.4f}"), i) for i, d in enumerate(scores.tolist())]
        return torch.tensor([i for _, i in sorted(keys)], dtype=torch.long)
    return torch.sort(scores.detach().cpu(), stable=True).indices


def rank_results(images: torch.Tensor, mask: torch.Tensor, clip: Any, prompt: Optional[str] = None,
                 text_embed: Optional[torch.Tensor] = None, top_k: Optional[int] = None,
                 faithful: bool = False) -> RankResult:
    """Rank a batch of final edits by masked CLIP distance to ``prompt`` (or ``text_embed``).

    ``images`` are the pasted results in [-1, 1]; ``mask`` ``(1 or B, 1, H, W)``, 1 = edit.
    """
    if text_embed is None:
        if prompt is None:
            raise ValueError("rank_results needs a prompt or a text embedding")
        with torch.no_grad():
            text_embed = clip.encode_text([prompt]).float()
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    scores = ranking_distances(images, mask, clip, text_embed, faithful=faithful).cpu()
    order = rank_order(scores, faithful=faithful)
    return RankResult(order, scores, order[: top_k if top_k is not None else len(order)])


def ranked_file_name(distance: float, stem: str, iteration: int, index: int) -> str:
    """Upstream's ranked file name: ``{d:.4f without the point}_{stem}_i_{iteration}_b_{index}.png``."""
    return f"{distance:.4f}".replace(".", "") + f"_{stem}_i_{iteration}_b_{index}.png"
