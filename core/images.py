"""Image I/O and conversions between files, ComfyUI's IMAGE layout and the model's [-1, 1] NCHW."""

from __future__ import annotations

import os

import numpy as np
import torch


def to_model(image_bhwc: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in [0,1] -> model input [B,3,H,W] in [-1,1] (alpha dropped, gray expanded)."""
    if image_bhwc.dim() == 3:
        image_bhwc = image_bhwc[None]
    if image_bhwc.dim() != 4:
        raise ValueError(f"image must be [B,H,W,C], got shape {tuple(image_bhwc.shape)}")
    channels = image_bhwc.shape[-1]
    if channels == 1:
        image_bhwc = image_bhwc.expand(-1, -1, -1, 3)
    elif channels == 4:
        image_bhwc = image_bhwc[..., :3]
    elif channels != 3:
        raise ValueError(f"image must have 1, 3 or 4 channels, got {channels}")
    return image_bhwc.movedim(-1, 1).float().clamp(0, 1) * 2 - 1


def from_model(x: torch.Tensor) -> torch.Tensor:
    """Model output [B,3,H,W] in [-1,1] -> ComfyUI IMAGE [B,H,W,3] in [0,1]."""
    return ((x.detach().float().clamp(-1, 1) + 1) / 2).movedim(1, -1)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def pil_to_rgb8(im):
    """A PIL image as 8-bit RGB, 16-bit grayscale *scaled* (0..65535 -> 0..255), not clipped.

    PIL opens 16-bit grayscale PNG/TIFF as ``I;16`` (``I;16B``, ``I;16L``, ``I;16N``; ``I`` in older
    Pillow), and its ``convert("RGB")`` clips those values at 255, which turns a 0..65535 ramp 99.6%
    white. Here they are divided by 257 (65535 -> 255) and rounded, like every 8-bit view of 16-bit
    data; 16-bit RGB(A) is already reduced to 8 bits by PIL itself. Other modes go through
    ``convert("RGB")`` unchanged, so 8-bit files give the same pixels as before.
    """
    from PIL import Image

    if im.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(im).astype(np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return im.convert("RGB")


def pil_to_float(im) -> np.ndarray:
    """A PIL image as float32 ``[H, W, 3]`` in [0, 1]; 16-bit grayscale keeps its full precision
    (``value / 65535``), every other mode is PIL's RGB conversion / 255."""
    if im.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(im).astype(np.float32) / 65535.0
        return np.repeat(np.clip(values, 0.0, 1.0)[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str) -> torch.Tensor:
    """Read any PIL-readable file as [1,3,H,W] in [-1,1] (alpha dropped, grayscale expanded, 16-bit scaled:
    ``I;16*`` / ``I`` values 0..65535 map to 0..1, see :func:`pil_to_float`)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = pil_to_float(im)
    return to_model(torch.from_numpy(np.ascontiguousarray(rgb))[None])


def save_image(x: torch.Tensor, path: str) -> list[str]:
    """Save a [B,3,H,W] batch in [-1,1] as PNG(s); never overwrites: a taken name gets a counter."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stem, ext = os.path.splitext(path)
    ext = ext or ".png"
    arrays = (from_model(x) * 255).round().to(torch.uint8).cpu().numpy()
    written = []
    for b, arr in enumerate(arrays):
        candidate = f"{stem}{'' if len(arrays) == 1 else f'_{b:03d}'}{ext}"
        n = 1
        while os.path.exists(candidate):
            candidate = f"{stem}{'' if len(arrays) == 1 else f'_{b:03d}'}_{n}{ext}"
            n += 1
        Image.fromarray(arr).save(candidate)
        written.append(candidate)
    return written


def resize_to_model(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [B,3,H,W] to size x size like upstream's PIL LANCZOS load (aspect not kept, antialiased).

    A tensor path (bicubic with antialias) is used so IMAGE batches never leave the device; it differs
    from PIL's LANCZOS by a few 1/255 steps (``load_image_pil`` is the exact upstream path).
    """
    import torch.nn.functional as F

    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def load_image_pil(path: str, size: int) -> torch.Tensor:
    """Upstream's loader exactly: PIL RGB, resize((size, size), LANCZOS), to [-1,1] [1,3,size,size].

    16-bit grayscale is scaled to 8 bits first (:func:`pil_to_rgb8`; upstream's ``convert("RGB")`` clips it).
    """
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(pil_to_rgb8(im).resize((size, size), Image.LANCZOS), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1
