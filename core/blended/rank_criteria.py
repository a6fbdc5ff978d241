"""Ranking criteria beyond the paper's masked CLIP distance (an extension; the paper's ranking is the default).

Blended Diffusion ranks samples by the CLIP distance of the *masked region* to the prompt alone, and
names what that misses: a partial object can rank high, the prompt written as text in the edit ranks
high (CLIP's typographic bias), and the result's fit with its surroundings is not seen, since
nothing outside the mask is scored. :class:`RankingCriteria` weighs four per-sample components, each
"lower is better", into the score the samples are sorted by:

``masked_prompt``
    The paper's term: the masked, unaugmented CLIP distance to the prompt (``ranking.ranking_distances``,
    with its ``faithful`` variant). Weight 1 and the others 0 (:data:`PAPER_CRITERIA`, the default) is
    the paper's ranking, number for number.
``whole_image_prompt``
    The spherical CLIP distance of the *whole* scored view (the crop around the mask that was edited,
    or the whole image), unmasked, to the prompt: the edit judged in its context (an object that
    does not sit in the scene, or a half object, agrees less with the prompt there).
``typography``
    The cosine similarity (-1..1) between the masked view's CLIP embedding and the embedding of the
    prompt *rendered as text* (:func:`render_prompt_text`: black words on white, Pillow's default
    font, deterministic). A sample that wrote the prompt instead of drawing it is close to that
    rendering. The masked view is used because text can only appear where the sample differs from the
    source, and the background would dilute it.
``seam``
    How much the edit breaks off at the mask's border (:func:`seam_inconsistency`): the mean absolute
    RGB difference (in [0, 1] pixel units) between each pixel in a band just *inside* the mask and the
    mean of the source pixels just *outside* it, near that pixel. With the background blend the
    outside is the source exactly, so this is the seam's consistency with the source: a colour or
    brightness jump, texture that stops at the border, or an object cut off by the mask raise it.

The added CLIP terms always feed CLIP as it was trained (``[0, 1]`` pixels, antialiased resize,
CLIP normalisation); ``faithful`` changes only the paper's term. :data:`IMPROVED_CRITERIA`'s weights are
untuned starting points (no benchmark with the real CLIP stands behind them): the paper's term keeps weight
1, the context term counts half and the typography penalty a quarter, and the seam (a pixel difference in
[0, 1]) counts half, so a visible 0.1 colour jump at the border costs as much as 0.05 of CLIP distance.
Tune them per use; the reported components show what each term did.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .losses import clip_normalize

COMPONENTS = ("masked_prompt", "whole_image_prompt", "typography", "seam")
RENDER_SIZE = 224  # the prompt is drawn at least this large, then resized to CLIP's input size
RENDER_MARGIN = 0.06  # fraction of the canvas left blank on each side of the text


@dataclass(frozen=True)
class RankingCriteria:
    """Weights of the ranking components (module docstring); total = sum of weight * component, lower
    is better. ``seam_width``: the band's width in pixels of the scored view (0 = ``round(side / 64)``,
    at least 1: 4 px on a 256 px crop)."""

    masked_prompt: float = 1.0
    whole_image_prompt: float = 0.0
    typography: float = 0.0
    seam: float = 0.0
    seam_width: int = 0

    def __post_init__(self) -> None:
        for name in COMPONENTS:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"ranking weight {name} must be a finite number >= 0, got {value!r}")
        if not any(getattr(self, name) for name in COMPONENTS):
            raise ValueError("ranking criteria need at least one weight > 0 (all four are 0)")
        if not isinstance(self.seam_width, int) or self.seam_width < 0:
            raise ValueError(f"seam_width must be an integer >= 0 (0 = automatic), got {self.seam_width!r}")

    def weights(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in COMPONENTS}

    def active(self) -> tuple[str, ...]:
        """The components with a weight > 0 (those the total needs)."""
        return tuple(name for name in COMPONENTS if getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PAPER_CRITERIA = RankingCriteria()
IMPROVED_CRITERIA = RankingCriteria(masked_prompt=1.0, whole_image_prompt=0.5, typography=0.25, seam=0.5)
CRITERIA_PRESETS = {"paper": PAPER_CRITERIA, "improved": IMPROVED_CRITERIA}


def weighted_total(components: dict[str, torch.Tensor], criteria: RankingCriteria) -> torch.Tensor:
    """``sum(weight * component)`` over the weighted components. A lone weight of 1 returns that
    component itself (the paper's criteria give exactly the paper's distances)."""
    terms = [(getattr(criteria, name), components[name]) for name in criteria.active()]
    total = terms[0][1] if terms[0][0] == 1 else terms[0][0] * terms[0][1]
    for weight, value in terms[1:]:
        total = total + weight * value
    return total


def resize_square(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """Bilinear resize to ``size`` x ``size`` (nothing to do when already that size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def clip_embeddings(pixels01: torch.Tensor, clip: Any) -> torch.Tensor:
    """CLIP image embeddings (float32) of ``[0, 1]`` images as CLIP was trained to see them: antialiased
    bilinear resize to its input size, CLIP normalisation."""
    with torch.no_grad():
        pixels = clip_normalize(resize_square(pixels01.clamp(0, 1), int(clip.image_size), True), clip)
        return clip.encode_image(pixels).float()


def _load_font(size: int) -> Any:
    from PIL import ImageFont

    try:  # Pillow >= 10.1: the bundled scalable font (a fixed bitmap font without FreeType)
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: the bitmap font only
        return ImageFont.load_default()


def _wrap(words: list[str], fits: Any) -> list[str]:
    """Greedy word wrap: each line takes words while ``fits(line)`` (a word alone always gets a line)."""
    lines: list[str] = []
    for word in words:
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def render_prompt_text(prompt: str, size: int) -> torch.Tensor:
    """The prompt written as text: black words on a white square, Pillow's default font at the largest
    size whose word-wrapped, centred block fits the canvas (``RENDER_MARGIN`` blank on each side).
    Drawn at ``max(size, RENDER_SIZE)`` pixels and resized (antialiased) to ``size``; deterministic for
    a given Pillow. Returns ``(1, 3, size, size)`` float32 in [0, 1]."""
    from PIL import Image, ImageDraw

    words = prompt.split()
    if not words:
        raise ValueError("the typography term needs a non-empty prompt to render")
    canvas = max(int(size), RENDER_SIZE)
    room = canvas * (1 - 2 * RENDER_MARGIN)
    draw = ImageDraw.Draw(Image.new("L", (canvas, canvas), 255))

    def layout(font_size: int) -> tuple[Any, str, tuple[int, int, int, int]]:
        font = _load_font(font_size)
        text = "\n".join(_wrap(words, lambda line: draw.textlength(line, font=font) <= room))
        return font, text, draw.multiline_textbbox((0, 0), text, font=font, align="center")

    def fits(box: tuple[int, int, int, int]) -> bool:
        return box[2] - box[0] <= room and box[3] - box[1] <= room

    low, high = 4, canvas  # binary search for the largest font size that fits (4 px always drawn)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(layout(mid)[2]) else (low, mid - 1)
    font, text, box = layout(low)
    image = Image.new("L", (canvas, canvas), 255)
    origin = ((canvas - (box[2] - box[0])) / 2 - box[0], (canvas - (box[3] - box[1])) / 2 - box[1])
    ImageDraw.Draw(image).multiline_text(origin, text, fill=0, font=font, align="center")
    gray = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(1, 1, canvas, canvas)
    return resize_square(gray.float().div(255).expand(1, 3, -1, -1), int(size), True).clamp(0, 1)


def typography_similarity(masked01: torch.Tensor, clip: Any, rendering_embed: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each ``[0, 1]`` masked view's CLIP embedding to the rendered prompt's; ``[B]``."""
    embeds = clip_embeddings(masked01, clip)
    return F.cosine_similarity(embeds, rendering_embed.to(embeds.device).float(), dim=-1)


def seam_inconsistency(images: torch.Tensor, mask: torch.Tensor, width: int = 0) -> torch.Tensor:
    """How much each image breaks off at its mask's border; ``[B]``, in [0, 1], 0 = seamless.

    ``images`` ``(B, 3, H, W)`` in [-1, 1]; ``mask`` ``(1 or B, 1, H, W)``, >= 0.5 = edited. For every
    edited pixel within ``width`` pixels (Chebyshev) of an unedited one, the mean over RGB of
    ``|pixel - mean of the unedited pixels in its (2 width + 1)^2 window|`` (``[0, 1]`` units),
    averaged over that inner band. The comparison is local, so a border running through differently
    coloured surroundings is compared with what lies next to each point. A mask without a border
    (full, or empty) scores 0.
    """
    batch, _, height, width_px = images.shape
    k = int(width) if width else max(1, round(min(height, width_px) / 64))
    x = ((images.float() + 1) / 2).clamp(0, 1)
    inside = (mask.to(x.device).float() >= 0.5).float().expand(batch, 1, height, width_px)
    outside = 1 - inside

    def window_mean(t: torch.Tensor) -> torch.Tensor:  # (2k+1)^2 box, zero-padded, as two 1-D passes
        t = F.avg_pool2d(t, kernel_size=(1, 2 * k + 1), stride=1, padding=(0, k), count_include_pad=True)
        return F.avg_pool2d(t, kernel_size=(2 * k + 1, 1), stride=1, padding=(k, 0), count_include_pad=True)

    # both means share the box's divisor, so their ratio is the mean of the unedited pixels in the window
    outside_sum = window_mean(x * outside)
    outside_share = window_mean(outside)
    band = inside * (outside_share > 0)
    local = outside_sum / outside_share.clamp_min(torch.finfo(x.dtype).tiny)
    jump = (x - local).abs().mean(dim=1, keepdim=True) * band
    return jump.sum(dim=(1, 2, 3)) / band.sum(dim=(1, 2, 3)).clamp_min(1)
