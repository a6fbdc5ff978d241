"""Schedules, respacing and single steps reproduce the official guided-diffusion values."""

import pytest
import torch
from conftest import assert_close
from core.diffusion.sampling import ddim_step, ddpm_step, model_output
from core.diffusion.schedule import DiffusionSchedule, cosine_betas, p_mean_variance, q_sample, space_timesteps

GROUP = "guided_diffusion"
# README "Tolerances": float64 schedules are identical when recomputed in float64; allow last-bit noise only
SCHEDULE_RTOL = 1e-12


def atol(ref, key):
    return ref["float64_shadow_vs_float32_reference"]["outputs"][key]["recommended_atol_at_rtol_1e-5"]


def schedule_for(ref, spacing):
    kw = ref["diffusion_kwargs"]
    return DiffusionSchedule.create(kw["steps"], kw["noise_schedule"], spacing)


def test_space_timesteps_exact(ref):
    for spacing, entry in ref["space_timesteps_1000"].items():
        assert space_timesteps(ref["diffusion_kwargs"]["steps"], spacing) == entry["use_timesteps"], spacing


def test_base_and_respaced_schedules(ref, tensors):
    base = schedule_for(ref, None)
    prefixes = {"base_1000": base} | {s: schedule_for(ref, s) for s in ref["respaced_schedules"]}
    checked = 0
    for name, sched in prefixes.items():
        prefix = "schedule.base_1000" if name == "base_1000" else ref["respaced_schedules"][name]["tensor_prefix"]
        for key, value in tensors.items():
            if not key.startswith(prefix + "."):
                continue
            field = key[len(prefix) + 1:]
            mine = getattr(sched, field)
            if field == "timestep_map":
                assert mine.tolist() == value.tolist(), name
            else:
                assert mine.dtype == torch.float64
                assert torch.allclose(mine, value, rtol=SCHEDULE_RTOL, atol=0), f"{name}.{field}"
            checked += 1
    assert checked >= 60


def test_explicit_list_and_cosine():
    assert space_timesteps(1000, [999, 0, 500]) == [0, 500, 999]
    betas = cosine_betas(1000)
    assert betas.dtype == torch.float64 and betas.max() <= 0.999 and betas[0] > 0
    with pytest.raises(ValueError, match="cannot create exactly"):
        space_timesteps(1000, "ddim7777")


def test_q_sample(ref, tensors):
    s = schedule_for(ref, ref["q_sample"]["spacing"])
    out = q_sample(s, tensors["q_sample.x_start"], tensors["q_sample.t"], tensors["q_sample.noise"])
    assert_close(out, tensors["q_sample.out"], atol(ref, "q_sample.out"), what="q_sample")


def test_p_mean_variance_and_model_call(ref, tensors, unet):
    s = schedule_for(ref, ref["p_mean_variance"]["spacing"])
    x, t = tensors["p_mean_variance.x_t"], tensors["p_mean_variance.t"]
    with torch.no_grad():
        out = model_output(unet, x, t, s)
    assert_close(out, tensors["p_mean_variance.model_output"], atol(ref, "p_mean_variance.model_output"))
    for mode, clip in (("clip", True), ("noclip", False)):
        mv = p_mean_variance(s, tensors["p_mean_variance.model_output"], x, t, clip_denoised=clip)
        for field in ("mean", "variance", "log_variance", "pred_xstart"):
            key = f"p_mean_variance.{mode}.{field}"
            assert_close(getattr(mv, field).expand_as(tensors[key]), tensors[key], atol(ref, key), what=key)


@pytest.mark.parametrize("name", ["p_sample", "p_sample_t0", "p_sample_cond"])
def test_p_sample(ref, tensors, unet, name):
    s = schedule_for(ref, ref[name]["spacing"])
    x, t = tensors[f"{name}.x_t"], tensors[f"{name}.t"]
    with torch.no_grad():
        mv = p_mean_variance(s, model_output(unet, x, t, s), x, t, clip_denoised=ref[name]["clip_denoised"])
    cond = tensors.get(f"{name}.cond_grad")
    sample = ddpm_step(s, mv, x, t, tensors[f"{name}.noise"], cond)
    assert_close(sample, tensors[f"{name}.sample"], atol(ref, f"{name}.sample"), what=name)
    assert_close(mv.pred_xstart, tensors[f"{name}.pred_xstart"], atol(ref, f"{name}.pred_xstart"))


@pytest.mark.parametrize("name", ["ddim_sample", "ddim_sample_eta05", "ddim_sample_t0", "ddim_sample_cond"])
def test_ddim_sample(ref, tensors, unet, name):
    s = schedule_for(ref, ref[name]["spacing"])
    x, t = tensors[f"{name}.x_t"], tensors[f"{name}.t"]
    with torch.no_grad():
        mv = p_mean_variance(s, model_output(unet, x, t, s), x, t, clip_denoised=ref[name]["clip_denoised"])
    noise = tensors.get(f"{name}.noise", torch.zeros_like(x))
    sample, x0 = ddim_step(s, mv, x, t, noise, ref[name]["eta"], tensors.get(f"{name}.cond_grad"))
    assert_close(sample, tensors[f"{name}.sample"], atol(ref, f"{name}.sample"), what=name)
    assert_close(x0, tensors[f"{name}.pred_xstart"], atol(ref, f"{name}.pred_xstart"), what=name + " x0")


def test_gradient_through_unet(ref, tensors, unet):
    s = schedule_for(ref, ref["grad_pred_xstart"]["spacing"])
    x = tensors["grad_pred_xstart.x_t"].clone().requires_grad_(True)
    t = tensors["grad_pred_xstart.t"]
    mv = p_mean_variance(s, model_output(unet, x, t, s), x, t, clip_denoised=ref["grad_pred_xstart"]["clip_denoised"])
    loss = (tensors["grad_pred_xstart.weight"] * mv.pred_xstart).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert_close(loss.reshape(-1), tensors["grad_pred_xstart.loss"].reshape(-1), atol(ref, "grad_pred_xstart.loss"), what="loss")
    assert_close(grad, tensors["grad_pred_xstart.grad_x_t"], atol(ref, "grad_pred_xstart.grad_x_t"), what="grad")


def test_device_copies_once_per_table_and_never_stale():
    """Each schedule table (derived ones included) is one persistent tensor copied once per device; a copy
    belongs to its table's identity while the table lives, so a new tensor never finds a dead one's copy."""
    import gc

    from core.diffusion.schedule import on_device

    s = DiffusionSchedule.create(1000, "linear", "10")
    assert s.log_betas is s.log_betas and torch.equal(s.log_betas, torch.log(s.betas))
    assert torch.equal(s.fixed_large_variance, torch.cat([s.posterior_variance[1:2], s.betas[1:]]))
    assert torch.equal(s.log_fixed_large_variance, torch.log(s.fixed_large_variance))
    meta = torch.device("meta")
    assert s.to_device(meta) is s
    for name in s.TABLES:
        table = getattr(s, name)
        assert on_device(table, meta) is on_device(table, "meta") and on_device(table, meta).dtype == table.dtype
    temp = torch.ones(4, dtype=torch.float64)
    first = on_device(temp, meta)
    del temp
    gc.collect()
    other = torch.zeros(4, dtype=torch.float64)
    assert on_device(other, meta) is not first
