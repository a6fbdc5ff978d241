"""Load the tiny models with ComfyUI's own nodes and sample, in a ComfyUI environment; prints one JSON line.

    <comfy venv>/bin/python tests/e2e/tiny_sd15_check.py COMFY_DIR MODELS_DIR [--steps N] [--size PX]

``MODELS_DIR`` holds ``checkpoints/tiny_sd15.safetensors`` and ``vae_approx/taesd_*`` (as written
by ``core.tiny_sd``). Load Checkpoint -> CLIP Text Encode -> Empty Latent -> KSampler (euler) ->
VAE Decode, then VAE Loader "taesd" decoding the same latent; reports the detected model type,
timings and value ranges. Used by tests/test_tiny_sd.py and bench/bench_tiny_sd15.py (standard
library + what ComfyUI brings; never imported by the pack).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class Clock:
    """Wall and process-CPU seconds of a block (CPU time is what a loaded, shared machine still measures)."""

    def __init__(self, out: dict, name: str, divide: int = 1):
        self.out, self.name, self.divide = out, name, divide

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.out[self.name + "_s"] = (time.perf_counter() - self.wall) / self.divide
        self.out[self.name + "_cpu_s"] = (time.process_time() - self.cpu) / self.divide


def stats(t) -> dict:
    t = t.float()
    return {"finite": bool(t.isfinite().all()), "min": float(t.min()), "max": float(t.max()), "std": float(t.std()),
            "shape": list(t.shape)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("comfy_dir")
    parser.add_argument("models_dir")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    sys.argv = [sys.argv[0], "--cpu"]
    os.chdir(args.comfy_dir)
    sys.path.insert(0, args.comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    import folder_paths
    import nodes

    for folder in ("checkpoints", "vae_approx"):
        folder_paths.add_model_folder_path(folder, os.path.join(args.models_dir, folder), is_default=True)
    out: dict = {}
    with torch.inference_mode():
        with Clock(out, "load"):
            model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
        out["model_type"] = type(model.model.model_config).__name__
        # every weight ComfyUI built must come from the file (a missing one would stay uninitialised)
        import safetensors

        with safetensors.safe_open(folder_paths.get_full_path("checkpoints", "tiny_sd15.safetensors"), "pt") as f:
            in_file = set(f.keys())
        strip = lambda prefix: {k[len(prefix):] for k in in_file if k.startswith(prefix)}  # noqa: E731
        clip_built = {k for k in clip.cond_stage_model.state_dict()
                      if not k.endswith(("text_projection.weight", "logit_scale"))}  # SD15 drops these on save too
        out["not_in_file"] = sorted(
            (set(model.model.diffusion_model.state_dict()) - strip("model.diffusion_model."))
            | (set(vae.first_stage_model.state_dict()) - strip("first_stage_model."))
            | (clip_built - {"clip_l." + k for k in strip("cond_stage_model.")}))
        out["unet_parameters"] = sum(p.numel() for p in model.model.diffusion_model.parameters())
        with Clock(out, "encode", 2):
            positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
            negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        out["cond"] = stats(positive[0][0])
        latent = nodes.EmptyLatentImage().generate(args.size, args.size, 1)[0]
        sample = lambda steps: nodes.common_ksampler(model, 0, steps, 7.0, "euler", "normal", positive, negative,
                                                     latent)[0]
        sample(1)  # loads the model and warms up
        with Clock(out, "step", args.steps):
            result = sample(args.steps)
        out["latent"] = stats(result["samples"])
        with Clock(out, "vae_decode"):
            image = nodes.VAEDecode().decode(vae, result)[0]
        out["image"] = stats(image)
        # the raw decoder output (before ComfyUI's clamp to [0, 1]) of an N(0, 1) latent
        z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
        out["vae_raw_of_normal_latent"] = stats(vae.first_stage_model.decode(z.to(vae.vae_dtype)))
        out["vae_list"] = [v for v in nodes.VAELoader.vae_list(nodes.VAELoader) if v.startswith("tae")]
        taesd = nodes.VAELoader().load_vae("taesd")[0]
        out["taesd_image"] = stats(nodes.VAEDecode().decode(taesd, result)[0])
        out["taesd_latent"] = stats(nodes.VAEEncode().encode(taesd, image)[0]["samples"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
