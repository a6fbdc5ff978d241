"""DiffuseIT and Blended batches equal their serial runs up to float32 rounding (the README's stated bound).

Rows are independent runs, but a batched matmul/convolution may sum in another order than a one-row
one, so a row's values can differ in the last bits: measured at most 2.7 float32 epsilons of the
largest value compared (tiny presets, 64 px); asserted below 64.
"""

import dataclasses

import pytest
import torch

from conftest import EPS32
from core.diffusion.batching import sample_many
from core.tiny_models import tiny_preset_run

BOUND_ULPS = 64  # README: "up to 64 float32 epsilons of the largest value (measured <= 2.7)"


@pytest.mark.parametrize("method", ["diffuseit-image", "blended"])
def test_batch_equals_serial_runs_within_the_stated_bound(method):
    run = tiny_preset_run(method, 1, ncuts=2)
    if method == "blended":
        options, schedule = dataclasses.replace(run.options, skip_timesteps=97), run.schedule
    else:
        options = dataclasses.replace(run.options, skip_timesteps=17, resample_steps=2, range_restart_threshold=None)
        schedule = run.ddpm.schedule("20")
    kw = dict(seed=4, options=options, blend=run.blend, learn_sigma=run.ddpm.learn_sigma)
    batch = sample_many(run.ddpm.unet, schedule, run.source, run.terms, samples_per_image=2, chunk_size=2, **kw).images
    serial = torch.cat([sample_many(run.ddpm.unet, schedule, run.source, run.terms, first_row=r, **kw).images
                        for r in range(2)])
    assert not torch.equal(serial[0], serial[1])  # two different samples were compared
    diff, scale = (batch - serial).abs().max().item(), serial.abs().max().item()
    assert diff <= BOUND_ULPS * EPS32 * scale, f"{diff:.3g} = {diff / (EPS32 * scale):.1f} ulps of {scale:.3g}"
