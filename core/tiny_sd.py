"""Random models in ComfyUI's own formats, for offline runs of workflows that use ComfyUI's loaders.

* ``checkpoints/tiny_sd15.safetensors`` (``SD15_FILE``) -- a checkpoint that Load Checkpoint
  detects as SD1.5: a UNet with SD1.5's detection values (320 channels, 768-wide context, 8 heads,
  no linear projections in the transformers) but one level with one res block, plus the full-size
  SD VAE and CLIP-L text encoder, which ComfyUI builds at full size from fixed configs (missing
  weights would stay uninitialised). 232.5 M parameters, 465 MB in float16. Key names and shapes
  come from ``tiny_sd15_layout.json``, read once from ComfyUI v0.3.75's own classes by
  ``tests/e2e/make_sd15_layout.py`` -- core never imports comfy.
* ``vae_approx/{taesd,taesdxl,taesd3,taef1}_{encoder,decoder}.safetensors`` -- TAESD at its real
  size (4 latent channels for SD1.5/SDXL, 16 for SD3/Flux) under the published files' keys. ComfyUI's
  VAE Loader offers ``taesd`` etc. only when both halves are present.

Weights are random (outputs are noise) but scaled so every activation stays finite and in a sane
range: conv/linear weights ~ N(0, 1/fan_in), halved where a layer writes into a residual stream,
norm weights 1, biases 0, embeddings N(0, 0.02^2). Each block of rows has its own generator seeded
from (seed, key, block), so a file is byte-identical for a seed and any subset of keys can be written alone with
the same values. The checkpoint is written tensor by tensor straight into the safetensors layout,
so memory stays at one block of rows (4 M values) however large the tensor.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from .tiny_guard import claim, record

PathLike = Union[str, "os.PathLike[str]"]

LAYOUT_FILE = Path(__file__).with_name("tiny_sd15_layout.json")
SD15_FILE = "tiny_sd15.safetensors"  # under ComfyUI's models/checkpoints
SD15_FOLDER = "checkpoints"
TAESD_FAMILIES = ("taesd", "taesdxl", "taesd3", "taef1")  # ComfyUI's VAELoader names
# layers whose output is added to a residual stream (UNet res/transformer blocks, VAE res blocks
# and attention, CLIP attention and MLP): halved, so the streams grow slowly with depth
_RESIDUAL_OUT = ("out_layers.3.", "proj_out.", "to_out.0.", "ff.net.2.", ".conv2.", "out_proj.", "mlp.fc2.")
RESIDUAL_GAIN = 0.5
EMBEDDING_STD = 0.02
CHUNK_VALUES = 1 << 22  # values generated at once (16 MB in float32)
_ST_DTYPES = {"float16": "F16", "float32": "F32", "int64": "I64", "int32": "I32"}


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its full key, shape, stored dtype and how it is initialised."""

    key: str
    shape: tuple
    dtype: str  # "float16", or an integer dtype for buffers
    init: str  # "zeros", "ones" or "normal"
    std: float = 0.0

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@functools.lru_cache(maxsize=1)
def sd15_layout() -> dict:
    """The committed layout (``tiny_sd15_layout.json``): prefix groups of [key, shape(, dtype)]."""
    try:
        return json.loads(LAYOUT_FILE.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"the tiny SD1.5 layout {LAYOUT_FILE} is missing from the installed package "
                                f"({exc}); reinstall the pack or regenerate it with tests/e2e/make_sd15_layout.py") from None


def layout_sha256() -> str:
    """Hash of the layout file: part of the cache key, so a regenerated layout never reuses a stale file."""
    return hashlib.sha256(LAYOUT_FILE.read_bytes()).hexdigest()


def init_rule(key: str, shape: tuple) -> tuple[str, float]:
    """(init, std) for a weight: biases 0, 1-D weights (norms) 1, embeddings small, the rest 1/sqrt(fan_in)."""
    if key.endswith(".bias"):
        return "zeros", 0.0
    if len(shape) == 1:
        return "ones", 0.0
    if "embedding" in key:
        return "normal", EMBEDDING_STD
    fan_in = 1
    for n in shape[1:]:
        fan_in *= n
    gain = RESIDUAL_GAIN if any(part in key for part in _RESIDUAL_OUT) else 1.0
    return "normal", gain / fan_in ** 0.5


