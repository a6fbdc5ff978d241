"""Load guided-diffusion checkpoints: safe reading, layout inference, presets, clear errors.

The UNet's architecture is read off the state dict (widths, levels, residual blocks, attention
placement, class embedding, learned sigma, scale-shift norm, resblock up/down). Three facts leave
no trace in the shapes -- heads vs head width, legacy vs new attention order, the noise schedule --
and come from presets for the published files (matched by file name, then by architecture).

Overrides are guided-diffusion's command-line flags and mean what they mean there: each flag
passed wins; a flag not passed comes from the file's preset, else from upstream's
``model_and_diffusion_defaults()``. The head layout is one unit: passing any of ``num_heads``,
``num_head_channels``, ``num_heads_upsample`` builds exactly what ``create_model`` builds from those
flags and upstream's defaults for the others (so ``num_heads=4`` alone means 4 heads, because
upstream's ``num_head_channels`` defaults to -1), never a mix with a preset's head width. A file
with neither a preset nor a head flag is assumed to use ``num_head_channels=64`` and a log line
says so (see ``ASSUMED_HEAD_LAYOUT``).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch

from ..weights_file import check_weights_file
from .schedule import DiffusionSchedule, Spacing
from .unet import UNetConfig, UNetModel

logger = logging.getLogger(__name__)

MODEL_FOLDER = "models/guided_diffusion"
BASE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"

# file name -> (what it is, the flags shapes can't tell). Sizes are of the float32 files.
PRESETS: dict[str, dict[str, Any]] = {
    "256x256_diffusion_uncond.pt": dict(about="ImageNet 256x256 unconditional (DiffuseIT, Blended Diffusion)",
                                        size="2.2 GB", image_size=256, num_head_channels=64),
    "256x256_diffusion.pt": dict(about="ImageNet 256x256 class-conditional", size="2.2 GB",
                                 image_size=256, num_head_channels=64),
    "512x512_diffusion.pt": dict(about="ImageNet 512x512 class-conditional", size="2.2 GB",
                                 image_size=512, num_head_channels=64),
    "128x128_diffusion.pt": dict(about="ImageNet 128x128 class-conditional", size="1.7 GB",
                                 image_size=128, num_heads=4, num_head_channels=-1),
    "64x64_diffusion.pt": dict(about="ImageNet 64x64 class-conditional", size="1.2 GB", image_size=64,
                               num_head_channels=64, noise_schedule="cosine", use_new_attention_order=True),
    "lsun_bedroom.pt": dict(about="LSUN bedroom 256x256", size="2.2 GB", image_size=256, num_head_channels=64),
    "lsun_cat.pt": dict(about="LSUN cat 256x256", size="2.2 GB", image_size=256, num_head_channels=64),
    "lsun_horse.pt": dict(about="LSUN horse 256x256", size="2.2 GB", image_size=256, num_head_channels=64),
    "lsun_horse_nodropout.pt": dict(about="LSUN horse 256x256, trained without dropout", size="2.2 GB",
                                    image_size=256, num_head_channels=64),
    "ffhq_10m.pt": dict(about="FFHQ 256x256 (DiffuseIT's face model, P2-weighting release)", size="0.5 GB",
                        image_size=256, num_head_channels=64, url=None),
}
# upstream's default channel_mult per image size; used to guess the size of an unknown file
_SIZE_BY_MULT = {(0.5, 1, 1, 2, 2, 4, 4): 512, (1, 1, 2, 2, 4, 4): 256, (1, 1, 2, 3, 4): 128, (1, 2, 3, 4): 64}
# a renamed published file, recognised by (model_channels, channel_mult, num_res_blocks, attention_ds)
_PUBLISHED_ARCHITECTURES = {
    (192, (1, 2, 3, 4), 3, (2, 4, 8)): "64x64_diffusion.pt",
    (256, (1, 1, 2, 3, 4), 2, (4, 8, 16)): "128x128_diffusion.pt",
    (256, (1, 1, 2, 2, 4, 4), 2, (8, 16, 32)): "256x256_diffusion_uncond.pt",  # also 256x256_diffusion, LSUN
    (256, (0.5, 1, 1, 2, 2, 4, 4), 2, (16, 32, 64)): "512x512_diffusion.pt",
}
_FLAG_NAMES = {"image_size", "num_heads", "num_head_channels", "num_heads_upsample", "use_new_attention_order",
               "noise_schedule", "diffusion_steps", "learn_sigma", "class_cond"}
HEAD_FLAGS = ("num_heads", "num_head_channels", "num_heads_upsample")
# guided-diffusion's model_and_diffusion_defaults() for the flags the shapes cannot tell
UPSTREAM_DEFAULTS: dict[str, Any] = dict(num_heads=4, num_head_channels=-1, num_heads_upsample=-1,
                                         use_new_attention_order=False, noise_schedule="linear", diffusion_steps=1000)
# The head layout of a file with no preset and no head flag. Every published 64/256/512 px model and
# LSUN model, and the community models fine-tuned from them (the files these methods run on), use
# 64-channel heads; only the 128 px model uses upstream's default of 4 heads. Assuming upstream's
# default instead would silently miscompute a renamed or fine-tuned 256 px file.
ASSUMED_HEAD_LAYOUT: dict[str, Any] = dict(num_head_channels=64)
_HOW_TO_OVERRIDE = ("pass the flags the model was trained with, as guided-diffusion names them: num_heads=N "
                    "(upstream's default layout: num_heads=4, num_head_channels=-1) or num_head_channels=N -- in "
                    "the LoadDDPM node's overrides box, with --overrides on the command line, or as "
                    "load_ddpm(path, num_heads=4)")


class CheckpointError(ValueError):
    """A file that exists but is not a usable guided-diffusion UNet checkpoint."""


class MissingWeightsError(FileNotFoundError):
    """The checkpoint file is not where it was looked for."""


def download_url(file_name: str) -> Optional[str]:
    preset = PRESETS.get(file_name)
    if preset is None:
        return None
    return preset.get("url", BASE_URL + file_name)


def _missing_message(path: str) -> str:
    name = os.path.basename(path)
    url = download_url(name)
    where = (f"DDPM checkpoint not found: {path!r}. Put guided-diffusion checkpoints in ComfyUI's "
             f"'{MODEL_FOLDER}' folder (or pass a full path). ")
    if url:
        return where + f"{name!r} can be downloaded from {url} (or run: python -m core.cli download {name})."
    return where + ("DiffuseIT and Blended Diffusion use 256x256_diffusion_uncond.pt from "
                    f"{BASE_URL}256x256_diffusion_uncond.pt (python -m core.cli download 256x256_diffusion_uncond.pt).")


def read_state_dict(path: Union[str, os.PathLike], what: str = "DDPM checkpoint") -> dict[str, torch.Tensor]:
    """Read a flat tensor dict from .safetensors or a torch file, never executing pickled code.

    The reader follows the file's content, not its extension; a directory, an empty file or a text
    file (an HTML page, a Git LFS pointer) is refused by name before any reading.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingWeightsError(_missing_message(path))
    kind = check_weights_file(path, what, CheckpointError)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path!r} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:  # a real pickle that names Python objects: the safe loader refuses them
            raise CheckpointError(
                f"refused to load {path!r}: it contains pickled Python objects other than tensors ({found.group(1)}), "
                "which could run arbitrary code. Only plain state dicts (or .safetensors) are loaded.") from None
        raise CheckpointError(f"{path!r} could not be read: the file is truncated or corrupt "
                              f"(re-download it). Details: {_first_line(exc)}") from None
    except Exception as exc:  # truncated zips and pickles fail in many ways (EOFError, KeyError, RuntimeError ...)
        raise CheckpointError(f"{path!r} could not be read: the file is truncated or corrupt "
                              f"(re-download it). Details: {_first_line(exc)}") from None
    return unwrap_state_dict(loaded, path)


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type when it has none."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def unwrap_state_dict(loaded: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Accept a flat dict or the usual wrappers ({'state_dict': ...}, {'model': ...}, DDP 'module.')."""
    for key in ("ema", "state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not loaded:
        raise CheckpointError(f"{where} does not hold a state dict (found {type(loaded).__name__})")
    sd = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _describe_foreign(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    keys = list(sd)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return ("a Stable Diffusion / latent-diffusion checkpoint (keys 'model.diffusion_model.*'); load it with "
                "ComfyUI's Load Checkpoint node. This loader needs a pixel-space guided-diffusion UNet such as "
                "256x256_diffusion_uncond.pt")
    if any(k.startswith(("conv_in.", "down_blocks.", "up_blocks.")) for k in keys):
        return "a diffusers UNet (keys 'down_blocks.*'); it is not a guided-diffusion checkpoint"
    if any(k.startswith(("blocks.", "cls_token", "visual.", "transformer.", "token_embedding")) for k in keys):
        return "a ViT / CLIP / DINO model (keys like 'blocks.*' or 'visual.*'), not a diffusion UNet"
    if "time_embed.0.weight" in sd and "input_blocks.0.0.weight" in sd and "out.2.weight" not in sd:
        return "a guided-diffusion noisy-image classifier (EncoderUNetModel), not a diffusion UNet"
    if "time_embed.0.weight" not in sd or "input_blocks.0.0.weight" not in sd:
        return f"not a guided-diffusion UNet (first keys: {', '.join(keys[:4])})"
    return None


def infer_unet_config(sd: Mapping[str, torch.Tensor], **flags: Any) -> UNetConfig:
    """Read the architecture off a guided-diffusion state dict; ``flags`` fill in what shapes can't tell.

    Flags not given take upstream's defaults (``UPSTREAM_DEFAULTS``); presets and the assumed head
    layout of unknown files are applied by ``load_ddpm``, not here.
    """
    flags = {**UPSTREAM_DEFAULTS, **flags}
    model_channels = sd["time_embed.0.weight"].shape[1]
    in_channels = sd["input_blocks.0.0.weight"].shape[1]
    out_channels = sd["out.2.weight"].shape[0]
    n_out = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("output_blocks."))

    def children(prefix: str) -> set[str]:
        return {k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)}

    def is_upsampler(block: int) -> bool:
        # a third child (or a second one that is not attention) carries the upsampling
        return any(c != "0" and f"output_blocks.{block}.{c}.qkv.weight" not in sd
                   for c in children(f"output_blocks.{block}."))

    num_res_blocks = next((i for i in range(n_out) if is_upsampler(i)), n_out - 1)
    levels = n_out // (num_res_blocks + 1)
    mult, attention_ds = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        width = sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]
        mult.append(width / model_channels if width % model_channels else width // model_channels)
        if f"input_blocks.{first}.1.qkv.weight" in sd:
            attention_ds.append(2 ** level)
    first_res = "input_blocks.1.0"
    scale_shift = sd[f"{first_res}.emb_layers.1.weight"].shape[0] == 2 * sd[f"{first_res}.out_layers.3.weight"].shape[0]
    updown = levels > 1 and f"input_blocks.{num_res_blocks + 1}.0.in_layers.0.weight" in sd
    label = sd.get("label_emb.weight")
    channel_mult = tuple(mult)
    image_size = flags.get("image_size") or _SIZE_BY_MULT.get(channel_mult) or 32 * min(attention_ds or [1])
    return UNetConfig(
        image_size=int(image_size), in_channels=in_channels, model_channels=model_channels,
        out_channels=out_channels, num_res_blocks=num_res_blocks, attention_ds=tuple(attention_ds),
        channel_mult=channel_mult, num_classes=None if label is None else label.shape[0],
        num_heads=int(flags["num_heads"]), num_head_channels=int(flags["num_head_channels"]),
        num_heads_upsample=int(flags["num_heads_upsample"]), use_scale_shift_norm=scale_shift,
        resblock_updown=updown, use_new_attention_order=bool(flags["use_new_attention_order"]),
    )


def _preset_for(name: Optional[str], cfg: UNetConfig) -> Optional[str]:
    """The PRESETS entry for a file: by its name, else by the architecture of a published file."""
    if name and name in PRESETS:
        return name
    key = (cfg.model_channels, tuple(cfg.channel_mult), cfg.num_res_blocks, tuple(sorted(cfg.attention_ds)))
    match = _PUBLISHED_ARCHITECTURES.get(key)
    if match == "256x256_diffusion_uncond.pt" and cfg.num_classes is not None:
        match = "256x256_diffusion.pt"
    return match


def resolve_flags(preset: Optional[str], overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flags a file is built with, and the head layout that had to be assumed ({} if none).

    An override wins; a flag not overridden comes from the preset, else upstream's default. The head
    layout is taken whole from the first of: the overrides (with upstream's defaults for the head
    flags not passed, as ``create_model`` would), the preset, ``ASSUMED_HEAD_LAYOUT``.
    """
    recorded = {k: v for k, v in PRESETS.get(preset or "", {}).items() if k in _FLAG_NAMES}
    flags = {**UPSTREAM_DEFAULTS, **{k: v for k, v in recorded.items() if k not in HEAD_FLAGS}}
    assumed: dict[str, Any] = {}
    if any(k in overrides for k in HEAD_FLAGS):
        pass  # the user's head flags on upstream's defaults
    elif any(k in recorded for k in HEAD_FLAGS):
        flags.update({k: v for k, v in recorded.items() if k in HEAD_FLAGS})
    else:
        assumed = dict(ASSUMED_HEAD_LAYOUT)
        flags.update(assumed)
    flags.update(overrides)
    return flags, assumed


def _check_heads(sd: Mapping[str, torch.Tensor], flags: Mapping[str, Any], origin: Callable[[str], str],
                 where: str) -> None:
    """Every attention layer's channels must split into whole heads, as upstream's AttentionBlock asserts."""
    try:
        nhc, heads, heads_up = (int(flags[k]) for k in ("num_head_channels", "num_heads", "num_heads_upsample"))
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: {', '.join(f'{k}={flags[k]!r}' for k in HEAD_FLAGS)}: head flags must be "
                              "whole numbers") from None
    for key, weight in sd.items():
        if not key.endswith(".qkv.weight"):
            continue
        layer, channels = key[: -len(".qkv.weight")], weight.shape[1]
        if nhc != -1:
            name, value = "num_head_channels", nhc
        elif layer.startswith("output_blocks.") and heads_up != -1:
            name, value = "num_heads_upsample", heads_up
        else:
            name, value = "num_heads", heads
        if value <= 0 or channels % value:
            what = "head width" if name == "num_head_channels" else "head count"
            raise CheckpointError(
                f"{where}: {name}={value} ({origin(name)}) is not a possible {what}: attention layer {layer} has {channels} "
                f"channels, which must split into whole heads (num_head_channels must divide the channels; "
                f"with num_head_channels=-1, num_heads and num_heads_upsample must divide them). To fix it, "
                + _HOW_TO_OVERRIDE + ".")


def _check_shape_flags(cfg: UNetConfig, overrides: Mapping[str, Any], where: str) -> None:
    """learn_sigma and class_cond are visible in the shapes; an override may only agree with them."""
    seen = {"learn_sigma": cfg.out_channels == 2 * cfg.in_channels, "class_cond": cfg.num_classes is not None}
    shown = {"learn_sigma": f"{cfg.out_channels} output channels",
             "class_cond": "a class embedding" if cfg.num_classes is not None else "no class embedding"}
    for flag, value in seen.items():
        if flag in overrides and bool(overrides[flag]) != value:
            raise CheckpointError(f"{where}: {flag}={overrides[flag]} contradicts the file, which has {shown[flag]} "
                                  f"({flag}={value}); leave {flag} out, the shapes tell it")


def _check_value_flags(cfg: UNetConfig, overrides: Mapping[str, Any], where: str) -> None:
    """Overrides whose values cannot work are refused before the model is built, naming the accepted values."""
    stride = 2 ** (len(cfg.channel_mult) - 1)  # the UNet halves the image once per level after the first
    if "image_size" in overrides:
        size = overrides["image_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % stride:
            raise CheckpointError(f"{where}: image_size={size!r} is not possible for this UNet: it has "
                                  f"{len(cfg.channel_mult)} levels, so image_size must be a positive multiple of "
                                  f"{stride} (e.g. {max(stride, cfg.image_size - cfg.image_size % stride)})")
    if "diffusion_steps" in overrides:
        steps = overrides["diffusion_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise CheckpointError(f"{where}: diffusion_steps={steps!r} must be a whole number >= 2 (the published "
                                  "models use 1000, guided-diffusion's default)")
    if "noise_schedule" in overrides and overrides["noise_schedule"] not in ("linear", "cosine"):
        raise CheckpointError(f"{where}: noise_schedule={overrides['noise_schedule']!r} must be 'linear' or 'cosine'")
    for flag in ("use_new_attention_order", "learn_sigma", "class_cond"):
        if flag in overrides and not isinstance(overrides[flag], bool):
            raise CheckpointError(f"{where}: {flag}={overrides[flag]!r} must be True or False")


@dataclass
class DDPM:
    """A loaded pixel-space DDPM: the UNet plus the diffusion facts needed to sample from it."""

    unet: UNetModel
    config: UNetConfig
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    learn_sigma: bool = True
    source: str = "<state dict>"
    flags: dict = field(default_factory=dict)  # the resolved guided-diffusion flags the model was built with
    preset: Optional[str] = None  # the PRESETS entry that supplied flags (by file name or architecture)
    assumed: dict = field(default_factory=dict)  # head layout assumed for lack of a preset or flag ({} if none)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def size_multiple(self) -> int:
        """Image sides the UNet takes are multiples of this (2 ** (levels - 1); 32 for the 256 px models)."""
        return self.config.size_multiple

    @property
    def class_cond(self) -> bool:
        return self.config.num_classes is not None

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.body_dtype

    def schedule(self, timestep_respacing: Spacing = None) -> DiffusionSchedule:
        return DiffusionSchedule.create(self.diffusion_steps, self.noise_schedule, timestep_respacing)

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "DDPM":
        with torch.inference_mode(False):
            if device is not None:
                self.unet.to(device)
            if dtype is not None:
                self.unet.convert_body(dtype)
        return self


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_ddpm(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]], *, dtype: Union[str, torch.dtype] = "fp32",
              device: Union[str, torch.device] = "cpu", **overrides: Any) -> DDPM:
    """Load a guided-diffusion UNet from a path (.pt/.pth/.safetensors) or a state dict.

    ``overrides`` are guided-diffusion's flags with their meaning there (see the module docstring):
    image_size, num_heads, num_head_channels, num_heads_upsample, use_new_attention_order,
    noise_schedule, diffusion_steps, and learn_sigma / class_cond (checked against the shapes).
    ``load_ddpm(path, num_heads=4)`` builds what ``create_model(num_heads=4)`` builds. The model is built
    on the meta device and the file's tensors are assigned into it, so nothing is allocated twice;
    a state dict of meta tensors therefore checks a layout without any memory.
    """
    unknown = set(overrides) - _FLAG_NAMES
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; expected guided-diffusion flags {sorted(_FLAG_NAMES)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of fp32, fp16, bf16; got {dtype!r}")
        dtype = DTYPES[dtype]
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; guidance needs grads later
        if isinstance(source, Mapping):
            sd, name, where = unwrap_state_dict(source), None, "<state dict>"
        else:
            where = os.fspath(source)
            sd, name = read_state_dict(where), os.path.basename(where)
        foreign = _describe_foreign(sd)
        if foreign:
            raise CheckpointError(f"{where} is {foreign}.")
        try:
            cfg = infer_unet_config(sd)
        except (KeyError, IndexError, StopIteration, ValueError) as exc:
            raise CheckpointError(f"{where}: the guided-diffusion UNet layout could not be read ({exc!r}); "
                                  "the file may be truncated or from another code base") from None
        if cfg.in_channels != 3 or cfg.out_channels not in (3, 6):
            raise CheckpointError(f"{where} has {cfg.in_channels} input / {cfg.out_channels} output channels: "
                                  "super-resolution upsamplers and other variants are not supported; use a "
                                  "3-channel generator such as 256x256_diffusion_uncond.pt")
        _check_shape_flags(cfg, overrides, where)
        _check_value_flags(cfg, overrides, where)
        preset = _preset_for(name, cfg)
        flags, assumed = resolve_flags(preset, overrides)

        def origin(flag: str) -> str:
            if flag in overrides:
                return "passed as an override"
            if flag in assumed:
                return ("assumed, as no preset matches this file by name or architecture and no head flag was "
                        "given: the published models' head width")
            if preset and flag in PRESETS[preset]:
                return f"from the preset of {preset}"
            return "guided-diffusion's default"

        _check_heads(sd, flags, origin, where)
        if assumed:
            logger.warning(
                "%s: no preset matches this file by name or architecture and no head flag was given, so "
                "its attention heads were assumed to be %s (the layout of OpenAI's published 64/256/512 px "
                "models; the file's shapes cannot tell). If it was trained with other head flags its "
                "outputs will be wrong: %s.", where,
                ", ".join(f"{k}={v}" for k, v in assumed.items()), _HOW_TO_OVERRIDE)
        flags["image_size"] = int(flags.get("image_size") or cfg.image_size)  # else read off channel_mult
        flags.update(learn_sigma=cfg.out_channels == 2 * cfg.in_channels, class_cond=cfg.num_classes is not None)
        cfg = infer_unet_config(sd, **flags)
        try:
            with torch.device("meta"):
                unet = UNetModel(cfg)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}. Pass the right head layout, e.g. num_head_channels=... "
                                  "or num_head_channels=-1 with num_heads=...") from None
        tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
        _check_finite(tensors, where)
        try:
            unet.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{where} does not match the inferred UNet layout {cfg}: "
                                  f"{str(exc).splitlines()[0]} ... (override flags such as num_head_channels?)") from None
        unet.eval().requires_grad_(False)
        unet.source_file = where  # named by the sampler's NaN report if the model's own output goes bad
        if unet.out[2].weight.device.type != "meta":
            unet.to(device)
            if dtype != torch.float32:
                unet.convert_body(dtype)
    return DDPM(unet=unet, config=cfg, diffusion_steps=int(flags["diffusion_steps"]),
                noise_schedule=flags["noise_schedule"], learn_sigma=flags["learn_sigma"],
                source=where, flags=flags, preset=preset, assumed=assumed)


def _check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """A checkpoint with NaN/inf weights samples black images; refuse it at load time, naming it."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and v.device.type != "meta"
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{where} holds NaN/inf weights in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}): the file is damaged or was saved from a "
                              "diverged training run; re-download it")


def parse_flags(text: str) -> dict[str, Any]:
    """Parse 'num_head_channels=64, noise_schedule=cosine' into typed override keywords."""
    flags: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").replace("\n", ",").split(","))):
        if "=" not in part:
            raise ValueError(f"override {part!r} must look like name=value (e.g. num_head_channels=64)")
        key, value = (s.strip().lstrip("-") for s in part.split("=", 1))
        if key not in _FLAG_NAMES:
            raise ValueError(f"unknown override {key!r}; expected one of {sorted(_FLAG_NAMES)}")
        low = value.lower()
        if low in ("true", "false"):
            flags[key] = low == "true"
        else:
            try:
                flags[key] = int(value)
            except ValueError:
                flags[key] = value
    return flags
