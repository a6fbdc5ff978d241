"""Regenerate ``core/tiny_sd15_layout.json``: the key -> shape layout of the tiny SD1.5 checkpoint.

Run with the Python of a ComfyUI environment (the e2e harness's venv works), from anywhere:

    ~/.cache/diffuseit-blended-tests/venv-py311-*/bin/python tests/e2e/make_sd15_layout.py \
        [--comfy ~/.cache/diffuseit-blended-tests/ComfyUI-0.3.75-horde2.22.2]

core never imports comfy, so the layout is read here, once, from ComfyUI's own classes: the tiny
UNet config is built with comfy's ``UNetModel`` and must be detected as ``supported_models.SD15``
by ``model_detection.model_config_from_unet`` (the same call Load Checkpoint makes); the VAE is the
``AutoencoderKL`` that ``comfy.sd.VAE`` builds for SD1.x files, the text encoder comfy's
``SD1ClipModel`` (CLIP-L). Key names are the ones ComfyUI writes when it saves a checkpoint
(``state_dict_for_saving``), i.e. the ldm names Load Checkpoint reads back. Modules are built on
the ``meta`` device: only names and shapes are read, no weights are made.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "core" / "tiny_sd15_layout.json"
DEFAULT_COMFY = Path.home() / ".cache" / "diffuseit-blended-tests" / "ComfyUI-0.3.75-horde2.22.2"

# one level, one res block, transformer depth 1 everywhere; the values SD15 detection matches on
# (model_channels 320, context_dim 768, no linear-in-transformer, no ADM) are SD1.5's own
TINY_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [1], "transformer_depth": [1], "channel_mult": [1], "transformer_depth_middle": 1,
             "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
             "transformer_depth_output": [1, 1], "use_temporal_attention": False, "use_temporal_resblock": False}
# comfy.sd.VAE's default SD1.x/SD2.x configuration
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def shapes(sd: dict) -> dict:
    """key -> [shape, dtype in the file]: floating weights are stored in float16 (whatever dtype the
    module was built in), integer buffers (none in v0.3.75's modules) keep theirs."""
    return {k: [list(v.shape), "float16" if v.dtype.is_floating_point else str(v.dtype).replace("torch.", "")]
            for k, v in sd.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy", type=Path, default=DEFAULT_COMFY, help="ComfyUI tree (main.py)")
    args = parser.parse_args()
    comfy_dir = args.comfy.resolve()
    sys.argv = ["x", "--cpu"]  # comfy parses its CLI flags at import
    os.chdir(comfy_dir)
    sys.path.insert(0, str(comfy_dir))
    import torch

    import comfy.options

    comfy.options.enable_args_parsing()  # as main.py does, so --cpu is read
    import comfy.model_detection
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfyui_version import __version__

    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        unet = UNetModel(**TINY_UNET, dtype=torch.float16, device="meta", operations=ops)
    unet_sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    # Load Checkpoint's own detection must find SD15 with exactly this config
    config = comfy.model_detection.model_config_from_unet(dict(unet_sd), "model.diffusion_model.")
    assert type(config) is comfy.supported_models.SD15, f"detected {type(config).__name__}, not SD15"
    detected = {k: v for k, v in config.unet_config.items() if k in TINY_UNET}
    assert detected == TINY_UNET, f"detected config differs: {detected}"
    config.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):
        model = config.get_model(unet_sd, "model.diffusion_model.", device="meta")
        vae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
        clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float16)
    saved = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())  # ComfyUI's Save Checkpoint names
    assert set(k for k in saved if k.startswith("model.diffusion_model.")) == set(unet_sd)
    # and Load Checkpoint finds every CLIP weight it builds under those names
    clip_back = config.process_clip_state_dict(dict(saved))
    missing = set(clip.state_dict()) - set(clip_back) - {"clip_l.transformer.text_projection.weight", "clip_l.logit_scale"}
    assert not missing, f"CLIP keys Load Checkpoint would miss: {sorted(missing)[:5]}"

    groups = []
    for prefix, what in (("model.diffusion_model.", "tiny UNet (SD15 detection config, one level)"),
                         ("first_stage_model.", "SD VAE, full size (comfy.sd.VAE's SD1.x config)"),
                         ("cond_stage_model.", "CLIP-L text encoder, full size (comfy.sd1_clip.SD1ClipModel)")):
        part = {k[len(prefix):]: v for k, v in shapes(saved).items() if k.startswith(prefix)}
        dtypes = sorted({d for _, d in part.values()})
        groups.append({"prefix": prefix, "what": what,
                       "tensors": [[k, shape] if d == "float16" else [k, shape, d] for k, (shape, d) in part.items()]})
        print(f"{prefix}: {len(part)} tensors, stored dtypes {dtypes}")
    other = [k for k in saved if not any(k.startswith(g["prefix"]) for g in groups)]
    assert not other, f"keys outside the three groups: {other[:5]}"
    total = sum(int(torch.Size(s).numel()) for g in groups for _, s, *_ in g["tensors"])
    layout = {"source": f"ComfyUI v{__version__}: tests/e2e/make_sd15_layout.py (supported_models.SD15, "
                        "AutoencoderKL, SD1ClipModel, names from state_dict_for_saving)",
              "detected_as": "SD15", "unet_config": TINY_UNET, "dtype": "float16", "parameters": total,
              "groups": groups}
    text = json.dumps(layout, separators=(",", ":"))
    OUT.write_text(text + "\n")
    print(f"{OUT}: {total:,} parameters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}")


if __name__ == "__main__":
    main()
