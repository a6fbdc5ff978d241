"""Tiny random checkpoints in the real formats, under the real file names, for smoke and e2e tests.

``write_tiny_models(models_dir)`` fills the pack's model folders so that every loader finds the
file a workflow names and reads it through exactly the code path a published checkpoint takes --
only the widths are tiny, so a whole workflow runs in seconds on a CPU. The weights are random
(seeded, so the files are reproducible): outputs are noise, never meaningful images.

* ``guided_diffusion/256x256_diffusion_uncond.pt`` -- a ``torch.save``'d flat state dict with the
  256x256 model's key scheme and layout rules (learned sigma, scale-shift norm, resblock
  up/down, six levels, attention at downsampling 8/16/32) but ``model_channels=32`` and one
  residual block per level. Attention widths are multiples of 64, so the published file's preset
  (``image_size=256, num_head_channels=64``) applies unchanged and workflows need no overrides.
  ~2.7 M parameters, 11 MB; one 256 px step takes ~0.2 s on a laptop CPU.
* ``dino/dino_vitbase8_pretrain.pth`` -- an official-style DINO v1 backbone state dict (timm ViT
  keys, [CLS] token, qkv bias, patch 8, 224 px, 12 blocks so DiffuseIT's block-11 keys exist) with
  ``embed_dim=32``; its head count, which no shape shows, is in the sidecar
  ``dino_vitbase8_pretrain_config.json`` that ``core.encoders.dino`` reads.
* ``clip_guidance/tiny-clip-vit/`` -- an open_clip model folder (``open_clip_config.json`` with
  ``core.encoders.clip.tiny_open_clip_config()`` + ``open_clip_model.safetensors``), loadable with
  ``core.encoders.clip.load_clip(folder, pretrained=<folder>/open_clip_model.safetensors)``. OpenAI's
  file names (``ViT-B-16.pt``) imply full-size architectures, so a tiny CLIP cannot take them.
* ``lpips/vgg16-397923af.pth`` -- torchvision's VGG16 ``features.*`` keys (the only part LPIPS
  uses; no classifier). VGG16 has fixed shapes, so this one is full size (14.7 M parameters),
  stored in float16 (29 MB) and He-initialised so activations stay finite.

In memory (no files): ``tiny_preset_run(method, batch)`` builds a whole guided run of a preset
(DiffuseIT text / image, Blended Diffusion) on tiny random models -- UNet, DINO, CLIP, source image,
the preset's terms, schedule, options and background blend -- for tests of the step loop;
``preset_terms`` is the model-agnostic half the benchmarks (``bench/bench_guided.py``) share.

ComfyUI's own formats (an SD1.5 checkpoint for Load Checkpoint, TAESD encoder/decoder pairs in
``vae_approx``) are written by :mod:`core.tiny_sd`; ``write_tiny_models`` calls it.

CLI: ``python -m core.cli tiny-models DIR [--sd15]`` (or ``python -m core.tiny_models DIR``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from .diffusion.unet import UNetConfig, UNetModel

PathLike = Union[str, "os.PathLike[str]"]

DDPM_FILE = "256x256_diffusion_uncond.pt"
DINO_FILE = "dino_vitbase8_pretrain.pth"
CLIP_FOLDER = "tiny-clip-vit"
CLIP_WEIGHTS = "open_clip_model.safetensors"
LPIPS_FILE = "vgg16-397923af.pth"  # core.encoders.lpips.VGG16_FILE
TAESD_FILE = "taesd_decoder.safetensors"  # ComfyUI's vae_approx name for SD1.5's TAESD decoder
# torchvision's vgg16 "D" configuration: conv widths, "M" = max pool (each conv is followed by a ReLU)
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

# the published 256x256 layout rules with tiny widths (see the module docstring)
TINY_UNET = UNetConfig(image_size=256, model_channels=32, num_res_blocks=1, attention_ds=(8, 16, 32),
                       channel_mult=(1, 1, 2, 2, 2, 2), num_head_channels=64, use_scale_shift_norm=True,
                       resblock_updown=True, out_channels=6)
TINY_DINO = dict(patch_size=8, embed_dim=32, depth=12, num_heads=2, mlp_ratio=4.0, img_size=224)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build models under a fixed seed, with autograd-ready weights, leaving the caller's RNG alone."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        torch.manual_seed(seed)
        yield


def tiny_unet_state_dict(seed: int = 0, config: UNetConfig = TINY_UNET) -> dict[str, torch.Tensor]:
    """Random weights of a tiny guided-diffusion UNet (float32, CPU, contiguous)."""
    with _seeded(seed):
        model = UNetModel(config)
        # scale the output head down so predicted x0 stays in a sane range for a few steps
        with torch.no_grad():
            model.out[2].weight.mul_(0.1)
            model.out[2].bias.zero_()
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_tiny_ddpm(folder: PathLike, name: str = DDPM_FILE, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save(tiny_unet_state_dict(seed), path)
    return path


def tiny_dino_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights of a tiny DINO v1 ViT with the official checkpoint's keys (no head)."""
    from .encoders.dino import DINOViTConfig, build_dino_vit

    cfg = DINOViTConfig(TINY_DINO["patch_size"], TINY_DINO["embed_dim"], TINY_DINO["depth"], TINY_DINO["num_heads"],
                        TINY_DINO["mlp_ratio"], True, TINY_DINO["img_size"])
    with _seeded(seed):
        model = build_dino_vit(cfg)
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_tiny_dino(folder: PathLike, name: str = DINO_FILE, seed: int = 1) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save(tiny_dino_state_dict(seed), path)
    (folder / (name.split(".")[0] + "_config.json")).write_text(json.dumps({"num_heads": TINY_DINO["num_heads"]}))
    return path


