"""GuidedSampler: runs DiffuseIT / Blended Diffusion (or plain SDEdit) from the pieces wired into it."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.blended.pipeline import blended_sample
from ..core.diffusion.guided_loop import GuidedSamplerOptions
from ..core.diffusion.batching import planned_steps, sample_many
from ..core.diffusion.range import RESTART_THRESHOLD
from ..core.io import from_model, resize_for_model, resize_to, to_model
from . import checks, comfy_bridge as bridge
from .schema_features import advanced, schema
from .types import BlendType, DDPMType, GuidanceType

CATEGORY = "DiffuseIT-Blended/sampling"
SAMPLERS = ["ddpm", "ddim"]


class GuidedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="GuidedSampler",
            search_aliases=["DiffuseIT", "Blended Diffusion", "SDEdit", "CLIP guidance",
                            "guided diffusion", "img2img", "image translation"],
            display_name="Guided Sampler (DiffuseIT / Blended)",
            category=CATEGORY,
            description="Noises the source image to the start step and denoises it with the DDPM while the wired "
                        "guidance losses steer every step's predicted x0. The loss nodes are prepared with this "
                        "node's image, so they need no image wiring of their own.",
            inputs=[
                DDPMType.Input("ddpm", tooltip="The diffusion model from Load DDPM."),
                io.Image.Input("image", tooltip="Source image(s). Resized to the model's resolution (short side 256 px "
                                                "for the ImageNet model, see keep_aspect) unless a Background Blend "
                                                "crops around its mask."),
                GuidanceType.Input("guidance", optional=True,
                                   tooltip="Chained guidance losses (DINO structure/style, CLIP, semantic divergence, "
                                           "range...). Without guidance this is plain SDEdit-style resampling."),
                BlendType.Input("blend", optional=True,
                                tooltip="Blended Diffusion: keeps everything outside the mask from the source at every step."),
                io.String.Input("respacing", default="100",
                                tooltip='Timestep respacing: "100" (DiffuseIT text, Blended), "200" (DiffuseIT image), '
                                        '"ddim50", or comma sections like "10,10,5".'),
                io.Int.Input("skip_timesteps", default=40, min=0, max=10000,
                             tooltip="Respaced steps skipped at the start: higher keeps more of the source. DiffuseIT text "
                                     "40/100, image 80/200; Blended Diffusion 25/100."),
                io.Int.Input("resample_steps", default=10, min=1, max=100,
                             tooltip="DiffuseIT's resampling start: the first guided step is repeated this many times with "
                                     "re-noising (10 upstream). 1 turns it off (Blended Diffusion)."),
                io.Combo.Input("sampler", options=SAMPLERS, default="ddpm",
                               tooltip="DDPM: guidance shifts the mean by the step variance (both papers). DDIM: score "
                                       "correction, deterministic (eta 0)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Sample r of the batch draws from a generator seeded by a SplitMix64 mix of "
                                     "(seed, r): results are reproducible, a batch equals serial runs, and seed and "
                                     "seed + 1 share no sample (so 'increment' gives a fresh batch)."),
                io.Int.Input("samples", default=1, min=1, max=256,
                             tooltip="Samples per source image (the official code's serial iterations, batched here)."),
                advanced(io.Int.Input, "chunk_size", default=0, min=0, max=256,
                         tooltip="Rows per batch on the GPU; 0 = all at once when they fit in the free memory, "
                                 "else as many as fit (measured on one row). Results do not change."),
                io.Boolean.Input("range_restart", default=False,
                                 tooltip="DiffuseIT's --use_range_restart: a sample whose x0 leaves [-1,1] too far restarts "
                                         "(at most max_restarts times)."),
                advanced(io.Int.Input, "max_restarts", default=3, min=0, max=100,
                         tooltip="Upper bound on range restarts per sample (upstream has none)."),
                io.Boolean.Input("keep_aspect", default=True, optional=True,
                                 tooltip="Sample at the image's aspect ratio: short side at the model's resolution, "
                                         "long side to the nearest multiple of the UNet's downsampling factor (32 "
                                         "for the 256 px model; 1600x900 -> 448x256), at most 4:1. Off = upstream's "
                                         "square (a wide photo comes back squashed). Ignored with a Background Blend."),
                advanced(io.Boolean.Input, "upscale_to_source", default=False, optional=True,
                         tooltip="Resize the results back to the input image's size (bicubic). Off = the "
                                 "size they were sampled at. Ignored with a Background Blend (it always "
                                 "returns the full-size image)."),
            ],
            outputs=[io.Image.Output(display_name="images",
                                     tooltip="The last step's x0 prediction per sample (what the official code saves).")],
        )

    @classmethod
    def validate_inputs(cls, sampler: str | None = None) -> bool | str:
        return checks.validation_result("GuidedSampler", {"sampler": sampler}, {"sampler": SAMPLERS})

    @classmethod
    def execute(cls, ddpm, image, guidance=None, blend=None, respacing="100", skip_timesteps=40, resample_steps=10,
                sampler="ddpm", seed=0, samples=1, chunk_size=0, range_restart=False, max_restarts=3,
                keep_aspect=True, upscale_to_source=False) -> io.NodeOutput:
        checks.check_inputs("GuidedSampler", {"sampler": sampler}, {"sampler": SAMPLERS})
        core_ddpm = ddpm.value
        # the settings are checked (respacing, skip_timesteps, ...) before any model moves to the device
        options = GuidedSamplerOptions(sampler=sampler, skip_timesteps=skip_timesteps, resample_steps=resample_steps,
                                       range_restart_threshold=RESTART_THRESHOLD if range_restart else None, max_restarts=max_restarts)
        schedule = core_ddpm.schedule(respacing)
        per_image = planned_steps(schedule, options, samples, chunk_size)
        models = [ddpm] + list(guidance.models if guidance is not None else ())
        bridge.load_to_device(models)
        device = core_ddpm.device
        progress = bridge.Progress(per_image * image.shape[0] if blend is not None
                                   else planned_steps(schedule, options, samples * image.shape[0], chunk_size))
        terms = guidance.terms if guidance is not None else ()
        with torch.inference_mode(False), torch.enable_grad():
            source = to_model(image.clone()).to(device)
            if blend is not None:  # crop around each mask, edit at model size, stitch back
                result = blended_sample(core_ddpm, source, blend, terms, samples=samples, seed=seed,
                                        respacing=respacing, options=options, chunk_size=chunk_size, callback=progress,
                                        free_memory=bridge.free_memory)
            else:
                model_source = resize_for_model(source, core_ddpm.image_size, core_ddpm.size_multiple, keep_aspect)
                result = sample_many(core_ddpm.unet, schedule, model_source, terms,
                                     samples_per_image=samples, seed=seed, chunk_size=chunk_size, options=options,
                                     callback=progress, learn_sigma=core_ddpm.learn_sigma,
                                     free_memory=bridge.free_memory)
                if upscale_to_source:
                    result.images = resize_to(result.images, tuple(source.shape[-2:]))
        return io.NodeOutput(from_model(result.images).to(bridge.intermediate_device()))
