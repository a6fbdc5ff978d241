"""Apply Guidance to Model inside ComfyUI's real sampling code (not the stub), in one child process.

Run by ``tests/test_model_guidance_comfy.py`` with the real ComfyUI's interpreter and ComfyUI's tree as
the working directory: ``python model_guidance_probe.py PACK_ROOT WORKDIR < cases.json``; prints one
JSON object of measurements on its last line. Builds a tiny SD1.5-family model in-process (ComfyUI's
own ``supported_models.SD15`` with a 32-channel, one-level UNet; eps, v-prediction via the
ModelSamplingDiscrete patch and flow via ModelSamplingSD3), a tiny TAESD decoder file in a registered
``vae_approx`` folder, and the pack's guidance terms on tiny DINO / CLIP models.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys

PACK_ROOT, WORKDIR = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses the command line when comfy.cli_args is imported
sys.path.insert(0, os.getcwd())
sys.path.insert(1, PACK_ROOT)  # `core` for building tiny models (the nodes import it relatively)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import folder_paths  # noqa: E402
from comfy_extras import nodes_custom_sampler, nodes_model_advanced  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

spec = importlib.util.spec_from_file_location("diffuseit_pack", os.path.join(PACK_ROOT, "__init__.py"),
                                              submodule_search_locations=[PACK_ROOT])
pack = importlib.util.module_from_spec(spec)
sys.modules["diffuseit_pack"] = pack
spec.loader.exec_module(pack)
from diffuseit_pack.core.blended.losses import MaskedCLIPLoss  # noqa: E402
from diffuseit_pack.core.diffuseit.clip_direction import CLIPDirectionalLoss  # noqa: E402
from diffuseit_pack.core.diffuseit.dino_losses import DINOStructureLoss, DINOStyleLoss, SemanticDivergence  # noqa: E402
from diffuseit_pack.core.diffusion.guidance import StepContext  # noqa: E402
from diffuseit_pack.core.diffusion.range import RangeLoss  # noqa: E402
from diffuseit_pack.core.encoders.dino import DINOExtractor  # noqa: E402
from diffuseit_pack.core.encoders.taesd import load_taesd_decoder  # noqa: E402
from diffuseit_pack.core.tiny_models import smooth_image, tiny_clip, tiny_dino_vit, write_tiny_taesd  # noqa: E402
from diffuseit_pack.nodes.model_guidance import ApplyGuidanceToModel  # noqa: E402
from diffuseit_pack.nodes.types import NodeGuidance  # noqa: E402

LATENT = 8  # 8x8 latents -> 64 px images through the tiny TAESD
CONTEXT = 32


def tiny_sd15(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    unet = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
            "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
            "use_linear_in_transformer": False, "context_dim": CONTEXT, "num_heads": 2, "num_head_channels": -1,
            "use_temporal_attention": False, "use_temporal_resblock": False}
    config = comfy.supported_models.SD15(unet)
    config.unet_config.update(num_heads=2, num_head_channels=-1)
    model = config.get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(p[0].numel(), 1) ** 0.5))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def with_prediction(patcher, kind: str):
    if kind == "eps":
        return patcher
    if kind == "v":
        return nodes_model_advanced.ModelSamplingDiscrete().patch(patcher, "v_prediction", False)[0]
    if kind == "flow":
        return nodes_model_advanced.ModelSamplingSD3().patch(patcher, 3.0)[0]
    raise ValueError(kind)


def conds(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 4, CONTEXT, generator=g), {}]], [[torch.zeros(1, 4, CONTEXT), {}]]


torch.manual_seed(11)
DINO = DINOExtractor(tiny_dino_vit().eval().requires_grad_(False))
CLIP = tiny_clip()
SOURCE = smooth_image(3, 64).unsqueeze(0) if smooth_image(3, 64).dim() == 3 else smooth_image(3, 64)
STYLE = smooth_image(9, 64).unsqueeze(0) if smooth_image(9, 64).dim() == 3 else smooth_image(9, 64)
yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
MASK = (((yy - 32) ** 2 + (xx - 32) ** 2) < 20 ** 2).float()[None]  # ComfyUI MASK [1, H, W]

TERMS = {
    "range": lambda: RangeLoss(200.0),
    "dino_structure": lambda: DINOStructureLoss(DINO, 1000.0, 200.0),
    "dino_style": lambda: DINOStyleLoss(DINO, STYLE, 2000.0, 0.0),
    "semantic_divergence": lambda: SemanticDivergence(DINO, 100.0),
    "clip_directional": lambda: CLIPDirectionalLoss([CLIP], "cat", "tiger", 2000.0, ncuts=2),
    "masked_clip": lambda: MaskedCLIPLoss(CLIP, "a red ball", lambda_clip=1000.0, n_cuts=2),
}

vae_approx = os.path.join(WORKDIR, "vae_approx")
write_tiny_taesd(vae_approx)
folder_paths.add_model_folder_path("vae_approx", vae_approx)
DECODER_FILE = "taesd_decoder.safetensors"
DECODER = load_taesd_decoder(os.path.join(vae_approx, DECODER_FILE))


def to_comfy_image(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def guided_model(base, terms, strength=1.0, start=0.0, end=1.0, every_n=1, decoder=DECODER_FILE, vae=None, mask=None):
    guidance = NodeGuidance(terms=tuple(terms))
    out = ApplyGuidanceToModel.execute(base, guidance, image=to_comfy_image(SOURCE), vae=vae, decoder=decoder,
                                       mask=mask, strength=strength, start_percent=start, end_percent=end,
                                       every_n_steps=every_n, augment_seed=7)
    return out.result[0] if hasattr(out, "result") else out.args[0]


def guide_of(patcher):
    fns = patcher.model_options.get("sampler_post_cfg_function", [])
    return getattr(fns[-1], "latent_guide", None) if fns else None


def ksample(patcher, seed=3, steps=6, cfg=4.0, sampler="euler", scheduler="normal", denoise=1.0, callback=None):
    latent = torch.zeros(1, 4, LATENT, LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conds()
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, pos, neg, latent, denoise=denoise,
                                   seed=seed, callback=callback, disable_pbar=True)


def custom_sample(patcher, guider_kind: str, seed=3, steps=5, sampler="euler"):
    latent = torch.zeros(1, 4, LATENT, LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conds()
    with torch.inference_mode():
        if guider_kind == "basic":
            guider = comfy.samplers.CFGGuider(patcher)
            guider.inner_set_conds({"positive": pos})
        elif guider_kind == "cfg":
            guider = comfy.samplers.CFGGuider(patcher)
            guider.set_conds(pos, neg)
            guider.set_cfg(4.0)
        else:
            guider = nodes_custom_sampler.Guider_DualCFG(patcher)
            guider.set_conds(pos, pos, neg)
            guider.set_cfg(4.0, 2.0)
        sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "karras", steps).cpu()
        return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=seed)


def final_loss(term, latent: torch.Tensor) -> float:
    """The term's own loss on the decoded final image (noise level 0: the noise-mixed input is the image)."""
    with torch.inference_mode(False), torch.no_grad():
        image = DECODER(latent.clone())
        prepared = term.prepare(SOURCE.expand(image.shape[0], -1, -1, -1).clone())
        ctx = StepContext(t_index=None, t=None, x_t=latent.clone(), schedule=None, source=SOURCE, blend_mask=MASK[None],
                          generators=[torch.Generator().manual_seed(1)], progress=1.0,
                          noise_level=torch.zeros(image.shape[0]), mixed_input=lambda: image)
        if hasattr(prepared, "before_step"):
            prepared.before_step(ctx)
        return float(prepared(image, ctx).sum())


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    cases = json.loads(sys.stdin.read() or "{}")
    out: dict = {}
    base = tiny_sd15()
    options_before = repr(sorted(base.model_options.keys())), len(base.model_options.get("sampler_post_cfg_function", []))

    if "zero" in cases:
        plain = ksample(base)
        zero = ksample(guided_model(base, [TERMS["range"](), TERMS["dino_structure"]()], strength=0.0))
        weights0 = ksample(guided_model(base, [RangeLoss(0.0)], strength=1.0))
        plain_again = ksample(base)
        out["zero"] = {"strength0_equal": bool(torch.equal(plain, zero)), "weights0_equal": bool(torch.equal(plain, weights0)),
                       "plain_repeat_equal": bool(torch.equal(plain, plain_again)),
                       "model_options_unchanged": options_before == (repr(sorted(base.model_options.keys())),
                                                                     len(base.model_options.get("sampler_post_cfg_function", [])))}

    if "lowers" in cases:
        res = {}
        plain = ksample(base, steps=8)
        for name in cases["lowers"]:
            term = TERMS[name]()
            mask = MASK if name == "masked_clip" else None
            guided = ksample(guided_model(base, [term], strength=cases.get("strength", 1.0), mask=mask), steps=8)
            res[name] = {"plain": final_loss(term, plain), "guided": final_loss(term, guided),
                         "finite": bool(torch.isfinite(guided).all())}
        out["lowers"] = res

    if "matrix" in cases:
        res = {}
        for kind in cases["matrix"]["kinds"]:
            model = with_prediction(base, kind)
            for sampler in cases["matrix"]["samplers"]:
                # the plumbing under test is the sampler's; the cheap range term keeps 18 runs short
                guided = guided_model(model, [TERMS["range"]()], strength=0.5)
                result = ksample(guided, steps=4, sampler=sampler, scheduler="karras")
                guide = guide_of(guided)
                res[f"{kind}/{sampler}"] = {"finite": bool(torch.isfinite(result).all()),
                                            "guided_calls": guide.total_guided_calls if guide else -1,
                                            "moved": guide.max_step_size > 0 if guide else False}
        out["matrix"] = res

    if "guiders" in cases:
        res = {}
        for kind in cases["guiders"]:
            guided = guided_model(base, [TERMS["range"]()], strength=0.5)
            result = custom_sample(guided, kind)
            res[kind] = {"finite": bool(torch.isfinite(result).all()), "guided_calls": guide_of(guided).total_guided_calls,
                         "moved": guide_of(guided).max_step_size > 0}
        out["guiders"] = res

    if "band" in cases:
        res = []
        for start, end, every_n, steps in cases["band"]:
            guided = guided_model(base, [TERMS["range"]()], strength=0.5, start=start, end=end, every_n=every_n)
            ksample(guided, steps=steps)
            guide = guide_of(guided)
            res.append({"calls": guide.total_guided_calls, "steps_guided": sorted(guide.guided_steps)})
        out["band"] = res

    if "vae_decoder" in cases:
        sd = {f"taesd_decoder.{k}": v for k, v in load_file(os.path.join(vae_approx, DECODER_FILE)).items()}
        sd["vae_scale"], sd["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)
        with torch.inference_mode():  # as Load VAE builds it, inside a node
            vae = comfy.sd.VAE(sd=sd)
        guided = guided_model(base, [TERMS["dino_structure"]()], strength=0.5, decoder="vae (wired VAE)", vae=vae)
        result = ksample(guided)
        out["vae_decoder"] = {"finite": bool(torch.isfinite(result).all()),
                              "guided_calls": guide_of(guided).total_guided_calls}

    if "repeat_cancel_memory" in cases:
        terms = [TERMS["dino_structure"](), TERMS["clip_directional"]()]
        guided = guided_model(base, terms, strength=0.5)
        first = ksample(guided, seed=4, steps=4)
        second = ksample(guided, seed=4, steps=4)

        def cancel_at_2(step, x0, x, total):
            if step == 2:
                mm.interrupt_current_processing(True)
                mm.throw_exception_if_processing_interrupted()
        cancelled = False
        try:
            ksample(guided, seed=4, steps=4, callback=cancel_at_2)
        except mm.InterruptProcessingException:
            cancelled = True
        after_cancel = ksample(guided, seed=4, steps=4)
        rss = []
        for i in range(cases["repeat_cancel_memory"]):
            ksample(guided, seed=10 + i, steps=3)
            rss.append(rss_mb())
        out["repeat_cancel_memory"] = {"same_seed_equal": bool(torch.equal(first, second)), "cancelled": cancelled,
                                       "after_cancel_equal": bool(torch.equal(first, after_cancel)), "rss_mb": rss}

    if "errors" in cases:
        res = {}
        for label, kwargs in (("no_vae", {"decoder": "vae (wired VAE)"}),
                              ("no_source", {"image": None})):
            try:
                guidance = NodeGuidance(terms=(TERMS["dino_structure"](),))
                args = dict(image=to_comfy_image(SOURCE), vae=None, decoder=DECODER_FILE, mask=None, strength=0.5,
                            start_percent=0.0, end_percent=1.0, every_n_steps=1, augment_seed=0)
                args.update(kwargs)
                ApplyGuidanceToModel.execute(base, guidance, **args)
                res[label] = None
            except Exception as error:  # noqa: BLE001 -- the message is the measurement
                res[label] = f"{type(error).__name__}: {error}"
        guided = guided_model(base, [TERMS["dino_structure"]()], strength=0.5)
        batch_mismatch = None
        try:
            latent = torch.zeros(2, 4, LATENT, LATENT)
            pos, neg = conds()
            src3 = to_comfy_image(SOURCE.expand(3, -1, -1, -1))
            g3 = ApplyGuidanceToModel.execute(base, NodeGuidance(terms=(TERMS["dino_structure"](),)), image=src3,
                                              decoder=DECODER_FILE, strength=0.5, end_percent=1.0)
            g3 = g3.result[0] if hasattr(g3, "result") else g3.args[0]
            with torch.inference_mode():
                comfy.sample.sample(g3, comfy.sample.prepare_noise(latent, 0), 3, 4.0, "euler", "normal", pos, neg,
                                    latent, seed=0, disable_pbar=True)
        except Exception as error:  # noqa: BLE001
            batch_mismatch = f"{type(error).__name__}: {error}"
        res["batch_mismatch"] = batch_mismatch
        del guided
        out["errors"] = res

    print(json.dumps(out))


if __name__ == "__main__":
    main()
