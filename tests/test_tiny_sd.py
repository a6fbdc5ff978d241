"""Tiny models in ComfyUI's own formats (core.tiny_sd): the SD1.5 checkpoint's layout, values and file,
the cache, TAESD pairs; and, in a real ComfyUI (e2e), that Load Checkpoint and VAE Loader accept them."""

import json
import math
import os
import subprocess

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT
from core import tiny_sd
from core.encoders.taesd import LATENT_FORMATS, TAESDCheckpointError, load_taesd_decoder
from core.tiny_models import write_tiny_models

LAYOUT = tiny_sd.sd15_layout()
SMALL = 1 << 16  # values: tensors up to this size make a fast partial file (the noise path's are larger)


def small_or_noise_path(key: str) -> bool:
    item = PLAN[key]
    return math.prod(item.shape) <= SMALL or key in tiny_sd._NOISE_PATH


PLAN = {item.key: item for item in tiny_sd.sd15_plan()}


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_the_layout_is_sd15_as_comfyui_detects_it():
    config = LAYOUT["unet_config"]
    # supported_models.SD15's detection values, and the tiny depth
    assert (config["model_channels"], config["context_dim"], config["num_heads"]) == (320, 768, 8)
    assert not config["use_linear_in_transformer"] and config["adm_in_channels"] is None
    assert config["channel_mult"] == [1] and config["num_res_blocks"] == [1]
    assert [g["prefix"] for g in LAYOUT["groups"]] == ["model.diffusion_model.", "first_stage_model.",
                                                       "cond_stage_model."]
    assert sum(math.prod(item.shape) for item in PLAN.values()) == LAYOUT["parameters"]
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in PLAN if k.startswith("cond_"))
    assert {item.dtype for item in PLAN.values()} == {"float16"}
    # the whole file's size follows from the plan: 8-byte length, header, 2 bytes per value
    header = tiny_sd._header(list(PLAN.values()), tiny_sd._metadata(0))
    assert tiny_sd.sd15_file_size() == 8 + len(header) + 2 * LAYOUT["parameters"]


def test_a_partial_file_has_the_layouts_keys_shapes_and_values(tmp_path):
    path = tiny_sd.write_tiny_sd15(tmp_path, seed=3, keys=small_or_noise_path)
    tensors, meta = read(path)
    expected = [k for k in PLAN if small_or_noise_path(k)]
    assert set(tensors) == set(expected)
    assert len(expected) > 300
    for key, value in tensors.items():
        assert tuple(value.shape) == PLAN[key].shape and value.dtype == torch.float16, key
        assert torch.equal(value, tiny_sd.make_tensor(PLAN[key], 3)), key  # same values as in the whole file
    assert meta["seed"] == "3" and meta["layout_sha256"] == tiny_sd.layout_sha256()[:16]
    assert not list(tmp_path.glob("*.part"))


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    keys = lambda k: k.startswith("model.diffusion_model.input_blocks.1.1.")  # noqa: E731
    a = tiny_sd.write_tiny_sd15(tmp_path / "a", seed=0, keys=keys).read_bytes()
    b = tiny_sd.write_tiny_sd15(tmp_path / "b", seed=0, keys=keys).read_bytes()
    c = tiny_sd.write_tiny_sd15(tmp_path / "c", seed=1, keys=keys).read_bytes()
    assert a == b and a != c and len(a) == len(c)


