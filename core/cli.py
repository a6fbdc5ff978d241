"""Command line over the core library: ``python -m core.cli <command>`` (or ``diffuseit-blended``).

Commands: ``download`` (published weights), ``diffuseit-text``, ``diffuseit-image``, ``blended``
(the two papers' pipelines), ``sample`` (plain DDPM sampling) and ``tiny-models`` (random tiny
checkpoints for offline smoke tests). Long commands show a tqdm bar with the sampler's step count.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import Optional, Sequence

import torch

from .diffusion.checkpoints import PRESETS, download_url, load_ddpm, parse_flags
from .io import load_image, load_image_pil, save_image
from .diffusion.sampling import sample

MODELS = "models"
DDPM_FILE, DINO_FILE = "256x256_diffusion_uncond.pt", "dino_vitbase8_pretrain.pth"  # the papers' files


def known_downloads() -> dict[str, tuple[str, str]]:
    """file name -> (models sub-folder, official URL) for every published file the pack can use."""
    from .encoders.clip import expected_file
    from .encoders.dino import DINO_ARCHS, dino_checkpoint_url
    from .encoders.lpips import VGG16_FILE, VGG16_URL

    table = {name: ("guided_diffusion", download_url(name)) for name in PRESETS if download_url(name)}
    for arch, (_, stem) in DINO_ARCHS.items():
        table[stem + ".pth"] = ("dino", dino_checkpoint_url(arch))
    for arch in ("RN50", "RN50x4", "RN50x16", "ViT-B-32", "ViT-B-16"):
        file_name, url = expected_file(arch, "openai")
        table[file_name] = ("clip_guidance", url)
    table[VGG16_FILE] = ("lpips", VGG16_URL)
    return table


DOWNLOAD_SETS = {
    "diffuseit": ["256x256_diffusion_uncond.pt", "dino_vitbase8_pretrain.pth", "RN50.pt", "RN50x4.pt",
                  "ViT-B-32.pt", "RN50x16.pt", "ViT-B-16.pt"],
    "blended": ["256x256_diffusion_uncond.pt", "ViT-B-16.pt"],
}


def tqdm_callback(desc: str):
    from tqdm.auto import tqdm

    bar = None

    def callback(info: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=info["total"], desc=desc, unit="step")
        bar.total = info["total"]  # range restarts add steps
        bar.update(1)
        if info["i"] + 1 >= info["total"]:
            bar.close()

    return callback


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class DownloadError(RuntimeError):
    """A weights download failed (network, HTTP or disk); nothing partial is left behind."""


def _fetch(url: str, target: str, force: bool) -> None:
    from tqdm.auto import tqdm

    if os.path.exists(target) and not force:
        print(f"{target} already exists (use --force to replace it)")
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".part"
    try:
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(target)) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:  # offline, DNS, HTTP errors, a full disk
        if os.path.exists(partial):
            os.remove(partial)
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"could not download {url}: {reason}. Check the connection and run the command "
                            f"again, or download the file by hand and save it as {target}") from None
    os.replace(partial, target)  # only a complete download takes the final name
    print(target)


def cmd_download(args: argparse.Namespace) -> int:
    table = known_downloads()
    names = [n for item in args.names for n in DOWNLOAD_SETS.get(item, [item])]
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown file(s) {unknown}; known: {', '.join(sorted(table))}, or a set: {', '.join(DOWNLOAD_SETS)}",
              file=sys.stderr)
        return 2
    for name in names:
        folder, url = table[name]
        _fetch(url, os.path.join(args.models, folder, name), args.force)
    return 0


def _ddpm(args: argparse.Namespace, device: str):
    ckpt = args.ckpt or os.path.join(args.models, "guided_diffusion", DDPM_FILE)
    ddpm = load_ddpm(ckpt, dtype=args.dtype, device=device, **parse_flags(args.overrides))
    ddpm.unet.gradient_checkpointing = getattr(args, "low_memory", False)
    return ddpm


def cmd_sample(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    ddpm = _ddpm(args, device)
    schedule = ddpm.schedule(args.respacing)
    shape = (args.batch, 3, ddpm.image_size, ddpm.image_size)
    y = torch.full((args.batch,), args.class_label, dtype=torch.long, device=device) if ddpm.class_cond else None
    images = sample(ddpm.unet, schedule, shape, seed=args.seed, sampler=args.sampler, eta=args.eta, y=y,
                    callback=tqdm_callback("sampling"), learn_sigma=ddpm.learn_sigma)
    for path in save_image(images, args.out):
        print(path)
    return 0


def _dino(args: argparse.Namespace, device: str):
    from .encoders.dino import load_dino_extractor

    dino = args.dino or os.path.join(args.models, "dino", DINO_FILE)
    return load_dino_extractor(dino, antialias=args.antialias, device=device)


def _clip_models(args: argparse.Namespace, names: Sequence[str], device: str):
    from .encoders.clip import ClipEnsemble, load_clip

    dtype = torch.float16 if device == "cuda" else torch.float32
    folder = os.path.join(args.models, "clip_guidance")
    loaded = []
    for name in names:
        custom = os.path.join(folder, name)
        if os.path.isfile(os.path.join(custom, "open_clip_config.json")):
            weights = sorted(f for f in os.listdir(custom) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
            loaded.append(load_clip(f"local-dir:{custom}", pretrained=weights[0] if weights else None,
                                    models_dir=custom, device=device, dtype=dtype))
        else:
            loaded.append(load_clip(name, pretrained="openai", models_dir=folder, device=device, dtype=dtype))
    for model in loaded:
        model.gradient_checkpointing = args.low_memory
    return ClipEnsemble(loaded)


def cmd_diffuseit_text(args: argparse.Namespace) -> int:
    from .diffuseit.pipeline import diffuseit_text

    device = args.device or default_device()
    ddpm = _ddpm(args, device)
    source = load_image_pil(args.image, ddpm.image_size).to(device)
    clip = _clip_models(args, [m.strip() for m in args.clip_models.split(",") if m.strip()], device)
    result = diffuseit_text(ddpm, _dino(args, device), clip, source, args.source_text, args.target_text,
                            samples=args.samples, seed=args.seed, chunk_size=args.chunk_size,
                            callback=tqdm_callback("DiffuseIT"), **_overrides(args))
    for path in save_image(result.images, args.out):
        print(path)
    return 0


def cmd_diffuseit_image(args: argparse.Namespace) -> int:
    from .diffuseit.pipeline import diffuseit_image

    device = args.device or default_device()
    ddpm = _ddpm(args, device)
    source = load_image_pil(args.image, ddpm.image_size).to(device)
    style = load_image_pil(args.style, ddpm.image_size).to(device)
    result = diffuseit_image(ddpm, _dino(args, device), source, style, samples=args.samples, seed=args.seed,
                             chunk_size=args.chunk_size, callback=tqdm_callback("DiffuseIT"), **_overrides(args))
    for path in save_image(result.images, args.out):
        print(path)
    return 0


def cmd_blended(args: argparse.Namespace) -> int:
    from .blended import blended_edit
    from .blended.rank_criteria import CRITERIA_PRESETS
    from .io import load_mask_file

    device = args.device or default_device()
    ddpm = _ddpm(args, device)
    image = load_image(args.image).to(device)
    mask = load_mask_file(args.mask)  # upstream's rule: the red channel, any non-zero value = edit
    clip = _clip_models(args, [args.clip_model], device)[0]
    result = blended_edit(ddpm, clip, image, mask, args.prompt, samples=args.samples, seed=args.seed,
                          skip_timesteps=args.skip_timesteps, respacing=args.respacing, chunk_size=args.chunk_size,
                          invert_mask=args.invert_mask, top_k=args.top_k, callback=tqdm_callback("Blended Diffusion"),
                          rank_criteria=CRITERIA_PRESETS[args.rank_criteria])
    for k, (path, score) in enumerate(zip(save_image(result.images, args.out), result.scores.tolist())):
        if args.rank_criteria == "paper":
            print(f"{path}\tclip_distance={score:.4f}")
        else:  # the weighted total, then each component
            parts = "\t".join(f"{name}={float(value[k]):.4f}" for name, value in result.components.items())
            print(f"{path}\tscore={score:.4f}\t{parts}")
    return 0


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from .tiny_models import write_tiny_models

    for folder, path in write_tiny_models(args.dir, sd15=args.sd15, seed=args.seed).items():
        print(f"{folder}: {path}")
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    out = {}
    for key in ("skip_timesteps", "respacing", "resample_steps"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    return out


def _model_args(p: argparse.ArgumentParser, dino: bool = False) -> None:
    p.add_argument("--models", default=MODELS, help="models folder with guided_diffusion/, dino/, clip_guidance/")
    p.add_argument("--ckpt", default=None, help=f"guided-diffusion checkpoint (default: <models>/guided_diffusion/{DDPM_FILE})")
    if dino:
        p.add_argument("--dino", default=None, help=f"DINO ViT checkpoint (default: <models>/dino/{DINO_FILE})")
        p.add_argument("--antialias", action="store_true", help="antialiased 256->224 resize (torchvision>=0.17)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="UNet body precision")
    p.add_argument("--device", default=None, help="cuda / mps / cpu (default: best available)")
    p.add_argument("--overrides", default="", help="guided-diffusion flags, e.g. 'num_head_channels=64'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="samples per image (batched)")
    p.add_argument("--chunk-size", type=int, default=0, help="rows per batch (0 = all at once)")
    p.add_argument("--low-memory", action="store_true",
                   help="gradient checkpointing of the UNet and CLIP towers: ~55%% less step memory, ~25%% slower")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffuseit-blended", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="download published weights (file names or sets: diffuseit, blended)")
    p.add_argument("names", nargs="+", help="e.g. diffuseit, or 256x256_diffusion_uncond.pt ViT-B-16.pt")
    p.add_argument("--models", default=MODELS, help="models folder (files go into its sub-folders)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("diffuseit-text", help="DiffuseIT text-guided translation (official text preset)")
    _model_args(p, dino=True)
    p.add_argument("--image", required=True, help="source image (resized to 256x256 like the official code)")
    p.add_argument("--source-text", required=True, help="what the image shows, e.g. 'Lion'")
    p.add_argument("--target-text", required=True, help="what it should become, e.g. 'Black Leopard'")
    p.add_argument("--clip-models", default="RN50, RN50x4, ViT-B-32, RN50x16, ViT-B-16", help="CLIP ensemble")
    p.add_argument("--skip-timesteps", dest="skip_timesteps", type=int, default=None)
    p.add_argument("--respacing", default=None)
    p.add_argument("--resample-steps", dest="resample_steps", type=int, default=None)
    p.add_argument("--out", default="outputs/diffuseit_text.png")
    p.set_defaults(func=cmd_diffuseit_text)

    p = sub.add_parser("diffuseit-image", help="DiffuseIT image-guided translation (official image preset)")
    _model_args(p, dino=True)
    p.add_argument("--image", required=True, help="structure (content) image")
    p.add_argument("--style", required=True, help="appearance (style) image")
    p.add_argument("--skip-timesteps", dest="skip_timesteps", type=int, default=None)
    p.add_argument("--respacing", default=None)
    p.add_argument("--resample-steps", dest="resample_steps", type=int, default=None)
    p.add_argument("--out", default="outputs/diffuseit_image.png")
    p.set_defaults(func=cmd_diffuseit_image)

    p = sub.add_parser("blended", help="Blended Diffusion: edit the masked region towards a prompt, ranked")
    _model_args(p)
    p.add_argument("--image", required=True, help="image of any size")
    p.add_argument("--mask", required=True, help="mask image: any non-zero red value = edit (upstream's rule; green/blue ignored)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--clip-model", default="ViT-B-16")
    p.add_argument("--invert-mask", action="store_true")
    p.add_argument("--skip-timesteps", dest="skip_timesteps", type=int, default=25)
    p.add_argument("--respacing", default="100")
    p.add_argument("--top-k", type=int, default=None, help="keep the best k (default: all, ranked)")
    p.add_argument("--rank-criteria", dest="rank_criteria", choices=["paper", "improved"], default="paper",
                   help="paper: masked CLIP distance (default); improved: + whole view, typography penalty, seam "
                        "(README, CLIP Rank)")
    p.add_argument("--out", default="outputs/blended.png")
    p.set_defaults(func=cmd_blended)

    p = sub.add_parser("sample", help="unconditional (or class-conditional) sampling from a DDPM file")
    p.add_argument("--ckpt", required=True, help="guided-diffusion checkpoint (.pt/.pth/.safetensors)")
    p.add_argument("--out", default="outputs/sample.png", help="output PNG (numbered when batch > 1)")
    p.add_argument("--respacing", default="100", help='timestep respacing: "100", "ddim50", "10,10,5", ...')
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--class-label", type=int, default=0, help="ImageNet class for class-conditional models")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default=None, help="cuda / mps / cpu (default: best available)")
    p.add_argument("--overrides", default="", help="guided-diffusion flags, e.g. 'num_head_channels=64'")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("tiny-models", help="write tiny random checkpoints (real formats and names) for offline tests")
    p.add_argument("dir", help="models folder to fill")
    p.add_argument("--sd15", action="store_true",
                   help="also write checkpoints/tiny_sd15.safetensors, a random SD1.5-layout checkpoint for Load "
                        "Checkpoint (465 MB: full-size VAE and CLIP-L, tiny UNet)")
    p.add_argument("--seed", type=int, default=0, help="seed of the SD1.5 checkpoint's weights (default 0)")
    p.set_defaults(func=cmd_tiny_models)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, DownloadError) as exc:  # say what and how to fix it, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
