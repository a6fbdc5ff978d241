"""CLIP encoders over open_clip, loaded from local files without executing pickled code.

Spec: diffuseit_spec §2.4 (the CLIP ensemble, its normalisation and tokeniser), §12 (the
open_clip names of OpenAI's models) and blended_diffusion_spec §3.3 (Blended Diffusion's single
ViT-B/16). Upstream loads OpenAI's TorchScript archives with ``clip.load``; here any open_clip
architecture is built with random weights and the file's tensors are loaded into it strictly.

Weight files are read by :mod:`.clip_weights` (never by executing pickled code).
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..devices import constant
from .clip_weights import OPENAI_ARCHIVE_METADATA, ClipLoadError, PathLike, read_clip_weights, read_torchscript_weights

__all__ = ["ClipModel", "ClipEnsemble", "ClipLoadError", "MissingClipWeightsError", "MODEL_FOLDER",
           "OPENAI_ARCHIVE_METADATA", "load_clip", "load_clip_ensemble", "read_clip_weights",
           "read_torchscript_weights", "resolve_architecture", "architecture_name", "expected_file",
           "tiny_open_clip_config"]

MODEL_FOLDER = "models/clip_guidance"  # the pack's folder for CLIP weights, named in error messages


class MissingClipWeightsError(FileNotFoundError):
    """The weights file is not where it was looked for."""


def _open_clip():
    import open_clip  # lazily: importing it costs ~2 s, which ComfyUI would pay at start-up

    return open_clip


# ----------------------------------------------------------------------------------------------
# The encoder wrapper


class ClipModel:
    """One CLIP model as the guidance code sees it (spec §2.4).

    ``module`` is anything with ``encode_image(pixels)`` and ``encode_text(token_ids)`` (an
    open_clip ``CLIP``, or a stub in tests); ``tokenizer`` maps a list of prompts to token ids
    (default: open_clip's OpenAI BPE tokenizer, context 77, as ``clip.tokenize``). ``mean``/``std``
    are the CLIP normalisation applied by :meth:`normalize`; ``image_size`` is the square input
    size (n_px). Embeddings are returned in float32 whatever the module's dtype, as upstream casts
    them with ``.float()`` (blended_diffusion_spec §3.3).
    """

    def __init__(self, module: nn.Module, image_size: int, *, tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, name: str = "clip"):
        if not (hasattr(module, "encode_image") and hasattr(module, "encode_text")):
            raise TypeError(f"{type(module).__name__} has no encode_image/encode_text")
        oc = _open_clip() if tokenizer is None or mean is None or std is None else None
        self.module = module
        self.image_size = int(image_size)
        self.tokenizer = tokenizer if tokenizer is not None else oc.tokenize
        self.mean = tuple(float(m) for m in (mean if mean is not None else oc.OPENAI_DATASET_MEAN))
        self.std = tuple(float(s) for s in (std if std is not None else oc.OPENAI_DATASET_STD))
        self.name = name
        # recompute the image tower's activations in the backward: with an ensemble only one tower's
        # graph is alive at a time (bench/README.md, "full CLIP ensemble")
        self.gradient_checkpointing = False

    def __repr__(self) -> str:
        return f"ClipModel({self.name!r}, image_size={self.image_size})"

    @property
    def device(self) -> torch.device:
        t = next(iter(self.module.parameters()), None)
        t = t if t is not None else next(iter(self.module.buffers()), None)
        return t.device if t is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        t = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        return t.dtype if t is not None else torch.float32

    def to(self, device: Union[str, torch.device]) -> "ClipModel":
        self.module.to(device)
        return self

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context] of a list of prompts, on the model's device."""
        return self.tokenizer(list(prompts)).to(self.device)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Raw (un-normalised) text features [N, D], float32."""
        return self.module.encode_text(self.tokenize(prompts)).float()

    def encode_image(self, pixels_normalised: torch.Tensor) -> torch.Tensor:
        """Raw image features [N, D], float32, of CLIP-normalised pixels at ``image_size``."""
        pixels = pixels_normalised.to(self.device, self.dtype)
        if self.gradient_checkpointing and torch.is_grad_enabled() and pixels.requires_grad:
            return checkpoint(self.module.encode_image, pixels, use_reentrant=False).float()
        return self.module.encode_image(pixels).float()

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """CLIP normalisation of [0, 1] images NCHW (or CHW): (x - mean) / std per channel."""
        mean = constant(self.mean, x01.device, x01.dtype).view(3, 1, 1)  # made once per device, not per call
        std = constant(self.std, x01.device, x01.dtype).view(3, 1, 1)
        return (x01 - mean) / std


class ClipEnsemble(tuple):
    """An ordered, immutable tuple of :class:`ClipModel` (upstream's ``--clip_models``)."""

    def __new__(cls, models: Iterable[ClipModel]) -> "ClipEnsemble":
        models = tuple(models)
        if not models:
            raise ValueError("a CLIP ensemble needs at least one model")
        for m in models:
            if not isinstance(m, ClipModel):
                raise TypeError(f"ClipEnsemble members must be ClipModel, got {type(m).__name__}")
        return super().__new__(cls, models)


# ----------------------------------------------------------------------------------------------
# Architectures and file names


def resolve_architecture(name: str) -> str:
    """open_clip model name for ``name``: a built-in architecture ('ViT-B-16'; OpenAI's 'ViT-B/16'
    spelling too) or a folder with an ``open_clip_config.json`` (returned as 'local-dir:<path>')."""
    if name.startswith("local-dir:"):
        name = name[len("local-dir:"):]
    elif not os.path.isdir(name):
        return architecture_name(name)
    if not os.path.isfile(os.path.join(name, "open_clip_config.json")):
        raise ClipLoadError(f"{name!r} is a folder without open_clip_config.json; pass an open_clip architecture "
                            "name (e.g. 'ViT-B-16') or a folder holding open_clip_config.json")
    return "local-dir:" + os.path.abspath(name)


def architecture_name(name: str) -> str:
    """The built-in open_clip architecture ``name`` means ('ViT-B-16', OpenAI's 'ViT-B/16' spelling, or an
    OpenAI file stem), from the name alone: unlike :func:`resolve_architecture` it never looks for a folder
    of that name (the ComfyUI node must not load folders relative to the server's working directory)."""
    oc = _open_clip()
    cleaned = name.replace("/", "-")
    if cleaned in oc.list_models():
        return cleaned
    by_file = {Path(oc.get_pretrained_url(m, "openai")).stem: m for m in oc.list_openai_models()
               if not m.endswith("-quickgelu")}
    if cleaned in by_file:  # OpenAI file stems, e.g. 'ViT-L-14-336px'
        return by_file[cleaned]
    close = difflib.get_close_matches(cleaned, oc.list_models(), n=5)
    raise ClipLoadError(f"unknown CLIP architecture {name!r}. "
                        + (f"Did you mean {', '.join(close)}? " if close else "")
                        + f"OpenAI's models: {', '.join(oc.list_openai_models())}; "
                        "all open_clip names: open_clip.list_models().")


def expected_file(arch: str, tag: str) -> tuple[str, str]:
    """(file name to put in the models folder, official download URL) of open_clip tag ``tag``."""
    cfg = _open_clip().get_pretrained_cfg(arch, tag)
    if cfg.get("url"):
        return os.path.basename(cfg["url"]), cfg["url"]
    repo = cfg.get("hf_hub", "").rstrip("/")
    return f"{arch}-{tag}.safetensors", f"https://huggingface.co/{repo} (open_clip_model.safetensors, renamed)"


def _missing(arch: str, file_name: str, models_dir: Optional[PathLike], url: Optional[str]) -> MissingClipWeightsError:
    folder = os.fspath(models_dir) if models_dir is not None else MODEL_FOLDER
    url = url or (None if arch.startswith("local-dir:") else _open_clip().get_pretrained_url(arch, "openai"))
    return MissingClipWeightsError(
        f"CLIP weights for {arch!r} not found: expected the file {file_name!r} in {folder!r} (the pack's "
        f"{MODEL_FOLDER} folder)." + (f" Download it from {url} and put it there." if url else ""))


def _weights_path(arch: str, pretrained: PathLike, models_dir: Optional[PathLike]) -> tuple[str, dict]:
    """Path of the weights file and the open_clip tag config when ``pretrained`` is a tag."""
    oc = _open_clip()
    tag_cfg = {} if arch.startswith("local-dir:") else oc.get_pretrained_cfg(arch, os.fspath(pretrained))
    if tag_cfg:
        file_name, url = expected_file(arch, os.fspath(pretrained))
        candidate = os.path.join(os.fspath(models_dir), file_name) if models_dir is not None else None
        if candidate is None or not os.path.exists(candidate):  # a folder of that name is refused as one later
            raise _missing(arch, file_name, models_dir, url)
        return candidate, tag_cfg
    path = os.fspath(pretrained)
    for candidate in (path, os.path.join(os.fspath(models_dir), path) if models_dir is not None else None):
        if candidate and os.path.exists(candidate):
            return candidate, {}
    raise _missing(arch, os.path.basename(path), models_dir if models_dir is not None else os.path.dirname(path) or None, None)


# ----------------------------------------------------------------------------------------------
# Building and loading


def _build(arch: str, quick_gelu: Optional[bool]) -> nn.Module:
    # open_clip warns "initialized randomly"; we load the weights right after, so hide that one
    quiet = lambda r: "initialized randomly" not in r.getMessage() and "no CLIP weights" not in r.getMessage()  # noqa: E731
    logging.getLogger().addFilter(quiet)
    try:  # pretrained_text=False: never fetch HF text towers over the network
        return _open_clip().create_model(arch, pretrained=None, load_weights=False, pretrained_text=False,
                                         **({} if quick_gelu is None else {"quick_gelu": bool(quick_gelu)}))
    finally:
        logging.getLogger().removeFilter(quiet)


def _mismatch_message(where: str, arch: str, model: nn.Module, sd: dict[str, torch.Tensor]) -> Optional[str]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return None
    looks_clip = any(k.startswith("visual.") for k in sd)
    parts = [f"{where!r} does not fit open_clip architecture {arch!r}"
             + ("" if looks_clip else " and does not look like a CLIP checkpoint at all (no 'visual.*' keys)")]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes)):
        if items:
            parts.append(f"{len(items)} {label}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}")
    stem = Path(where).stem
    if stem != arch and stem in _open_clip().list_models():
        parts.append(f"the file name suggests architecture {stem!r}")
    return "; ".join(parts) + "."


