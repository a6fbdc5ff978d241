"""Command line over the core library: ``python -m core.cli <command>`` (or ``diffuseit-blended``).

Commands grow with the pipelines; every long command shows a tqdm bar with the sampler's step count.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from typing import Optional, Sequence

import torch

from .checkpoints import PRESETS, download_url, load_ddpm, parse_flags
from .images import save_image
from .sampling import sample


def tqdm_callback(total: int, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step")

    def callback(info: dict) -> None:
        bar.update(1)
        if info["i"] + 1 == info["total"]:
            bar.close()

    return callback


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cmd_download(args: argparse.Namespace) -> int:
    url = download_url(args.name)
    if url is None:
        print(f"unknown checkpoint {args.name!r}; known: {', '.join(n for n in PRESETS if download_url(n))}",
              file=sys.stderr)
        return 2
    os.makedirs(args.dir, exist_ok=True)
    target = os.path.join(args.dir, args.name)
    if os.path.exists(target) and not args.force:
        print(f"{target} already exists (use --force to replace it)")
        return 0
    from tqdm.auto import tqdm

    partial = target + ".part"
    with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=args.name) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    os.replace(partial, target)  # only a complete download takes the final name
    print(target)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    ddpm = load_ddpm(args.ckpt, dtype=args.dtype, device=device, **parse_flags(args.overrides))
    schedule = ddpm.schedule(args.respacing)
    shape = (args.batch, 3, ddpm.image_size, ddpm.image_size)
    y = None
    if ddpm.class_cond:
        y = torch.full((args.batch,), args.class_label, dtype=torch.long, device=device)
    steps = schedule.num_timesteps
    images = sample(ddpm.unet, schedule, shape, seed=args.seed, sampler=args.sampler, eta=args.eta, y=y,
                    callback=tqdm_callback(steps, "sampling"), learn_sigma=ddpm.learn_sigma)
    for path in save_image(images, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffuseit-blended", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="download a published guided-diffusion checkpoint")
    p.add_argument("name", help="file name, e.g. 256x256_diffusion_uncond.pt")
    p.add_argument("--dir", default="models/guided_diffusion", help="target folder")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_download)

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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # bad input: say what and how to fix it, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
