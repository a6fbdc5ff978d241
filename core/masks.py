"""Source image and edit-mask preprocessing for Blended Diffusion.

Two paths:

* the **PIL path** (:func:`load_image_pil`, :func:`load_mask_pil`) is upstream's, byte for
  byte (spec 4.1, 4.2): LANCZOS resize of the image to a square (aspect ratio ignored), NEAREST
  resize of the mask when its size differs, every channel ``> 0.5`` on the 8-bit values (any
  non-zero value is "edit"), optional inversion, channel 0 (red) only;
* the **tensor path** for ComfyUI inputs (IMAGE ``[B, H, W, C]`` in [0, 1], MASK ``[B, H, W]``,
  1 = edit, the same polarity as upstream). Its resizes are torch's, so it does not match
  LANCZOS exactly; masks use ``nearest-exact``, which is PIL's NEAREST.

Mask conventions everywhere: float32 ``(B or 1, 1, H, W)``, 1 = edit, 0 = keep.

Decisions for the tensor path (documented behaviour, asserted by tests):

* binarisation keeps upstream's "any non-zero 8-bit value is edit": a float value counts as
  edit when it is ``>= 0.5 / 255`` (it would be non-zero once quantised to 8 bits), so float
  round-off around 0 never leaks into the mask;
* ``soft=True`` keeps values in [0, 1] instead (an extension used for blending only);
* an **empty** mask (per sample) raises ``ValueError``: upstream silently returns the source;
* a **full** mask is allowed by default: it is upstream's no-mask mode (blending and the final
  paste do nothing, the method becomes CLIP-guided SDEdit); ``allow_full=False`` rejects it;
* a mask of another size is **resized** to the image (``nearest-exact``; bilinear with
  antialias for soft masks), like upstream resizes the mask file; ``on_size_mismatch="error"``
  rejects it instead;
* batch: a mask of batch 1 serves every image; otherwise the batches must be equal.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

EDIT_THRESHOLD = 0.5 / 255.0  # "non-zero once quantised to 8 bits"


# --------------------------------------------------------------------------- PIL path (exact)

def load_image_pil(image: Image.Image, size: int = 256) -> torch.Tensor:
    """Upstream source preprocessing (spec 4.1): RGB, LANCZOS to (size, size), [-1, 1], (1, 3, S, S)."""
    rgb = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (pixels * 2 - 1).unsqueeze(0)


def load_mask_pil(mask: Image.Image, size: int = 256, invert: bool = False) -> torch.Tensor:
    """Upstream mask preprocessing (spec 4.2), shape (1, 1, S, S), values {0, 1}, 1 = edit.

    NEAREST resize only when the size differs; each channel ``> 0.5`` on the 8-bit values
    (so 1/255 counts), binarised to 0/255, ``255 - v`` when inverted, then only the red channel.
    An all-zero result is returned as is (upstream does not reject it; see :func:`check_mask`).
    """
    rgb = _mask_rgb8(mask)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.NEAREST)
    values = (np.array(rgb, dtype=np.uint8) > 0.5).astype(np.uint8) * 255
    if invert:
        values = 255 - values
    tensor = torch.from_numpy(values).permute(2, 0, 1).float().div(255)
    return tensor[:1].unsqueeze(0)


def _mask_rgb8(mask: Image.Image) -> Image.Image:
    from .images import pil_to_rgb8  # 16-bit grayscale scaled to 8 bits, not clipped

    return pil_to_rgb8(mask)


def mask_from_pil(mask: Image.Image) -> torch.Tensor:
    """A mask file at its own resolution, upstream's channel rule (spec 4.2, section 9 item 7):
    PIL RGB, then the **red channel** only (green / blue ignored, alpha dropped), as float32
    ``(1, 1, H, W)`` in [0, 1] (value / 255). Binarisation (any non-zero 8-bit value = edit),
    inversion and resizing to the image are :func:`prepare_mask`'s. The CLI's ``--mask`` and
    :func:`load_mask_pil` both read masks by this rule.
    """
    red = np.array(_mask_rgb8(mask), dtype=np.uint8)[..., 0]
    return torch.from_numpy(red.astype(np.float32) / 255.0)[None, None]


def load_mask_file(path: str) -> torch.Tensor:
    """:func:`mask_from_pil` of an image file."""
    with Image.open(path) as im:
        return mask_from_pil(im)


def no_mask_like(image: torch.Tensor) -> torch.Tensor:
    """Upstream's mask when none is given: all ones, shape of the image (spec 4.2)."""
    return torch.ones_like(image)


# --------------------------------------------------------------------------- tensor path

