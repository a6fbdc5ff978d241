"""Any image size at model resolution: a square crop around the mask, then the edit stitched back.

Upstream resizes the whole image to 256x256 (aspect ratio lost, a small mask shrinks to a few
pixels). Here a square window around the mask's bounding box, with context, is cut out and
resampled to model size; the edited crop is pasted back through the full-resolution mask, so no
pixel outside the mask changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .masks import blur_mask, erode_mask, mask_bbox, resize_mask


@dataclass(frozen=True)
class CropBox:
    """A square ``size`` x ``size`` window at ``(top, left)`` of an ``image_height`` x
    ``image_width`` image. It may reach outside the image (small or very elongated images);
    those pixels are edge-replicated on the way in and dropped on the way back."""

    top: int
    left: int
    size: int
    image_height: int
    image_width: int

    def inside(self) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of the window's part that lies in the image."""
        return (max(self.top, 0), max(self.left, 0), min(self.top + self.size, self.image_height),
                min(self.left + self.size, self.image_width))


def plan_crop(mask: torch.Tensor, model_size: int = 256, margin: float = 0.25,
              min_size: Optional[int] = None) -> CropBox:
    """Square window around the mask's bounding box (union over the batch), with context.

    Side = ``ceil(max(bbox_h, bbox_w) * (1 + 2 * margin))``, at least ``min_size`` (default
    ``model_size``: the model gets at least its own resolution of context when the image has
    it), at most ``max(H, W)``. The window is centred on the box and shifted to lie inside the
    image whenever its side allows; otherwise it is centred on the image (and padded).
    """
    h, w = mask.shape[-2:]
    top, left, bottom, right = mask_bbox(mask)
    side = math.ceil(max(bottom - top, right - left) * (1 + 2 * margin))
    side = max(side, model_size if min_size is None else min_size)
    side = min(side, max(h, w))

    def place(lo: int, hi: int, extent: int) -> int:
        if side >= extent:
            return (extent - side) // 2
        start = (lo + hi) // 2 - side // 2
        return min(max(start, 0), extent - side)

    return CropBox(place(top, bottom, h), place(left, right, w), side, h, w)


def _window(x: torch.Tensor, box: CropBox, pad_mode: str) -> torch.Tensor:
    t, l, b, r = box.inside()
    part = x[..., t:b, l:r]
    pads = (l - box.left, box.left + box.size - r, t - box.top, box.top + box.size - b)
    if any(pads):
        part = F.pad(part, pads, mode=pad_mode) if pad_mode != "constant" else F.pad(part, pads)
    return part


def _resize_image(x: torch.Tensor, size: int, value_range: tuple[float, float]) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    # bicubic overshoots at edges: clamp back to the data range
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True).clamp(*value_range)


def extract_crop(image: torch.Tensor, mask: torch.Tensor, box: CropBox, out_size: int,
                 soft_mask: bool = False, value_range: tuple[float, float] = (-1.0, 1.0)
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``box`` out of ``image`` and ``mask`` and resample both to ``out_size`` square.

    Image: bicubic with antialias (down- or up-scaling: this is also the upscale path for
    images smaller than the model), edge-replicated outside the image. Mask: zero (keep)
    outside the image, ``nearest-exact`` (bilinear for ``soft_mask``).
    """
    img = _resize_image(_window(image, box, "replicate"), out_size, value_range)
    m = resize_mask(_window(mask.float(), box, "constant"), out_size, out_size, soft=soft_mask)
    return img, m


def stitch_weight(mask: torch.Tensor, feather: int = 0) -> torch.Tensor:
    """Paste weight from a full-resolution mask: the mask itself, or with ``feather`` > 0 a
    ramp *inside* the mask (``min(m, blur(erode(m, f), f))``), so the weight is 0 everywhere
    the mask is 0 and nothing outside the mask can change."""
    if feather <= 0:
        return mask
    return torch.minimum(mask, blur_mask(erode_mask(mask, feather), feather))


def stitch_back(full: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor, box: CropBox,
                feather: int = 0, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Put an edited crop (``(B, C, s, s)``, any ``s``) back into the full image.

    ``edited`` is resized to the window (bicubic, antialias), and composited with weight
    :func:`stitch_weight` of the full-resolution ``mask``. Every pixel whose weight is 0 (all
    of the background) is copied from ``full`` unchanged, byte for byte. Returns
    ``(B, C, H, W)``; ``full`` and ``mask`` may have batch 1.
    """
    h, w = full.shape[-2:]
    if (box.image_height, box.image_width) != (h, w):
        raise ValueError(f"crop box was planned for {(box.image_height, box.image_width)}, image is {(h, w)}")
    weight = stitch_weight(mask.float(), feather).to(full.dtype)
    t, l, b, r = box.inside()
    outside = weight.clone()
    outside[..., t:b, l:r] = 0
    if bool((outside > 0).any()):
        raise ValueError("the mask reaches outside the crop box; plan the box from this mask")
    patch = _resize_image(edited.to(full.dtype), box.size, value_range)
    patch = patch[..., t - box.top:b - box.top, l - box.left:r - box.left]
    batch = max(full.shape[0], edited.shape[0], weight.shape[0])
    out = full.expand(batch, *full.shape[1:]).clone()
    region = out[..., t:b, l:r]
    wr = weight[..., t:b, l:r]
    out[..., t:b, l:r] = torch.where(wr > 0, region * (1 - wr) + patch * wr, region)
    return out


def paste_into_source(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor, feather: int = 0) -> torch.Tensor:
    """The final step of a latent-model edit: the edited images inside the mask, the source's own pixels
    outside it (a latent model's VAE round trip changes every pixel; Blended Latent Diffusion pastes the
    original background back). Works in the value range the inputs share (ComfyUI's [0, 1] or the pack's
    [-1, 1]).

    ``source`` ``(1|B, C, H, W)``; ``edited`` ``(B, C, h, w)``, resized to the source's size when the VAE
    cropped it to a multiple of 8 (bicubic, antialias, clamped to the source's range); ``mask``
    ``(1|B, 1, H', W')`` with 1 = edited, resized to the source's size (bilinear, soft). The paste weight
    is :func:`stitch_weight` (``feather`` ramps it *inside* the mask), so every pixel where the mask is 0
    is the source's, unchanged.
    """
    h, w = source.shape[-2:]
    if edited.shape[-2:] != (h, w):
        low, high = float(source.min()), float(source.max())
        edited = F.interpolate(edited.float(), size=(h, w), mode="bicubic", antialias=True,
                               align_corners=False).clamp(min(low, 0.0), max(high, 1.0)).to(source.dtype)
    if mask.shape[-2:] != (h, w):
        mask = resize_mask(mask.float(), h, w, soft=True)
    weight = stitch_weight(mask.float().clamp(0, 1), feather).to(source.dtype)
    batch = max(source.shape[0], edited.shape[0], weight.shape[0])
    for name, t in (("source", source), ("edited", edited), ("mask", weight)):
        if t.shape[0] not in (1, batch):
            raise ValueError(f"{name} has {t.shape[0]} images; give 1 or {batch} (the batch being pasted)")
    full = source.expand(batch, *source.shape[1:])
    return torch.where(weight > 0, full * (1 - weight) + edited.to(source.dtype) * weight, full)
