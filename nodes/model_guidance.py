"""Apply Guidance to Model: the pack's guidance terms steering ComfyUI's own MODEL (SD1.5, SDXL, SD3, Flux).

The node returns a clone of the MODEL with a post-CFG hook (``sampler_post_cfg_function``) that hands
every denoiser call to ``core.latent.LatentGuide``: decode the post-CFG x0, evaluate the terms, move
x0 against their gradient. KSampler, KSamplerAdvanced, SamplerCustom(Advanced) with any guider, every
k-sampler and scheduler call it the same way; the input MODEL is never modified.
"""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from ..core.encoders.taesd import load_taesd_decoder
from ..core.io import to_model
from ..core.latent.model_guidance import DenoiserCall, LatentGuidanceError, LatentGuide
from ..core.latent.x0_guidance import GuidanceBand
from . import checks, comfy_bridge as bridge
from .schema_features import schema
from .types import GuidanceType

CATEGORY = "DiffuseIT-Blended/sampling"
USE_VAE = "vae (wired VAE)"
TAESD_PREFIXES = ("taesd_decoder", "taesdxl_decoder", "taesd3_decoder", "taef1_decoder")
ADDITIONAL_MODELS_KEY = "diffuseit_blended_guidance"


def decoder_choices() -> list[str]:
    return [USE_VAE] + [f for f in bridge.model_files("vae_approx") if "decoder" in os.path.basename(f)]


class ApplyGuidanceToModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ApplyGuidanceToModel",
            search_aliases=["DiffuseIT", "Blended Diffusion", "CLIP guidance", "KSampler guidance", "SDXL", "Flux"],
            display_name="Apply Guidance to Model (DiffuseIT / Blended)",
            category=CATEGORY,
            description="Steers any ComfyUI model (SD1.5, SDXL, SD3, Flux) with the pack's guidance losses: at every "
                        "sampler step the post-CFG predicted x0 is decoded, scored by the wired losses, and moved "
                        "against their gradient (through the decoder only, never the diffusion model). Use the "
                        "output MODEL in KSampler or SamplerCustom; the input MODEL is unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to guide (from Load Checkpoint, or after LoRAs "
                                                "and other model patches)."),
                GuidanceType.Input("guidance", tooltip="Chained guidance losses (DINO structure/style, CLIP directional, "
                                                       "semantic divergence, masked CLIP, range)."),
                io.Image.Input("image", optional=True,
                               tooltip="The source image the losses compare with: the photo being translated (the "
                                       "one that went into VAE Encode). 1 image, or one per latent. Resized to the "
                                       "decoded size. Not needed for masked CLIP and range losses alone."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Decoder for the gradient when decoder is 'vae': the checkpoint's VAE (exact, "
                                     "about 18x the cost of TAESD) or a TAESD loaded by Load VAE."),
                io.Combo.Input("decoder", options=decoder_choices(), default=USE_VAE,
                               tooltip="Which decoder turns the latent x0 into RGB for the losses: the wired VAE, or a "
                                       "TAESD decoder file from models/vae_approx (fast and light; must match the "
                                       "model family: taesd_ SD1.5, taesdxl_ SDXL, taesd3_ SD3, taef1_ Flux)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where masked losses (masked CLIP) act, 1 = edit; resized to the decoded size. "
                                      "Background preservation itself is Set Latent Noise Mask's job."),
                io.Float.Input("strength", default=0.3, min=0.0, max=10.0, step=0.01,
                               tooltip="Size of each guidance step as a fraction of what CFG changes in x0 (of x0 "
                                       "itself without CFG), whatever the loss weights. 0 = off, bit for bit. "
                                       "Typical 0.1-1."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Guidance starts at this fraction of the sampled schedule (0 = first step)."),
                io.Float.Input("end_percent", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Guidance stops after this fraction of the schedule (the last steps only add "
                                       "detail; MPGD guides 0.3-0.7)."),
                io.Int.Input("every_n_steps", default=1, min=1, max=1000,
                             tooltip="Guide every n-th sampler step inside the band (2 halves the cost)."),
                io.Int.Input("augment_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the losses' random augmentations (CLIP cuts, cutouts); the sampler's "
                                     "noise keeps its own seed."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A guided clone of the input model.")],
        )

    @classmethod
    def validate_inputs(cls, decoder: str | None = None) -> bool | str:
        # 'vae (wired VAE)' is a legal name too; any other value must be a file in the vae_approx folders
        return checks.validation_result("ApplyGuidanceToModel", {"decoder": decoder},
                                        model_names={"decoder": "vae_approx"})

    @classmethod
    def execute(cls, model, guidance, image=None, vae=None, decoder=USE_VAE, mask=None, strength=0.3,
                start_percent=0.0, end_percent=0.8, every_n_steps=1, augment_seed=0) -> io.NodeOutput:
        checks.check_inputs("ApplyGuidanceToModel", {"decoder": decoder}, model_names={"decoder": "vae_approx"})
        band = GuidanceBand(start_percent, end_percent, every_n_steps)
        latent_format = bridge.latent_format(model)
        decode, decoder_module, decoder_patcher = _decoder(decoder, vae, latent_format)
        source = None if image is None else to_model(image.clone())
        edit_mask = None if mask is None else _mask_batch(mask)
        managed = list(guidance.models)
        guide = LatentGuide(guidance.terms, decode, source, mask=edit_mask, strength=strength, band=band, seed=augment_seed,
                            modules=[decoder_module] + [m.module for m in managed])
        guided = model.clone()
        if guide.enabled:
            guided.set_model_sampler_post_cfg_function(_post_cfg(guide))
            extra = [m.patcher for m in managed] + ([decoder_patcher] if decoder_patcher is not None else [])
            if extra:
                guided.set_additional_models(ADDITIONAL_MODELS_KEY, extra)
        return io.NodeOutput(guided)


def _mask_batch(mask: torch.Tensor) -> torch.Tensor:
    mask = mask if mask.dim() == 3 else mask.reshape(-1, *mask.shape[-2:])
    return mask.unsqueeze(1).float().clone()


def _decoder(choice: str, vae, latent_format):
    """(decode, module, patcher or None) for the chosen decoder, checked against the model's latent format."""
    channels = int(getattr(latent_format, "latent_channels", 4))
    family = getattr(latent_format, "taesd_decoder_name", None)
    if choice == USE_VAE:
        if vae is None:
            raise ValueError("Apply Guidance to Model: decoder is 'vae' but no VAE is wired; connect the checkpoint's "
                             "VAE or pick a TAESD decoder file from models/vae_approx")
        if bridge.vae_latent_channels(vae) != channels:
            raise ValueError(f"Apply Guidance to Model: the VAE takes {bridge.vae_latent_channels(vae)}-channel latents "
                             f"but the model makes {channels}-channel latents ({type(latent_format).__name__}); wire "
                             "the VAE of the model's family")
        return bridge.vae_decoder(vae, latent_format)
    name = os.path.basename(choice)
    prefix = next((p for p in TAESD_PREFIXES if name.startswith(p + ".")), None)
    if prefix is not None and family is not None and prefix != family:
        raise ValueError(f"Apply Guidance to Model: decoder {choice} is for another model family than this model "
                         f"({type(latent_format).__name__}, whose TAESD is {family}.*)")
    module = load_taesd_decoder(bridge.resolve_model_file("vae_approx", choice, "ApplyGuidanceToModel decoder"))
    if module.latent_channels != channels:
        raise ValueError(f"Apply Guidance to Model: decoder {choice} takes {module.latent_channels}-channel latents "
                         f"but the model ({type(latent_format).__name__}) makes {channels}-channel latents")
    managed = bridge.manage(module, module)

    def decode(latent: torch.Tensor) -> torch.Tensor:
        return module(latent.to(next(module.parameters()).device))
    return decode, module, managed.patcher


def _post_cfg(guide: LatentGuide):
    def post_cfg(args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        uncond = args.get("uncond_denoised")
        cfg = float(args.get("cond_scale", 1.0))
        reference = denoised - uncond if (uncond is not None and cfg != 1.0) else denoised
        options = args.get("model_options", {}).get("transformer_options", {})
        sigma = args["sigma"]
        a, b = bridge.state_scales(args["model"].model_sampling, sigma)
        call = DenoiserCall(x0=denoised, x_t=args["input"], sigma=sigma, sigmas=options.get("sample_sigmas"),
                            reference=reference, signal_scale=a.to(denoised.device), noise_scale=b.to(denoised.device))
        try:
            return guide(call)
        except LatentGuidanceError as error:
            raise ValueError(f"Apply Guidance to Model: {error}") from None
    post_cfg.latent_guide = guide  # for inspection (tests count guided calls)
    return post_cfg
