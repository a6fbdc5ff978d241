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

That is the paper's criterion. ``rank_results(..., criteria=...)`` ranks by a weighted sum of further
components (the whole view's agreement with the prompt, a typography penalty, the seam's
consistency): :mod:`.rank_criteria`. Its default, the paper's criteria, gives the numbers above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .losses import clip_normalize, spherical_distance
from .rank_criteria import (COMPONENTS, PAPER_CRITERIA, RankingCriteria, clip_embeddings, render_prompt_text,
                            resize_square, seam_inconsistency, typography_similarity, weighted_total)


@dataclass(frozen=True)
class RankResult:
    """``order``: sample indices best first; ``scores``: the ranking score of each sample (input order;
    the masked distance under the paper's criteria, else the weighted total); ``top_k``: the first ``k``
    of ``order`` (all when k is None); ``components``: each computed component's values (input order)."""

    order: torch.Tensor
    scores: torch.Tensor
    top_k: torch.Tensor
    components: Optional[dict] = None

    @property
    def sorted_scores(self) -> torch.Tensor:
        return self.scores[self.order]


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
            pixels = resize_square(pixels, size, False if antialias is None else antialias)
        else:
            pixels = ((images * mask + 1) / 2).clamp(0, 1)
            pixels = clip_normalize(resize_square(pixels, size, True if antialias is None else antialias), clip)
        embeds = clip.encode_image(pixels).float()
        return spherical_distance(embeds, text_embed.to(embeds.device).float())


def rank_order(scores: torch.Tensor, faithful: bool = False) -> torch.Tensor:
    """Indices best (lowest) first. Faithful: by ``f"{d:.4f}"`` as upstream's file names sort,
    ties by index; otherwise a stable sort of the exact values."""
    if faithful:
        keys = [(float(f"{float(d):.4f}"), i) for i, d in enumerate(scores.tolist())]
        return torch.tensor([i for _, i in sorted(keys)], dtype=torch.long)
    return torch.sort(scores.detach().cpu(), stable=True).indices


def ranking_components(images: torch.Tensor, mask: torch.Tensor, clip: Any, text_embed: torch.Tensor, *,
                       prompt: Optional[str] = None, faithful: bool = False,
                       components: tuple[str, ...] = COMPONENTS, seam_width: int = 0) -> dict[str, torch.Tensor]:
    """Per-sample values (float32 ``[B]``, on the CPU) of the named ranking components, each lower =
    better (:mod:`.rank_criteria`): ``masked_prompt`` is :func:`ranking_distances` (``faithful`` picks its
    variant); ``typography`` needs ``prompt`` (the text it renders). ``images`` ``(B, 3, H, W)`` in
    [-1, 1], ``mask`` ``(1 or B, 1, H, W)``, 1 = edit."""
    unknown = [name for name in components if name not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown ranking component(s) {unknown}: expected some of {list(COMPONENTS)}")
    if "typography" in components and (prompt is None or not prompt.strip()):
        raise ValueError("the typography term needs the prompt text (it renders it), not only its embedding")
    mask = mask.to(device=images.device, dtype=images.dtype)
    values: dict[str, torch.Tensor] = {}
    if "masked_prompt" in components:
        values["masked_prompt"] = ranking_distances(images, mask, clip, text_embed, faithful=faithful)
    if "whole_image_prompt" in components:
        embeds = clip_embeddings((images + 1) / 2, clip)
        values["whole_image_prompt"] = spherical_distance(embeds, text_embed.to(embeds.device).float())
    if "typography" in components:
        rendering = render_prompt_text(prompt, int(clip.image_size)).to(device=images.device, dtype=images.dtype)
        # the masked view the default ranking and the guidance score (background mid-grey)
        values["typography"] = typography_similarity((images * mask + 1) / 2, clip, clip_embeddings(rendering, clip))
    if "seam" in components:
        values["seam"] = seam_inconsistency(images, mask, seam_width)
    return {name: values[name].float().cpu() for name in COMPONENTS if name in values}


def rank_results(images: torch.Tensor, mask: torch.Tensor, clip: Any, prompt: Optional[str] = None,
                 text_embed: Optional[torch.Tensor] = None, top_k: Optional[int] = None,
                 faithful: bool = False, criteria: Optional[RankingCriteria] = None,
                 report_all: bool = False) -> RankResult:
    """Rank a batch of final edits by masked CLIP distance to ``prompt`` (or ``text_embed``), or by
    ``criteria``'s weighted components (default: the paper's, the masked distance alone).

    ``images`` are the pasted results in [-1, 1]; ``mask`` ``(1 or B, 1, H, W)``, 1 = edit.
    ``report_all`` computes every component for ``RankResult.components``, weighted or not.
    """
    criteria = PAPER_CRITERIA if criteria is None else criteria
    if text_embed is None:
        if prompt is None:
            raise ValueError("rank_results needs a prompt or a text embedding")
        with torch.no_grad():
            text_embed = clip.encode_text([prompt]).float()
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    components = ranking_components(images, mask, clip, text_embed, prompt=prompt, faithful=faithful,
                                    components=COMPONENTS if report_all else criteria.active(),
                                    seam_width=criteria.seam_width)
    scores = weighted_total(components, criteria)
    order = rank_order(scores, faithful=faithful)
    return RankResult(order, scores, order[: top_k if top_k is not None else len(order)], components)


def ranked_file_name(distance: float, stem: str, iteration: int, index: int) -> str:
    """Upstream's ranked file name: ``{d:.4f without the point}_{stem}_i_{iteration}_b_{index}.png``."""
    return f"{distance:.4f}".replace(".", "") + f"_{stem}_i_{iteration}_b_{index}.png"