def test_init_rules_scale_each_kind_of_weight():
    conv = PLAN["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]  # 320 x 320 x 3 x 3
    w = tiny_sd.make_tensor(conv, 0).float()
    assert abs(w.std().item() * math.sqrt(320 * 9) - 1) < 0.01 and abs(w.mean().item()) < 1e-3
    residual = tiny_sd.make_tensor(PLAN["first_stage_model.decoder.mid.block_1.conv2.weight"], 0).float()
    assert abs(residual.std().item() * math.sqrt(512 * 9) / tiny_sd.RESIDUAL_GAIN - 1) < 0.01
    emb = tiny_sd.make_tensor(PLAN["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"], 0)
    assert abs(emb.float().std().item() / tiny_sd.EMBEDDING_STD - 1) < 0.02
    assert torch.equal(tiny_sd.make_tensor(PLAN["first_stage_model.decoder.norm_out.weight"], 0), torch.ones(128,
                       dtype=torch.float16))
    assert not tiny_sd.make_tensor(PLAN["model.diffusion_model.out.2.bias"], 0).any()


def test_the_unet_carries_its_input_to_the_noise_prediction():
    """conv_in writes +x / -x into GroupNorm group 0, the last skip copies exactly that group, the out conv
    reads x back (silu(z) - silu(-z) = z): checked by running those layers alone."""
    get = lambda name: tiny_sd.make_tensor(PLAN["model.diffusion_model." + name], 0).float()  # noqa: E731
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    h0 = torch.nn.functional.conv2d(x, get("input_blocks.0.0.weight"), padding=1)
    other = torch.randn(1, 320, 8, 8, generator=torch.Generator().manual_seed(1))  # the rest of the network
    h = torch.nn.functional.conv2d(torch.cat([other, h0], 1), get("output_blocks.1.0.skip_connection.weight"))
    assert torch.equal(h[:, :10], h0[:, :10])
    assert not get("output_blocks.1.0.out_layers.3.weight")[:10].any()
    assert not get("output_blocks.1.1.proj_out.weight")[:10].any()
    z = torch.nn.functional.silu(torch.nn.functional.group_norm(h, 32))
    out_w = get("out.2.weight")
    eps_path = torch.nn.functional.conv2d(z[:, :10], out_w[:, :10], padding=1)
    rms = x.square().mean().sqrt()
    assert torch.allclose(eps_path, x / rms, atol=5e-3 * (x / rms).abs().max().item())


def test_the_cache_writes_once_and_links_into_a_models_folder(tmp_path, monkeypatch):
    small = [item for item in tiny_sd.sd15_plan() if math.prod(item.shape) <= 4096]
    monkeypatch.setattr(tiny_sd, "sd15_plan", lambda: small)  # the real file is 465 MB
    cached = tiny_sd.tiny_sd15_checkpoint(tmp_path / "cache", seed=0)
    assert cached.name == f"tiny_sd15-{tiny_sd.layout_sha256()[:12]}-seed0.safetensors"
    assert cached.stat().st_size == tiny_sd.sd15_file_size()
    stamp = cached.stat().st_mtime_ns
    assert tiny_sd.tiny_sd15_checkpoint(tmp_path / "cache", seed=0) == cached and cached.stat().st_mtime_ns == stamp
    cached.write_bytes(b"truncated")  # a damaged cache entry is rewritten
    assert tiny_sd.tiny_sd15_checkpoint(tmp_path / "cache", seed=0).stat().st_size == tiny_sd.sd15_file_size()
    linked = tiny_sd.link_tiny_sd15(tmp_path / "models", tmp_path / "cache")
    assert linked == tmp_path / "models" / "checkpoints" / "tiny_sd15.safetensors"
    assert linked.read_bytes() == cached.read_bytes()
    assert tiny_sd.link_tiny_sd15(tmp_path / "models", tmp_path / "cache") == linked  # again: replaced, no error
    other = tmp_path / "other" / "checkpoints" / "tiny_sd15.safetensors"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"someone's file")
    with pytest.raises(FileExistsError, match="is not the tiny SD1.5 checkpoint"):
        tiny_sd.link_tiny_sd15(tmp_path / "other", tmp_path / "cache")
    assert other.read_bytes() == b"someone's file"


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        tiny_sd.write_tiny_sd15(tmp_path, seed=-1)
    with pytest.raises(ValueError, match="keys accepted none"):
        tiny_sd.write_tiny_sd15(tmp_path, keys=lambda k: False)
    with pytest.raises(ValueError, match=r"unknown TAESD families \['taesd2'\]"):
        tiny_sd.write_tiny_vae_approx(tmp_path, families=("taesd", "taesd2"))
    assert not list(tmp_path.iterdir())


