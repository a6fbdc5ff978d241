"""Override flags mean what guided-diffusion's command-line flags mean.

``load_ddpm(path, num_heads=4)`` must build what upstream's ``create_model`` builds from
``--num_heads 4`` on top of ``model_and_diffusion_defaults()`` -- there ``num_head_channels`` is -1,
so the head count comes from ``num_heads`` -- and a file with neither a preset nor a head flag says
which head layout was assumed.
"""

import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path, load_json
from core import CheckpointError, load_ddpm
from core.tiny_models import tiny_unet_state_dict
from core.diffusion.unet import AttentionBlock, UNetConfig, UNetModel

GROUP = "guided_diffusion"
LOGGER = "core.diffusion.checkpoints"
# an architecture no published file has; every attention layer (encoder level 1, middle, decoder level 1) has 128 channels
WIDE = UNetConfig(image_size=64, model_channels=32, num_res_blocks=1, attention_ds=(2,), channel_mult=(1, 4),
                  num_heads=4, num_head_channels=-1, use_scale_shift_norm=True, resblock_updown=True)


@pytest.fixture(scope="module")
def wide_sd() -> dict:
    sd = tiny_unet_state_dict(seed=5, config=WIDE)
    # the tiny factory damps the output head; undo that so attention's share of the output is plain to see
    sd["out.2.weight"] = sd["out.2.weight"] * 10
    return sd


@pytest.fixture()
def wide_file(tmp_path, wide_sd):
    path = tmp_path / "my_finetune.pt"
    torch.save(wide_sd, path)
    return str(path)


def attention_blocks(unet):
    return {name: m for name, m in unet.named_modules() if isinstance(m, AttentionBlock)}


def run(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]))


def direct(sd, **layout):
    """The UNet built straight from an explicit head layout (what create_model would build), same weights."""
    unet = UNetModel(UNetConfig(**{**WIDE.__dict__, **layout}))
    unet.load_state_dict(sd, strict=True)
    return unet.eval()


def assert_differs(a, b):
    assert (a - b).abs().max() > 1e-3 * a.abs().max(), "the head layout should change the output"


def test_num_heads_alone_gives_that_many_heads(wide_file, wide_sd):
    ddpm = load_ddpm(wide_file, num_heads=4)
    blocks = attention_blocks(ddpm.unet)
    assert len(blocks) == 4
    for name, block in blocks.items():
        assert block.qkv.in_channels == 128 and block.num_heads == 4, name  # 4 heads of 32 channels
        assert not block.new_order
    assert ddpm.config.num_head_channels == -1 and ddpm.config.num_heads == 4
    out = run(ddpm.unet)
    assert torch.equal(out, run(direct(wide_sd, num_heads=4, num_head_channels=-1)))
    assert_differs(out, run(direct(wide_sd, num_head_channels=64)))  # the old silent layout: 2 heads of 64


def test_new_attention_order_with_num_heads(wide_file, wide_sd):
    ddpm = load_ddpm(wide_file, num_heads=4, use_new_attention_order=True)
    for name, block in attention_blocks(ddpm.unet).items():
        assert block.num_heads == 4 and block.new_order, name
    out = run(ddpm.unet)
    assert torch.equal(out, run(direct(wide_sd, num_heads=4, num_head_channels=-1, use_new_attention_order=True)))
    assert_differs(out, run(direct(wide_sd, num_heads=4, num_head_channels=-1)))  # legacy order


def test_num_head_channels_sets_the_head_width(wide_file, wide_sd):
    ddpm = load_ddpm(wide_file, num_head_channels=32)
    assert {b.num_heads for b in attention_blocks(ddpm.unet).values()} == {4}
    assert torch.equal(run(ddpm.unet), run(direct(wide_sd, num_head_channels=32)))


@pytest.mark.parametrize("flags, encoder, decoder", [
    (dict(num_heads_upsample=8), 4, 8),  # upstream: num_heads=4, num_head_channels=-1 by default
    (dict(num_heads=2, num_heads_upsample=8), 2, 8),
    (dict(num_heads=8), 8, 8),  # num_heads_upsample=-1: same as num_heads
    (dict(num_head_channels=64, num_heads_upsample=8), 2, 2),  # a head width wins, as upstream
])
def test_num_heads_upsample_only_in_the_decoder(wide_file, wide_sd, flags, encoder, decoder):
    ddpm = load_ddpm(wide_file, **flags)
    for name, block in attention_blocks(ddpm.unet).items():
        assert block.num_heads == (decoder if name.startswith("output_blocks.") else encoder), name
    layout = {"num_heads": 4, "num_head_channels": -1, "num_heads_upsample": -1, **flags}
    assert torch.equal(run(ddpm.unet), run(direct(wide_sd, **layout)))


