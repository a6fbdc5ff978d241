"""The only module that touches ComfyUI internals: model folders, devices, memory management, progress.

Everything ComfyUI-specific the nodes need goes through here so the rest of the pack stays a thin
translation layer over ``core``.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

# folder name -> extensions ComfyUI lists in the loader's combo
MODEL_FOLDERS = {
    "guided_diffusion": {".pt", ".pth", ".safetensors"},
    "dino": {".pth", ".pt", ".safetensors"},
    "clip_guidance": {".pt", ".pth", ".bin", ".safetensors"},
    "lpips": {".pth", ".pt", ".safetensors"},
}


def register_model_folders() -> None:
    """Add ``models/<name>`` for each of the pack's folders, keeping paths extra_model_paths.yaml added."""
    import folder_paths

    for name, extensions in MODEL_FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        entry = folder_paths.folder_names_and_paths[name]
        entry[1].update(extensions)  # a freshly created entry has an empty set, which lists every file


def model_files(folder: str) -> list[str]:
    import folder_paths

    try:
        return folder_paths.get_filename_list(folder)
    except KeyError:
        return []


class ModelNameError(ValueError):
    """A name that cannot be an entry of the node's model folders. Decided from the text alone, so the
    message never tells anything about the rest of the disk."""


_DRIVE = re.compile(r"^[A-Za-z]:")  # C:\x and C:x (drive-relative) on Windows
_DOTS_OR_SPACES = re.compile(r"^[. ]+$")  # '..', '...', '.. ': Windows trims trailing dots/spaces into '..'
_SHOWN_CHARS = 120


def model_name_problem(name: object) -> Optional[str]:
    """Why ``name`` cannot name an entry inside a model folder, or None when it can. Both separators count
    (a workflow saved on Windows uses backslashes); nothing on disk is looked at."""
    if not isinstance(name, str) or not name.strip():
        return "the name is empty"
    if "\x00" in name:
        return "it contains a NUL byte"
    if _DRIVE.match(name):
        return "it starts with a drive letter"
    if name[0] in "/\\" or posixpath.isabs(name) or ntpath.isabs(name):
        return "it is an absolute path"
    parts = re.split(r"[\\/]", name)
    if any(part == ".." for part in parts):
        return "it has a '..' component"
    if any(part != "." and _DOTS_OR_SPACES.match(part) for part in parts):
        return "it has a component made only of dots or spaces"
    if posixpath.normpath(name.replace("\\", "/")) == ".":
        return "it names the folder itself"
    return None


def check_model_name(folder: str, name: object, where: str) -> None:
    """Raise :class:`ModelNameError` naming the input (``where``, e.g. 'LoadDDPM ckpt_name') unless ``name``
    can be an entry of ``folder``'s registered paths."""
    problem = model_name_problem(name)
    if problem is not None:
        raise _refusal(folder, name, where, problem)


def _refusal(folder: str, name: object, where: str, problem: str) -> ModelNameError:
    shown = repr(name) if len(repr(name)) <= _SHOWN_CHARS else repr(name)[:_SHOWN_CHARS] + "..."
    return ModelNameError(f"{where}: {shown} is not a file name inside the {folder} model folders ({problem}); "
                          "choose one of the listed files")


def registered_folders(folder: str) -> list[str]:
    """The folder's paths in ComfyUI's order (models/<folder> and extra_model_paths.yaml entries)."""
    import folder_paths

    if folder in folder_paths.folder_names_and_paths:
        return folder_paths.get_folder_paths(folder)
    return [os.path.join(folder_paths.models_dir, folder)]


def model_entries(folder: str, name: str, where: str) -> list[str]:
    """``name`` joined to each registered path of ``folder``, after :func:`check_model_name`.

    normpath, not realpath: a symlink the user placed inside a model folder keeps working (models linked
    from other disks), as in ComfyUI's own loaders; only the name itself may not leave the folder."""
    check_model_name(folder, name, where)
    relative = os.path.normpath(name)
    entries = []
    for base in registered_folders(folder):
        base = os.path.normpath(base)
        entry = os.path.normpath(os.path.join(base, relative))
        if os.path.commonpath([base, entry]) != base:  # the containment guarantee itself, should a rule above miss a form
            raise _refusal(folder, name, where, "it leaves the folder")
        entries.append(entry)
    return entries


def resolve_model_file(folder: str, name: str, where: str) -> str:
    """Path of the file ``name`` in the first of ``folder``'s registered paths that has it. A legal name
    that is in none of them gives its place in the first folder, so core's loader raises its 'missing
    weights: put it in models/<folder>, download from URL' message."""
    entries = model_entries(folder, name, where)
    return next((entry for entry in entries if os.path.isfile(entry)), entries[0])


def resolve_model_dir(folder: str, name: str, where: str, marker: str) -> Optional[str]:
    """The sub-folder ``name`` of ``folder``'s registered paths that holds the file ``marker``, or None."""
    return next((entry for entry in model_entries(folder, name, where)
                 if os.path.isfile(os.path.join(entry, marker))), None)


def torch_device() -> torch.device:
    import comfy.model_management as mm

    return mm.get_torch_device()


def intermediate_device() -> torch.device:
    import comfy.model_management as mm

    return mm.intermediate_device()


def offload_device() -> torch.device:
    import comfy.model_management as mm

    return mm.unet_offload_device()


