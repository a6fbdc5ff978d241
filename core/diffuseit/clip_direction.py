"""DiffuseIT's text-guided CLIP loss (diffuseit_spec §2.4, §3.1, §4.5, §6).

Per CLIP model m of the ensemble:

* text embedding ``E(text) = normalize(mean over 79 ImageNet templates of encode_text)`` (§2.4);
* image embedding ``E_I(x01, ncuts)`` = mean of the unit embeddings of the cuts; ``ncuts = 0`` is
  the deterministic "test" path (bilinear resize without antialias + centre crop), ``ncuts > 0``
  draws random rotate / resized-crop / flip cuts (§6);
* target ``v_m = normalize(E_T - 0.4 E_S + 0.2 E_I0)`` with ``E_I0 = E_I(source, 0)`` (§3.1);
* ``L_CLIP(x) = -(1/M) sum_m <E_I^m(0.5 x + 0.5, ncuts), v_m>``, weight 2000 (§4.5). The mean of
  unit cut embeddings is not re-normalised, so this is not exactly a cosine (as upstream).

A non-square image (DiffuseIT with ``keep_aspect``; upstream only ever sees squares) is scored through
square windows along its long side (:func:`random_cuts`, :func:`eval_views`); a square one as upstream.

Upstream squeezes the batch (batch size 1 only). Here row b of a batch is scored on its own,
against its own source row, so a batch equals serial runs; with one ``torch.Generator`` per row
the random cuts are identical too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from ..devices import to_device
from ..encoders.clip import ClipEnsemble, ClipModel
from ..diffusion.guidance import StepContext, noise_mixed_input

NUM_TEMPLATES = 79
DROPPED_TEMPLATE = "a photo of many {}."  # the one OPENAI_IMAGENET_TEMPLATES entry upstream lacks (§2.4)
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def imagenet_templates() -> tuple[Callable[[str], str], ...]:
    """Upstream's 79 prompt templates: open_clip's OPENAI_IMAGENET_TEMPLATES minus one, same order."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    kept = tuple(t for t in OPENAI_IMAGENET_TEMPLATES if t("{}") != DROPPED_TEMPLATE)
    if len(kept) != NUM_TEMPLATES:
        raise RuntimeError(f"expected {NUM_TEMPLATES} templates after dropping {DROPPED_TEMPLATE!r}, got {len(kept)}; "
                           "open_clip's OPENAI_IMAGENET_TEMPLATES changed")
    return kept


def template_prompts(text: str) -> list[str]:
    """The 79 prompts of ``text`` (e.g. 'a bad photo of a Lion.'), in upstream's order."""
    return [t(text) for t in imagenet_templates()]


def text_embedding(model: ClipModel, text: str) -> torch.Tensor:
    """[1, D]: raw text features averaged over the templates, then L2-normalised (§2.4)."""
    return F.normalize(model.encode_text(template_prompts(text)).mean(0, keepdim=True), dim=-1)


