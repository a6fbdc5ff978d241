"""TAESD decoders for x0 guidance: ComfyUI's file layout, latent formats, differentiability, clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import fixture_path
from core.encoders.taesd import (LATENT_FORMATS, TAESDCheckpointError, TAESDDecoder, load_taesd_decoder,
                                 taesd_decoder_module, taesd_encoder_module)
from core.tiny_models import write_tiny_taesd

with open(fixture_path("comfy", "taesd_state_dict_layout.json")) as f:
    LAYOUT = json.load(f)["latent_channels"]


@pytest.mark.parametrize("channels", sorted(int(c) for c in LAYOUT))
def test_decoder_keys_and_shapes_are_comfyuis(channels):
    expected = {k: tuple(v) for k, v in LAYOUT[str(channels)]["decoder"].items()}
    ours = {k: tuple(v.shape) for k, v in taesd_decoder_module(channels).state_dict().items()}
    assert ours == expected


@pytest.mark.parametrize("channels", sorted(int(c) for c in LAYOUT))
def test_encoder_keys_and_shapes_are_comfyuis(channels):
    expected = {k: tuple(v) for k, v in LAYOUT[str(channels)]["encoder"].items()}
    module = taesd_encoder_module(channels)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
    assert module(torch.zeros(1, 3, 64, 64)).shape == (1, channels, 8, 8)  # three stride-2 stages


def test_a_file_in_comfyuis_layout_loads_and_decodes_differentiably(tmp_path):
    path = write_tiny_taesd(tmp_path / "vae_approx")
    decoder = load_taesd_decoder(path)
    assert decoder.latent_channels == 4 and not any(p.requires_grad for p in decoder.parameters())
    latent = torch.randn(2, 4, 8, 8, requires_grad=True)
    rgb = decoder(latent)
    assert rgb.shape == (2, 3, 64, 64)
    (grad,) = torch.autograd.grad(rgb.square().sum(), latent)
    assert grad.abs().sum() > 0
    # loaded under inference mode (as in a ComfyUI node), the weights still take part in a backward pass
    with torch.inference_mode():
        inside = load_taesd_decoder(path)
    latent = torch.randn(1, 4, 8, 8, requires_grad=True)
    torch.autograd.grad(inside(latent).sum(), latent)


def test_sixteen_channel_decoders_load_as_such():
    sd = taesd_decoder_module(16).state_dict()
    assert load_taesd_decoder(sd).latent_channels == 16
    assert {f.channels for f in LATENT_FORMATS.values()} == {4, 16}


def test_a_latent_of_another_format_is_a_clear_error():
    with pytest.raises(ValueError, match="4-channel latents.*16, 8, 8.*latent format"):
        TAESDDecoder(4)(torch.randn(1, 16, 8, 8))


def test_wrong_files_are_refused_with_what_was_expected(tmp_path):
    encoder_like = {"0.weight": torch.zeros(64, 3, 3, 3), "0.bias": torch.zeros(64)}
    save_file(encoder_like, str(tmp_path / "taesd_encoder.safetensors"))
    with pytest.raises(TAESDCheckpointError, match="encoder.*_decoder file"):
        load_taesd_decoder(tmp_path / "taesd_encoder.safetensors")
    with pytest.raises(TAESDCheckpointError, match="not a TAESD decoder.*1.weight"):
        load_taesd_decoder({"input_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="vae_approx.*taesd"):
        load_taesd_decoder(tmp_path / "taesdxl_decoder.safetensors")
