"""Blended Diffusion's cutout pipeline: one plain and ``n_cuts - 1`` randomly warped copies.

Spec section 5.5 (``optimization/augmentations.py`` upstream). The image is average-pooled to
the CLIP input size, tiled ``n_cuts`` times along the batch (rows ordered ``[I1..IB, I1..IB,
...]``), the first ``B`` rows are kept as they are and the others go through kornia's
``RandomAffine(degrees=15, translate=0.1, p=0.7, padding_mode="border")`` followed by
``RandomPerspective(0.7, p=0.7)``. Augmentation happens in the [-1, 1] range, before the CLIP
[0, 1] mapping, so the perspective's zero padding is mid-grey.

Parameters are drawn here, not by kornia's modules, so that a caller-supplied
``torch.Generator`` makes the crops reproducible. The draws follow kornia 0.9.0's order and
arithmetic exactly (affine gate, angle, x shift, y shift; perspective gate, corner offsets),
so ``torch.Generator().manual_seed(s)`` gives the same crops as ``torch.manual_seed(s)``
followed by the upstream module call. The warps themselves are kornia's functional ops.

Translate quirk (spec 5.5, quirk 3): kornia turns the scalar ``translate=0.1`` into the range
``[0, 0.1]`` and samples x in U(-0, 0), y in U(-0.1, 0.1): upstream only ever shifts
vertically. ``FAITHFUL_TRANSLATE = (0.0, 0.1)`` keeps that; ``(0.1, 0.1)`` is the deliberate
"both axes" deviation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from kornia.geometry.transform import (get_affine_matrix2d, get_perspective_transform,
                                       warp_affine, warp_perspective)

from ..devices import to_device

FAITHFUL_TRANSLATE: tuple[float, float] = (0.0, 0.1)


@dataclass(frozen=True)
class AugmentSettings:
    """Cutout settings; defaults are upstream's (spec 5.5, ``--aug_num 8``)."""

    n_cuts: int = 8
    degrees: float = 15.0
    translate: tuple[float, float] = FAITHFUL_TRANSLATE  # (x, y) fractions of width / height
    p_affine: float = 0.7
    distortion_scale: float = 0.7
    p_perspective: float = 0.7

    def __post_init__(self) -> None:
        if self.n_cuts < 1:
            raise ValueError(f"n_cuts must be >= 1 (1 plain cutout + n_cuts-1 augmented), got {self.n_cuts}")
        if not 0.0 <= self.distortion_scale <= 1.0:
            raise ValueError(f"distortion_scale must lie in [0, 1], got {self.distortion_scale}")


@dataclass(frozen=True)
class AugmentParams:
    """Per-row warp parameters for the ``(n_cuts - 1) * B`` augmented rows (kornia's names).

    ``affine_applied`` / ``perspective_applied`` are the Bernoulli gates; rows with a False
    gate are passed through untouched for that transform.
    """

    affine_applied: torch.Tensor      # bool [N]
    angle: torch.Tensor               # [N] degrees
    translations: torch.Tensor        # [N, 2] pixels (x, y)
    center: torch.Tensor              # [N, 2] pixels
    scale: torch.Tensor               # [N, 2]
    shear_x: torch.Tensor             # [N] degrees
    shear_y: torch.Tensor             # [N] degrees
    perspective_applied: torch.Tensor  # bool [N]
    start_points: torch.Tensor        # [N, 4, 2]
    end_points: torch.Tensor          # [N, 4, 2]

    @property
    def rows(self) -> int:
        return int(self.angle.shape[0])

    @classmethod
    def from_kornia(cls, affine: Mapping[str, torch.Tensor],
                    perspective: Mapping[str, torch.Tensor]) -> "AugmentParams":
        """Build from kornia ``_params`` dicts (``batch_prob``, ``angle``, ... / ``start_points``...)."""
        return cls(
            affine_applied=torch.as_tensor(affine["batch_prob"]) > 0.5,
            angle=affine["angle"], translations=affine["translations"], center=affine["center"],
            scale=affine["scale"], shear_x=affine["shear_x"], shear_y=affine["shear_y"],
            perspective_applied=torch.as_tensor(perspective["batch_prob"]) > 0.5,
            start_points=perspective["start_points"], end_points=perspective["end_points"],
        )

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "AugmentParams":
        moved = {k: to_device(v if v.dtype == torch.bool else v.to(dtype), device) for k, v in self.__dict__.items()}
        return replace(self, **moved)


def _uniform(shape: tuple[int, ...], low: torch.Tensor, high: torch.Tensor,
             generator: Optional[torch.Generator]) -> torch.Tensor:
    # torch.distributions.Uniform.rsample's arithmetic, with an explicit generator
    u = torch.rand(shape, generator=generator, dtype=low.dtype)
    return low + u * (high - low)


