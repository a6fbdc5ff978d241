"""Images in and out: files, ComfyUI's IMAGE layout and the model's [-1, 1] NCHW.

Two file paths: :func:`load_image` reads any file at its own size (the ComfyUI-like path, resized
later on tensors), and :func:`load_image_pil` / :func:`load_mask_pil` are upstream's PIL
preprocessing byte for byte (LANCZOS / NEAREST to a square; Blended Diffusion spec 4.1, 4.2).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from typing import Literal, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, Image.Image]


def to_model(image_bhwc: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] (or [H,W,C]) in [0,1] -> model input [B,3,H,W] in [-1,1].

    C = 1 (gray) is repeated to RGB; C = 2 (gray + alpha) keeps gray; C = 4 (RGBA) drops alpha
    without compositing (ComfyUI hands alpha over as LoadImage's MASK). Values are clamped to
    [0, 1]; the input is never modified.
    """
    if image_bhwc.dim() == 3:
        image_bhwc = image_bhwc[None]
    if image_bhwc.dim() != 4:
        raise ValueError(f"image must be [B,H,W,C], got shape {tuple(image_bhwc.shape)}")
    channels = image_bhwc.shape[-1]
    if channels in (1, 2):
        image_bhwc = image_bhwc[..., :1].expand(-1, -1, -1, 3)
    elif channels == 4:
        image_bhwc = image_bhwc[..., :3]
    elif channels != 3:
        raise ValueError(f"image must have 1, 2, 3 or 4 channels (last dim), got {channels}")
    return image_bhwc.movedim(-1, 1).float().clamp(0, 1) * 2 - 1


RANGE_SLACK = 1e-3  # resampling can overshoot [-1, 1] by a rounding error; anything further is another scale


def check_model_range(x: torch.Tensor, what: str) -> None:
    """Refuse a model-space image that is not in [-1, 1] (e.g. 0..255 values) or not finite, before any work.

    The pipelines take [-1, 1] images only; they do not guess a scale (a 0..1 image is a valid [-1, 1]
    image, so no rule could tell it apart). Tensors on the ``meta`` device (no values) pass.
    """
    if x.device.type == "meta" or x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach().float()))
    if not (-1 - RANGE_SLACK <= lo and hi <= 1 + RANGE_SLACK):  # also false for NaN
        raise ValueError(f"{what} has values in [{lo:g}, {hi:g}]; images must be in [-1, 1]: use x / 127.5 - 1 "
                         "for 0..255 data, x * 2 - 1 for 0..1 data (core.io.load_image / load_image_pil / "
                         "to_model do this)")


