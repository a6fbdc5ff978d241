"""DINO ViT loading (timm) and the DiffuseIT feature extractor.

Reproduces the DINO side of DiffuseIT (``diffuseit_spec.md`` §2.3, §12): the official
facebookresearch/dino checkpoints (``dino_vitbase8_pretrain.pth`` = ``vit_base(patch_size=8,
num_classes=0)``) load into ``timm.models.vision_transformer.VisionTransformer`` with
``strict=True`` and no key renaming. DiffuseIT reads two things from block index 11:

* the **keys**: columns ``[D:2D]`` of the fused ``blocks[11].attn.qkv`` Linear applied to
  ``norm1(x)`` (bias included, before the 1/sqrt(d) scale), all tokens including [CLS], all heads
  concatenated -> ``(B, N, D)``;
* the **[CLS] token** of the block-11 output *before* the final LayerNorm -> ``(B, D)``.

Both come from a single forward pass that stops after that block. Checkpoints are read safely
only (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from ..tiny_guard import file_sha256
from ..weights_file import check_weights_file

DINO_URL_TEMPLATE = "https://dl.fbaipublicfiles.com/dino/{stem}/{stem}.pth"
DEFAULT_DINO_ARCH = "vit_base_patch8_224"
DEFAULT_DINO_FILENAME = "dino_vitbase8_pretrain.pth"
DINO_VITB8_URL = DINO_URL_TEMPLATE.format(stem="dino_vitbase8_pretrain")
MODELS_SUBFOLDER = "models/dino"

# ImageNet statistics, as the DINO config of DiffuseIT uses (spec §2.3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Mapping[str, torch.Tensor]


class DINOCheckpointError(ValueError):
    """A DINO checkpoint could not be used (wrong content, corrupt file, bad architecture)."""


class DINOCheckpointNotFoundError(DINOCheckpointError, FileNotFoundError):
    """The DINO checkpoint file does not exist."""


@dataclass(frozen=True)
class DINOViTConfig:
    """Hyper-parameters of a DINO v1 ViT (timm ``VisionTransformer`` arguments)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    img_size: int = 224


# The four DINO v1 ViTs of facebookresearch/dino's hubconf (name -> config, official file stem).
DINO_ARCHS: dict[str, tuple[DINOViTConfig, str]] = {
    "vit_small_patch16_224": (DINOViTConfig(16, 384, 12, 6), "dino_deitsmall16_pretrain"),
    "vit_small_patch8_224": (DINOViTConfig(8, 384, 12, 6), "dino_deitsmall8_pretrain"),
    "vit_base_patch16_224": (DINOViTConfig(16, 768, 12, 12), "dino_vitbase16_pretrain"),
    "vit_base_patch8_224": (DINOViTConfig(8, 768, 12, 12), "dino_vitbase8_pretrain"),
}
_ALIASES = {
    "dino_vits16": "vit_small_patch16_224", "dino_vits8": "vit_small_patch8_224",
    "dino_vitb16": "vit_base_patch16_224", "dino_vitb8": "vit_base_patch8_224",
    **{stem: arch for arch, (_, stem) in DINO_ARCHS.items()},
}


def resolve_arch(name: str) -> str:
    """Canonical timm name for a DINO arch given as a timm name (``.dino`` tag allowed), a hub
    name (``dino_vitb8``) or an official file stem (``dino_vitbase8_pretrain``)."""
    key = name.strip().split(".")[0]
    key = _ALIASES.get(key, key)
    if key not in DINO_ARCHS:
        known = sorted(DINO_ARCHS) + sorted(_ALIASES)
        raise DINOCheckpointError(f"unknown DINO architecture {name!r}; choose one of {known}")
    return key


def dino_checkpoint_url(arch: str = DEFAULT_DINO_ARCH) -> str:
    """Official download URL of the DINO v1 checkpoint for ``arch``."""
    return DINO_URL_TEMPLATE.format(stem=DINO_ARCHS[resolve_arch(arch)][1])


def build_dino_vit(config: Union[str, DINOViTConfig] = DEFAULT_DINO_ARCH, *,
                   device: Union[str, torch.device, None] = None) -> VisionTransformer:
    """An (untrained) timm ViT with the DINO v1 layout: [CLS] token, learned pos-embed,
    qkv bias, LayerNorm eps 1e-6, exact GELU, no head (``num_classes=0``) — spec §2.3.
    Pass ``device='meta'`` to build without allocating weights."""
    cfg = DINO_ARCHS[resolve_arch(config)][0] if isinstance(config, str) else config
    return VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias, num_classes=0, device=device)


