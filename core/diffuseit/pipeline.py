"""DiffuseIT (Kwon & Ye, ICLR 2023) assembled from the core pieces: presets, guidance, pipelines.

The presets equal the official README commands (spec section 5). ``diffuseit_guidance`` builds the
term tuple the official ``cond_fn`` sums; ``diffuseit_text`` / ``diffuseit_image`` run it through the
single-pass guided sampler, with the official 10 serial iterations as a batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch

from .clip_direction import CLIPDirectionalLoss
from ..diffusion.batching import sample_many
from ..diffusion.guided_loop import GuidedResult, GuidedSamplerOptions
from ..diffusion.range import RESTART_THRESHOLD, RangeLoss
from ..diffusion.schedule import DiffusionSchedule
from .dino_losses import DINOStructureLoss, DINOStyleLoss, SemanticDivergence



@dataclass(frozen=True)
class DiffuseITSettings:
    """Every knob of the official method; the two presets below are the README commands."""

    respacing: str = "100"
    skip_timesteps: int = 40
    resample_steps: int = 10
    diff_iter: int = 50
    lambda_ssim: float = 1000.0
    lambda_contra: float = 200.0
    lambda_dir_cls: float = 100.0
    lambda_clip: float = 2000.0
    lambda_trg: float = 2000.0
    lambda_mse: float = 3000.0
    lambda_range: float = 200.0
    ncuts: int = 8
    noise_mix_all: bool = True  # --use_noise_aug_all: DINO losses see x_mix too
    range_restart: bool = True
    max_restarts: int = 3
    regularize_content: bool = False
    use_prog_contrast: bool = False
    colormatch: bool = False
    sampler: str = "ddpm"
    resample_beta: str = "previous"


PRESETS = {
    # python main.py -p "Black Leopard" -s "Lion" -i input_example/lion1.jpg --use_range_restart
    #   --use_noise_aug_all --regularize_content
    "text": DiffuseITSettings(respacing="100", skip_timesteps=40, diff_iter=50, regularize_content=True),
    # python main.py -i ... -tg ... --use_range_restart --diff_iter 100 --timestep_respacing 200
    #   --skip_timesteps 80 --use_colormatch --use_noise_aug_all
    "image": DiffuseITSettings(respacing="200", skip_timesteps=80, diff_iter=100, colormatch=True),
}


def diffuseit_guidance(dino: Any, settings: DiffuseITSettings, *, clip: Optional[Sequence[Any]] = None,
                       source_text: str = "", target_text: str = "",
                       style_image: Optional[torch.Tensor] = None) -> tuple:
    """The official cond_fn's terms (spec 3.5, 4.9): structure, semantic divergence, CLIP or style, range."""
    mix = settings.noise_mix_all
    terms: list = [DINOStructureLoss(dino, settings.lambda_ssim, settings.lambda_contra, noise_mix=mix,
                                     use_prog_contrast=settings.use_prog_contrast,
                                     regularize_content=settings.regularize_content)]
    if settings.lambda_dir_cls:
        steps = DiffusionSchedule.create(1000, "linear", settings.respacing).num_timesteps
        terms.append(SemanticDivergence(dino, settings.lambda_dir_cls, diff_iter=settings.diff_iter, noise_mix=mix,
                                        diff_steps=steps))
    if clip is not None and settings.lambda_clip:
        terms.append(CLIPDirectionalLoss(clip, source_text, target_text, settings.lambda_clip, settings.ncuts))
    if style_image is not None:
        terms.append(DINOStyleLoss(dino, style_image, settings.lambda_trg, settings.lambda_mse, noise_mix=mix))
    if settings.lambda_range:
        terms.append(RangeLoss(settings.lambda_range))
    return tuple(terms)


def sampler_options(settings: DiffuseITSettings) -> GuidedSamplerOptions:
    return GuidedSamplerOptions(sampler=settings.sampler, skip_timesteps=settings.skip_timesteps,
                                resample_steps=settings.resample_steps, resample_beta=settings.resample_beta,
                                range_restart_threshold=RESTART_THRESHOLD if settings.range_restart else None,
                                max_restarts=settings.max_restarts)


