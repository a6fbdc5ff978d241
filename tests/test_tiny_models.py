"""The tiny checkpoints load through the same code paths as the published files."""

import torch

from core.diffusion.checkpoints import PRESETS, load_ddpm
from core.tiny_models import DDPM_FILE, TINY_UNET, write_tiny_models


def test_tiny_models_load_like_the_real_ones(tmp_path):
    written = write_tiny_models(tmp_path)
    assert written["guided_diffusion"] == tmp_path / "guided_diffusion" / DDPM_FILE
    assert DDPM_FILE in PRESETS  # the file name picks the published preset, no overrides needed

    ddpm = load_ddpm(written["guided_diffusion"])
    assert ddpm.image_size == 256 and ddpm.learn_sigma
    assert ddpm.config.channel_mult == TINY_UNET.channel_mult and ddpm.config.attention_ds == (8, 16, 32)
    with torch.no_grad():
        out = ddpm.unet(torch.zeros(1, 3, 64, 64), torch.tensor([10]))
    assert out.shape == (1, 6, 64, 64) and torch.isfinite(out).all()

    from core.encoders.dino import load_dino_extractor

    features = load_dino_extractor(written["dino"])(torch.zeros(1, 3, 224, 224))
    assert features.keys.shape == (1, 785, 32) and features.cls.shape == (1, 32)

    from core.encoders.clip import load_clip

    clip = load_clip(str(written["clip_guidance"].parent), pretrained=str(written["clip_guidance"]))
    assert clip.encode_text(["a photo"]).shape == (1, 16)

    from core.encoders.lpips import VGG16_FILE, load_lpips

    assert written["lpips"].name == VGG16_FILE
    from core.encoders.taesd import load_taesd_decoder
    assert load_taesd_decoder(written["vae_approx"]).latent_channels == 4  # ComfyUI's vae_approx layout
    lp = load_lpips(written["lpips"])
    d = lp(torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1)
    assert torch.isfinite(d).all()


def test_tiny_models_are_reproducible(tmp_path):
    a = write_tiny_models(tmp_path / "a", dino=False, clip=False)["guided_diffusion"]
    b = write_tiny_models(tmp_path / "b", dino=False, clip=False)["guided_diffusion"]
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