def direction_target(e_target: torch.Tensor, e_source: torch.Tensor, e_image: torch.Tensor,
                     lambda_src: float = 0.4, lambda_img: float = 0.2) -> torch.Tensor:
    """Input-aware target ``normalize(E_T - lambda_src E_S + lambda_img E_I0)`` (§3.1; upstream 0.4 / 0.2)."""
    return F.normalize(e_target - lambda_src * e_source + lambda_img * e_image, dim=-1)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``Resize(size)`` + ``CenterCrop(size)`` on a tensor, bilinear without antialias (§2.4).

    The shorter side goes to ``size`` (the longer one to ``int(size * long / short)``), as
    torchvision's tensor resize; antialias off as in the authors' torchvision 0.10 (quirk 9).
    """
    h, w = x.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def square_window_offsets(height: int, width: int) -> list[int]:
    """Offsets along the long side of the square windows (side = the short side) that :func:`image_embedding`
    scores a non-square image with: ``ceil(long / short)`` windows, evenly spaced from one end to the other,
    so together they cover the image. A square image has the one window at offset 0."""
    short, long = min(height, width), max(height, width)
    extra = long - short
    if extra == 0:
        return [0]
    count = -(-long // short)  # >= 2 here
    return [int(i * extra / (count - 1) + 0.5) for i in range(count)]


def square_window(x: torch.Tensor, offset: int) -> torch.Tensor:
    """The square window (side = the short side) of an (N)CHW image starting ``offset`` pixels along its long side."""
    h, w = x.shape[-2:]
    side = min(h, w)
    return x[..., offset:offset + side, :] if h > w else x[..., :, offset:offset + side]


def eval_views(model: ClipModel, x01: torch.Tensor) -> torch.Tensor:
    """[B, V, C, n_px, n_px] CLIP inputs of the ``ncuts = 0`` path for images of any aspect ratio.

    The image is resized so its short side is n_px (upstream's ``Resize(n_px)``); a square one then
    gives upstream's single centre crop, a non-square one the :func:`square_window_offsets` windows, so
    CLIP (square input) sees all of it instead of the centre crop alone.
    """
    if x01.shape[-2] == x01.shape[-1]:
        return eval_preprocess(model, x01).unsqueeze(1)
    size = model.image_size
    h, w = x01.shape[-2:]
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    resized = F.interpolate(x01, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    views = [square_window(resized, off) for off in square_window_offsets(new_h, new_w)]
    return torch.stack([model.normalize(v) for v in views], dim=1)


def eval_preprocess(model: ClipModel, x01: torch.Tensor) -> torch.Tensor:
    """The ``ncuts = 0`` input of ``model``: resize + centre crop to n_px, then CLIP-normalise (§2.4)."""
    return model.normalize(resize_center_crop(x01, model.image_size))


class CutParams(NamedTuple):
    angle: float  # degrees, counter-clockwise
    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_cut_params(height: int, width: int, generator: Optional[torch.Generator] = None, degrees: float = 10.0,
                      scale: tuple[float, float] = (0.8, 1.0), ratio: tuple[float, float] = (0.9, 1.1)) -> CutParams:
    """Draw one cut's parameters like torchvision's RandomRotation -> RandomResizedCrop -> RandomHorizontalFlip (§2.4, §6).

    Same draws in the same order as those transforms (angle; up to 10 tries of area fraction in
    ``scale`` and log-uniform aspect in ``ratio``, then the offsets; fallback: the centred crop
    closest to ``ratio``; flip with p = 0.5), but from ``generator`` so runs are reproducible.
    """
    angle = float(torch.empty(1).uniform_(-degrees, degrees, generator=generator).item())
    area, log_lo, log_hi = height * width, math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            break
    else:
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = bool(torch.rand(1, generator=generator).item() < 0.5)
    return CutParams(angle, top, left, h, w, flip)


def rotate_nearest(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate a CHW / NCHW image ``angle`` degrees counter-clockwise about its centre (nearest, zero fill,
    same size), bit-identical to ``TF.rotate(x, angle, NEAREST, expand=False, fill=None)`` with its gradient.

    torchvision sends its 2x3 matrix and the (w/2, h/2) scale to the device with ``torch.tensor(...,
    device=...)`` each call, a blocking copy on CUDA. Here the 3x2 matrix that maps centred pixel
    coordinates to grid_sample's [-1, 1] range is computed on the CPU in the grid dtype (same roundings:
    the float64 inverse rotation rounded to the dtype, then divided by the rounded half sizes) and staged
    with :func:`core.devices.to_device`; the pixel-centre base grid, the bmm and the sampling are the
    same device ops in the same order, so the values match exactly.
    """
    if x.ndim not in (3, 4):
        raise ValueError(f"rotate_nearest expects a CHW or NCHW image, got shape {tuple(x.shape)}")
    h, w = x.shape[-2], x.shape[-1]
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    # inverse of a rotation by `angle` (about the centre, so no translation), as a 2x3 row-major matrix
    rad = math.radians(-float(angle))
    cos, sin = math.cos(rad), math.sin(rad)
    inverse = torch.tensor([[cos, sin, 0.0], [-sin, cos, 0.0]], dtype=dtype)
    half = torch.tensor([0.5 * w, 0.5 * h], dtype=dtype)
    scaled = to_device(inverse.t() / half, x.device)  # [3, 2]: rows x, y, 1 -> normalised (gx, gy)
    # pixel-centre coordinates relative to the image centre, homogeneous
    base = torch.empty(1, h, w, 3, dtype=dtype, device=x.device)
    base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 + 0.5 - 1, steps=w, device=x.device))
    base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 + 0.5 - 1, steps=h, device=x.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    grid = base.view(1, h * w, 3).bmm(scaled.unsqueeze(0)).view(1, h, w, 2)
    img = x.unsqueeze(0) if x.ndim == 3 else x
    if img.dtype != dtype:
        img = img.to(dtype)
    out = F.grid_sample(img, grid.expand(img.shape[0], h, w, 2), mode="nearest", padding_mode="zeros",
                        align_corners=False)
    if x.ndim == 3:
        out = out.squeeze(0)
    if out.dtype != x.dtype:
        out = out.round().to(x.dtype)
    return out