# A random UNet predicts noise unrelated to its input, so a sampler's x0 = x - sigma * eps stays at
# the starting noise's scale (std ~ sigma_max = 14.6, ~100 with CFG 7). The tiny UNet instead carries
# its input on a fixed path and predicts it as the noise: conv_in writes +x and -x into channels 0-7
# (GroupNorm group 0 = channels 0-9), the last output block's skip copies those channels and adds
# nothing else to them, and the final GroupNorm + SiLU + conv read eps = x / rms(x) back
# (silu(z) - silu(-z) = z). x0 then starts near 0; the random rest of the network adds a small,
# prompt-dependent "content" (its out-conv weights get NOISE_PATH_CONTENT_GAIN), as a trained model would.
_UNET = "model.diffusion_model."
_GROUP = 10  # channels per GroupNorm group (32 groups of 320)
NOISE_PATH_CONTENT_GAIN = 0.05


def _conv_in(w: torch.Tensor) -> None:
    w[:_GROUP] = 0
    for c in range(4):
        w[c, c, 1, 1], w[4 + c, c, 1, 1] = 1.0, -1.0


def _skip(w: torch.Tensor) -> None:
    w[:_GROUP] = 0
    for c in range(_GROUP):
        w[c, 320 + c, 0, 0] = 1.0  # input channels 320.. are the concatenated conv_in output


def _zero_group0(w: torch.Tensor) -> None:
    w[:_GROUP] = 0


def _out(w: torch.Tensor) -> None:
    w.mul_(NOISE_PATH_CONTENT_GAIN)
    w[:, :_GROUP] = 0
    k = (8 / _GROUP) ** 0.5  # group 0's variance is 8/10 of mean(x^2): undo it
    for c in range(4):
        w[c, c, 1, 1], w[c, 4 + c, 1, 1] = k, -k


_NOISE_PATH = {_UNET + "input_blocks.0.0.weight": _conv_in, _UNET + "output_blocks.1.0.skip_connection.weight": _skip,
               _UNET + "output_blocks.1.0.out_layers.3.weight": _zero_group0,
               _UNET + "output_blocks.1.1.proj_out.weight": _zero_group0, _UNET + "out.2.weight": _out}


def sd15_plan() -> list[PlannedTensor]:
    """Every tensor of the tiny SD1.5 checkpoint, in file order, without making any."""
    plan = []
    for group in sd15_layout()["groups"]:
        for name, shape, *dtype in group["tensors"]:
            key = group["prefix"] + name
            init, std = init_rule(key, tuple(shape)) if not dtype else ("zeros", 0.0)
            plan.append(PlannedTensor(key, tuple(shape), dtype[0] if dtype else "float16", init, std))
    return plan


