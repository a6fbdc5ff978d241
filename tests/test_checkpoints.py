"""load_ddpm: strict loading of the real layouts, safe unpickling and clear errors."""

import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_path, load_json
from core import CheckpointError, load_ddpm
from core.diffusion.checkpoints import MissingWeightsError, infer_unet_config

GROUP = "guided_diffusion"


def meta_state_dict(shapes: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_real_256_uncond_manifest_loads_strictly_on_meta():
    manifest = load_json(GROUP, "unet256_uncond_manifest.json")
    ddpm = load_ddpm(meta_state_dict(manifest["tensors"]))
    expected = manifest["unet_model_kwargs"]
    cfg = ddpm.config
    assert cfg.model_channels == expected["model_channels"]
    assert list(cfg.channel_mult) == expected["channel_mult"]
    assert sorted(cfg.attention_ds) == sorted(expected["attention_resolutions"])
    assert cfg.num_res_blocks == expected["num_res_blocks"] and cfg.num_classes == expected["num_classes"]
    assert cfg.image_size == expected["image_size"] and ddpm.learn_sigma
    assert sum(p.numel() for p in ddpm.unet.parameters()) == manifest["total_parameters"]
    assert list(ddpm.unet.state_dict()) == list(manifest["tensors"])
    for block in manifest["attention_blocks"]:
        assert ddpm.unet.get_submodule(block["module"]).num_heads == block["num_heads"]
        assert ddpm.unet.get_submodule(block["module"]).new_order == (block["attention_class"] == "QKVAttention")


def test_preset_by_file_name_and_overrides(tmp_path):
    manifest = load_json(GROUP, "unet256_uncond_manifest.json")
    sd = meta_state_dict(manifest["tensors"])
    # the same architecture under a 128x128 file name would take that preset's head count
    cfg = infer_unet_config(sd, num_heads=4, num_head_channels=-1)
    assert cfg.heads_for(1024) == 4
    ddpm = load_ddpm(sd, noise_schedule="cosine", use_new_attention_order=True)
    assert ddpm.noise_schedule == "cosine"
    assert ddpm.unet.get_submodule("middle_block.1").new_order
    with pytest.raises(TypeError, match="unknown override"):
        load_ddpm(sd, num_channelz=3)


def test_class_conditional_layout():
    manifest = load_json(GROUP, "unet256_uncond_manifest.json")
    sd = meta_state_dict(manifest["tensors"])
    sd["label_emb.weight"] = torch.empty(1000, 1024, device="meta")
    ddpm = load_ddpm(sd)
    assert ddpm.class_cond and ddpm.config.num_classes == 1000


@pytest.mark.parametrize("name", ["tiny_unet.pt", "tiny_unet.safetensors"])
def test_official_containers_load(name):
    kw = load_json(GROUP, "tiny_unet_config.json")["create_model_kwargs"]
    ddpm = load_ddpm(fixture_path(GROUP, name), num_head_channels=kw["num_head_channels"])
    ref = load_file(fixture_path(GROUP, "tiny_unet.safetensors"))
    for k, v in ddpm.unet.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert not any(p.is_inference() for p in ddpm.unet.parameters())


def test_fp16_checkpoint_loads(tmp_path):
    kw = load_json(GROUP, "tiny_unet_config.json")["create_model_kwargs"]
    sd = {k: v.half() for k, v in load_file(fixture_path(GROUP, "tiny_unet.safetensors")).items()}
    path = tmp_path / "half.pt"
    torch.save(sd, path)
    ddpm = load_ddpm(str(path), num_head_channels=kw["num_head_channels"])
    assert ddpm.unet.out[2].weight.dtype == torch.float32


def test_loading_inside_inference_mode_keeps_grads_possible():
    kw = load_json(GROUP, "tiny_unet_config.json")["create_model_kwargs"]
    with torch.inference_mode():
        ddpm = load_ddpm(fixture_path(GROUP, "tiny_unet.safetensors"), num_head_channels=kw["num_head_channels"])
    assert not any(p.is_inference() for p in ddpm.unet.parameters())


def test_missing_file_says_where_and_url(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        load_ddpm(str(tmp_path / "256x256_diffusion_uncond.pt"))
    msg = str(err.value)
    assert "models/guided_diffusion" in msg
    assert load_json(GROUP, "unet256_uncond_manifest.json")["download_url"] in msg


def test_stable_diffusion_checkpoint_is_named(tmp_path):
    path = tmp_path / "sd15.safetensors"
    from safetensors.torch import save_file
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match="Stable Diffusion"):
        load_ddpm(str(path))


def test_truncated_files(tmp_path):
    src = fixture_path(GROUP, "tiny_unet.pt")
    for name in ("cut.pt", "cut.safetensors"):
        original = src if name.endswith(".pt") else fixture_path(GROUP, "tiny_unet.safetensors")
        data = open(original, "rb").read()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_ddpm(str(tmp_path / name))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"time_embed.0.weight": torch.zeros(1), "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        load_ddpm(str(path))


def test_wrong_head_layout_is_explained():
    sd = load_file(fixture_path(GROUP, "tiny_unet.safetensors"))
    with pytest.raises(CheckpointError, match="num_head_channels"):
        load_ddpm(sd)  # the tiny model needs num_head_channels=16, which shapes cannot tell


def test_dino_state_dict_is_not_a_unet():
    with pytest.raises(CheckpointError, match="not a diffusion UNet"):
        load_ddpm({"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)})