def half_precision_ok(device: torch.device) -> bool:
    """ComfyUI's own verdict on fp16 for this device (respects --force-fp32 and CPU runs)."""
    import comfy.model_management as mm

    return bool(mm.should_use_fp16(device))


def pick_unet_dtype(choice: str, device: torch.device, n_params: int) -> torch.dtype:
    """'auto' follows ComfyUI's --fp16-unet/--bf16-unet/--force-fp32 and the device's support."""
    import comfy.model_management as mm

    if choice != "auto":
        from ..core.diffusion.checkpoints import DTYPES
        return DTYPES[choice]
    return mm.unet_dtype(device, n_params, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])


@dataclass(frozen=True, eq=False)  # identity: two loads of one file are two models
class ManagedModel:
    """A core model value plus the ComfyUI ModelPatcher that lets ComfyUI load and offload it."""

    value: Any
    patcher: Any

    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model


def manage(value: Any, module: torch.nn.Module) -> ManagedModel:
    import comfy.model_management as mm
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return ManagedModel(value=value, patcher=patcher)


def load_to_device(models: list[ManagedModel], memory_required: int = 0) -> None:
    """Let ComfyUI make room (evicting other models) and move ours to the compute device."""
    import comfy.model_management as mm

    with torch.inference_mode(False):  # moving weights inside inference mode would freeze them for autograd
        mm.load_models_gpu([m.patcher for m in models], memory_required=memory_required, force_full_load=True)


def free_memory(device: torch.device) -> int:
    """ComfyUI's own count of the bytes free on ``device`` (what it uses to decide model offloading);
    Guided Sampler picks ``chunk_size`` 0's chunks from it."""
    import comfy.model_management

    return int(comfy.model_management.get_free_memory(device))


def preview_method() -> str | None:
    """ComfyUI's ``--preview-method`` ("none", "auto", "latent2rgb", "taesd"), read when a node runs (a
    prompt's own preview setting, where ComfyUI supports one, lands there too); None when this ComfyUI
    has no such setting."""
    try:
        from comfy.cli_args import args
    except Exception:  # noqa: BLE001 -- an older or trimmed ComfyUI: keep the previews
        return None
    method = getattr(args, "preview_method", None)
    return None if method is None else str(getattr(method, "value", method))


def comfy_preview_size(default: int = 512) -> int:
    """ComfyUI's ``--preview-size`` (512 when absent)."""
    try:
        from comfy.cli_args import args
    except Exception:  # noqa: BLE001
        return default
    return int(getattr(args, "preview_size", default) or default)


class Progress:
    """ComfyUI's progress bar with a preview of the predicted x0; checks Cancel on every update.

    Previews follow ComfyUI's ``--preview-method`` like its own samplers: "none" sends none, and then
    an update reads nothing back from the device (the step loop never waits for the GPU on our
    account); any other method previews every ``preview_every`` steps (1 = every step, as ComfyUI's
    samplers do) and the last one. Only a step that sends a preview copies its x0 (one image) to the host.
    """

    def __init__(self, total: int, preview_every: int = 1, preview_size: int | None = None,
                 previews: bool | None = None):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.total, self.preview_every = total, preview_every
        self.preview_size = preview_size if preview_size is not None else comfy_preview_size()
        self.previews = previews if previews is not None else preview_method() != "none"

    def __call__(self, info: dict) -> None:
        done = info["i"] + 1
        if info["total"] != self.total:  # restarts add steps
            self.total = info["total"]
        preview = None
        if self.previews and (done % self.preview_every == 0 or done == self.total):
            preview = ("JPEG", to_pil(info["predicted_x0"][0]), self.preview_size)
        self.bar.update_absolute(done, self.total, preview)


def to_pil(x: torch.Tensor):
    from PIL import Image
    import numpy as np

    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def interrupted() -> None:
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


# ------------------------------------------------------------------ guiding ComfyUI's own models


def latent_format(model: Any) -> Any:
    """The MODEL's latent format (scale/shift, channel count, its TAESD decoder's name)."""
    return model.get_model_object("latent_format")


def state_scales(model_sampling: Any, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` of the sampler state ``x = a x0 + b eps`` at ``sigma``: flow models (CONST: SD3, Flux,
    ModelSamplingSD3/AuraFlow patches) interpolate, ``a = 1 - sigma``; eps and v models add noise, ``a = 1``."""
    import comfy.model_sampling

    sigma = sigma.reshape(-1).float()
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return 1.0 - sigma, sigma
    return torch.ones_like(sigma), sigma


def vae_decoder(vae: Any, model_latent_format: Any):
    """A differentiable model-latent -> RGB [-1, 1] map through a ComfyUI VAE (full VAE or core's TAESD
    "VAE"): ``first_stage_model.decode(process_out(x0))``, not ``VAE.decode`` (which preallocates its
    output and may fall back to tiling). Returns (decode, module, patcher)."""
    module = vae.first_stage_model

    def decode(latent: torch.Tensor) -> torch.Tensor:
        raw = model_latent_format.process_out(latent)
        return module.decode(raw.to(device=vae.device, dtype=vae.vae_dtype)).float().to(latent.device)
    return decode, module, vae.patcher


def vae_latent_channels(vae: Any) -> int:
    return int(getattr(vae, "latent_channels", 4))
