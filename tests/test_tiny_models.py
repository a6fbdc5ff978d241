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


def test_tiny_models_refuse_to_replace_real_checkpoints(tmp_path):
    """A real file under a published name is never replaced without force; rewriting tiny files is fine."""
    import pytest
    from core.tiny_models import TinyModelsRefused

    real = tmp_path / "guided_diffusion" / DDPM_FILE
    real.parent.mkdir()
    real.write_bytes(b"a real checkpoint")
    with pytest.raises(TinyModelsRefused, match=r"holds weights that tiny-models did not write \(.*256x256_diffusion_uncond\.pt\)"):
        write_tiny_models(tmp_path, dino=False, clip=False, lpips=False, taesd=False)
    assert real.read_bytes() == b"a real checkpoint"
    other = tmp_path / "lpips" / "my_vgg.pth"  # another weights file in a folder to be filled
    other.parent.mkdir()
    other.write_bytes(b"mine")
    with pytest.raises(TinyModelsRefused, match="my_vgg.pth"):
        write_tiny_models(tmp_path / "", dino=False, clip=False, taesd=False)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [DDPM_FILE, "my_vgg.pth"]  # nothing written
    written = write_tiny_models(tmp_path, dino=False, clip=False, lpips=False, taesd=False, force=True)
    assert written["guided_diffusion"] == real and real.read_bytes() != b"a real checkpoint"
    again = write_tiny_models(tmp_path, dino=False, clip=False, lpips=False, taesd=False)  # tiny on record: rewritten
    assert again["guided_diffusion"].stat().st_size == real.stat().st_size
    real.write_bytes(b"replaced by the real file later")  # no longer the recorded tiny file
    with pytest.raises(TinyModelsRefused):
        write_tiny_models(tmp_path, dino=False, clip=False, lpips=False, taesd=False)


def test_dino_sidecar_never_applies_to_a_real_file_of_the_same_name(tmp_path):
    """The tiny DINO's 2-head sidecar is tied to its hash: a ViT-B/8 that later takes the name gets 12 heads."""
    from core.encoders.dino import DINO_ARCHS, build_dino_vit, load_dino_vit, resolve_arch
    from core.tiny_models import TINY_DINO, write_tiny_dino

    path = write_tiny_dino(tmp_path)
    assert load_dino_vit(path).blocks[0].attn.num_heads == TINY_DINO["num_heads"]
    cfg = DINO_ARCHS[resolve_arch("vit_base_patch8_224")][0]
    with torch.device("meta"):
        real = build_dino_vit(cfg)
    # a ViT-B/8-shaped file (zeros, fp16 to halve the 340 MB) replaces the tiny one under its name
    torch.save({k: torch.zeros(v.shape, dtype=torch.float16) for k, v in real.state_dict().items()}, path)
    loaded = load_dino_vit(path, device="meta")
    assert loaded.blocks[0].attn.num_heads == cfg.num_heads == 12


def test_cli_tiny_models_refuses_then_forces(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    real = tmp_path / "dino" / "dino_vitbase8_pretrain.pth"
    real.parent.mkdir()
    real.write_bytes(b"real")
    run = subprocess.run([sys.executable, "-m", "core.cli", "tiny-models", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "--force" in run.stderr
    assert "Traceback" not in run.stderr and real.read_bytes() == b"real"
    assert not (tmp_path / "guided_diffusion").exists()
