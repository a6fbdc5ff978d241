"""TAESD decoders (madebyollin/taesd) as differentiable latent -> RGB maps for x0 guidance.

Guiding a latent model with pixel-space losses needs the decoded image *and* its gradient every
guided step. The SD VAE decoder costs ~18x TAESD's forward+backward at 512 px (FLOP counts in the
project's notes); TAESD is the affordable choice, the full VAE the faithful one. ComfyUI keeps the
files in ``models/vae_approx`` (``taesd_decoder``, ``taesdxl_decoder``, ``taesd3_decoder``,
``taef1_decoder``, ``.safetensors`` or ``.pth``); their keys are the indices of a plain
``nn.Sequential`` (``1.weight``, ``3.conv.0.weight``, ...), which the modules below reproduce, so
the published files load with ``strict=True`` (checked against ComfyUI v0.3.75's layout in the tests).

Input: the *model-space* latent the sampler works with (ComfyUI's ``process_latent_in`` applied,
i.e. ``(raw - shift) * scale``), which is what the TAESD decoder was trained on; output: RGB in
[-1, 1] (not clamped, so the range loss still sees overshoot).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from ..diffusion.checkpoints import read_state_dict

MODEL_FOLDER = "models/vae_approx"
TAESD_URL = "https://github.com/madebyollin/taesd/raw/main/{name}.pth"


@dataclass(frozen=True)
class LatentFormat:
    """How a model family's latents relate to its VAE: ``model = (raw - shift) * scale``."""

    name: str
    channels: int
    scale: float
    shift: float
    taesd_decoder: str


LATENT_FORMATS = {
    "SD15": LatentFormat("SD15", 4, 0.18215, 0.0, "taesd_decoder"),
    "SDXL": LatentFormat("SDXL", 4, 0.13025, 0.0, "taesdxl_decoder"),
    "SD3": LatentFormat("SD3", 16, 1.5305, 0.0609, "taesd3_decoder"),
    "Flux": LatentFormat("Flux", 16, 0.3611, 0.1159, "taef1_decoder"),
}


class TAESDCheckpointError(ValueError):
    """A file that is not a TAESD decoder."""


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _SoftClamp(nn.Module):
    """Squashes latents into (-3, 3) smoothly, as TAESD's decoder does first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    """Three 3x3 convs with ReLUs, a residual (1x1 when widths differ) and a ReLU after the sum."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_decoder_module(latent_channels: int = 4, width: int = 64) -> nn.Sequential:
    """The decoder as a Sequential whose indices are the published files' keys: soft clamp, a conv in,
    three stages of (3 blocks, 2x upsample, conv), a last block and a conv to RGB in [0, 1]."""
    layers: list[nn.Module] = [_SoftClamp(), _conv(latent_channels, width), nn.ReLU()]
    for _ in range(3):
        layers += [_Block(width, width), _Block(width, width), _Block(width, width), nn.Upsample(scale_factor=2),
                   _conv(width, width, bias=False)]
    layers += [_Block(width, width), _conv(width, 3)]
    return nn.Sequential(*layers)


def taesd_encoder_module(latent_channels: int = 4, width: int = 64) -> nn.Sequential:
    """The encoder as a Sequential whose indices are the published ``*_encoder`` files' keys: a conv in
    and a block, three stages of (a stride-2 conv, 3 blocks), a conv to the latent channels. Written by
    ``core.tiny_sd`` (ComfyUI's TAESD loader needs an encoder beside each decoder); guidance itself only
    decodes."""
    layers: list[nn.Module] = [_conv(3, width), _Block(width, width)]
    for _ in range(3):
        layers += [_conv(width, width, stride=2, bias=False), _Block(width, width), _Block(width, width),
                   _Block(width, width)]
    layers.append(_conv(width, latent_channels))
    return nn.Sequential(*layers)


class TAESDDecoder(nn.Module):
    """Model-space latent ``[B, C, h, w]`` -> RGB ``[B, 3, 8h, 8w]`` in [-1, 1], differentiable."""

    def __init__(self, latent_channels: int = 4, width: int = 64) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.decoder = taesd_decoder_module(latent_channels, width)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.dim() != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"this TAESD decoder takes {self.latent_channels}-channel latents [B, "
                             f"{self.latent_channels}, h, w], got shape {tuple(latent.shape)}: the decoder does not "
                             "match the model's latent format (e.g. an SD1.5/SDXL TAESD on an SD3/Flux model, or the "
                             "reverse); use the decoder of the model's family")
        return self.decoder(latent) * 2 - 1


def load_taesd_decoder(source: Union[str, os.PathLike, dict], device: Union[str, torch.device] = "cpu",
                       dtype: torch.dtype = torch.float32) -> TAESDDecoder:
    """A TAESD decoder from a ``.safetensors`` / ``.pth`` file (read safely) or a state dict.

    The latent channel count is read off the first conv; any other layout (an encoder file, a VAE,
    a UNet) is refused with the keys that were expected. The module is built and loaded outside
    inference mode so its weights can take part in a backward pass under ComfyUI.
    """
    where = os.fspath(source) if not isinstance(source, dict) else "<state dict>"
    if not isinstance(source, dict) and not os.path.isfile(where):
        name = os.path.splitext(os.path.basename(where))[0]
        raise FileNotFoundError(f"TAESD decoder not found: {where!r}. Put it in ComfyUI's '{MODEL_FOLDER}' folder; "
                                f"the published files are at {TAESD_URL.format(name=name or 'taesd_decoder')} "
                                "(taesd_decoder for SD1.5, taesdxl_decoder for SDXL, taesd3_decoder, taef1_decoder).")
    sd = read_state_dict(source) if not isinstance(source, dict) else dict(source)
    first = sd.get("1.weight")
    if first is None or first.dim() != 4 or "3.conv.0.weight" not in sd:
        hint = " (this looks like a TAESD *encoder*: use the *_decoder file)" if "0.weight" in sd else ""
        raise TAESDCheckpointError(
            f"{where} is not a TAESD decoder{hint}: expected keys '1.weight', '3.conv.0.weight', ... (a decoder file "
            f"such as taesd_decoder.safetensors from {TAESD_URL.format(name='taesd_decoder')}, in '{MODEL_FOLDER}'); "
            f"found {', '.join(list(sd)[:4])}{', ...' if len(sd) > 4 else ''}")
    with torch.inference_mode(False):
        module = TAESDDecoder(latent_channels=int(first.shape[1]), width=int(first.shape[0]))
        missing, unexpected = module.decoder.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise TAESDCheckpointError(f"{where} does not have TAESD's decoder layout: missing {missing[:4]}, "
                                       f"unexpected {unexpected[:4]}")
        return module.to(device=device, dtype=dtype).eval().requires_grad_(False)
