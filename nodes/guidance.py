"""Guidance nodes: each adds one loss term to the incoming GUIDANCE and passes it on.

Terms are prepared by Guided Sampler with its own source image (and Background Blend's mask), so
the loss nodes need no image or mask wiring of their own.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.blended.losses import BackgroundPreservationLoss, MaskedCLIPLoss
from ..core.diffuseit.clip_direction import CLIPDirectionalLoss
from ..core.io import to_model
from ..core.diffuseit.dino_losses import DINOStructureLoss, DINOStyleLoss, SemanticDivergence
from ..core.diffusion.range import RangeLoss
from . import checks
from .schema_features import advanced, schema
from .types import CLIPType, DINOType, GuidanceType, LPIPSType, chain

CATEGORY = "DiffuseIT-Blended/guidance"
CONTRAST_SCHEDULES = ["constant", "regularize_content", "prog_contrast"]


def _guidance_in() -> io.Input:
    return GuidanceType.Input("guidance", optional=True,
                              tooltip="Guidance to extend (chain loss nodes); empty starts a new chain.")


def _guidance_out() -> io.Output:
    return GuidanceType.Output(display_name="guidance", tooltip="The incoming guidance plus this loss.")


def _weight(name: str, default: float, tooltip: str, maximum: float = 1e6) -> io.Input:
    return io.Float.Input(name, default=default, min=0.0, max=maximum, step=1.0, tooltip=tooltip)


class DINOStructureLossNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="DINOStructureLoss", display_name="DINO Structure Loss (DiffuseIT)", category=CATEGORY,
            search_aliases=["DiffuseIT", "structure loss", "self-similarity"],
            description="Keeps the source's structure: DINO layer-11 key self-similarity (L_ssim) plus the "
                        "patch-wise contrastive InfoNCE loss (L_cont) between output and source keys.",
            inputs=[
                DINOType.Input("dino", tooltip="DINO ViT from Load DINO ViT."),
                _weight("lambda_ssim", 1000.0, "Weight of the key self-similarity loss (official 1000)."),
                _weight("lambda_contra", 200.0, "Weight of the contrastive patch loss (official 200)."),
                io.Combo.Input("contrast_schedule", options=CONTRAST_SCHEDULES,
                               default="constant",
                               tooltip="Text mode's contrastive weight schedule from the previous CLIP loss: "
                                       "regularize_content doubles it once the CLIP loss < -0.5 (official text "
                                       "command); prog_contrast halves it while the CLIP loss > -0.5."),
                advanced(io.Boolean.Input, "noise_mix", default=True,
                         tooltip="Score x0*f_t + x_t*(1-f_t) instead of x0 (--use_noise_aug_all, on in both "
                                 "official commands)."),
                _guidance_in(),
            ],
            outputs=[_guidance_out()],
        )

    @classmethod
    def validate_inputs(cls, contrast_schedule: str | None = None) -> bool | str:
        return checks.validation_result("DINOStructureLoss", {"contrast_schedule": contrast_schedule},
                                        {"contrast_schedule": CONTRAST_SCHEDULES})

    @classmethod
    def execute(cls, dino, lambda_ssim=1000.0, lambda_contra=200.0, contrast_schedule="constant", noise_mix=True,
                guidance=None) -> io.NodeOutput:
        checks.check_inputs("DINOStructureLoss", {"contrast_schedule": contrast_schedule},
                            {"contrast_schedule": CONTRAST_SCHEDULES})
        term = DINOStructureLoss(dino.value, lambda_ssim, lambda_contra, noise_mix=noise_mix,
                                 regularize_content=contrast_schedule == "regularize_content",
                                 use_prog_contrast=contrast_schedule == "prog_contrast")
        return io.NodeOutput(chain(guidance).plus(term, dino))


class DINOStyleLossNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="DINOStyleLoss", display_name="DINO Style Loss (DiffuseIT image-guided)", category=CATEGORY,
            search_aliases=["DiffuseIT", "style transfer", "image-guided translation"],
            description="Pulls the output's appearance towards a style image: DINO [CLS] token distance (L_sty) "
                        "plus a pixel MSE to the style image.",
            inputs=[
                DINOType.Input("dino", tooltip="DINO ViT from Load DINO ViT."),
                io.Image.Input("style_image", tooltip="The appearance target. Resized to the source's size "
                                                      "(bilinear, antialiased) if it differs."),
                _weight("lambda_trg", 2000.0, "Weight of the [CLS] style loss (official 2000)."),
                _weight("lambda_mse", 3000.0, "Weight of the pixel MSE to the style image (official 3000; 0 = off)."),
                advanced(io.Boolean.Input, "noise_mix", default=True,
                         tooltip="Score the noise-mixed x0 (--use_noise_aug_all)."),
                _guidance_in(),
            ],
            outputs=[_guidance_out()],
        )

    @classmethod
    def execute(cls, dino, style_image, lambda_trg=2000.0, lambda_mse=3000.0, noise_mix=True,
                guidance=None) -> io.NodeOutput:
        with torch.inference_mode(False):  # a clone made outside inference mode can enter autograd
            style = to_model(style_image[:1].clone())
        term = DINOStyleLoss(dino.value, style, lambda_trg, lambda_mse, noise_mix=noise_mix)
        return io.NodeOutput(chain(guidance).plus(term, dino))


class SemanticDivergenceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="SemanticDivergence", display_name="Semantic Divergence (DiffuseIT)", category=CATEGORY,
            search_aliases=["DiffuseIT", "semantic divergence loss"],
            description="Pushes each step's [CLS] token away from the previous step's, while the respaced step "
                        "index is above diff_iter, so the semantics change early in sampling.",
            inputs=[
                DINOType.Input("dino", tooltip="DINO ViT from Load DINO ViT."),
                _weight("lambda_dir_cls", 100.0, "Weight of the semantic divergence loss (official 100)."),
                io.Int.Input("diff_iter", default=50, min=0, max=10000,
                             tooltip="Active while the respaced index t > diff_iter: 50 for the text command "
                                     "(respacing 100), 100 for the image command (respacing 200). Under KSampler (Apply "
                                     "Guidance to Model) it counts in a 100-step schedule: active while the noise "
                                     "level is above upstream's at index diff_iter of 100 (50 = the official point)."),
                advanced(io.Boolean.Input, "noise_mix", default=True,
                         tooltip="Score the noise-mixed x0 (--use_noise_aug_all)."),
                _guidance_in(),
            ],
            outputs=[_guidance_out()],
        )

    @classmethod
    def execute(cls, dino, lambda_dir_cls=100.0, diff_iter=50, noise_mix=True, guidance=None) -> io.NodeOutput:
        term = SemanticDivergence(dino.value, lambda_dir_cls, diff_iter=diff_iter, noise_mix=noise_mix)
        return io.NodeOutput(chain(guidance).plus(term, dino))


class CLIPDirectionalLossNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="CLIPDirectionalLoss", display_name="CLIP Directional Loss (DiffuseIT text-guided)",
            search_aliases=["DiffuseIT", "CLIP guidance", "text-guided translation", "directional CLIP loss"],
            category=CATEGORY,
            description="Input-aware directional CLIP loss over an ensemble: moves the image embedding towards "
                        "normalize(E_target - 0.4 E_source + 0.2 E_image), 79 prompt templates, augmented cuts.",
            inputs=[
                CLIPType.Input("clip", tooltip="CLIP ensemble from Load CLIP (guidance ensemble)."),
                io.String.Input("source_text", default="Lion", tooltip="What the source image shows (e.g. 'Lion')."),
                io.String.Input("target_text", default="Black Leopard", tooltip="What it should become."),
                _weight("lambda_clip", 2000.0, "Weight of the CLIP loss (official 2000)."),
                io.Int.Input("ncuts", default=8, min=0, max=64,
                             tooltip="Random augmented cuts per model (official 8); 0 = one deterministic "
                                     "resize + centre crop."),
                _guidance_in(),
            ],
            outputs=[_guidance_out()],
        )

    @classmethod
    def execute(cls, clip, source_text, target_text, lambda_clip=2000.0, ncuts=8, guidance=None) -> io.NodeOutput:
        term = CLIPDirectionalLoss(clip.value, source_text, target_text, lambda_clip, ncuts)
        return io.NodeOutput(chain(guidance).plus(term, clip))


class RangeLossNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="RangeLoss", display_name="Range Loss", category=CATEGORY,
            search_aliases=["DiffuseIT", "Blended Diffusion", "guidance"],
            description="Penalises predicted x0 values outside [-1, 1]: weight * mean((x0 - clamp(x0))^2). Also "
                        "what Guided Sampler's range_restart watches.",
            inputs=[_weight("weight", 200.0, "DiffuseIT 200, Blended Diffusion 50."), _guidance_in()],
            outputs=[_guidance_out()],
        )

    @classmethod
    def execute(cls, weight=200.0, guidance=None) -> io.NodeOutput:
        return io.NodeOutput(chain(guidance).plus(RangeLoss(weight)))


class MaskedCLIPLossNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="MaskedCLIPLoss", display_name="Masked CLIP Loss (Blended Diffusion)", category=CATEGORY,
            search_aliases=["Blended Diffusion", "CLIP guidance", "local edit", "inpainting"],
            description="CLIP guidance on the masked region: spherical distance between the prompt and augmented "
                        "cutouts of x_in * mask (x_in mixes x0 and x_t). Uses Background Blend's mask.",
            inputs=[
                CLIPType.Input("clip", tooltip="CLIP from Load CLIP (first model of the list; official ViT-B-16)."),
                io.String.Input("prompt", default="a red ball", multiline=True,
                                tooltip="What the masked region should show."),
                _weight("lambda_clip", 1000.0, "Weight of the CLIP loss (official 1000)."),
                io.Int.Input("n_cuts", default=8, min=1, max=64,
                             tooltip="Cutouts per sample: 1 plain + n-1 with random affine/perspective (official 8)."),
                _guidance_in(),
            ],
            outputs=[_guidance_out()],
        )

    @classmethod
    def execute(cls, clip, prompt, lambda_clip=1000.0, n_cuts=8, guidance=None) -> io.NodeOutput:
        if not prompt or not prompt.strip():
            raise ValueError("Masked CLIP Loss: prompt is empty; describe what the masked region should show")
        term = MaskedCLIPLoss(clip.value[0], prompt, None, lambda_clip=lambda_clip, n_cuts=n_cuts)
        return io.NodeOutput(chain(guidance).plus(term, clip))


class BackgroundPreservationLossNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="BackgroundPreservationLoss", display_name="Background Preservation Loss (Blended)",
            search_aliases=["Blended Diffusion", "background loss", "LPIPS"],
            category=CATEGORY,
            description="LPIPS + L2 between the image outside the mask and the source (the paper's local CLIP-"
                        "guided baseline; off by default in Blended Diffusion). Uses Background Blend's mask.",
            inputs=[
                _weight("lambda_l2", 10000.0, "Weight of the L2 term (official 10000)."),
                _weight("lambda_lpips", 1000.0, "Weight of the LPIPS term (official 1000); needs an LPIPS model."),
                LPIPSType.Input("lpips", optional=True, tooltip="LPIPS from Load LPIPS (VGG); without it only L2."),
                _guidance_in(),
            ],
            outputs=[_guidance_out()],
        )

    @classmethod
    def execute(cls, lambda_l2=10000.0, lambda_lpips=1000.0, lpips=None, guidance=None) -> io.NodeOutput:
        term = BackgroundPreservationLoss(None, lambda_lpips if lpips is not None else 0.0, lambda_l2,
                                          lpips.value if lpips is not None else None)
        return io.NodeOutput(chain(guidance).plus(term, *([lpips] if lpips is not None else [])))


NODES = [DINOStructureLossNode, DINOStyleLossNode, SemanticDivergenceNode, CLIPDirectionalLossNode, RangeLossNode,
         MaskedCLIPLossNode, BackgroundPreservationLossNode]
