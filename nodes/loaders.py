"""Loader nodes: checkpoint files from the pack's model folders into managed core models."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from ..core.diffusion.checkpoints import load_ddpm, parse_flags
from ..core.encoders.clip import ClipEnsemble, architecture_name, expected_file, load_clip
from ..core.encoders.dino import load_dino_extractor
from ..core.encoders.lpips import VGG16_FILE, load_lpips
from . import checks, comfy_bridge as bridge
from .schema_features import advanced, schema
from .types import CLIPType, DDPMType, DINOType, LPIPSType

CATEGORY = "DiffuseIT-Blended/loaders"
DEFAULT_CLIP_ENSEMBLE = "RN50, RN50x4, ViT-B-32, RN50x16, ViT-B-16"
DDPM_DTYPES = ["auto", "fp32", "fp16", "bf16"]
CLIP_DTYPES = ["auto", "fp32", "fp16"]
CLIP_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class LoadDDPM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LoadDDPM",
            search_aliases=["guided-diffusion", "OpenAI ADM", "DiffuseIT", "Blended Diffusion"],
            display_name="Load DDPM (guided-diffusion)",
            category=CATEGORY,
            description="Loads an OpenAI guided-diffusion pixel UNet (e.g. 256x256_diffusion_uncond.pt) "
                        "from models/guided_diffusion for DiffuseIT and Blended Diffusion.",
            inputs=[
                io.Combo.Input("ckpt_name", options=bridge.model_files("guided_diffusion"),
                               tooltip="Checkpoint in models/guided_diffusion. DiffuseIT and Blended Diffusion "
                                       "use 256x256_diffusion_uncond.pt (see the README's model table)."),
                advanced(io.Combo.Input, "dtype", options=DDPM_DTYPES, default="auto",
                         tooltip="Precision of the UNet body. 'auto' follows ComfyUI's device and "
                                 "--fp16-unet/--bf16-unet/--force-fp32 flags; norms and embeddings stay fp32."),
                advanced(io.String.Input, "overrides", default="", optional=True,
                         tooltip="guided-diffusion flags the file's shapes cannot tell, comma separated, "
                                 "e.g. 'num_heads=4' or 'num_head_channels=64, noise_schedule=cosine'. They "
                                 "mean what they mean in guided-diffusion: a flag left out comes from the "
                                 "published file's preset, else guided-diffusion's default, and any head "
                                 "flag (num_heads, num_head_channels, num_heads_upsample) sets the whole "
                                 "head layout, so 'num_heads=4' alone gives 4 heads (num_head_channels=-1). "
                                 "Empty = the preset of the published file; a file with no preset is "
                                 "assumed to use num_head_channels=64 (the published models' layout, logged "
                                 "in the console) -- pass num_heads=... or num_head_channels=... if it was "
                                 "trained otherwise."),
                advanced(io.Boolean.Input, "gradient_checkpointing", default=False, optional=True,
                         tooltip="Recompute the UNet's activations during the guidance backward instead of "
                                 "keeping them: about 55% less memory per guided step for about 25% more "
                                 "time (bench/README.md). For large batches or small GPUs."),
            ],
            outputs=[DDPMType.Output(display_name="ddpm", tooltip="The diffusion model and its schedule facts.")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name: str | None = None, dtype: str | None = None) -> bool | str:
        return checks.validation_result("LoadDDPM", {"ckpt_name": ckpt_name, "dtype": dtype}, {"dtype": DDPM_DTYPES},
                                        {"ckpt_name": "guided_diffusion"})

    @classmethod
    def execute(cls, ckpt_name: str, dtype: str = "auto", overrides: str = "",
                gradient_checkpointing: bool = False) -> io.NodeOutput:
        checks.check_inputs("LoadDDPM", {"dtype": dtype}, {"dtype": DDPM_DTYPES})
        path = bridge.resolve_model_file("guided_diffusion", ckpt_name, "LoadDDPM ckpt_name")
        ddpm = load_ddpm(path, device=bridge.offload_device(), **parse_flags(overrides))
        chosen = bridge.pick_unet_dtype(dtype, bridge.torch_device(), sum(p.numel() for p in ddpm.unet.parameters()))
        if chosen != torch.float32:
            ddpm.to(dtype=chosen)
        ddpm.unet.gradient_checkpointing = bool(gradient_checkpointing)
        return io.NodeOutput(bridge.manage(ddpm, ddpm.unet))


class LoadDINO(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LoadDINO",
            search_aliases=["DINO ViT", "DiffuseIT"],
            display_name="Load DINO ViT",
            category=CATEGORY,
            description="Loads a DINO ViT (official dino_vitbase8_pretrain.pth by default) from models/dino for "
                        "DiffuseIT's structure, style and semantic-divergence losses.",
            inputs=[
                io.Combo.Input("dino_name", options=bridge.model_files("dino"),
                               tooltip="DINO checkpoint in models/dino: dino_vitbase8_pretrain.pth (ViT-B/8, the paper's), "
                                       "or dino_vitbase16 / dino_deitsmall8 / dino_deitsmall16 files."),
                advanced(io.Boolean.Input, "antialias", default=False,
                         tooltip="Antialias the 256->224 resize. Off reproduces the authors' runs "
                                 "(torchvision 0.10); on is what torchvision >= 0.17 does by default."),
                advanced(io.Int.Input, "num_heads", default=0, min=0, max=64, optional=True,
                         tooltip="Attention heads (0 = from the official size table or a <name>_config.json "
                                 "beside the file). Only needed for non-standard DINO models."),
            ],
            outputs=[DINOType.Output(display_name="dino", tooltip="DINO feature extractor (layer-11 keys and [CLS]).")],
        )

    @classmethod
    def validate_inputs(cls, dino_name: str | None = None) -> bool | str:
        return checks.validation_result("LoadDINO", {"dino_name": dino_name}, model_names={"dino_name": "dino"})

    @classmethod
    def execute(cls, dino_name: str, antialias: bool = False, num_heads: int = 0) -> io.NodeOutput:
        path = bridge.resolve_model_file("dino", dino_name, "LoadDINO dino_name")
        extractor = load_dino_extractor(path, num_heads=num_heads or None, antialias=antialias,
                                        device=bridge.offload_device())
        return io.NodeOutput(bridge.manage(extractor, extractor))


class LoadCLIPGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LoadCLIPGuidance",
            search_aliases=["CLIP guidance", "OpenAI CLIP", "DiffuseIT", "Blended Diffusion"],
            display_name="Load CLIP (guidance ensemble)",
            category=CATEGORY,
            description="Loads one or more OpenAI/open_clip CLIP models from models/clip_guidance: DiffuseIT uses "
                        "an ensemble of five, Blended Diffusion ViT-B-16. Not ComfyUI's text-encoder CLIP.",
            inputs=[
                io.String.Input("models", default=DEFAULT_CLIP_ENSEMBLE,
                                tooltip="Comma-separated open_clip architectures. Each needs its OpenAI file in "
                                        "models/clip_guidance (e.g. RN50.pt, ViT-B-16.pt) or a file named after the "
                                        "architecture (.pt/.bin/.safetensors). DiffuseIT: RN50, RN50x4, ViT-B-32, "
                                        "RN50x16, ViT-B-16 (ViT-B-32 alone saves memory); Blended: ViT-B-16. A "
                                        "sub-folder with open_clip_config.json + weights loads a custom model."),
                advanced(io.Combo.Input, "dtype", options=CLIP_DTYPES, default="auto",
                         tooltip="'auto': fp16 on CUDA as the official code runs CLIP (unless ComfyUI says "
                                 "fp16 is unsuitable, e.g. --force-fp32), fp32 elsewhere."),
                advanced(io.Boolean.Input, "gradient_checkpointing", default=False, optional=True,
                         tooltip="Recompute each CLIP image tower's activations during the guidance backward: "
                                 "with an ensemble only one tower's graph is kept at a time (the 5-model "
                                 "DiffuseIT ensemble needs this to fit in 24 GB on a CPU). Same result."),
            ],
            outputs=[CLIPType.Output(display_name="clip", tooltip="The CLIP ensemble (first model is used by "
                                                                  "masked CLIP loss and ranking).")],
        )

    @classmethod
    def validate_inputs(cls, models: str | None = None, dtype: str | None = None) -> bool | str:
        problem = checks.validation_result("LoadCLIPGuidance", {"dtype": dtype}, {"dtype": CLIP_DTYPES})
        for name in _clip_names(models or ""):
            if problem is True:
                problem = checks.validation_result("LoadCLIPGuidance", {"models": name},
                                                   model_names={"models": "clip_guidance"})
        return problem

    @classmethod
    def execute(cls, models: str, dtype: str = "auto", gradient_checkpointing: bool = False) -> io.NodeOutput:
        checks.check_inputs("LoadCLIPGuidance", {"dtype": dtype}, {"dtype": CLIP_DTYPES})
        names = _clip_names(models)
        if not names:
            raise ValueError("models is empty: name at least one CLIP architecture, e.g. ViT-B-16")
        for name in names:  # every name is checked before anything loads
            bridge.check_model_name("clip_guidance", name, "LoadCLIPGuidance models")
        device = bridge.torch_device()
        half = dtype == "fp16" or (dtype == "auto" and device.type == "cuda" and bridge.half_precision_ok(device))
        torch_dtype = torch.float16 if half else torch.float32
        loaded = []
        for name in names:  # load_clip builds outside inference mode itself
            folder = bridge.resolve_model_dir("clip_guidance", name, "LoadCLIPGuidance models", "open_clip_config.json")
            if folder is not None:  # a custom open_clip model folder
                weights = sorted(f for f in os.listdir(folder) if f.endswith(CLIP_WEIGHT_SUFFIXES))
                if not weights:
                    raise FileNotFoundError(f"CLIP folder {name!r} in clip_guidance has open_clip_config.json but no "
                                            f"weights file ({', '.join(CLIP_WEIGHT_SUFFIXES)})")
                loaded.append(load_clip(f"local-dir:{folder}", pretrained=weights[0], models_dir=folder,
                                        device=bridge.offload_device(), dtype=torch_dtype))
                continue
            arch = architecture_name(name)  # never a folder relative to ComfyUI's working directory
            file_name, _ = expected_file(arch, "openai")
            path = bridge.resolve_model_file("clip_guidance", file_name, "LoadCLIPGuidance models")
            loaded.append(load_clip(arch, pretrained="openai", models_dir=os.path.dirname(path),
                                    device=bridge.offload_device(), dtype=torch_dtype))
        for model in loaded:
            model.gradient_checkpointing = bool(gradient_checkpointing)
        ensemble = ClipEnsemble(loaded)
        return io.NodeOutput(bridge.manage(ensemble, torch.nn.ModuleList([m.module for m in ensemble])))


class LoadLPIPS(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LoadLPIPS",
            search_aliases=["LPIPS", "perceptual loss", "Blended Diffusion"],
            display_name="Load LPIPS (VGG)",
            category=CATEGORY,
            description="LPIPS-VGG for Blended Diffusion's optional background-preservation loss. The VGG16 trunk "
                        f"comes from {VGG16_FILE} in models/lpips; the LPIPS heads ship with the lpips package.",
            inputs=[io.Combo.Input("vgg_name", options=bridge.model_files("lpips"),
                                   tooltip=f"torchvision's {VGG16_FILE} in models/lpips.")],
            outputs=[LPIPSType.Output(display_name="lpips", tooltip="LPIPS distance model (inputs in [-1, 1]).")],
        )

    @classmethod
    def validate_inputs(cls, vgg_name: str | None = None) -> bool | str:
        return checks.validation_result("LoadLPIPS", {"vgg_name": vgg_name}, model_names={"vgg_name": "lpips"})

    @classmethod
    def execute(cls, vgg_name: str) -> io.NodeOutput:
        path = bridge.resolve_model_file("lpips", vgg_name, "LoadLPIPS vgg_name")
        model = load_lpips(path, device=bridge.offload_device())
        return io.NodeOutput(bridge.manage(model, model))


def _clip_names(models: str) -> list[str]:
    return [n.strip() for n in models.split(",") if n.strip()]