def make_chunks(item: PlannedTensor, seed: int) -> Iterator[torch.Tensor]:
    """The tensor's values as blocks of whole rows (dim 0) of at most ``CHUNK_VALUES`` values, each from
    its own generator seeded by (seed, key, block): values depend on nothing made before, and memory
    stays at one block however large the tensor."""
    dtype = getattr(torch, item.dtype)
    row = 1
    for n in item.shape[1:]:
        row *= n
    rows = item.shape[0] if item.shape else 1
    step = max(1, CHUNK_VALUES // max(row, 1))
    for block, start in enumerate(range(0, rows, step)):
        shape = (min(step, rows - start), *item.shape[1:]) if item.shape else ()
        if item.init == "zeros":
            yield torch.zeros(shape, dtype=dtype)
        elif item.init == "ones":
            yield torch.ones(shape, dtype=dtype)
        else:
            digest = hashlib.sha256(f"{seed}:{item.key}:{block}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            values = torch.randn(shape, generator=gen).mul_(item.std)
            edit = _NOISE_PATH.get(item.key)
            if edit is not None:  # these tensors are single blocks (< CHUNK_VALUES)
                edit(values)
            yield values.to(dtype)


def make_tensor(item: PlannedTensor, seed: int) -> torch.Tensor:
    """The whole tensor (as written in the file), e.g. to compare against a file in tests."""
    chunks = list(make_chunks(item, seed))
    return torch.cat(chunks) if item.shape else chunks[0]


def _header(plan: list[PlannedTensor], metadata: dict) -> bytes:
    entries, offset = {}, 0
    for item in plan:
        entries[item.key] = {"dtype": _ST_DTYPES[item.dtype], "shape": list(item.shape),
                             "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    text = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the safetensors format aligns the data to 8 bytes


def write_safetensors_streamed(path: PathLike, plan: list[PlannedTensor], seed: int, metadata: dict) -> Path:
    """Write ``plan`` as a safetensors file one tensor at a time (header first: the offsets follow
    from the shapes). Little-endian, as the format requires."""
    header = _header(plan, metadata)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for item in plan:
            for chunk in make_chunks(item, seed):
                f.write(chunk.contiguous().numpy().data)  # no extra copy
    return path


def sd15_file_size(plan: Optional[list[PlannedTensor]] = None) -> int:
    """Bytes of the whole checkpoint file, from the plan alone."""
    plan = sd15_plan() if plan is None else plan
    return 8 + len(_header(plan, _metadata(0))) + sum(item.nbytes for item in plan)


def _metadata(seed: int) -> dict:
    return {"format": "pt", "diffuseit_tiny_model": "sd15", "seed": str(seed), "layout_sha256": layout_sha256()[:16]}


def write_tiny_sd15(folder: PathLike, name: str = SD15_FILE, seed: int = 0,
                    keys: Optional[Callable[[str], bool]] = None, force: bool = False) -> Path:
    """Write the tiny SD1.5 checkpoint (465 MB; a few seconds) to ``folder/name``.

    ``keys`` keeps only the tensors whose key it accepts (same values as in the whole file): a fast
    partial file for tests. The file appears only once complete (written as ``.part``, then renamed),
    so an interrupted run never leaves a truncated checkpoint under the real name.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    plan = [item for item in sd15_plan() if keys is None or keys(item.key)]
    if not plan:
        raise ValueError("keys accepted none of the tiny SD1.5 checkpoint's tensors")
    path = claim(Path(folder) / name, force)  # never over a real checkpoint of that name (core.tiny_guard)
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        write_safetensors_streamed(part, plan, seed, _metadata(seed))
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return record(path)


def tiny_sd15_checkpoint(cache_dir: PathLike, seed: int = 0) -> Path:
    """The tiny SD1.5 checkpoint, written once per machine under ``cache_dir`` (the e2e tests use
    ``~/.cache/diffuseit-blended-tests``) and reused; the name carries the layout's hash and the
    seed. Concurrent callers each write their own ``.part`` and rename it: the result is the same."""
    name = f"tiny_sd15-{layout_sha256()[:12]}-seed{seed}.safetensors"
    path = Path(cache_dir) / name
    if path.is_file() and path.stat().st_size == sd15_file_size():
        return path
    return write_tiny_sd15(cache_dir, name, seed, force=True)  # the cache is ours: a damaged entry is rewritten


def link_tiny_sd15(models_dir: PathLike, cache_dir: PathLike, seed: int = 0) -> Path:
    """Put the cached checkpoint at ``models_dir/checkpoints/tiny_sd15.safetensors`` (a symlink,
    or a copy where links are not allowed); returns that path. An earlier link is replaced; a regular
    file of another size under that name is left alone (FileExistsError)."""
    source = tiny_sd15_checkpoint(cache_dir, seed)
    target = Path(models_dir) / SD15_FOLDER / SD15_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        if target.stat().st_size == source.stat().st_size:
            return target  # an earlier copy
        raise FileExistsError(f"{target} exists and is not the tiny SD1.5 checkpoint; move it away first")
    try:
        target.symlink_to(source)
    except OSError:
        shutil.copyfile(source, target)
    return target


def write_tiny_vae_approx(folder: PathLike, families: tuple = TAESD_FAMILIES, seed: int = 4,
                          force: bool = False) -> list[Path]:
    """TAESD encoder and decoder files (fp16, real size, published keys) for each family in ``folder``
    (ComfyUI's ``models/vae_approx``); returns the written paths, decoders first per family."""
    from safetensors.torch import save_file

    from .encoders.taesd import LATENT_FORMATS, taesd_decoder_module, taesd_encoder_module

    channels = {f.taesd_decoder[:-len("_decoder")]: f.channels for f in LATENT_FORMATS.values()}
    unknown = [f for f in families if f not in channels]
    if unknown:
        raise ValueError(f"unknown TAESD families {unknown}: expected some of {sorted(channels)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, family in enumerate(families):
        for half, build in (("decoder", taesd_decoder_module), ("encoder", taesd_encoder_module)):
            with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
                # the SD1.5 decoder keeps the seed core.tiny_models.write_tiny_taesd always used
                torch.manual_seed(seed + 10 * index + (half == "encoder"))
                module = build(channels[family])
                sd = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
            path = claim(folder / f"{family}_{half}.safetensors", force)
            save_file(sd, str(path))
            written.append(record(path))
    return written