def apply_cut(x01: torch.Tensor, params: CutParams, size: int) -> torch.Tensor:
    """One cut of a CHW [0, 1] image: rotate (nearest, fill 0, no expand), resized crop (bilinear, no antialias), flip."""
    # upstream's TF.rotate(fill=0) exactly: zero padding (nearest never mixes in the border), without
    # torchvision's boolean-mask fill (a host read-back) or its per-call blocking matrix copies
    x = rotate_nearest(x01, params.angle)
    x = TF.resized_crop(x, params.top, params.left, params.height, params.width, [size, size],
                        TF.InterpolationMode.BILINEAR, antialias=False)
    return x.flip(-1) if params.flip else x


def random_cuts(x01: torch.Tensor, ncuts: int, size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[ncuts, C, size, size] independent random cuts of one CHW [0, 1] image (not yet CLIP-normalised).

    A square image is cut as upstream. A non-square one gets, per cut, a square window (side = the
    short side) at an offset drawn uniformly along the long side first, then upstream's cut of that
    window: torchvision's crop ratio (0.9-1.1) cannot fit a 16:9 image, so upstream's fallback would give
    every cut the same centre crop and leave the sides unguided.
    """
    h, w = x01.shape[-2:]
    if h == w:
        return torch.stack([apply_cut(x01, sample_cut_params(h, w, generator), size) for _ in range(ncuts)])
    side, extra = min(h, w), abs(h - w)
    cuts = []
    for _ in range(ncuts):
        offset = int(torch.randint(0, extra + 1, (1,), generator=generator).item())
        cuts.append(apply_cut(square_window(x01, offset), sample_cut_params(side, side, generator), size))
    return torch.stack(cuts)


def mean_unit_embedding(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over cuts (dim -2) of the L2-normalised embeddings, not re-normalised (§2.4, vqc_core.py:84-88)."""
    return F.normalize(embeddings, dim=-1).mean(-2)


def _row_generators(generator: Generators, batch: int) -> list[Optional[torch.Generator]]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * batch  # one stream shared by the rows, consumed row after row
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}; pass one per row or a single one")
    return gens


def image_embedding(model: ClipModel, x01: torch.Tensor, ncuts: int = 0, generator: Generators = None) -> torch.Tensor:
    """``E_I(x01, ncuts)`` per row: [B, D] from NCHW [0, 1] images (§2.4).

    ``ncuts = 0``: one deterministic cut (the test path), so the result is the unit embedding; a
    non-square image averages the unit embeddings of its :func:`eval_views` windows instead.
    Otherwise every row gets ``ncuts`` random cuts, drawn from its own generator when a sequence
    of generators (one per row) is given; all cuts of the batch go through the encoder at once.
    """
    if ncuts == 0:
        if x01.shape[-2] == x01.shape[-1]:
            return mean_unit_embedding(model.encode_image(eval_preprocess(model, x01)).unsqueeze(1))
        views = eval_views(model, x01)  # non-square: the mean over square windows that cover the image
        emb = model.encode_image(views.flatten(0, 1))
        return mean_unit_embedding(emb.reshape(x01.shape[0], views.shape[1], -1))
    gens = _row_generators(generator, x01.shape[0])
    cuts = torch.cat([random_cuts(x01[b], ncuts, model.image_size, gens[b]) for b in range(x01.shape[0])])
    emb = model.encode_image(model.normalize(cuts))
    return mean_unit_embedding(emb.reshape(x01.shape[0], ncuts, -1))


