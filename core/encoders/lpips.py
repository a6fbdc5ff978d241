"""LPIPS (Zhang et al., 2018) for Blended Diffusion's optional background-preservation loss.

The ``lpips`` package ships its linear heads but fetches the VGG16 trunk from torchvision's servers
at construction. Here the trunk is built empty and filled from a local copy of torchvision's
``vgg16-397923af.pth``, read safely, so nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..diffusion.checkpoints import read_state_dict

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
MODEL_FOLDER = "models/lpips"
# torchvision's vgg16.features indices grouped into lpips' five slices
_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


class MissingLPIPSWeightsError(FileNotFoundError):
    pass


def _vgg_to_lpips_keys(sd: dict) -> dict:
    out = {}
    for slice_no, indices in _SLICES:
        for i in indices:
            for kind in ("weight", "bias"):
                key = f"features.{i}.{kind}"
                if key in sd:
                    out[f"net.slice{slice_no}.{i}.{kind}"] = sd[key]
    return out


def load_lpips(vgg_weights: Optional[Union[str, os.PathLike]], device: Union[str, torch.device] = "cpu",
               random_trunk: bool = False) -> torch.nn.Module:
    """LPIPS-VGG (v0.1 heads from the lpips package) with the VGG16 trunk from ``vgg_weights``.

    ``random_trunk=True`` keeps a random trunk (tests, as the official fixtures do); otherwise a
    missing file raises :class:`MissingLPIPSWeightsError` naming where it goes and its URL.
    """
    import lpips

    with torch.inference_mode(False):
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if not random_trunk:
            if vgg_weights is None or not os.path.exists(vgg_weights):
                raise MissingLPIPSWeightsError(
                    f"LPIPS needs the VGG16 weights {VGG16_FILE!r} (torchvision's ImageNet VGG16), expected at "
                    f"{os.fspath(vgg_weights) if vgg_weights else MODEL_FOLDER!r}: download {VGG16_URL} into the "
                    f"pack's '{MODEL_FOLDER}' folder. (Only needed with the background-preservation loss.)")
            sd = read_state_dict(vgg_weights, "LPIPS VGG16 weights")  # safe, and a bad file is named
            mapped = _vgg_to_lpips_keys(sd)
            if len(mapped) != 26:
                raise ValueError(f"{os.fspath(vgg_weights)!r} is not a torchvision VGG16 state dict "
                                 f"(found {len(mapped)} of the 26 'features.*' tensors)")
            missing = model.load_state_dict(mapped, strict=False).missing_keys
            trunk_missing = [k for k in missing if k.startswith("net.")]
            if trunk_missing:
                raise ValueError(f"VGG16 weights incomplete: {trunk_missing[:3]}")
        model.eval().requires_grad_(False)
        return model.to(device)