def sample_augment_params(rows: int, size: int, settings: AugmentSettings = AugmentSettings(),
                          generator: Optional[torch.Generator] = None) -> AugmentParams:
    """Draw warp parameters for ``rows`` square images of side ``size`` (spec 5.5).

    Draw order and float32 arithmetic are kornia 0.9.0's (``RandomAffine`` then
    ``RandomPerspective``, each gate drawn before its parameters, every row drawn whether
    selected or not). ``generator=None`` uses torch's global CPU generator, like kornia.
    Parameters live on the CPU; :func:`apply_augmentations` moves them.
    """
    f32 = torch.float32
    n = (rows,)
    affine_applied = torch.rand(n, generator=generator) < settings.p_affine
    deg = torch.tensor(float(settings.degrees), dtype=f32)
    angle = _uniform(n, -deg, deg, generator)
    tx, ty = (torch.tensor(float(v), dtype=f32) for v in settings.translate)
    # the x draw is consumed even for the faithful zero range, as kornia does
    shift_x = _uniform(n, -tx, tx, generator) * size
    shift_y = _uniform(n, -ty, ty, generator) * size
    translations = torch.stack([shift_x, shift_y], dim=-1)
    center = (torch.tensor([size, size], dtype=f32).view(1, 2) / 2.0 - 0.5).expand(rows, -1)
    scale = torch.ones(rows, 2, dtype=f32)
    zeros = torch.zeros(rows, dtype=f32)

    perspective_applied = torch.rand(n, generator=generator) < settings.p_perspective
    end = float(size - 1)
    start = torch.tensor([[[0.0, 0.0], [end, 0.0], [end, end], [0.0, end]]], dtype=f32).expand(rows, -1, -1)
    d = torch.tensor(float(settings.distortion_scale), dtype=f32)
    factor = torch.stack([d * size / 2, d * size / 2], dim=0).view(-1, 1, 2)
    rand_val = _uniform((rows, 4, 2), torch.tensor(0.0, dtype=f32), torch.tensor(1.0, dtype=f32), generator)
    inward = torch.tensor([[[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]]], dtype=f32)
    end_points = start + factor * rand_val * inward
    return AugmentParams(affine_applied, angle, translations, center.clone(), scale, zeros, zeros.clone(),
                         perspective_applied, start.clone(), end_points)


def apply_augmentations(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Warp ``images`` (N, C, S, S) with ``params``: affine (border padding), then perspective
    (zero padding), both bilinear with ``align_corners=False`` (spec 5.5). Differentiable.

    As kornia does, every row is warped (identity matrix for unselected rows) and the
    unselected rows are then taken from the input, so their values and gradients are exact.
    """
    if images.shape[0] != params.rows:
        raise ValueError(f"{images.shape[0]} images but parameters for {params.rows} rows")
    if images.shape[0] == 0:
        return images
    n, _, h, w = images.shape
    # the 3x3 matrices are built where the parameters were drawn (the CPU): kornia's perspective solve
    # would otherwise make the host wait for the GPU; only the matrices and gates travel
    home = params.translations.device
    p = params.to(home, images.dtype)
    eye = torch.eye(3, device=home, dtype=images.dtype).expand(n, 3, 3)
    affine = get_affine_matrix2d(p.translations, p.center, p.scale, p.angle,
                                 p.shear_x * (torch.pi / 180.0), p.shear_y * (torch.pi / 180.0))
    affine = to_device(torch.where(p.affine_applied.view(-1, 1, 1), affine, eye), images.device)
    persp = to_device(torch.where(p.perspective_applied.view(-1, 1, 1),
                                  get_perspective_transform(p.start_points, p.end_points), eye), images.device)
    affine_applied = to_device(p.affine_applied, images.device).view(-1, 1, 1, 1)
    perspective_applied = to_device(p.perspective_applied, images.device).view(-1, 1, 1, 1)

    warped = warp_affine(images, affine[:, :2, :], (h, w), "bilinear", padding_mode="border",
                         align_corners=False)
    out = torch.where(affine_applied, warped, images)
    warped = warp_perspective(out, persp, (h, w), mode="bilinear", align_corners=False)
    return torch.where(perspective_applied, warped, out)


def make_cutouts(images: torch.Tensor, cut_size: int, settings: AugmentSettings = AugmentSettings(),
                 generator: Optional[torch.Generator] = None,
                 params: Optional[AugmentParams] = None) -> tuple[torch.Tensor, AugmentParams]:
    """Upstream ``ImageAugmentations(cut_size, n_cuts)`` on a (B, C, H, W) batch (spec 5.5).

    Returns ``(cutouts, params)``: cutouts are ``(n_cuts * B, C, cut_size, cut_size)`` with row
    ``k * B + b`` the k-th cutout of sample ``b`` (k = 0 is the plain pooled image); ``params``
    are the warps used (drawn from ``generator`` unless given). There is no random cropping:
    every cutout is the whole (warped) image.
    """
    batch = images.shape[0]
    pooled = F.adaptive_avg_pool2d(images, cut_size)
    tiled = pooled.repeat(settings.n_cuts, 1, 1, 1)
    rows = (settings.n_cuts - 1) * batch
    if params is None:
        params = sample_augment_params(rows, cut_size, settings, generator)
    augmented = apply_augmentations(tiled[batch:], params)
    return torch.cat([tiled[:batch], augmented], dim=0), params
