"""Cost of Apply Guidance to Model: one guided KSampler step vs a plain one, on full-size random weights.

SD1.5 at 512 px (64x64 latents, full-size UNet 860 M, CFG so two UNet evaluations per call), the
pack's DINO structure (ViT-B/8) + directional CLIP (one ViT-B/16; the official ensemble has five)
terms, decoded with a full-size TAESD decoder or the full SD VAE decoder. Every configuration runs
in its own process inside ComfyUI's interpreter with ComfyUI's own sampling code (``comfy.sample``),
so the peak RSS column belongs to that configuration alone.

    python -m bench.bench_model_guidance [--steps 3] [--size 512] [--samplers euler,heun] [--json out.jsonl]

Needs a real ComfyUI (``tests/e2e/comfy_env``: $COMFYUI_DIR, or v0.3.75 from PyPI, cached).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECODERS = ("plain", "taesd", "vae")


def child(args: argparse.Namespace) -> dict:
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, os.getcwd())
    sys.path.insert(1, ROOT)
    import comfy.options

    comfy.options.enable_args_parsing()
    import importlib.util

    import torch

    import comfy.model_patcher
    import comfy.sample
    import comfy.sd
    import comfy.supported_models

    spec = importlib.util.spec_from_file_location("diffuseit_pack", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["diffuseit_pack"] = pack
    spec.loader.exec_module(pack)
    from diffuseit_pack.core.encoders.taesd import TAESDDecoder
    from diffuseit_pack.nodes import comfy_bridge as bridge
    from diffuseit_pack.nodes.model_guidance import _post_cfg
    from diffuseit_pack.core.latent.model_guidance import LatentGuide
    from diffuseit_pack.core.latent.x0_guidance import GuidanceBand

    from bench.models import build_clip, build_dino, peak_rss_mb
    from core.diffuseit.clip_direction import CLIPDirectionalLoss
    from core.diffuseit.dino_losses import DINOStructureLoss

    torch.set_num_threads(args.threads) if args.threads else None
    g = torch.Generator().manual_seed(0)

    def randomise(module: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=g) / max(p[0].numel(), 1) ** 0.5)
                elif name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()

    unet_config = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
                   "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
                   "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
                   "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
                   "num_heads": 8, "num_head_channels": -1, "adm_in_channels": None,
                   "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                   "use_temporal_attention": False, "use_temporal_resblock": False}
    config = comfy.supported_models.SD15(unet_config)
    model = config.get_model({})
    randomise(model)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    latent_format = patcher.get_model_object("latent_format")

    guided = patcher
    if args.decoder != "plain":
        if args.decoder == "taesd":
            module = TAESDDecoder(4).eval().requires_grad_(False)
            randomise(module)

            def decode(latent):
                return module(latent)
        else:
            vae = comfy.sd.VAE(sd={"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)})  # SD's VAE layout
            randomise(vae.first_stage_model)
            decode, module, _ = bridge.vae_decoder(vae, latent_format)
        dino, _ = build_dino()
        clip, _ = build_clip(["ViT-B-16"])
        terms = [DINOStructureLoss(dino, 1000.0, 200.0), CLIPDirectionalLoss(clip, "cat", "tiger", 2000.0, ncuts=8)]
        source = torch.rand(1, 3, args.size, args.size) * 2 - 1
        guide = LatentGuide(terms, decode, source, strength=0.3, band=GuidanceBand(0.0, 1.0, 1), seed=0,
                            modules=[module])
        guided = patcher.clone()
        guided.set_model_sampler_post_cfg_function(_post_cfg(guide))
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    uncond = [[torch.zeros(1, 77, 768), {}]]
    times: list = []
    last = [time.perf_counter()]

    def on_step(step, x0, x, total):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
    with torch.inference_mode():
        last[0] = time.perf_counter()
        comfy.sample.sample(guided, noise, args.steps, 7.0, args.sampler, "karras", cond, uncond, latent, denoise=1.0,
                            seed=0, callback=on_step, disable_pbar=True)
    steady = times[1:] if len(times) > 1 else times
    return {"decoder": args.decoder, "sampler": args.sampler, "size": args.size, "steps": args.steps,
            "s_per_step": sum(steady) / len(steady), "first_step_s": times[0], "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from e2e import comfy_env

    env = comfy_env.ensure_comfy()
    rows = []
    for sampler in args.samplers.split(","):
        for decoder in args.decoders.split(","):
            cmd = [str(env.python), os.path.abspath(__file__), "--child", "--decoder", decoder, "--sampler", sampler,
                   "--steps", str(args.steps), "--size", str(args.size), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, cwd=str(env.comfy_dir), capture_output=True, text=True)
            if proc.returncode:
                print(f"{sampler}/{decoder} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"\nComfyUI {env.version}, SD1.5 UNet (random, 860 M), {args.size} px, CFG 7, karras; "
          f"guidance = DINO ViT-B/8 structure + CLIP ViT-B/16 directional (8 cuts), strength 0.3, every step\n")
    print("| sampler | decoder | s / step | x plain | peak RSS MB |")
    print("|---|---|---:|---:|---:|")
    plain = {r["sampler"]: r["s_per_step"] for r in rows if r["decoder"] == "plain"}
    for r in rows:
        ratio = r["s_per_step"] / plain[r["sampler"]] if r["sampler"] in plain else float("nan")
        print(f"| {r['sampler']} | {r['decoder']} | {r['s_per_step']:.2f} | {ratio:.2f} | {r['peak_rss_mb']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--decoder", default="plain", choices=DECODERS)
    ap.add_argument("--decoders", default=",".join(DECODERS))
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--samplers", default="euler,heun")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
    else:
        parent(args)


if __name__ == "__main__":
    main()