def load_clip(name_or_path: PathLike, pretrained: Optional[PathLike] = "openai", *,
              models_dir: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
              dtype: torch.dtype = torch.float32, quick_gelu: Optional[bool] = None) -> ClipModel:
    """Build an open_clip model and load local weights into it strictly (spec §2.4, §12).

    ``name_or_path``: an open_clip architecture ('RN50', 'ViT-B-16', also 'ViT-B/16'), a folder
    with ``open_clip_config.json`` (custom architectures), or a weights file whose name is an
    architecture (``.../ViT-B-16.pt``). ``pretrained``: an open_clip tag ('openai' looks for
    OpenAI's file name, e.g. ``ViT-B-16.pt``, in ``models_dir``), a path or a file name inside
    ``models_dir``, or None for random weights (tests). ``quick_gelu`` None = automatic: on for
    OpenAI weights (archives or the 'openai' tag), else the architecture's own setting.
    Nothing is downloaded; a missing file raises :class:`MissingClipWeightsError` naming the
    folder, the file name and the official URL.
    """
    name = os.fspath(name_or_path)
    if os.path.isfile(name):
        try:
            arch = resolve_architecture(Path(name).stem)
        except ClipLoadError:
            raise ClipLoadError(f"cannot tell the CLIP architecture from the file name {Path(name).name!r}; pass the "
                                "architecture name and pretrained=<path>, e.g. load_clip('ViT-B-16', pretrained=path)") from None
        pretrained = name
    else:
        arch = resolve_architecture(name)
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; guidance needs autograd later
        sd, tag_cfg, where, is_openai = None, {}, "", False
        if pretrained is not None:
            where, tag_cfg = _weights_path(arch, pretrained, models_dir)
            sd, is_openai = read_clip_weights(where)
        if quick_gelu is None and (is_openai or tag_cfg.get("quick_gelu")):
            quick_gelu = True
        model = _build(arch, quick_gelu)
        if sd is not None:
            sd = _open_clip().convert.convert_state_dict(model, sd)
            persistent, buffers = model.state_dict(), dict(model.named_buffers())
            # non-persistent buffers (open_clip's causal attn_mask) may be saved by TorchScript; they are not weights
            sd = {k: v for k, v in sd.items() if k in persistent or k not in buffers}
            if "logit_scale" in sd and sd["logit_scale"].shape != persistent["logit_scale"].shape:
                sd["logit_scale"] = sd["logit_scale"].reshape(persistent["logit_scale"].shape)
            problem = _mismatch_message(where, arch, model, sd)
            if problem:
                raise ClipLoadError(problem)
            model.load_state_dict(sd, strict=True)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    size = model.visual.image_size
    size = size if isinstance(size, int) else (size[0] if size[0] == size[1] else None)
    if size is None:
        raise ClipLoadError(f"{arch!r} has a non-square input {model.visual.image_size}; only square inputs are supported")
    pp = {**_open_clip().get_model_preprocess_cfg(model), **tag_cfg}
    return ClipModel(model, size, tokenizer=_open_clip().get_tokenizer(arch), mean=pp.get("mean"), std=pp.get("std"),
                     name=Path(arch[len("local-dir:"):]).name if arch.startswith("local-dir:") else arch)


def load_clip_ensemble(names: Sequence[PathLike], pretrained: Optional[PathLike] = "openai", **kwargs: Any) -> ClipEnsemble:
    """:func:`load_clip` for each name (upstream default: RN50, RN50x4, ViT-B-32, RN50x16, ViT-B-16)."""
    return ClipEnsemble(load_clip(n, pretrained, **kwargs) for n in names)


def tiny_open_clip_config(vision: str = "vit", image_size: int = 32, embed_dim: int = 16) -> dict:
    """A tiny open_clip ``model_cfg`` (random init in ~30 ms) with the real 49408-token vocabulary, for
    tests: write ``{"model_cfg": cfg}`` to ``<dir>/open_clip_config.json`` and pass ``<dir>`` to
    :func:`load_clip`. ``vision``: 'vit' (patch 8) or 'resnet' (OpenAI's ModifiedResNet layout)."""
    visual = {"vit": {"layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "resnet": {"layers": [1, 1, 1, 1], "width": 8, "head_width": 8}}[vision]
    return {"embed_dim": embed_dim, "vision_cfg": {"image_size": image_size, **visual},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