def _describe(sd: Mapping[str, object], n: int = 4) -> str:
    keys = list(sd.keys())
    shown = ", ".join(repr(k) for k in keys[:n])
    more = f", ... ({len(keys)} entries)" if len(keys) > n else f" ({len(keys)} entries)"
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in keys):
        hint = " It looks like a guided-diffusion UNet checkpoint."
    elif any(k.startswith(("visual.", "transformer.resblocks")) for k in keys):
        hint = " It looks like a CLIP checkpoint."
    elif any(k in ("mask_token", "register_tokens") or ".ls1." in k for k in keys):
        hint = " It looks like a DINOv2 checkpoint; DiffuseIT uses DINO v1."
    else:
        hint = ""
    return f"keys {shown}{more}.{hint}"


def _unwrap(obj: object, name: str) -> dict[str, torch.Tensor]:
    """The plain backbone state dict inside a loaded object.

    A plain mapping of tensors (the official ``*_pretrain.pth`` and timm's safetensors) is used as
    is. Training checkpoints wrap it under ``teacher`` (DINO, with ``module.``/``backbone.``
    prefixes and a projection ``head.*`` that is not part of the backbone), ``model`` or
    ``state_dict``; only there are those prefixes stripped and ``head.*`` dropped.
    """
    if not isinstance(obj, Mapping):
        raise DINOCheckpointError(
            f"{name} does not contain a state dict (found a {type(obj).__name__}).")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for wrapper in ("teacher", "model", "state_dict"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()):
            out: dict[str, torch.Tensor] = {}
            for k, v in inner.items():
                k = re.sub(r"^(module\.)?(backbone\.)?", "", k)
                if not k.startswith("head."):
                    out[k] = v
            return out
    raise DINOCheckpointError(
        f"{name} is not a DINO ViT state dict: it is a dict with entries "
        f"{list(obj.keys())[:6]} and none of 'teacher'/'model'/'state_dict' holds tensors.")


def _missing_message(path: Path) -> str:
    return (f"DINO checkpoint not found: {path}. DiffuseIT needs the official DINO ViT-B/8 weights "
            f"'{DEFAULT_DINO_FILENAME}': download {DINO_VITB8_URL} and put the file in the pack's "
            f"{MODELS_SUBFOLDER} folder (other DINO sizes: {DINO_URL_TEMPLATE}, e.g. stem "
            f"'dino_deitsmall8_pretrain').")


