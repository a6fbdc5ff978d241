"""Whole DiffuseIT runs (image- and text-guided) through the pack's sampler vs the official runs.

Teacher-forced: every recorded call's x_t goes through the single-pass guidance and must give the
recorded gradient, guided mean and sample. Free-running: from the recorded start noise with the
recorded per-step and re-noising draws replayed, the final sample and saved x0 must match.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path, readme_tolerance_row
from core import load_ddpm
from core.diffuseit.pipeline import DiffuseITSettings, diffuseit_guidance, sampler_options
from core.encoders.dino import load_dino_extractor
from core.diffusion.guidance import StepContext, StepState
from core.diffusion.guided_loop import guidance_gradient, guided_sample
from core.diffusion.sampling import ddpm_step
from test_clip_losses import stub_ensemble

GROUP = "diffuseit"
JSON = json.load(open(fixture_path(GROUP, "fixtures.json")))
# fixture README, "Tolerances a re-implementation should meet": teacher-forced loop tensors within
# 2e-4 * max|ref|; the free-running final sample within 2e-2 (the loop is chaotic with random networks)
(TEACHER_RTOL,) = readme_tolerance_row(GROUP, "loops, teacher-forced")
(FREE_RUNNING_ATOL,) = readme_tolerance_row(GROUP, "loops, free-running")
CLIP_LOSS_ATOL, _ = readme_tolerance_row(GROUP, "CLIP glue embeddings / losses")


@pytest.fixture(scope="module")
def models():
    kw = JSON["loop_image_guided"]["tiny_unet_create_model_and_diffusion_kwargs"]
    ddpm = load_ddpm(fixture_path(GROUP, "tiny_unet.safetensors"), num_head_channels=kw["num_head_channels"],
                     image_size=kw["image_size"], noise_schedule=kw["noise_schedule"],
                     diffusion_steps=kw["diffusion_steps"])
    heads = json.load(open(fixture_path(GROUP, "tiny_dino_vit_config.json")))["num_heads"]
    dino = load_dino_extractor(fixture_path(GROUP, "tiny_dino_vit.safetensors"), num_heads=heads)
    return ddpm, dino


def settings_for(cfg: dict) -> DiffuseITSettings:
    return DiffuseITSettings(
        respacing=cfg["timestep_respacing"], skip_timesteps=cfg["skip_timesteps"], diff_iter=cfg["diff_iter"],
        lambda_ssim=cfg["lambda_ssim"], lambda_contra=cfg["lambda_contra_ssim"], lambda_dir_cls=cfg["lambda_dir_cls"],
        lambda_trg=cfg["lambda_trg"], lambda_mse=cfg["l2_trg_lambda"], lambda_range=cfg["range_lambda"],
        lambda_clip=cfg.get("clip_guidance_lambda", 0.0), ncuts=cfg.get("aug_num", 0),
        noise_mix_all=cfg["use_noise_aug_all"], range_restart=cfg["use_range_restart"],
        use_prog_contrast=cfg.get("use_prog_contrast", False), regularize_content=cfg.get("regularize_content", False))


def build(mode, models):
    ddpm, dino = models
    entry = JSON[f"loop_{mode}_guided"]
    loop = load_file(fixture_path(GROUP, f"loop_{mode}_guided.safetensors"))
    cfg = entry["config"]
    settings = settings_for(cfg)
    if mode == "text":
        terms = diffuseit_guidance(dino, settings, clip=stub_ensemble(), source_text=cfg["source"],
                                   target_text=cfg["prompt"])
    else:
        terms = diffuseit_guidance(dino, settings, style_image=loop["target_image"])
    return ddpm, entry, loop, settings, terms


def close(actual, expected, what):
    bound = TEACHER_RTOL * expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= bound, f"{what}: {diff:.3g} > {bound:.3g}"


@pytest.mark.parametrize("mode", ["image", "text"])
def test_teacher_forced_calls(models, mode):
    ddpm, entry, loop, settings, terms = build(mode, models)
    schedule = ddpm.schedule(settings.respacing)
    source = loop["init_image"]
    prepared = [t.prepare(source) for t in terms]
    state = StepState()
    calls = entry.get("num_p_sample_calls", len(JSON["loop_image_guided"]["sequence"]))
    for n in range(calls):
        s = f"step{n:02d}."
        x, t_index = loop[s + "x"], loop[s + "t"]
        ctx = StepContext(t_index=t_index, t=schedule.model_timesteps(t_index), x_t=x, schedule=schedule,
                          source=source, step=n, state=state)
        mv, grad, _ = guidance_gradient(ddpm.unet, schedule, x, t_index, prepared, ctx)
        close(grad, loop[s + "gradient"], f"{mode} call {n} gradient")
        guided_mean = ddpm_step(schedule, mv, x, t_index, torch.zeros_like(x), grad)  # the step without its noise
        close(guided_mean, loop[s + "guided_mean"], f"{mode} call {n} guided mean")
        close(ddpm_step(schedule, mv, x, t_index, loop[s + "noise"], grad), loop[s + "sample"], f"{mode} call {n} sample")
        if mode == "text":
            # an O(1) cosine loss: the README's CLIP-loss bound (abs 1e-6; measured 1.2e-7, one float32 step)
            assert abs(state.clip_loss.item() - entry["sequence"][n]["clip_loss"]) <= CLIP_LOSS_ATOL


class Replay:
    def __init__(self, loop, calls, undos):
        self.queue = [("start", loop["init_noise"])]
        for n in range(calls):
            self.queue.append(("step", loop[f"step{n:02d}.noise"]))
            if n < undos:
                self.queue.append(("resample", loop[f"undo{n:02d}.noise"]))

    def randn(self, shape, kind="step", rows=None):
        expected, z = self.queue.pop(0)
        assert kind == expected, f"sampler drew {kind} where upstream drew {expected}"
        return z


@pytest.mark.parametrize("mode", ["image", "text"])
def test_free_running_loop(models, mode):
    ddpm, entry, loop, settings, terms = build(mode, models)
    calls, undos = entry["num_p_sample_calls"], entry["num_undo_calls"]
    seen = []
    result = guided_sample(ddpm.unet, ddpm.schedule(settings.respacing), loop["init_image"], terms,
                           options=sampler_options(settings), noise_source=Replay(loop, calls, undos),
                           callback=lambda d: seen.append(d["t_index"]))
    assert seen == [loop[f"step{n:02d}.t"].item() for n in range(calls)]
    last = f"step{calls - 1:02d}."
    assert (result.samples - loop[last + "sample"]).abs().max().item() <= FREE_RUNNING_ATOL
    assert (result.images - loop[last + "pred_xstart"]).abs().max().item() <= FREE_RUNNING_ATOL