def _settings(preset: str, overrides: dict) -> DiffuseITSettings:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return replace(PRESETS[preset], **overrides)


def _check_source(source: torch.Tensor, size: int) -> None:
    if source.dim() != 4 or source.shape[1] != 3:
        raise ValueError(f"source must be [B,3,H,W] in [-1,1], got {tuple(source.shape)}")
    if source.shape[-2:] != (size, size):
        raise ValueError(f"source is {tuple(source.shape[-2:])}; resize it to the model's {size}x{size} first "
                         "(core.io.resize_to_model or load_image_pil)")


def diffuseit_text(ddpm: Any, dino: Any, clip: Sequence[Any], source: torch.Tensor, source_text: str,
                   target_text: str, *, samples: int = 1, seed: int = 0, chunk_size: int = 0, preset: str = "text",
                   callback: Optional[Callable[[dict], None]] = None, **overrides: Any) -> GuidedResult:
    """Text-guided translation of ``source`` ([B,3,S,S] in [-1,1]) from ``source_text`` to ``target_text``."""
    settings = _settings(preset, overrides)
    _check_source(source, ddpm.image_size)
    terms = diffuseit_guidance(dino, settings, clip=clip, source_text=source_text, target_text=target_text)
    return sample_many(ddpm.unet, ddpm.schedule(settings.respacing), source, terms, samples_per_image=samples,
                       seed=seed, chunk_size=chunk_size, options=sampler_options(settings), callback=callback,
                       learn_sigma=ddpm.learn_sigma)


def diffuseit_image(ddpm: Any, dino: Any, source: torch.Tensor, style: torch.Tensor, *, samples: int = 1,
                    seed: int = 0, chunk_size: int = 0, preset: str = "image",
                    callback: Optional[Callable[[dict], None]] = None, **overrides: Any) -> GuidedResult:
    """Image-guided translation: the structure of ``source``, the appearance of ``style`` ([1,3,H,W])."""
    settings = _settings(preset, overrides)
    _check_source(source, ddpm.image_size)
    terms = diffuseit_guidance(dino, settings, style_image=style)
    result = sample_many(ddpm.unet, ddpm.schedule(settings.respacing), source, terms, samples_per_image=samples,
                         seed=seed, chunk_size=chunk_size, options=sampler_options(settings), callback=callback,
                         learn_sigma=ddpm.learn_sigma)
    if settings.colormatch:
        result.images = match_colors(result.images, style)
    return result


def match_colors(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Monge-Kantorovich linear colour transfer (Pitie & Kokaram 2007), as upstream's colour matcher.

    Maps each image's pixel distribution (mean, covariance) onto the reference's:
    T = S^-1/2 (S^1/2 R S^1/2)^1/2 S^-1/2 with S, R the image and reference RGB covariances.
    Works in [0, 1] and returns [-1, 1].
    """
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pix = x.reshape(3, -1).double()
        mean = pix.mean(1, keepdim=True)
        centred = pix - mean
        return mean, centred @ centred.T / pix.shape[1]

    def sqrtm(m: torch.Tensor) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh(m)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    ref01 = ((reference[0].float() + 1) / 2).clamp(0, 1)
    ref_mean, ref_cov = stats(ref01)
    out = []
    eye = torch.eye(3, dtype=torch.float64, device=images.device) * 1e-10
    for img in images:
        x01 = ((img.float() + 1) / 2).clamp(0, 1)
        mean, cov = stats(x01)
        root = sqrtm(cov + eye)
        inv_root = torch.linalg.inv(root + eye)
        transfer = inv_root @ sqrtm(root @ ref_cov.to(root.device) @ root) @ inv_root
        mapped = transfer @ (x01.reshape(3, -1).double() - mean) + ref_mean.to(mean.device)
        out.append(mapped.reshape_as(x01).clamp(0, 1).float() * 2 - 1)
    return torch.stack(out)