def clip_loss(predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """``-(1/M) sum_m <p_m, v_m>`` per row, [B] (§4.5); p_m [B, D], v_m [B, D] or [1, D]."""
    return -torch.stack([(p * v).sum(-1) for p, v in zip(predictions, targets)]).mean(0)


def clip_text_loss(ensemble: Sequence[ClipModel], x: torch.Tensor, targets: Sequence[torch.Tensor], ncuts: int = 0,
                   generator: Generators = None) -> torch.Tensor:
    """L_CLIP of [-1, 1] images ``x`` (upstream passes ``0.5 x + 0.5``), per row [B] (§4.5).

    Cuts of the models are drawn one model after the other, as upstream's loop over models.
    """
    x01 = 0.5 * x + 0.5
    preds = []
    for model in ensemble:
        preds.append(image_embedding(model, x01, ncuts, generator).to(x.device))
    return clip_loss(preds, [t.to(x.device) for t in targets])


@dataclass(frozen=True, eq=False)
class PreparedCLIPDirectional:
    """The per-run state of :class:`CLIPDirectionalLoss`: embeddings and targets of every model."""

    term: "CLIPDirectionalLoss"
    source_text_embeddings: tuple[torch.Tensor, ...]  # E_S per model, [1, D]
    target_text_embeddings: tuple[torch.Tensor, ...]  # E_T per model, [1, D]
    source_image_embeddings: tuple[torch.Tensor, ...]  # E_I0 per model, [B, D]
    targets: tuple[torch.Tensor, ...]  # v per model, [B, D]
    source_loss: torch.Tensor  # unweighted L_CLIP of the source (ncuts 0): upstream's first loss_prev, [B]
    name: str = field(default="clip_directional")
    last_loss: list = field(default_factory=lambda: [None])  # the one mutable cell: this run's latest loss

    def __call__(self, predicted_x0: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor:
        """``lambda_clip * L_CLIP`` per sample, [B].

        The image is scored as given: upstream feeds CLIP the noise-mixed ``x_mix`` (§3.5 step 3),
        which this term builds from ``ctx`` when ``noise_mix`` is on (the default). Random cuts use the
        context's per-row ``generators`` when present. The unweighted loss is left in
        ``ctx.state.clip_loss`` (detached) and becomes the next call's ``clip_loss_prev``.
        """
        x = noise_mixed_input(predicted_x0, ctx) if (ctx is not None and self.term.noise_mix) else predicted_x0
        generators = ctx.generators if ctx is not None else None
        loss = clip_text_loss(self.term.ensemble, x, self.targets, self.term.ncuts, generators)
        if ctx is not None:
            ctx.state.clip_loss = loss.detach()
            self.last_loss[0] = loss.detach()
        return self.term.lambda_clip * loss

    def before_step(self, ctx: StepContext) -> None:
        """Publish the previous call's unweighted loss (the source's at the first call) as
        ``ctx.state.clip_loss_prev``: upstream's ``loss_prev``, which sets the contrastive weight of
        :class:`~core.diffuseit.dino_losses.DINOStructureLoss` (content regularisation, §3.5 step 1)."""
        previous = self.last_loss[0] if self.last_loss[0] is not None else self.source_loss
        ctx.state.clip_loss_prev = previous.to(ctx.x_t.device)


@dataclass(frozen=True)
class CLIPDirectionalLoss:
    """DiffuseIT's text guidance term (§4.5): pull each sample towards ``normalize(E_T - 0.4 E_S + 0.2 E_I0)``.

    Defaults are upstream's: weight 2000 (``--clip_guidance_lambda``), 8 cuts per model
    (``--aug_num``; 0 = the deterministic test path), 0.4 / 0.2 hard-coded mix.
    """

    ensemble: Sequence[ClipModel]
    source_text: str
    target_text: str
    lambda_clip: float = 2000.0
    ncuts: int = 8
    lambda_src: float = 0.4
    lambda_img: float = 0.2
    noise_mix: bool = True  # upstream always scores x_mix = x0 f_t + x_t (1 - f_t) (§3.5 step 3)
    name: str = "clip_directional"

    def __post_init__(self) -> None:
        for label, text in (("source_text", self.source_text), ("target_text", self.target_text)):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{label} is empty: DiffuseIT's text guidance needs both a source prompt (what the "
                                 "image shows, e.g. 'Lion') and a target prompt (e.g. 'Black Leopard')")
        if int(self.ncuts) != self.ncuts or self.ncuts < 0:
            raise ValueError(f"ncuts must be an integer >= 0 (0 = deterministic resize + centre crop), got {self.ncuts}")
        object.__setattr__(self, "ensemble", ClipEnsemble(self.ensemble))

    def prepare(self, source: torch.Tensor) -> PreparedCLIPDirectional:
        """Text embeddings, source-image embeddings and targets, once per run (§3.1); ``source`` NCHW in [-1, 1]."""
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: they enter autograd graphs later
            e_s = tuple(text_embedding(m, self.source_text) for m in self.ensemble)
            e_t = tuple(text_embedding(m, self.target_text) for m in self.ensemble)
            src01 = 0.5 * source.detach().clone().float() + 0.5
            e_i0 = tuple(image_embedding(m, src01, 0) for m in self.ensemble)
            targets = tuple(direction_target(t, s, i, self.lambda_src, self.lambda_img) for t, s, i in zip(e_t, e_s, e_i0))
            source_loss = clip_text_loss(self.ensemble, source.detach().clone().float(), targets, 0)
        return PreparedCLIPDirectional(self, e_s, e_t, e_i0, targets, source_loss, self.name)
