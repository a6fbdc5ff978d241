"""A model that produces NaN/inf is an error naming the checkpoint, with or without guidance (never a black image)."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, fixture_path, load_json
from core import load_ddpm
from core.diffusion.checkpoints import CheckpointError
from core.diffusion.finite_watch import GuidanceError
from core.diffusion.guided_loop import GuidedSamplerOptions, guided_sample
from core.diffusion.sampling import sample

HEADS = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]["num_head_channels"]
TINY = fixture_path("guided_diffusion", "tiny_unet.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_non_finite_weights_is_refused_naming_it(tmp_path, bad):
    sd = load_file(TINY)
    key = sorted(k for k in sd if k.endswith("weight"))[3]
    sd[key][0] = bad
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=rf"^{path} holds NaN/inf weights in 1 tensor\(s\) \({key}\)"):
        load_ddpm(path, num_head_channels=HEADS)
    run = subprocess.run([sys.executable, "-m", "core.cli", "sample", "--ckpt", str(path), "--device", "cpu",
                          "--overrides", f"num_head_channels={HEADS}", "--respacing", "2",
                          "--out", str(tmp_path / "s.png")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith(f"error: {path} holds NaN/inf weights")
    assert not (tmp_path / "s.png").exists()


def test_model_going_non_finite_without_guidance_names_the_checkpoint():
    """Weights that overflow after loading (as a fp16 body can): the unguided loop and plain sampling stop."""
    ddpm = load_ddpm(TINY, num_head_channels=HEADS)
    with torch.no_grad():
        ddpm.unet.out[2].bias.fill_(float("inf"))
    size = ddpm.image_size
    source = torch.zeros(2, 3, size, size)
    schedule = ddpm.schedule("10")
    with pytest.raises(GuidanceError, match=rf"^the diffusion model \({TINY}\) produced NaN/inf at guided step 0 "
                                            r"\(respaced t=5\) in row 0 \(also row 1 at t=5\), before any guidance "
                                            r"loss: the loss weights are not the cause"):
        guided_sample(ddpm.unet, schedule, source, [], options=GuidedSamplerOptions(skip_timesteps=4),
                      learn_sigma=ddpm.learn_sigma)
    with pytest.raises(GuidanceError, match=rf"^the diffusion model's output \({TINY}\) is NaN/inf"):
        sample(ddpm.unet, schedule, (1, 3, size, size), learn_sigma=ddpm.learn_sigma)