def from_model(x: torch.Tensor) -> torch.Tensor:
    """Model output [B,3,H,W] in [-1,1] -> ComfyUI IMAGE [B,H,W,3] in [0,1]."""
    return ((x.detach().float().clamp(-1, 1) + 1) / 2).movedim(1, -1)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def pil_to_rgb8(im: Image.Image) -> Image.Image:
    """A PIL image as 8-bit RGB, 16-bit grayscale *scaled* (0..65535 -> 0..255), not clipped.

    PIL opens 16-bit grayscale PNG/TIFF as ``I;16`` (``I;16B``, ``I;16L``, ``I;16N``; ``I`` in older
    Pillow), and its ``convert("RGB")`` clips those values at 255, which turns a 0..65535 ramp 99.6%
    white. Here they are divided by 257 (65535 -> 255) and rounded, like every 8-bit view of 16-bit
    data; 16-bit RGB(A) is already reduced to 8 bits by PIL itself. Other modes go through
    ``convert("RGB")`` unchanged, so 8-bit files give the same pixels as before.
    """
    if im.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(im).astype(np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return im.convert("RGB")


def pil_to_float(im: Image.Image) -> np.ndarray:
    """A PIL image as float32 ``[H, W, 3]`` in [0, 1]; 16-bit grayscale keeps its full precision
    (``value / 65535``), every other mode is PIL's RGB conversion / 255."""
    if im.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(im).astype(np.float32) / 65535.0
        return np.repeat(np.clip(values, 0.0, 1.0)[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation tag says (phone photos store sideways pixels plus that tag),
    as ComfyUI's Load Image does; images without the tag are returned unchanged."""
    from PIL import ImageOps

    if im.getexif().get(0x0112, 1) in (None, 1):  # 0x0112 = Orientation; 1 = already upright
        return im
    return ImageOps.exif_transpose(im)


def load_image(path: ImageSource) -> torch.Tensor:
    """Read any PIL-readable file (or a PIL image) as [1,3,H,W] in [-1,1] (EXIF orientation applied, alpha
    dropped, grayscale expanded, 16-bit scaled: ``I;16*`` / ``I`` values 0..65535 map to 0..1, see
    :func:`pil_to_float`)."""
    rgb = pil_to_float(_open_pil(path))
    return to_model(torch.from_numpy(np.ascontiguousarray(rgb))[None])


# what ``save_image`` writes: PIL's format name per file extension (lower case)
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                  ".tif": "TIFF", ".tiff": "TIFF"}


def check_output_path(path: Union[str, os.PathLike], what: str = "output path") -> None:
    """Refuse an output path that :func:`save_image` could not write, before any work starts.

    The extension must be one of ``OUTPUT_FORMATS`` (none = ``.png``); the nearest existing folder on the
    way to the file must be a folder (not a regular file) that accepts a new file (checked by creating and
    removing one, which also catches read-only file systems and runs as root correctly). Nothing is left
    behind: missing folders are only created by :func:`save_image`. ``what`` names the input in errors.
    """
    path = os.fspath(path)
    if not path or path.endswith(("/", os.sep)):
        raise ValueError(f"{what} {path!r} names a folder; give a file name such as {os.path.join(path or '.', 'out.png')!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext and ext not in OUTPUT_FORMATS:
        raise ValueError(f"{what} {path!r}: unknown image extension {ext!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder; give a file name inside it")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path!r} cannot be written: {folder!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"{what} {path!r} cannot be written: folder {folder!r} does not accept new files "
                         f"({exc.strerror or exc})") from None


def _create_exclusive(stem: str, ext: str) -> tuple[str, int]:
    """Create ``stem + ext`` (or ``stem_1 + ext``, ``stem_2 + ext``, ... when taken) with O_EXCL, so two
    processes saving to one name at once each get their own file; returns (name, open descriptor)."""
    n = 0
    while True:
        candidate = f"{stem}{'' if n == 0 else f'_{n}'}{ext}"
        try:
            return candidate, os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            n += 1


def save_image(x: torch.Tensor, path: str) -> list[str]:
    """Save a [B,3,H,W] batch in [-1,1] as image file(s) (format from the extension, PNG without one);
    ``_000``, ``_001``, ... number a batch. Never overwrites: every file is created exclusively (O_EXCL)
    and a taken name gets the next free counter (``s.png`` -> ``s_1.png``), also when other processes
    save to the same name at the same time."""
    check_output_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stem, ext = os.path.splitext(path)
    ext = ext or ".png"
    image_format = OUTPUT_FORMATS[ext.lower()]
    arrays = (from_model(x) * 255).round().to(torch.uint8).cpu().numpy()
    written = []
    for b, arr in enumerate(arrays):
        name, fd = _create_exclusive(f"{stem}{'' if len(arrays) == 1 else f'_{b:03d}'}", ext)
        try:
            with os.fdopen(fd, "wb") as out:
                Image.fromarray(arr).save(out, format=image_format)
        except BaseException:
            os.remove(name)  # no half-written file under the name
            raise
        written.append(name)
    return written


def resize_to_model(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [B,3,H,W] to size x size like upstream's PIL LANCZOS load (aspect not kept, antialiased).

    A tensor path (bicubic with antialias) is used so IMAGE batches never leave the device; it differs
    from PIL's LANCZOS by a few 1/255 steps (``load_image_pil`` is the exact upstream path).
    """
    return resize_to(x, (size, size))


def resize_to(x: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Resize [B,3,H,W] in [-1, 1] to ``size_hw`` = (height, width): bicubic with antialias, clamped;
    returned as is when it already has that size."""
    import torch.nn.functional as F

    height, width = int(size_hw[0]), int(size_hw[1])
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


# Longest side / shortest side sampled with keep_aspect: a 10:1 strip is sampled at 4:1 (squashed that far),
# so a thin image can never ask for a UNet input tens of times the model's area.
MAX_ASPECT = 4.0


def model_size_for(source_hw: tuple[int, int], image_size: int, multiple: int,
                   max_aspect: float = MAX_ASPECT) -> tuple[int, int]:
    """(height, width) to sample a ``source_hw`` image at with its aspect ratio kept (``keep_aspect``).

    The short side is the model's ``image_size`` (what it was trained at); the long side is
    ``image_size * long / short`` (the ratio capped at ``max_aspect``) rounded to the nearest multiple of
    ``multiple`` (the UNet's downsampling factor, :attr:`core.diffusion.checkpoints.DDPM.size_multiple`)
    and never shorter than the short side. A square source (and any source within half a multiple of
    square) gives ``(image_size, image_size)``, the upstream size. E.g. 1600x900 (W x H) on the 256 px model
    (multiple 32) -> (256, 448); 900x1600 -> (448, 256).
    """
    height, width = int(source_hw[0]), int(source_hw[1])
    if height < 1 or width < 1:
        raise ValueError(f"source size must be positive, got {height}x{width} (height x width)")
    if multiple < 1 or image_size < 1 or image_size % multiple:
        raise ValueError(f"the model's image_size {image_size} must be a positive multiple of its size multiple "
                         f"{multiple} (2 ** (levels - 1))")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    ratio = min(max(height, width) / min(height, width), float(max_aspect))
    steps = int(image_size * ratio / multiple + 0.5)  # nearest multiple, halves up (not banker's rounding)
    long_side = max(image_size, steps * multiple)
    return (image_size, long_side) if height <= width else (long_side, image_size)


def resize_for_model(x: torch.Tensor, image_size: int, multiple: int, keep_aspect: bool) -> torch.Tensor:
    """[B,3,H,W] at the size the UNet samples it: :func:`model_size_for` with ``keep_aspect``, else
    ``image_size`` square (upstream). A square input gives the very same tensor either way."""
    if not keep_aspect:
        return resize_to_model(x, image_size)
    return resize_to(x, model_size_for(tuple(x.shape[-2:]), image_size, multiple))


def to_uint8(x: torch.Tensor, rounding: Literal["truncate", "round"] = "truncate") -> torch.Tensor:
    """[-1, 1] -> uint8 as upstream Blended Diffusion saves PNGs (spec 6): ``(x + 1) / 2``, clamp,
    ``* 255``, then truncation (``to_pil_image``'s ``mul(255).byte()``); ``rounding="round"`` rounds."""
    v = ((x + 1) / 2).clamp(0, 1).mul(255)
    if rounding == "round":
        v = v.round()
    elif rounding != "truncate":
        raise ValueError(f"rounding must be 'truncate' or 'round', got {rounding!r}")
    return v.to(torch.uint8)


class ImageFileError(ValueError):
    """An image or mask file that cannot be used: missing, a directory, not an image, truncated or too large."""


def read_image_file(path: Union[str, os.PathLike], what: str = "image") -> Image.Image:
    """Open and fully decode an image file, or raise :class:`ImageFileError` naming it and what was wrong.

    Decoding happens here, so a truncated or corrupt file fails now (before any model work), not
    later. Images with more pixels than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``,
    89,478,485 by default; Pillow itself only warns up to twice that) are refused from their header,
    before their pixels are decoded.
    """
    where = os.fspath(path)
    if os.path.isdir(where):
        raise ImageFileError(f"{what} {where!r} is a directory; expected an image file (PNG, JPEG, WebP, ...)")
    if not os.path.exists(where):
        raise ImageFileError(f"{what} {where!r} does not exist; expected an image file (PNG, JPEG, WebP, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(where) as im:
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1)):,} pixels" if found else "its size"
        raise ImageFileError(f"{what} {where!r} is refused: {pixels} is more than the limit of "
                             f"{Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's decompression-bomb guard); scale it down "
                             "first") from None
    except UnidentifiedImageError:
        raise ImageFileError(f"{what} {where!r} is not an image Pillow can read (a corrupt file, or another kind of "
                             "file); expected PNG, JPEG, WebP, BMP, TIFF, ...") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated data, broken chunks, bad headers
        raise ImageFileError(f"{what} {where!r} could not be decoded (truncated or corrupt?): {exc}") from None


def _open_pil(image: ImageSource, what: str = "image") -> Image.Image:
    """A path (read and checked by :func:`read_image_file`) or PIL image, upright by its EXIF orientation
    (:func:`upright`)."""
    if isinstance(image, Image.Image):
        return upright(image)
    return upright(read_image_file(image, what))


def load_image_pil(image: ImageSource, size: int = 256) -> torch.Tensor:
    """Upstream's source preprocessing exactly (both papers), after the EXIF orientation: PIL RGB, ``resize((size, size), LANCZOS)``
    (aspect ratio ignored), [-1, 1], shape (1, 3, size, size). ``image``: a path or a PIL image.
    16-bit grayscale is scaled to 8 bits first (:func:`pil_to_rgb8`; upstream's ``convert("RGB")`` clips it)."""
    rgb = pil_to_rgb8(_open_pil(image)).resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (pixels * 2 - 1).unsqueeze(0)


def load_mask_pil(mask: ImageSource, size: int = 256, invert: bool = False) -> torch.Tensor:
    """Upstream Blended Diffusion's mask preprocessing (spec 4.2): (1, 1, S, S), values {0, 1}, 1 = edit.

    NEAREST resize only when the size differs; each channel ``> 0.5`` on the 8-bit values (so 1/255
    counts), binarised to 0/255, ``255 - v`` when inverted, then only the red channel. An all-zero
    result is returned as is (upstream does not reject it; see :func:`core.blended.masks.check_mask`).
    """
    rgb = pil_to_rgb8(_open_pil(mask, "mask"))
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.NEAREST)
    values = (np.array(rgb, dtype=np.uint8) > 0.5).astype(np.uint8) * 255
    if invert:
        values = 255 - values
    tensor = torch.from_numpy(values).permute(2, 0, 1).float().div(255)
    return tensor[:1].unsqueeze(0)


def mask_from_pil(mask: ImageSource) -> torch.Tensor:
    """A mask file at its own resolution, by upstream's channel rule (Blended Diffusion spec 4.2, §9 item 7):
    PIL RGB, then the **red channel** only (green / blue ignored, alpha dropped), as float32
    ``(1, 1, H, W)`` in [0, 1] (value / 255). Binarisation (any non-zero 8-bit value = edit),
    inversion and resizing to the image are :func:`core.blended.masks.prepare_mask`'s. The CLI's
    ``--mask`` and :func:`load_mask_pil` both read masks by this rule.
    """
    red = np.array(pil_to_rgb8(_open_pil(mask, "mask")), dtype=np.uint8)[..., 0]
    return torch.from_numpy(red.astype(np.float32) / 255.0)[None, None]


def load_mask_file(path: Union[str, os.PathLike]) -> torch.Tensor:
    """:func:`mask_from_pil` of an image file."""
    return mask_from_pil(path)