def test_cli_writes_the_checkpoint_only_when_asked(tmp_path, monkeypatch, capsys):
    import core.tiny_models
    from core.cli import main

    for writer in ("write_tiny_dino", "write_tiny_clip", "write_tiny_lpips"):  # covered in test_tiny_models
        monkeypatch.setattr(core.tiny_models, writer, lambda folder, **kw: folder)
    calls = []
    monkeypatch.setattr(tiny_sd, "write_tiny_sd15", lambda folder, seed=0, **kw: calls.append((folder, seed)) or folder)
    assert main(["tiny-models", str(tmp_path / "a")]) == 0 and calls == []
    assert main(["tiny-models", str(tmp_path / "b"), "--sd15", "--seed", "7"]) == 0
    assert calls == [(tmp_path / "b" / "checkpoints", 7)]
    assert main(["tiny-models", str(tmp_path / "c"), "--sd15", "--seed", "-1"]) == 2
    assert "error: seed must be a non-negative integer, got -1" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_vae_approx_gets_encoder_decoder_pairs_of_every_family(tmp_path):
    written = write_tiny_models(tmp_path, dino=False, clip=False, lpips=False)
    assert written["vae_approx"] == tmp_path / "vae_approx" / "taesd_decoder.safetensors"
    names = sorted(p.name for p in (tmp_path / "vae_approx").glob("*.safetensors"))
    assert names == sorted(f"{f}_{half}.safetensors" for f in tiny_sd.TAESD_FAMILIES for half in ("encoder", "decoder"))
    for fmt in LATENT_FORMATS.values():
        decoder = load_taesd_decoder(tmp_path / "vae_approx" / f"{fmt.taesd_decoder}.safetensors")
        assert decoder.latent_channels == fmt.channels
        rgb = decoder(torch.randn(1, fmt.channels, 4, 4))
        assert rgb.shape == (1, 3, 32, 32) and torch.isfinite(rgb).all()
        with pytest.raises(TAESDCheckpointError, match="looks like a TAESD \\*encoder\\*"):
            load_taesd_decoder(tmp_path / "vae_approx" / f"{fmt.taesd_decoder[:-8]}_encoder.safetensors")


# ------------------------------------------------------------------------- in a real ComfyUI


@pytest.mark.e2e
def test_comfyui_loads_the_tiny_checkpoint_and_taesd_and_samples(tmp_path):
    from e2e import comfy_env

    try:
        env = comfy_env.ensure_comfy()
    except comfy_env.ComfyUnavailable as exc:
        if comfy_env.required():
            pytest.fail(f"no real ComfyUI could be set up: {exc}")
        pytest.skip(f"no real ComfyUI available: {exc}")
    tiny_sd.link_tiny_sd15(tmp_path, comfy_env.cache_root())
    tiny_sd.write_tiny_vae_approx(tmp_path / "vae_approx")
    env_vars = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run([str(env.python), os.path.join(ROOT, "tests", "e2e", "tiny_sd15_check.py"),
                           str(env.comfy_dir), str(tmp_path), "--steps", "2", "--size", "64"],
                          capture_output=True, text=True, timeout=900, env=env_vars)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["model_type"] == "SD15"
    assert out["not_in_file"] == []  # every weight ComfyUI builds (UNet, VAE, CLIP-L) is in the file
    assert out["cond"]["shape"] == [1, 77, 768] and out["cond"]["finite"]
    assert out["image"]["shape"] == [1, 64, 64, 3] and out["image"]["finite"] and out["image"]["std"] > 0
    # the noise path keeps the sampled latent in the range of real SD latents (CFG 7), not sigma_max's
    assert out["latent"]["finite"] and out["latent"]["std"] < 10
    # the full VAE decodes an N(0, 1) latent to a few units at most (before ComfyUI's clamp)
    raw = out["vae_raw_of_normal_latent"]
    assert raw["finite"] and max(-raw["min"], raw["max"]) < 10
    assert out["vae_list"] == list(tiny_sd.TAESD_FAMILIES)  # VAE Loader offers each complete pair
    assert out["taesd_image"]["finite"] and out["taesd_image"]["shape"] == [1, 64, 64, 3]
    assert out["taesd_latent"]["finite"] and out["taesd_latent"]["shape"] == [1, 4, 8, 8]