def test_unknown_file_without_head_flag_logs_the_assumed_layout(wide_file, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ddpm = load_ddpm(wide_file)
    lines = [r for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    msg = lines[0].getMessage()
    assert "\n" not in msg and "my_finetune.pt" in msg
    assert "num_head_channels=64" in msg and "num_heads=" in msg  # what was assumed, and the alternative
    assert "overrides" in msg and "--overrides" in msg and "load_ddpm(" in msg  # where to override it
    assert {b.num_heads for b in attention_blocks(ddpm.unet).values()} == {2}
    assert ddpm.assumed == {"num_head_channels": 64} and ddpm.preset is None


@pytest.mark.parametrize("flags", [dict(num_heads=4), dict(num_head_channels=64), dict(num_heads_upsample=2)])
def test_no_log_when_a_head_flag_decides(wide_file, caplog, flags):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ddpm = load_ddpm(wide_file, **flags)
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert ddpm.assumed == {}


def test_known_name_uses_its_preset_without_log(tmp_path, wide_sd, caplog):
    path = tmp_path / "256x256_diffusion_uncond.pt"
    torch.save(wide_sd, path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ddpm = load_ddpm(str(path))
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert {b.num_heads for b in attention_blocks(ddpm.unet).values()} == {2}  # the preset's 64-channel heads
    assert ddpm.preset == "256x256_diffusion_uncond.pt" and ddpm.assumed == {}
    # a head flag replaces the preset's whole head layout, as `--num_heads 4` without `--num_head_channels 64`
    ddpm = load_ddpm(str(path), num_heads=4)
    assert {b.num_heads for b in attention_blocks(ddpm.unet).values()} == {4}
    # flags the preset does not record keep the preset for the rest
    ddpm = load_ddpm(str(path), noise_schedule="cosine")
    assert ddpm.noise_schedule == "cosine" and ddpm.config.num_head_channels == 64


def test_published_architecture_without_name_uses_its_preset(caplog):
    manifest = load_json(GROUP, "unet256_uncond_manifest.json")
    sd = {k: torch.empty(v, device="meta") for k, v in manifest["tensors"].items()}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ddpm = load_ddpm(sd)
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert ddpm.preset == "256x256_diffusion_uncond.pt" and ddpm.assumed == {}
    for block in manifest["attention_blocks"]:
        assert ddpm.unet.get_submodule(block["module"]).num_heads == block["num_heads"]
    # upstream's `--num_heads 4` alone on the same architecture: 4 heads everywhere (num_head_channels=-1)
    ddpm = load_ddpm(sd, num_heads=4)
    assert {b.num_heads for b in attention_blocks(ddpm.unet).values()} == {4}


def test_official_create_model_flags_build_the_official_heads():
    """The tiny fixture's create_model head flags, passed verbatim, give the heads upstream built."""
    fixture = load_json(GROUP, "tiny_unet_config.json")
    kw = fixture["create_model_kwargs"]
    flags = {k: kw[k] for k in ("num_heads", "num_head_channels", "num_heads_upsample", "use_new_attention_order")}
    ddpm = load_ddpm(load_file(fixture_path(GROUP, "tiny_unet.safetensors")), **flags)
    for block in fixture["attention_blocks"]:
        module = ddpm.unet.get_submodule(block["module"])
        assert module.num_heads == block["num_heads"], block["module"]
        assert module.new_order == (block["attention_class"] == "QKVAttention")


@pytest.mark.parametrize("flags, flag, channels", [
    (dict(num_heads=3), "num_heads=3", 128),
    (dict(num_heads=0), "num_heads=0", 128),
    (dict(num_head_channels=48), "num_head_channels=48", 128),
    (dict(num_head_channels=0), "num_head_channels=0", 128),
    (dict(num_heads=4, num_heads_upsample=3), "num_heads_upsample=3", 128),
])
def test_impossible_head_layout_is_a_clear_error(wide_file, flags, flag, channels):
    with pytest.raises(CheckpointError) as err:
        load_ddpm(wide_file, **flags)
    msg = str(err.value)
    assert flag in msg and f"{channels} channels" in msg


def test_unknown_file_whose_widths_rule_out_the_assumption_says_what_to_pass():
    sd = load_file(fixture_path(GROUP, "tiny_unet.safetensors"))  # 32-channel attention: no 64-channel heads
    with pytest.raises(CheckpointError) as err:
        load_ddpm(sd)
    msg = str(err.value)
    assert "num_head_channels=64" in msg and "32 channels" in msg and "num_heads=" in msg


def test_flags_the_shapes_show_must_agree(wide_file):
    with pytest.raises(CheckpointError, match="learn_sigma"):
        load_ddpm(wide_file, num_heads=4, learn_sigma=False)  # the file has 6 output channels
    with pytest.raises(CheckpointError, match="class_cond"):
        load_ddpm(wide_file, num_heads=4, class_cond=True)  # the file has no label embedding
    assert load_ddpm(wide_file, num_heads=4, learn_sigma=True, class_cond=False).learn_sigma
