"""Workflow files as fast API prompts for the tiny models: the rules the e2e tests and the soak bench share.

A UI workflow from ``workflows/`` is converted with the server's own ``/object_info``
(:func:`e2e.ui_to_api.convert`), its LoadImage/LoadImageMask names get generated test pictures
(:func:`picture_png`; needs numpy and Pillow), and :data:`FAST_INPUTS` replace the widget values that
would need the full-size models or many steps.
"""

from __future__ import annotations

import io
import json

from .server import ComfyServer
from .ui_to_api import convert

# few steps for every GuidedSampler of a workflow: 2 resampling repeats + (10 - 1 - 5) steps
FAST_SAMPLER = {"respacing": "10", "skip_timesteps": 5, "resample_steps": 2}
MAX_SAMPLES = 2  # enough to exercise batching and ranking
# widget values replaced in every workflow so it runs with the tiny models in seconds
FAST_INPUTS = {
    "GuidedSampler": FAST_SAMPLER,
    # sample at 64 px: the tiny UNet accepts any multiple of 32, and LPIPS/crops shrink with it (the
    # published preset itself, without overrides, is covered by test_tiny_models)
    "LoadDDPM": {"overrides": "image_size=64"},
    # OpenAI's CLIP names imply full-size models; the tiny one is an open_clip folder (core.tiny_models.CLIP_FOLDER)
    "LoadCLIPGuidance": {"models": "tiny-clip-vit"},
    # latent-model workflows: the tiny SD1.5-layout checkpoint (core.tiny_sd) stands in for every checkpoint,
    # SDXL's included (ComfyUI builds SDXL's two text encoders at full size: too heavy for CI), so the SD1.5
    # TAESD decodes; 64 px pictures, 2 sampler steps, 2 latents per batch
    "CheckpointLoaderSimple": {"ckpt_name": "tiny_sd15.safetensors"},
    "ApplyGuidanceToModel": {"decoder": "taesd_decoder.safetensors"},
    "ImageScale": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
    "RepeatLatentBatch": {"amount": MAX_SAMPLES},
}


def picture_png(seed: int = 0, size: int = 64, mask: bool = False) -> bytes:
    """A small deterministic test picture (gradients + a disc) as PNG bytes. ``mask``: an RGBA picture that
    is white and transparent on the disc, black and opaque elsewhere, so LoadImage's MASK (1 - alpha) and
    LoadImageMask (any channel) are all 1 on the disc."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.06).astype(float)
    rgb = np.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], -1)
    rgb = (rgb + 0.02 * np.random.default_rng(seed).standard_normal(rgb.shape)).clip(0, 1)
    if mask:  # white disc on black, and transparent there: LoadImage's MASK and LoadImageMask agree
        rgb = np.concatenate([np.repeat(disc[..., None], 3, -1), 1 - disc[..., None]], -1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def prepared(server: ComfyServer, path: str, image_name=None, **sampler) -> dict:
    """A workflow file as a fast API prompt: test pictures under its LoadImage names (names containing
    'mask' get a transparent disc), FAST_INPUTS applied, at most MAX_SAMPLES samples, ``sampler`` values
    on top for GuidedSampler."""
    with open(path) as f:
        prompt = convert(json.load(f), server.object_info())
    for node in prompt.values():
        if node["class_type"] in ("LoadImage", "LoadImageMask"):
            name = node["inputs"]["image"]
            if image_name and "mask" not in name.lower():
                node["inputs"]["image"] = name = image_name
            server.upload_input(name, picture_png(mask="mask" in name.lower()))
        fast = dict(FAST_INPUTS.get(node["class_type"], {}))
        if node["class_type"] == "GuidedSampler":
            fast["samples"] = min(node["inputs"].get("samples", 1), MAX_SAMPLES)
            fast.update(sampler)
        for name, value in fast.items():
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):  # never replace a link
                node["inputs"][name] = value
    return prompt