def load_dino_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a DINO ViT state dict safely from ``.safetensors`` or a ``.pth``/``.pt`` file.

    Raises :class:`DINOCheckpointNotFoundError` (missing file, with the download URL) or
    :class:`DINOCheckpointError` (unreadable/corrupt file, or not a ViT state dict).
    """
    p = Path(path)
    if not p.exists():
        raise DINOCheckpointNotFoundError(_missing_message(p))
    kind = check_weights_file(p, "DINO checkpoint", DINOCheckpointError)  # a folder, empty or text file: by name
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file
            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors/pickle/zip errors have no common base class
        raise DINOCheckpointError(
            f"could not read DINO checkpoint {p} ({type(err).__name__}: {str(err)[:200]}). The file "
            f"is corrupt or truncated, or it holds pickled Python objects that safe loading refuses "
            f"(e.g. a full training checkpoint). Re-download {DINO_VITB8_URL}.") from err
    return _unwrap(obj, str(p))


_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")


def _sidecar_num_heads(path: Path) -> Optional[int]:
    """``num_heads`` from ``<stem>_config.json`` next to the weights (heads are not in shapes). A sidecar
    that names a ``sha256`` applies to that file only: the tiny test models' sidecar must not give a real
    ViT-B/8 saved later under the same name 2 heads."""
    side = path.with_name(path.name.split(".")[0] + "_config.json")
    if side.is_file():
        try:
            config = json.loads(side.read_text())
            value = config.get("num_heads")
        except (OSError, ValueError, AttributeError):
            return None
        if config.get("sha256") and config["sha256"] != file_sha256(path):
            return None  # written for another file of this name
        return int(value) if value else None
    return None


def infer_dino_config(sd: StateDict, num_heads: Optional[int] = None) -> DINOViTConfig:
    """Architecture from state-dict shapes. The head count is not visible in any shape: it comes
    from ``num_heads``, else from the matching official arch, else it is an error."""
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise DINOCheckpointError(
            f"not a DINO ViT state dict: missing {missing}; expected keys like cls_token, "
            f"pos_embed, patch_embed.proj.weight, blocks.<i>.attn.qkv.weight, norm.weight; found "
            + _describe(sd))
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3]:
        raise DINOCheckpointError(f"not a DINO ViT: patch_embed.proj.weight has shape {tuple(w.shape)}")
    embed_dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = math.isqrt(int(sd["pos_embed"].shape[1]) - 1)
    if grid * grid + 1 != sd["pos_embed"].shape[1]:
        raise DINOCheckpointError(
            f"pos_embed has {sd['pos_embed'].shape[1]} tokens: expected [CLS] + a square grid")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0
    if num_heads is None:
        for cfg, _ in DINO_ARCHS.values():
            if (cfg.embed_dim, cfg.patch_size, cfg.depth) == (embed_dim, patch, depth):
                num_heads = cfg.num_heads
        if num_heads is None:
            raise DINOCheckpointError(
                f"cannot tell the number of attention heads of this ViT (embed_dim {embed_dim}, "
                f"patch {patch}, depth {depth} is not an official DINO size): pass num_heads= or "
                f"put a '<name>_config.json' with \"num_heads\" next to the weights.")
    if embed_dim % num_heads:
        raise DINOCheckpointError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    return DINOViTConfig(patch, embed_dim, depth, int(num_heads), mlp_ratio,
                         "blocks.0.attn.qkv.bias" in sd, grid * patch)


def load_dino_vit(source: Union[PathLike, StateDict], arch: Optional[str] = None, *,
                  num_heads: Optional[int] = None,
                  device: Union[str, torch.device] = "cpu") -> VisionTransformer:
    """A frozen, eval-mode timm ViT loaded strictly from a DINO checkpoint path or state dict.

    ``arch`` (e.g. ``"vit_base_patch8_224"``, ``"dino_vits16"``) forces an official size; by
    default the size is inferred from the shapes (tiny test models need ``num_heads`` or a
    ``<stem>_config.json`` sidecar). The model is built on the meta device and the checkpoint
    tensors are assigned, so no second copy of the weights is allocated.
    """
    if isinstance(source, Mapping):
        sd, name = _unwrap(source, "the given state dict"), "the given state dict"
    else:
        sd, name = load_dino_state_dict(source), str(source)
        if num_heads is None and arch is None:
            num_heads = _sidecar_num_heads(Path(source))
    inferred = infer_dino_config(sd, num_heads)
    if arch is not None:
        cfg = DINO_ARCHS[resolve_arch(arch)][0]
        if (cfg.embed_dim, cfg.patch_size, cfg.depth) != (inferred.embed_dim, inferred.patch_size,
                                                          inferred.depth):
            raise DINOCheckpointError(
                f"{name} holds a ViT with embed_dim {inferred.embed_dim}, patch "
                f"{inferred.patch_size}, depth {inferred.depth}, but arch={arch!r} expects "
                f"{cfg.embed_dim}/{cfg.patch_size}/{cfg.depth}.")
    else:
        cfg = inferred
    model = build_dino_vit(cfg, device="meta")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        raise DINOCheckpointError(
            f"{name} does not match a DINO v1 ViT ({cfg}): {str(err)[:600]}") from err
    model = model.to(device)
    model.requires_grad_(False)  # only gradients w.r.t. images are ever taken (spec §2.3)
    return model.eval()


@dataclass(frozen=True)
class DINOFeatures:
    """Block-``layer`` features of a batch: ``keys`` (B, N, D) incl. [CLS]; ``cls`` (B, D) pre-norm.
    ``qkv`` (B, N, 3D) is kept only when asked for (debugging/tests)."""

    keys: torch.Tensor
    cls: torch.Tensor
    qkv: Optional[torch.Tensor] = None


def dino_resize_size(height: int, width: int, size: int = 224, max_size: int = 480) -> tuple[int, int]:
    """Output size of torchvision ``Resize(size, max_size)``: shorter side -> ``size`` (spec §2.3)."""
    short, long = min(height, width), max(height, width)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


def resample_position_grid(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A ViT's learned position embeddings ``(1, 1 + n*n, D)`` ([CLS] first) for a ``rows x cols`` patch grid.

    DINO's rule for inputs other than 224 px: the [CLS] entry is kept, the n x n grid is resized
    bicubically with scale factors ``(rows + 0.1) / n`` and ``(cols + 0.1) / n`` (the extra 0.1 keeps the
    floored output size from coming out one short) and flattened row by row like the patch tokens.
    """
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    n, dim = math.isqrt(grid_pos.shape[1]), grid_pos.shape[-1]
    square = grid_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, scale_factor=((rows + 0.1) / n, (cols + 0.1) / n), mode="bicubic",
                            align_corners=False)
    if tuple(resized.shape[-2:]) != (rows, cols):  # cannot happen for grids up to thousands of patches
        raise RuntimeError(f"position grid resized to {tuple(resized.shape[-2:])}, expected {(rows, cols)}")
    return torch.cat([cls_pos, resized.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


class DINOExtractor(nn.Module):
    """DiffuseIT's DINO feature extractor (spec §2.3) around a timm ViT.

    ``forward(x)`` takes images in [-1, 1] (B, 3, H, W) of any size, applies the upstream preprocessing
    (``0.5x + 0.5`` -> ``Resize(224, max_size=480)`` bilinear, shorter side to 224 with the aspect ratio
    kept -> ImageNet normalisation, no clamping; a non-square image gets DINO's interpolated position
    grid, :meth:`tokens`) and returns
    :class:`DINOFeatures` of block ``layer`` (11 upstream). Differentiable w.r.t. ``x``; rows are
    independent. ``antialias=False`` reproduces the authors' torchvision 0.10 resize (and the
    fixtures); ``True`` is what torchvision >= 0.17 does by default.

    ``fused_attention=False`` (default) switches the model's blocks to timm's explicit
    softmax(q k^T / sqrt(d)) v, the arithmetic of DINO's own ``Attention``, which lands closer
    to the fixtures (ViT totals off by 2e-4 instead of 7e-4 at ~3e3). ``True`` keeps
    PyTorch's fused SDPA (faster, less memory for the backward on GPU). The setting is applied
    to ``model`` in place.
    """

    def __init__(self, model: VisionTransformer, layer: int = 11, antialias: bool = False,
                 size: int = 224, fused_attention: bool = False) -> None:
        super().__init__()
        if not 0 <= layer < len(model.blocks):
            raise ValueError(f"layer {layer} out of range for a ViT with {len(model.blocks)} blocks")
        for block in model.blocks:
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = fused_attention
        self.model = model
        self.layer = layer
        self.antialias = antialias
        self.size = size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> normalised DINO input (spec §2.3; loss_vit.py global_transform)."""
        x01 = 0.5 * x + 0.5
        h, w = dino_resize_size(x.shape[-2], x.shape[-1], self.size)
        if (x.shape[-2], x.shape[-1]) != (h, w):
            x01 = F.interpolate(x01, size=(h, w), mode="bilinear", align_corners=False,
                                antialias=self.antialias)
        return (x01 - self.mean.to(x01)) / self.std.to(x01)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens + [CLS] with position embeddings, for an input of any size.

        At the ViT's own size (224 x 224) this is timm's path unchanged. Any other size is what DINO's
        own ``VisionTransformer`` does with it (``interpolate_pos_encoding``): the patch convolution
        drops the pixels beyond the last whole patch, and the position grid is resampled bicubically
        to the patch grid (:func:`resample_position_grid`). That is how upstream's ``Resize(224,
        max_size=480)``, which keeps the aspect ratio, reaches the model with a non-square image.
        """
        m = self.model
        patch = m.patch_embed.patch_size
        grid = m.patch_embed.grid_size
        if (x.shape[-2], x.shape[-1]) == (grid[0] * patch[0], grid[1] * patch[1]):
            return m._pos_embed(m.patch_embed(x))
        rows, cols = x.shape[-2] // patch[0], x.shape[-1] // patch[1]
        if rows < 1 or cols < 1:
            raise ValueError(f"DINO needs at least one {patch[0]}x{patch[1]} patch; got {x.shape[-2]}x{x.shape[-1]}")
        patches = m.patch_embed.proj(x[..., :rows * patch[0], :cols * patch[1]]).flatten(2).transpose(1, 2)
        patches = m.patch_embed.norm(patches)
        tokens = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)
        return m.pos_drop(tokens + resample_position_grid(m.pos_embed, rows, cols))

    def forward(self, x: torch.Tensor, *, preprocessed: bool = False,
                return_qkv: bool = False) -> DINOFeatures:
        """One pass through blocks 0..layer (later blocks are never run)."""
        param = self.model.cls_token
        x = x.to(device=param.device, dtype=param.dtype)
        if not preprocessed:
            x = self.preprocess(x)
        m = self.model
        h = m.norm_pre(m.patch_drop(self.tokens(x)))
        for block in m.blocks[: self.layer]:
            h = block(h)
        captured: list[torch.Tensor] = []
        block = m.blocks[self.layer]
        handle = block.attn.qkv.register_forward_hook(lambda mod, inp, out: captured.append(out))
        try:
            h = block(h)
        finally:
            handle.remove()
        qkv = captured[0]
        d = self.embed_dim
        # heads are contiguous inside each third of the fused output, so upstream's reshape to
        # (heads, N, d) and back is this plain column slice (spec §2.3)
        return DINOFeatures(keys=qkv[..., d:2 * d], cls=h[:, 0], qkv=qkv if return_qkv else None)


def load_dino_extractor(source: Union[PathLike, StateDict], arch: Optional[str] = None, *,
                        num_heads: Optional[int] = None, layer: int = 11, antialias: bool = False,
                        fused_attention: bool = False,
                        device: Union[str, torch.device] = "cpu") -> DINOExtractor:
    """:func:`load_dino_vit` wrapped in a :class:`DINOExtractor` (upstream defaults)."""
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; buffers must stay normal tensors
        model = load_dino_vit(source, arch, num_heads=num_heads, device=device)
        return DINOExtractor(model, layer=layer, antialias=antialias,
                             fused_attention=fused_attention).to(device)