def comfy_image_to_model(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` (or ``[H, W, C]``) in [0, 1] -> ``(B, 3, H, W)`` in [-1, 1].

    C = 1 (grayscale) is repeated to RGB; C = 4 (RGBA) drops alpha without compositing (ComfyUI
    already hands the alpha over as the MASK of ``LoadImage``); C = 2 (gray + alpha) keeps gray.
    Values are clamped to [0, 1] first. The input is never modified.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"IMAGE must be [B, H, W, C] or [H, W, C], got shape {tuple(image.shape)}")
    channels = image.shape[-1]
    if channels in (1, 2):
        image = image[..., :1].expand(*image.shape[:-1], 3)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"IMAGE must have 1, 2, 3 or 4 channels (last dim), got {channels}")
    return image.float().clamp(0, 1).movedim(-1, 1) * 2 - 1


def model_to_comfy_image(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> ComfyUI IMAGE ``[B, H, W, 3]`` in [0, 1] (clamped)."""
    return ((x + 1) / 2).clamp(0, 1).movedim(1, -1)


def mask_from_image(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE used as a mask (``[B, H, W, C]``): channel 0, like upstream keeps the red channel."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    return image[..., 0]


def _as_nchw_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3:
        return mask[:, None]
    if mask.dim() == 4 and mask.shape[1] in (1, 3):
        return mask[:, :1]  # a 3-channel model-space mask: upstream uses channel 0
    raise ValueError(f"MASK must be [H, W], [B, H, W] or [B, 1, H, W], got shape {tuple(mask.shape)}")


def resize_mask(mask: torch.Tensor, height: int, width: int, soft: bool = False) -> torch.Tensor:
    """Resize an NCHW mask: ``nearest-exact`` (PIL NEAREST) or, soft, bilinear with antialias."""
    if mask.shape[-2:] == (height, width):
        return mask
    if soft:
        return F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False,
                             antialias=True).clamp(0, 1)
    return F.interpolate(mask, size=(height, width), mode="nearest-exact")


def _gaussian_kernel(radius: int, device: torch.device) -> torch.Tensor:
    sigma = max(radius / 2.0, 1e-3)
    xs = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    return k / k.sum()


def blur_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur (sigma = radius / 2), edge-replicated, of an NCHW mask."""
    if radius <= 0:
        return mask
    k = _gaussian_kernel(radius, mask.device).to(mask.dtype)
    c = mask.shape[1]
    out = F.pad(mask, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c).clamp(0, 1)


def dilate_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow the edit region by ``pixels`` (square structuring element, max filter)."""
    if pixels <= 0:
        return mask
    return F.max_pool2d(mask, 2 * pixels + 1, stride=1, padding=pixels)


def erode_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Shrink the edit region by ``pixels`` (min filter; the image border counts as edit)."""
    if pixels <= 0:
        return mask
    return -F.max_pool2d(-mask, 2 * pixels + 1, stride=1, padding=pixels)


def feather_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Soft edge growing *outward*: ``max(mask, blur(mask))``; the binary region stays 1."""
    if pixels <= 0:
        return mask
    return torch.maximum(mask, blur_mask(mask, pixels))


def check_mask(mask: torch.Tensor, allow_full: bool = True) -> None:
    """Raise ``ValueError`` for a mask with nothing to edit (per sample), or, unless
    ``allow_full``, with nothing to keep."""
    flat = mask.reshape(mask.shape[0], -1)
    empty = (flat.amax(dim=1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"mask is empty (no pixel to edit) for batch item(s) {empty}: Blended Diffusion edits "
            "only where the mask is 1. Note ComfyUI's LoadImage gives an all-zero 64x64 mask for "
            "images without alpha; paint a mask (1 = edit) or use invert.")
    if not allow_full:
        full = (flat.amin(dim=1) >= 1).nonzero().flatten().tolist()
        if full:
            raise ValueError(
                f"mask is full (every pixel is edited) for batch item(s) {full}: background "
                "blending then does nothing; pass a mask with a region to keep, or allow full masks.")


def prepare_mask(mask: torch.Tensor, height: int, width: int, batch: int = 1, *,
                 invert: bool = False, soft: bool = False, dilate: int = 0, feather: int = 0,
                 allow_full: bool = True,
                 on_size_mismatch: Literal["resize", "error"] = "resize") -> torch.Tensor:
    """ComfyUI MASK (1 = edit) -> float32 ``(1 or batch, 1, height, width)`` for Blended Diffusion.

    Order: resize -> binarise (``>= 0.5/255``, unless ``soft``) -> invert -> dilate -> feather ->
    :func:`check_mask`. See the module docstring for every edge-case decision. Dilation grows
    the region by a max filter; feathering adds an outward Gaussian ramp, so the result is soft
    (values in [0, 1]) whenever ``feather > 0``.
    """
    m = _as_nchw_mask(mask).float()
    if m.shape[0] not in (1, batch):
        raise ValueError(f"mask batch {m.shape[0]} does not match image batch {batch} "
                         "(give one mask for all images or one per image)")
    if m.shape[-2:] != (height, width):
        if on_size_mismatch == "error":
            raise ValueError(f"mask size {tuple(m.shape[-2:])} differs from image size {(height, width)}")
        if on_size_mismatch != "resize":
            raise ValueError(f"on_size_mismatch must be 'resize' or 'error', got {on_size_mismatch!r}")
        m = resize_mask(m, height, width, soft=soft)
    m = m.clamp(0, 1) if soft else (m >= EDIT_THRESHOLD).float()
    if invert:
        m = 1 - m
    m = dilate_mask(m, int(dilate))
    m = feather_mask(m, int(feather))
    check_mask(m, allow_full=allow_full)
    return m.contiguous()


def mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` (exclusive end) of the non-zero pixels over the whole batch."""
    m = _as_nchw_mask(mask).amax(dim=(0, 1)) > 0
    rows = m.any(dim=1).nonzero().flatten()
    cols = m.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        raise ValueError("mask is empty (no pixel to edit): cannot take its bounding box")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def is_binary(mask: torch.Tensor) -> bool:
    """True when every value is exactly 0 or 1."""
    return bool(((mask == 0) | (mask == 1)).all())


def mask_coverage(mask: torch.Tensor) -> float:
    """Fraction of edited pixels (mean of the mask), e.g. to warn about near-full masks."""
    return float(_as_nchw_mask(mask).float().mean())
