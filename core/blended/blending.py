"""Background blending, the final paste, and the crop / stitch-back path for large images.

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

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F

from .masks import blur_mask, erode_mask, mask_bbox, resize_mask
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


def to_uint8(x: torch.Tensor, rounding: Literal["truncate", "round"] = "truncate") -> torch.Tensor:
    """[-1, 1] -> uint8 as upstream saves PNGs (spec 6): ``(x + 1) / 2``, clamp, ``* 255``, then
    truncation (``to_pil_image``'s ``mul(255).byte()``); ``rounding="round"`` rounds instead."""
    v = ((x + 1) / 2).clamp(0, 1).mul(255)
    if rounding == "round":
        v = v.round()
    elif rounding != "truncate":
        raise ValueError(f"rounding must be 'truncate' or 'round', got {rounding!r}")
    return v.to(torch.uint8)


# --------------------------------------------------------------------------- crop / stitch

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
