"""DiffuseIT's DINO-ViT losses (``diffuseit_spec.md`` §4) and their guidance terms.

Pure functions take features from :class:`~.dino.DINOExtractor` and return one value per batch
row. Upstream (batch size 1) mixes batch reductions (§9.5: self-similarity / [CLS] / range summed
over the batch, contrastive and pixel MSE averaged); here every row gets its own loss, so at B = 1
the values are upstream's and a batch of N equals N serial runs.

Guidance terms follow :mod:`.guidance`: frozen descriptions, ``prepare(source)`` once per run
(caches the source keys / self-similarity, the style [CLS] and the first semantic-divergence
reference), then ``prepared(predicted_x0, ctx) -> Tensor[B]`` of *weighted* losses.
The ViT terms evaluate upstream's ``x_in`` (§3.5 steps 3 and 5): with ``noise_mix=True``
(``--use_noise_aug_all``, both README presets) ``x_in = x0 * f_t + x_t * (1 - f_t)``,
``f_t = sqrt(1 - abar_t)``; otherwise ``x_in = x0``. Terms sharing an extractor and a step share
one DINO forward (cached in ``ctx.state.dino_features``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F

from ..encoders.dino import DINOExtractor, DINOFeatures
from ..diffusion.guidance import StepContext, noise_mixed_input
from ..diffusion.schedule import DiffusionSchedule, upstream_timestep_index

TAU = 0.07          # InfoNCE temperature, hard-coded upstream (§4.2)
DIAGONAL_LOGIT = -10.0  # value written over the positive pair among the negatives (§4.2)


# --------------------------------------------------------------------------- pure losses


def self_similarity(keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine self-similarity of token keys (B, N, D) -> (B, N, N), §4.1:
    ``S_ij = <k_i, k_j> / max(|k_i| |k_j|, eps)`` (Splice's ``attn_cosine_sim``)."""
    norms = keys.norm(dim=-1, keepdim=True)
    return (keys @ keys.transpose(-1, -2)) / (norms @ norms.transpose(-1, -2)).clamp(min=eps)


def global_ssim_loss(keys: torch.Tensor, source_sim: torch.Tensor) -> torch.Tensor:
    """L_ssim per row, §4.1: ``mean_ij (S(keys)_ij - S_src_ij)^2``; ``source_sim`` (B, N, N) is
    the (detached) self-similarity of the source keys."""
    return (self_similarity(keys) - source_sim).pow(2).mean(dim=(-2, -1))