def write_tiny_clip(folder: PathLike, name: str = CLIP_FOLDER, seed: int = 2) -> Path:
    """An open_clip model folder with a tiny ViT CLIP; returns the weights file."""
    from safetensors.torch import save_file

    from .encoders.clip import tiny_open_clip_config

    target = Path(folder) / name
    target.mkdir(parents=True, exist_ok=True)
    model_cfg = tiny_open_clip_config("vit", image_size=32, embed_dim=16)
    (target / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}, indent=1))
    import open_clip

    with _seeded(seed):
        model = open_clip.CLIP(**model_cfg)
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = target / CLIP_WEIGHTS
    save_file(sd, str(path))
    return path


def vgg16_features_state_dict(seed: int = 3, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random ``features.<i>.weight/bias`` of torchvision's VGG16 (He init), the keys LPIPS reads."""
    gen = torch.Generator().manual_seed(seed)
    sd, index, channels = {}, 0, 3
    for width in _VGG16:
        if width == "M":
            index += 1
            continue
        std = (2.0 / (channels * 9)) ** 0.5
        sd[f"features.{index}.weight"] = (torch.randn(width, channels, 3, 3, generator=gen) * std).to(dtype)
        sd[f"features.{index}.bias"] = torch.zeros(width, dtype=dtype)
        channels, index = width, index + 2  # conv, relu
    return sd


def write_tiny_lpips(folder: PathLike, name: str = LPIPS_FILE, seed: int = 3) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save(vgg16_features_state_dict(seed), path)
    return path


def write_tiny_taesd(folder: PathLike, name: str = TAESD_FILE, seed: int = 4, latent_channels: int = 4) -> Path:
    """A TAESD decoder at its real size (1.2 M parameters, fp16) with random weights, under ComfyUI's
    ``vae_approx`` key layout (``1.weight``, ``3.conv.0.weight``, ...)."""
    from safetensors.torch import save_file

    from .encoders.taesd import taesd_decoder_module

    with _seeded(seed):
        module = taesd_decoder_module(latent_channels)
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def write_tiny_models(models_dir: PathLike, *, dino: bool = True, clip: bool = True,
                      lpips: bool = True, taesd: bool = True, sd15: bool = False, seed: int = 0) -> dict[str, Path]:
    """Write tiny checkpoints into ``models_dir/<folder>/``; returns {folder: written file}.

    ``models_dir`` is a ComfyUI models directory (or the ``base_path`` of an extra_model_paths.yaml
    entry). DINO and CLIP need timm / open_clip; pass ``dino=False`` / ``clip=False`` /
    ``lpips=False`` to skip a folder. ``vae_approx`` gets TAESD encoder + decoder pairs of all four
    families (``core.tiny_sd.write_tiny_vae_approx``; the returned path is ``taesd_decoder``).
    ``sd15=True`` also writes ``checkpoints/tiny_sd15.safetensors`` (465 MB, so opt-in; seeded by
    ``seed``; see ``core.tiny_sd``).
    """
    if sd15 and (not isinstance(seed, int) or seed < 0):  # before anything is written
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = Path(models_dir)
    written = {"guided_diffusion": write_tiny_ddpm(root / "guided_diffusion")}
    if dino:
        written["dino"] = write_tiny_dino(root / "dino")
    if clip:
        written["clip_guidance"] = write_tiny_clip(root / "clip_guidance")
    if lpips:
        written["lpips"] = write_tiny_lpips(root / "lpips")
    if taesd:
        from .tiny_sd import write_tiny_vae_approx

        written["vae_approx"] = write_tiny_vae_approx(root / "vae_approx")[0]
    if sd15:
        from .tiny_sd import SD15_FOLDER, write_tiny_sd15

        written[SD15_FOLDER] = write_tiny_sd15(root / SD15_FOLDER, seed=seed)
    return written


# ------------------------------------------------------------------ whole preset runs, in memory

PRESET_METHODS = ("diffuseit-text", "diffuseit-image", "blended")
SOURCE_TEXT, TARGET_TEXT, BLEND_PROMPT = "Lion", "Black Leopard", "a red ball"
TINY_IMAGE_SIZE = 64  # image side of tiny preset runs (the UNet is convolutional)


def smooth_image(seed: int, size: int = 256) -> torch.Tensor:
    """A smooth random [-1, 1] image (1, 3, size, size), from its own generator."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 16, 16, generator=g)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


def tiny_clip(vision: str = "vit", device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
    """A random tiny open_clip model in a ``ClipModel`` (uses the global RNG: seed around it)."""
    import open_clip

    from .encoders.clip import ClipModel, tiny_open_clip_config

    cfg = tiny_open_clip_config(vision, image_size=32, embed_dim=16)
    module = open_clip.CLIP(**cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ClipModel(module, 32, name=f"tiny-{vision}")


def tiny_dino_vit():
    """A random tiny DINO ViT (``TINY_DINO``; uses the global RNG: seed around it)."""
    from .encoders.dino import DINOViTConfig, build_dino_vit

    return build_dino_vit(DINOViTConfig(TINY_DINO["patch_size"], TINY_DINO["embed_dim"], TINY_DINO["depth"],
                                        TINY_DINO["num_heads"], TINY_DINO["mlp_ratio"], True, TINY_DINO["img_size"]))


@dataclass
class PresetRun:
    """Everything ``core.diffusion.guided_loop.guided_sample`` needs for one preset, plus the models it holds."""

    method: str
    ddpm: Any
    schedule: Any
    options: Any  # GuidedSamplerOptions
    source: torch.Tensor  # (batch, 3, size, size)
    terms: tuple
    blend: Any  # BackgroundBlend or None
    diff_iter: Optional[int]

    def to(self, device: Union[str, torch.device]) -> "PresetRun":
        """Move every model, the source and the blend mask to ``device`` (e.g. ``meta``); returns self."""
        from .encoders.clip import ClipModel

        self.ddpm.unet.to(device)
        for term in self.terms:
            for value in vars(term).values():
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(item, ClipModel):
                        item.module.to(device)
                    elif isinstance(item, torch.nn.Module):
                        item.to(device)
        self.source = self.source.to(device)
        if self.blend is not None:
            self.blend = replace(self.blend, mask=self.blend.mask.to(device))
        return self


def preset_terms(method: str, ddpm: Any, source: torch.Tensor, *, dino: Any = None, clip: Sequence[Any] = (),
                 ncuts: int = 8, seed: int = 0, resample_steps: int = 1) -> PresetRun:
    """A preset's guided run on given models: DiffuseIT text (``clip`` = the ensemble, texts
    ``SOURCE_TEXT`` -> ``TARGET_TEXT``) / image (style image ``smooth_image(seed + 1)``), or Blended
    Diffusion (``clip[0]``, ``BLEND_PROMPT``, the centre square edited, respacing 100, skip 25).
    DiffuseIT's range restart is off and its resampling repeats are ``resample_steps``."""
    from .blended import BackgroundBlend
    from .blended.losses import blended_guidance
    from .diffuseit.pipeline import PRESETS, diffuseit_guidance, sampler_options
    from .diffusion.guided_loop import GuidedSamplerOptions

    if method not in PRESET_METHODS:
        raise ValueError(f"method must be one of {PRESET_METHODS}, got {method!r}")
    size, device = source.shape[-1], source.device
    blend, diff_iter = None, None
    if method.startswith("diffuseit"):
        preset = "text" if method == "diffuseit-text" else "image"
        settings = replace(PRESETS[preset], ncuts=ncuts)
        diff_iter = settings.diff_iter
        if preset == "text":
            terms = diffuseit_guidance(dino, settings, clip=list(clip), source_text=SOURCE_TEXT, target_text=TARGET_TEXT)
        else:
            terms = diffuseit_guidance(dino, settings, style_image=smooth_image(seed + 1, size).to(device))
        schedule = ddpm.schedule(settings.respacing)
        options = replace(sampler_options(settings), resample_steps=max(resample_steps, 1), range_restart_threshold=None)
    else:
        mask = torch.zeros(1, 1, size, size, device=device)
        mask[..., size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
        terms = blended_guidance(clip[0], BLEND_PROMPT, None, n_cuts=ncuts)
        blend = BackgroundBlend(mask)
        schedule = ddpm.schedule("100")
        options = GuidedSamplerOptions(skip_timesteps=25)
    return PresetRun(method, ddpm, schedule, options, source, terms, blend, diff_iter)


def tiny_preset_run(method: str, batch: int = 1, *, ncuts: int = 2, seed: int = 0, resample_steps: int = 1,
                    device: Union[str, torch.device] = "cpu") -> PresetRun:
    """:func:`preset_terms` on tiny random models (UNet seed 0, DINO seed 1, CLIP seeds 100, 101, ...;
    DiffuseIT text gets a 5-model tiny ensemble like upstream's RN50, RN50x4, ViT-B-32, RN50x16,
    ViT-B-16) and a ``TINY_IMAGE_SIZE`` source, built on the CPU and moved to ``device``."""
    from .diffusion.checkpoints import load_ddpm
    from .encoders.dino import DINOExtractor

    ddpm = load_ddpm(tiny_unet_state_dict(0), device="cpu", image_size=256, num_head_channels=64)
    source = smooth_image(seed, TINY_IMAGE_SIZE).repeat(batch, 1, 1, 1)
    dino, clip = None, []
    if method.startswith("diffuseit"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            dino = DINOExtractor(tiny_dino_vit().eval().requires_grad_(False))
    if method != "diffuseit-image":
        visions = ("resnet", "resnet", "vit", "resnet", "vit") if method == "diffuseit-text" else ("vit",)
        for i, vision in enumerate(visions):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(100 + i)
                clip.append(tiny_clip(vision))
    run = preset_terms(method, ddpm, source, dino=dino, clip=clip, ncuts=ncuts, seed=seed,
                       resample_steps=resample_steps)
    return run.to(device) if torch.device(device).type != "cpu" else run


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        print("usage: python -m core.tiny_models MODELS_DIR", file=sys.stderr)
        sys.exit(2)
    for folder, path in write_tiny_models(sys.argv[1]).items():
        print(f"{folder}: {path}")
