"""Full-size models with random weights (no downloads) for the benchmarks, plus tiny variants.

* ``build_unet`` -- the 256x256 unconditional ADM (552.8 M parameters) through the pack's real
  loader: a random state dict with exactly the shapes of ``tests/fixtures/guided_diffusion/
  unet256_uncond_manifest.json`` goes through ``core.load_ddpm`` (meta-device build, strict load,
  ``convert_body``), so the benchmark runs the same module the published file gives.
* ``build_dino`` -- DINO ViT-B/8 (``vit_base_patch8_224``, 85.8 M) in ``core.encoders.dino.DINOExtractor``.
* ``build_clip`` -- DiffuseIT's CLIP ensemble (RN50, RN50x4, ViT-B-32, RN50x16, ViT-B-16) or any
  subset, through ``core.encoders.clip.load_clip(arch, pretrained=None)`` (open_clip's random init).

Random weights: every weight tensor is N(0, 1/fan_in) (keeps activations O(1) through the
residual stream), biases 0, norm scales 1; the output head is scaled by 0.1 as in
``core.tiny_models`` so x0 stays in a sane range. Values are meaningless -- only cost is measured.

``--tiny`` variants (``tiny=True``) use ``core.tiny_models``' configurations so the bench code
paths run in seconds (tests/test_bench_smoke.py).

CLI: ``python -m bench.models [--clip-models RN50,ViT-B-16] [--tiny]`` prints build times,
parameter counts and RSS after each model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MANIFEST = os.path.join(ROOT, "tests", "fixtures", "guided_diffusion", "unet256_uncond_manifest.json")
DIFFUSEIT_CLIP = ("RN50", "RN50x4", "ViT-B-32", "RN50x16", "ViT-B-16")  # upstream --clip_models default
BLENDED_CLIP = ("ViT-B-16",)


def rss_mb() -> float:
    """Current resident set size (MiB), from /proc/self/statm."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """Process-lifetime peak RSS (MiB): ru_maxrss is KiB on Linux. Run one configuration per process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def manifest_shapes(path: str = MANIFEST) -> dict[str, list[int]]:
    with open(path) as f:
        return json.load(f)["tensors"]


def random_state_dict(shapes: dict[str, Sequence[int]], seed: int = 0, head_scale: float = 0.1) -> dict[str, torch.Tensor]:
    """N(0, 1/fan_in) weights, zero biases, unit norm scales, for the given key -> shape map."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.empty(shape).normal_(0.0, fan_in ** -0.5, generator=gen)
        elif key.endswith(".weight") and (".norm." in key or "in_layers.0" in key or "out_layers.0" in key
                                           or key.startswith("out.0")):
            t = torch.ones(shape)
        else:
            t = torch.zeros(shape)
        sd[key] = t
    sd["out.2.weight"].mul_(head_scale)
    return sd


def build_unet(dtype: str = "fp32", device: str = "cpu", tiny: bool = False, seed: int = 0):
    """(DDPM, seconds). Full size: manifest shapes through ``load_ddpm``; tiny: core.tiny_models' UNet."""
    from core import load_ddpm
    from core.tiny_models import tiny_unet_state_dict

    t0 = time.perf_counter()
    if tiny:
        sd = tiny_unet_state_dict(seed)
    else:
        sd = random_state_dict(manifest_shapes(), seed)
    ddpm = load_ddpm(sd, dtype=dtype, device=device, image_size=256, num_head_channels=64)
    del sd
    return ddpm, time.perf_counter() - t0


def build_dino(device: str = "cpu", tiny: bool = False, fused_attention: bool = False, seed: int = 1):
    """(DINOExtractor, seconds): ViT-B/8 (or core.tiny_models' tiny ViT) with random weights, frozen."""
    from core.encoders.dino import DINOExtractor, build_dino_vit
    from core.tiny_models import tiny_dino_vit

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tiny:
            vit = tiny_dino_vit()
        else:
            vit = build_dino_vit("vit_base_patch8_224")
    vit = vit.to(device).eval().requires_grad_(False)
    extractor = DINOExtractor(vit, fused_attention=fused_attention).to(device)
    return extractor, time.perf_counter() - t0


def build_clip(names: Sequence[str] = DIFFUSEIT_CLIP, device: str = "cpu", tiny: bool = False,
               dtype: torch.dtype = torch.float32):
    """(list of ClipModel, {name: seconds}). Random open_clip weights; ``tiny``: core.encoders.clip's tiny config
    (one per requested name, so ensemble sizes stay comparable)."""
    from core.encoders.clip import load_clip

    models, seconds = [], {}
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + i)
            if tiny:
                models.append(_tiny_clip(device, "resnet" if name.startswith("RN") else "vit", dtype))
            else:
                models.append(load_clip(name, pretrained=None, device=device, dtype=dtype))
        seconds[name] = time.perf_counter() - t0
    return models, seconds


def _tiny_clip(device: str, vision: str, dtype: torch.dtype = torch.float32):
    from core.tiny_models import tiny_clip

    return tiny_clip(vision, device, dtype)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_manifest(unet: torch.nn.Module, path: str = MANIFEST) -> None:
    """Raise if the built UNet's state dict differs from the manifest's keys/shapes."""
    want = manifest_shapes(path)
    got = {k: list(v.shape) for k, v in unet.state_dict().items()}
    if got != {k: list(v) for k, v in want.items()}:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        raise AssertionError(f"UNet differs from the manifest: missing {missing}, extra {extra}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip-models", default=",".join(DIFFUSEIT_CLIP))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print("| model | parameters | build s | RSS after (MiB) |\n|---|---:|---:|---:|")
    ddpm, s = build_unet(device=args.device, tiny=args.tiny)
    if not args.tiny:
        check_manifest(ddpm.unet)
    print(f"| UNet 256 uncond{' (tiny)' if args.tiny else ''} | {count(ddpm.unet) / 1e6:.1f} M | {s:.1f} | {rss_mb():.0f} |")
    dino, s = build_dino(args.device, args.tiny)
    print(f"| DINO ViT-B/8{' (tiny)' if args.tiny else ''} | {count(dino) / 1e6:.1f} M | {s:.1f} | {rss_mb():.0f} |")
    names = [n for n in args.clip_models.split(",") if n]
    for name in names:
        models, secs = build_clip([name], args.device, args.tiny)
        print(f"| CLIP {name}{' (tiny)' if args.tiny else ''} | {count(models[0].module) / 1e6:.1f} M | "
              f"{secs[name]:.1f} | {rss_mb():.0f} |")
    print(f"peak RSS {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