def patch_nce_per_token(queries: torch.Tensor, keys: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Per-token InfoNCE of §4.2 (upstream ``PatchLoss``), (B, N, D) x2 -> (B, N).

    Logits of token i: ``cos(q_i, k_i)/tau`` (class 0) then ``cos(q_i, k_j)/tau`` for all j with
    the diagonal j = i overwritten by ``-10/tau``. Cosines use plain norms (no eps) as upstream.
    """
    q = queries / queries.norm(dim=-1, keepdim=True)
    k = keys / keys.norm(dim=-1, keepdim=True)
    positive = (q * k).sum(dim=-1, keepdim=True)
    negatives = q @ k.transpose(-1, -2)
    eye = torch.eye(negatives.shape[-1], dtype=torch.bool, device=negatives.device)
    negatives = negatives.masked_fill(eye, DIAGONAL_LOGIT)
    logits = torch.cat([positive, negatives], dim=-1) / tau
    return torch.logsumexp(logits, dim=-1) - logits[..., 0]


def contrastive_patch_loss(queries: torch.Tensor, keys: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """L_cont per row, §4.2: mean over the N tokens of :func:`patch_nce_per_token`
    (upstream then averages rows; at B = 1 identical)."""
    return patch_nce_per_token(queries, keys, tau).mean(dim=-1)


def cls_mse(cls: torch.Tensor, reference_cls: torch.Tensor) -> torch.Tensor:
    """``mean_d (c_ref - c)^2`` per row: L_sty (§4.3) with the style [CLS] as reference;
    L_sem (§4.4) is its negative with the previous input's [CLS]."""
    return (reference_cls - cls).pow(2).mean(dim=-1)


def dir_cls_loss(cls: torch.Tensor, prev_cls: torch.Tensor) -> torch.Tensor:
    """Semantic divergence L_sem per row, §4.4: ``-mean_d (c_prev - c)^2`` (pushes away)."""
    return -cls_mse(cls, prev_cls)


def pixel_mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel MSE to the style image per row, §4.7: ``mean_CHW (x - x_trg)^2``, both in [-1, 1]."""
    return (x - target).pow(2).flatten(1).mean(dim=1)


def loss_vit_forward(extractor: DINOExtractor, output: torch.Tensor, source: torch.Tensor,
                     prev: Optional[torch.Tensor] = None, use_dir: bool = False,
                     target: Optional[torch.Tensor] = None, frac_cont: float = 1.0, *,
                     lambda_ssim: float = 1000.0, lambda_dir_cls: float = 100.0,
                     lambda_contra_ssim: float = 200.0, lambda_trg: float = 2000.0,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Upstream ``Loss_vit.forward`` (loss_vit.py:46-75; §4.1-4.4) on [-1, 1] images, per row.

    ``L = lambda_ssim L_ssim + lambda_contra frac_cont L_cont + [use_dir] lambda_dir L_sem
    + [target given] lambda_trg L_sty``. Returns the per-row total and the unweighted terms under
    upstream's ``losses_val`` names. Reference images are evaluated without gradient.
    """
    out = extractor(output)
    with torch.no_grad():
        src = extractor(source)
    keys_src = src.keys.detach()
    losses = {"loss_global_ssim": global_ssim_loss(out.keys, self_similarity(keys_src)),
              "loss_contra_ssim": contrastive_patch_loss(out.keys, keys_src)}
    total = lambda_ssim * losses["loss_global_ssim"] + \
        lambda_contra_ssim * frac_cont * losses["loss_contra_ssim"]
    if use_dir:
        with torch.no_grad():
            prev_cls = extractor(prev).cls
        losses["loss_dir_cls"] = dir_cls_loss(out.cls, prev_cls)
        total = total + lambda_dir_cls * losses["loss_dir_cls"]
    if target is not None:
        with torch.no_grad():
            trg_cls = extractor(target).cls
        losses["loss_trg"] = cls_mse(out.cls, trg_cls)
        total = total + lambda_trg * losses["loss_trg"]
    return total, losses


# --------------------------------------------------------------------------- step helpers


def frac_cont_schedule(loss_prev: Union[float, torch.Tensor], use_prog_contrast: bool = False,
                       regularize_content: bool = False) -> Union[float, torch.Tensor]:
    """Contrastive weight multiplier of text mode, §3.5 step 1, from the previous call's CLIP loss.

    1.0; 0.5 if ``use_prog_contrast`` and ``loss_prev > -0.5`` (the upstream ``elif > -0.4 ->
    0.25`` is unreachable and omitted); 2.0 if ``regularize_content`` and ``loss_prev < -0.5``.
    A tensor ``loss_prev`` (one per row) gives a per-row tensor. :class:`DINOStructureLoss` applies
    it to ``ctx.state.clip_loss_prev``.
    """
    if isinstance(loss_prev, torch.Tensor):
        frac = torch.ones_like(loss_prev, dtype=torch.float32)
        if use_prog_contrast:
            frac = torch.where(loss_prev > -0.5, torch.full_like(frac, 0.5), frac)
        if regularize_content:
            frac = torch.where(loss_prev < -0.5, torch.full_like(frac, 2.0), frac)
        return frac
    frac_f = 1.0
    if use_prog_contrast and loss_prev > -0.5:
        frac_f = 0.5
    if regularize_content and loss_prev < -0.5:
        frac_f = 2.0
    return frac_f


def _features(extractor: DINOExtractor, predicted_x0: torch.Tensor, ctx: StepContext,
              noise_mix: bool) -> tuple[torch.Tensor, DINOFeatures]:
    """(x_in, features of x_in), computed once per step and shared by all terms using the same
    extractor and input rule (upstream runs a DINO forward per loss term, §8). The entry is
    recognised by the identity of this step's x0 and x_t; only the latest step's entry is kept."""
    cache = ctx.state.dino_features
    key = (id(extractor), noise_mix)
    hit = cache.get(key)
    if hit is not None and hit[0] is predicted_x0 and hit[1] is ctx.x_t:
        return hit[2], hit[3]
    x_in = noise_mixed_input(predicted_x0, ctx) if noise_mix else predicted_x0
    feats = extractor(x_in)
    cache[key] = (predicted_x0, ctx.x_t, x_in, feats)
    return x_in, feats


def _rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 and batch != 1 else x


def _per_row(value: Union[float, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return torch.full((), value, dtype=like.dtype, device=like.device)  # a fill, not a host-to-device copy


# --------------------------------------------------------------------------- guidance terms


class _PreparedStructure:
    def __init__(self, term: "DINOStructureLoss", source: torch.Tensor) -> None:
        self.name, self.term = term.name, term
        with torch.no_grad():
            self.source_keys = term.extractor(source).keys.detach().contiguous()
        self.source_sim = self_similarity(self.source_keys)

    def __call__(self, predicted_x0: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        t = self.term
        _, feats = _features(t.extractor, predicted_x0, ctx, t.noise_mix)
        b = feats.keys.shape[0]
        ssim = global_ssim_loss(feats.keys, _rows(self.source_sim, b))
        contra = contrastive_patch_loss(feats.keys, _rows(self.source_keys, b), t.tau)
        clip_loss_prev = ctx.state.clip_loss_prev  # written by the CLIP directional term before each step
        if ctx.replay.frac_cont is not None:
            frac_value = ctx.replay.frac_cont
        elif (t.use_prog_contrast or t.regularize_content) and clip_loss_prev is not None:
            frac_value = frac_cont_schedule(clip_loss_prev, t.use_prog_contrast, t.regularize_content)
        else:
            frac_value = t.frac_cont
        frac = _per_row(frac_value, contra)
        return t.lambda_ssim * ssim + t.lambda_contra * frac * contra


@dataclass(frozen=True, eq=False)
class DINOStructureLoss:
    """Content loss: ``lambda_ssim L_ssim + lambda_contra frac_cont L_cont`` (§4.1, §4.2).

    Defaults are upstream's (1000 / 200, both presets). ``frac_cont`` is the text-mode contrastive
    schedule (§3.5 step 1): with ``use_prog_contrast`` / ``regularize_content`` it follows the CLIP
    term's previous loss through :func:`frac_cont_schedule`. That is the one coupling between terms:
    :class:`~core.diffuseit.clip_direction.CLIPDirectionalLoss` writes ``ctx.state.clip_loss_prev``
    before each step and this term reads it (without a CLIP term in the guidance the weight stays
    ``frac_cont``). ``ctx.replay.frac_cont`` (float or Tensor[B]) overrides both. The source keys and
    their self-similarity are computed once in ``prepare``.
    """

    extractor: DINOExtractor
    lambda_ssim: float = 1000.0
    lambda_contra: float = 200.0
    frac_cont: float = 1.0
    tau: float = TAU
    noise_mix: bool = True
    use_prog_contrast: bool = False
    regularize_content: bool = False
    name: str = "dino_structure"

    def prepare(self, source: torch.Tensor) -> _PreparedStructure:
        return _PreparedStructure(self, source)


class _PreparedStyle:
    def __init__(self, term: "DINOStyleLoss", source: torch.Tensor) -> None:
        self.name, self.term = term.name, term
        style = term.style_image.to(device=source.device, dtype=source.dtype)
        if style.dim() == 3:
            style = style.unsqueeze(0)
        if style.shape[-2:] != source.shape[-2:]:
            style = F.interpolate(style, size=tuple(source.shape[-2:]), mode="bilinear",
                                  align_corners=False, antialias=True)
        self.style = _rows(style, source.shape[0]).detach()
        with torch.no_grad():
            self.style_cls = term.extractor(self.style).cls.detach().clone()

    def __call__(self, predicted_x0: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        t = self.term
        x_in, feats = _features(t.extractor, predicted_x0, ctx, t.noise_mix)
        b = feats.cls.shape[0]
        loss = t.lambda_trg * cls_mse(feats.cls, _rows(self.style_cls, b))
        if t.lambda_mse:
            loss = loss + t.lambda_mse * pixel_mse(x_in, _rows(self.style, b))
        return loss


@dataclass(frozen=True, eq=False)
class DINOStyleLoss:
    """Image-guided style loss: ``lambda_trg L_sty + lambda_mse MSE(x_in, x_trg)`` (§4.3, §4.7).

    ``style_image``: (1|B, 3, H, W) in [-1, 1]. Upstream loads source and style both at 256x256;
    here a style image of another size is resized to the source size in ``prepare`` (bilinear,
    antialiased) and its [CLS] is computed once from that resized image. Defaults 2000 / 3000
    are upstream's (image preset only; text mode has no style term).
    """

    extractor: DINOExtractor
    style_image: torch.Tensor
    lambda_trg: float = 2000.0
    lambda_mse: float = 3000.0
    noise_mix: bool = True
    name: str = "dino_style"

    def prepare(self, source: torch.Tensor) -> _PreparedStyle:
        return _PreparedStyle(self, source)


class _PreparedDivergence:
    def __init__(self, term: "SemanticDivergence", source: torch.Tensor) -> None:
        self.name, self.term = term.name, term
        self.source = source.detach()
        with torch.no_grad():
            self.prev_cls = term.extractor(self.source).cls.detach().clone()

    def _reference_cls(self, ctx: StepContext, batch: int) -> torch.Tensor:
        t = self.term
        prev = ctx.replay.prev_vit_input
        if prev is None and t.prev_source == "prev_x0":
            prev = ctx.prev_x0 if ctx.prev_x0 is not None else self.source
        if prev is None:
            return _rows(self.prev_cls, batch)
        with torch.no_grad():
            return _rows(t.extractor(prev.detach()).cls, batch)

    def __call__(self, predicted_x0: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        t = self.term
        _, feats = _features(t.extractor, predicted_x0, ctx, t.noise_mix)
        ref = self._reference_cls(ctx, feats.cls.shape[0])
        # upstream sets prev <- x_in after every call, gated or not (§3.5 step 10); the [CLS] of
        # this x_in is exactly what the next call's no-grad forward of prev would produce
        self.prev_cls = feats.cls.detach().clone()  # not a view pinning the whole block output
        loss = t.lambda_dir_cls * dir_cls_loss(feats.cls, ref)
        if ctx.schedule is None:  # a sampler without respaced indices: gate on the noise level instead
            level = divergence_gate_level(t.diff_iter, t.diff_steps)
            active = ctx.current_noise_level().to(feats.cls.device) > level
        else:
            index = (upstream_timestep_index(ctx.t, ctx.num_steps) if t.upstream_index_roundtrip
                     else ctx.t_index).to(feats.cls.device)
            active = index > t.diff_iter
        return torch.where(active, loss, torch.zeros_like(loss))


@functools.lru_cache(maxsize=32)
def divergence_gate_level(diff_iter: int, diff_steps: int) -> float:
    """The noise level ``sqrt(1 - abar)`` at respaced index ``diff_iter`` of upstream's linear 1000-step
    schedule respaced to ``diff_steps``: where the gate ``index > diff_iter`` sits, as a noise level a
    sampler without respaced indices can compare with (``ctx.noise_level``). Text preset: index 50 of
    100 -> 0.962; the image preset's 100 of 200 -> 0.961, the same point."""
    if diff_iter >= diff_steps:
        return float("inf")  # index > diff_iter never holds
    schedule = DiffusionSchedule.create(1000, "linear", str(diff_steps))
    return float(schedule.sqrt_one_minus_alphas_cumprod[max(diff_iter, 0)])


@dataclass(frozen=True, eq=False)
class SemanticDivergence:
    """Semantic divergence ``lambda_dir_cls L_sem`` (§4.4), active while index > ``diff_iter``.

    Gate: upstream compares the *respaced* index (recovered as ``floor(m_t T'/1000)``) with
    ``diff_iter``, not the original timestep. Default uses ``ctx.t_index`` (exact);
    ``upstream_index_roundtrip=True`` reproduces the float round trip, off by one for some
    respacings (§9.2). Defaults: lambda 100, diff_iter 50 (text preset, T' = 100); the image
    preset uses diff_iter 100 (T' = 200). Under a sampler without respaced indices (ComfyUI's
    KSampler, ``core.latent``) the gate compares the step's noise level with the level upstream's
    linear schedule has at index ``diff_iter`` of ``diff_steps`` (:func:`divergence_gate_level`): the
    same point of the diffusion, whatever the sampler, scheduler or denoise.

    Reference ("prev", §9.6): upstream diverges from the previous guidance call's ``x_in``
    (noise-mixed), the source at the first call. The prepared term tracks this itself (it keeps
    the [CLS] of its last ``x_in``), so it must be called exactly once per guided call, in order
    (resampling repeats included). ``ctx.replay.prev_vit_input`` (an image batch) overrides the
    reference; ``prev_source="prev_x0"`` uses ``ctx.prev_x0`` instead (a paper-style variant).
    """

    extractor: DINOExtractor
    lambda_dir_cls: float = 100.0
    diff_iter: int = 50
    noise_mix: bool = True
    diff_steps: int = 100
    prev_source: Literal["previous_input", "prev_x0"] = "previous_input"
    upstream_index_roundtrip: bool = False
    name: str = "semantic_divergence"

    def prepare(self, source: torch.Tensor) -> _PreparedDivergence:
        return _PreparedDivergence(self, source)
