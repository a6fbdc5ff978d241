"""Loader nodes: checkpoint files from the pack's model folders into managed core models."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.checkpoints import load_ddpm, parse_flags
from . import comfy_bridge as bridge
from .types import DDPMType

CATEGORY = "DiffuseIT-Blended/loaders"


class LoadDDPM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadDDPM",
            display_name="Load DDPM (guided-diffusion)",
            category=CATEGORY,
            description="Loads an OpenAI guided-diffusion pixel UNet (e.g. 256x256_diffusion_uncond.pt) "
                        "from models/guided_diffusion for DiffuseIT and Blended Diffusion.",
            inputs=[
                io.Combo.Input("ckpt_name", options=bridge.model_files("guided_diffusion"),
                               tooltip="Checkpoint in models/guided_diffusion. DiffuseIT and Blended Diffusion "
                                       "use 256x256_diffusion_uncond.pt (see the README's model table)."),
                io.Combo.Input("dtype", options=["auto", "fp32", "fp16", "bf16"], default="auto",
                               tooltip="Precision of the UNet body. 'auto' follows ComfyUI's device and "
                                       "--fp16-unet/--bf16-unet/--force-fp32 flags; norms and embeddings stay fp32."),
                io.String.Input("overrides", default="", optional=True,
                                tooltip="guided-diffusion flags the file's shapes cannot tell, comma separated, "
                                        "e.g. 'num_head_channels=64, noise_schedule=linear'. Empty = the preset "
                                        "of the published file."),
            ],
            outputs=[DDPMType.Output(display_name="ddpm", tooltip="The diffusion model and its schedule facts.")],
        )

    @classmethod
    def execute(cls, ckpt_name: str, dtype: str = "auto", overrides: str = "") -> io.NodeOutput:
        path = bridge.model_path("guided_diffusion", ckpt_name)
        ddpm = load_ddpm(path, device=bridge.offload_device(), **parse_flags(overrides))
        chosen = bridge.pick_unet_dtype(dtype, bridge.torch_device(), sum(p.numel() for p in ddpm.unet.parameters()))
        if chosen != torch.float32:
            ddpm.to(dtype=chosen)
        return io.NodeOutput(bridge.manage(ddpm, ddpm.unet))
