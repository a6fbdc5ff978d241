"""Bad input is refused before any work, with one line naming the input and the accepted values.

CLI cases run ``core.cli.main`` in-process (exit code 2, one ``error:`` line, no traceback); most use a
checkpoint path that does not exist, so the error they get proves the input was checked before any model
was loaded. Library and node cases assert the exception type and message. The README's "Reliability"
table lists each case with the test that covers it.
"""

import math
import os

import pytest
import torch
from PIL import Image

from conftest import ROOT, fixture_path, load_json

TINY_KW = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]
TINY_HEADS = f"num_head_channels={TINY_KW['num_head_channels']}"


def cli_error(capsys, *argv) -> str:
    """Run the CLI; it must exit 2 with exactly one stderr line starting with 'error:'. Returns that line."""
    from core.cli import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------ checkpoint files

NOT_WEIGHTS = {  # file name -> (content, or None for a directory; what the message must say)
    "empty.pt": (b"", "is empty (0 bytes)"),
    "empty.safetensors": (b"", "is empty (0 bytes)"),
    "notes.pt": (b"hello world\n", "is a text file (it starts with 'hello world')"),
    "page.pt": (b"<!DOCTYPE html><html>404</html>", "is an HTML/XML page"),
    "lfs.pt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 2\n", "is a Git LFS pointer"),
    "folder.pt": (None, "is a directory; expected a file (.pt, .pth, .bin or .safetensors)"),
    "noise.pt": (bytes(range(7, 64)), "is not a PyTorch or safetensors file"),
}


def make_not_weights(tmp_path, name):
    content, expected = NOT_WEIGHTS[name]
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path, expected


@pytest.mark.parametrize("name", sorted(NOT_WEIGHTS))
def test_checkpoint_that_is_not_weights_is_named(tmp_path, capsys, name):
    from core.diffusion.checkpoints import CheckpointError, load_ddpm

    path, expected = make_not_weights(tmp_path, name)
    with pytest.raises(CheckpointError) as err:
        load_ddpm(str(path))
    assert str(err.value).startswith(f"DDPM checkpoint {str(path)!r} {expected}")
    line = cli_error(capsys, "sample", "--ckpt", str(path), "--device", "cpu", "--out", str(tmp_path / "o.png"))
    assert line == f"error: {err.value}"
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("name", ["empty.pt", "notes.pt", "folder.pt"])
def test_other_loaders_name_a_file_that_is_not_weights(tmp_path, name):
    """DINO, CLIP, LPIPS and TAESD read through the same check, each with its own error type."""
    from core.encoders.clip import ClipLoadError, load_clip
    from core.encoders.dino import DINOCheckpointError, load_dino_vit
    from core.encoders.lpips import load_lpips
    from core.encoders.taesd import load_taesd_decoder
    from core.diffusion.checkpoints import CheckpointError

    path, expected = make_not_weights(tmp_path, name)
    for load, error, what in ((load_dino_vit, DINOCheckpointError, "DINO checkpoint"),
                              (lambda p: load_clip("ViT-B-16", pretrained=p), ClipLoadError, "CLIP weights"),
                              (load_lpips, CheckpointError, "LPIPS VGG16 weights"),
                              (load_taesd_decoder, CheckpointError, "TAESD decoder")):
        with pytest.raises(error) as err:
            load(str(path))
        assert str(err.value).startswith(f"{what} {str(path)!r} {expected}"), str(err.value)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_refused_pickle_still_says_it_could_run_code(tmp_path):
    """The safe loader's refusal of real pickled objects keeps its own message, naming the global."""
    from core.diffusion.checkpoints import CheckpointError, read_state_dict

    torch.save({"w": torch.zeros(1), "obj": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"\(posix.system\), which could run arbitrary code"):
        read_state_dict(tmp_path / "evil.pt")


# ------------------------------------------------------------------------------ respacing, overrides, device

BAD_RESPACINGS = ["0", "1", "-5", "abc", "ddim", "10,", "ddim1", "5,0"]


@pytest.mark.parametrize("spacing", BAD_RESPACINGS)
def test_respacing_is_refused_with_the_accepted_forms(tmp_path, capsys, spacing):
    from core.diffusion.schedule import DiffusionSchedule, RespacingError

    with pytest.raises(RespacingError) as err:
        DiffusionSchedule.create(1000, "linear", spacing)
    message = str(err.value)
    assert message.startswith(f"respacing {spacing!r} is not a valid timestep respacing for a 1000-step model")
    assert '"100"' in message and '"ddim50"' in message and '"10,10,5"' in message
    # the CLI checks it before looking for the checkpoint (which does not exist here)
    line = cli_error(capsys, "sample", "--ckpt", str(tmp_path / "missing.pt"), f"--respacing={spacing}",
                     "--device", "cpu")
    assert line == f"error: {message}"


def test_good_respacings_still_work():
    from core.diffusion.schedule import space_timesteps

    assert len(space_timesteps(1000, "2")) == 2 and len(space_timesteps(1000, "ddim50")) == 50
    assert len(space_timesteps(1000, " 10, 10,5 ")) == 25 and len(space_timesteps(1000, 100)) == 100


@pytest.mark.parametrize("override, message", [
    ("image_size=63", "image_size=63 is not possible for this UNet: it has {levels} levels, so image_size must be "
                      "a positive multiple of {stride}"),
    ("image_size=0", "image_size=0 is not possible for this UNet"),
    ("image_size=big", "image_size='big' is not possible for this UNet"),
    ("diffusion_steps=0", "diffusion_steps=0 must be a whole number >= 2"),
    ("diffusion_steps=1", "diffusion_steps=1 must be a whole number >= 2"),
    ("noise_schedule=cosyne", "noise_schedule='cosyne' must be 'linear' or 'cosine'"),
])
def test_override_values_are_checked_before_the_model_is_built(capsys, override, message):
    from core.diffusion.checkpoints import CheckpointError, load_ddpm, parse_flags

    levels = len(TINY_KW["channel_mult"].split(","))  # guided-diffusion's flag: "1,1,2"
    expected = message.format(levels=levels, stride=2 ** (levels - 1))
    path = fixture_path("guided_diffusion", "tiny_unet.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_ddpm(path, **parse_flags(f"{TINY_HEADS}, {override}"))
    assert str(err.value).startswith(f"{path}: {expected}"), str(err.value)
    line = cli_error(capsys, "sample", "--ckpt", path, "--overrides", f"{TINY_HEADS}, {override}", "--device", "cpu",
                     "--respacing", "5")
    assert line == f"error: {err.value}"


def test_device_that_this_machine_lacks(tmp_path, capsys):
    from core.devices import DeviceError, available_devices, check_device

    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: never present
    here = ", ".join(available_devices())
    with pytest.raises(DeviceError) as err:
        check_device(absent, "--device")
    assert str(err.value) == f"--device {absent!r} is not available on this machine; available: {here}"
    line = cli_error(capsys, "sample", "--ckpt", str(tmp_path / "missing.pt"), "--device", absent)
    assert line == f"error: {err.value}"
    line = cli_error(capsys, "sample", "--ckpt", str(tmp_path / "missing.pt"), "--device", "gpu")
    assert line == f"error: --device 'gpu' is not a device name; available here: {here}"
    assert check_device("cpu") == torch.device("cpu")


# ------------------------------------------------------------------------------ image files

def write_bad_image(tmp_path, kind):
    """A bad picture of each kind, and the start of the message it must get."""
    good = open(os.path.join(ROOT, "assets", "chelsea.png"), "rb").read()
    path = tmp_path / f"{kind}.png"
    if kind == "directory":
        path.mkdir()
        return path, "is a directory; expected an image file"
    if kind == "missing":
        return path, "does not exist; expected an image file"
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 10])
        return path, "could not be decoded (truncated or corrupt?)"
    if kind == "corrupt":  # the header survives, the signature does not
        path.write_bytes(good[:1] + b"XXXX" + good[5:])
        return path, "is not an image Pillow can read"
    if kind == "not_an_image":
        path.write_text("a text file named .png")
        return path, "is not an image Pillow can read"
    if kind == "bomb":  # a 1-bit PNG over Pillow's pixel limit: 40 kB on disk, 90 megapixels decoded
        side = math.isqrt(Image.MAX_IMAGE_PIXELS) + 1
        Image.new("1", (side, side)).save(path)
        return path, f"is refused: {side * side:,} pixels is more than the limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
    raise ValueError(kind)


IMAGE_KINDS = ["directory", "missing", "truncated", "corrupt", "not_an_image", "bomb"]


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_bad_image_files_are_named_before_any_model_loads(tmp_path, capsys, kind):
    from core.io import ImageFileError, load_image, load_image_pil, load_mask_file

    path, expected = write_bad_image(tmp_path, kind)
    for load, what in ((load_image, "image"), (load_image_pil, "image"), (load_mask_file, "mask")):
        with pytest.raises(ImageFileError) as err:
            load(str(path))
        assert str(err.value).startswith(f"{what} {str(path)!r} {expected}"), str(err.value)
    good = os.path.join(ROOT, "assets", "coffee.png")
    missing_ckpt = ["--ckpt", str(tmp_path / "missing.pt"), "--device", "cpu"]
    for flag, argv in (("--image", ["blended", "--image", str(path), "--mask", good, "--prompt", "x"]),
                       ("--mask", ["blended", "--image", good, "--mask", str(path), "--prompt", "x"]),
                       ("--style", ["diffuseit-image", "--image", good, "--style", str(path)])):
        line = cli_error(capsys, *argv, *missing_ckpt)
        assert line.startswith(f"error: {flag} {str(path)!r} {expected}"), line


# ------------------------------------------------------------------------------ --models

def test_models_dir_is_where_every_cli_model_comes_from(tmp_path, monkeypatch, capsys):
    """Each command's DDPM, DINO and CLIP files are read from --models (run from a folder with no ./models)."""
    import core.cli as cli
    import core.diffuseit.pipeline as diffuseit
    import core.blended as blended
    from core.encoders import clip as clip_module, dino as dino_module
    from core.tiny_models import write_tiny_models

    models = tmp_path / "elsewhere"
    write_tiny_models(models, lpips=False)
    monkeypatch.chdir(tmp_path)
    opened = []

    class Stop(Exception):
        pass

    def record(real, pick):
        def wrapper(*args, **kwargs):
            opened.append(os.path.abspath(pick(args, kwargs)))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(cli, "load_ddpm", record(cli.load_ddpm, lambda a, k: a[0]))
    monkeypatch.setattr(dino_module, "load_dino_extractor", record(dino_module.load_dino_extractor, lambda a, k: a[0]))
    monkeypatch.setattr(clip_module, "load_clip", record(clip_module.load_clip, lambda a, k: k["models_dir"]))
    for module, name in ((diffuseit, "diffuseit_text"), (diffuseit, "diffuseit_image"), (blended, "blended_edit")):
        monkeypatch.setattr(module, name, lambda *a, **k: (_ for _ in ()).throw(Stop()))
    image, mask = os.path.join(ROOT, "assets", "coffee.png"), os.path.join(ROOT, "assets", "coffee_mask.png")
    common = ["--models", str(models), "--device", "cpu"]
    commands = {
        "diffuseit-text": ["--image", image, "--source-text", "a", "--target-text", "b", "--clip-models", "tiny-clip-vit"],
        "diffuseit-image": ["--image", image, "--style", image],
        "blended": ["--image", image, "--mask", mask, "--prompt", "x", "--clip-model", "tiny-clip-vit"],
    }
    expected_kinds = {"diffuseit-text": 3, "diffuseit-image": 2, "blended": 2}
    for command, argv in commands.items():
        opened.clear()
        with pytest.raises(Stop):
            cli.main([command, *common, *argv])
        assert len(opened) == expected_kinds[command], opened
        assert all(path.startswith(str(models) + os.sep) for path in opened), (command, opened)
    assert not (tmp_path / "models").exists()


# ------------------------------------------------------------------------------ Blended Diffusion inputs

@pytest.mark.parametrize("margin", [float("nan"), float("inf"), -0.5])
def test_crop_margin_must_be_finite_and_not_negative(margin):
    from core.blended.pipeline import BlendSpec

    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:8, 4:8] = 1
    with pytest.raises(ValueError) as err:
        BlendSpec(mask, crop_margin=margin)
    assert str(err.value) == ("crop_margin must be a finite number >= 0 (context around the mask as a fraction of its "
                              f"size, e.g. 0.25), got {margin!r}")
    with pytest.raises(ValueError, match="feather must be a whole number of pixels >= 0, got -1"):
        BlendSpec(mask, feather=-1)


def test_background_blend_node_refuses_nan_crop_margin(pack):
    from diffuseit_pack.nodes.blending import BackgroundBlend

    mask = torch.zeros(1, 16, 16)
    mask[:, 4:8, 4:8] = 1
    with pytest.raises(ValueError, match=r"crop_margin must be a finite number >= 0 .*got nan"):
        BackgroundBlend.execute(mask=mask, crop_margin=float("nan"))


def test_clip_rank_accepts_one_mask_per_source_image(pack):
    """Two source images with two samples each and one mask per image: accepted, and every row is scored
    under its own image's mask (the same distances as ranking each image's rows alone). Rows that cannot
    be split among the masks get a message with the accepted counts."""
    from conftest import float32_atol
    from test_nodes import _run, _tiny_models_folder
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance
    from diffuseit_pack.nodes.ranking import CLIPRank

    _, models = pack
    _tiny_models_folder(models)
    (clip,) = _run(LoadCLIPGuidance, models="tiny-clip", dtype="fp32")
    images = torch.rand(4, 48, 64, 3, generator=torch.Generator().manual_seed(3))
    masks = torch.zeros(2, 48, 64)
    masks[0, 4:20, 4:30] = 1  # image 0: top left
    masks[1, 26:44, 30:60] = 1  # image 1: bottom right
    together = _run(CLIPRank, images=images, clip=clip, prompt="a cat", top_k=4, mask=masks, crop_size=32)
    alone = [_run(CLIPRank, images=images[2 * i:2 * i + 2], clip=clip, prompt="a cat", top_k=2, mask=masks[i:i + 1],
                  crop_size=32) for i in range(2)]
    import json
    def ranked(scores_json):  # CLIP Rank's scores: one object per sample, best first
        return [entry["score"] for entry in json.loads(scores_json)]

    scores = torch.tensor(ranked(together[2]))
    expected = torch.tensor(sorted(ranked(alone[0][2]) + ranked(alone[1][2])))
    assert together[0].shape == (4, 48, 64, 3)
    assert torch.allclose(scores, expected, rtol=0, atol=float32_atol(expected, 64) + 1e-6)  # JSON keeps 6 decimals
    with pytest.raises(ValueError) as err:
        _run(CLIPRank, images=images[:3], clip=clip, prompt="a cat", mask=masks, crop_size=32)
    assert str(err.value).startswith("3 images cannot be split among 2 masks: give one mask, or one per source image")


# ------------------------------------------------------------------------------ NaN from the model itself

def test_nan_model_is_blamed_not_the_loss_weights():
    """A checkpoint whose output is NaN: the report names the model and its file, not the loss weights."""
    from core.diffusion.checkpoints import load_ddpm
    from core.diffusion.finite_watch import GuidanceError
    from core.diffusion.guided_loop import GuidedSamplerOptions, guided_sample
    from test_guided import Poison, ToTarget

    path = fixture_path("guided_diffusion", "tiny_unet.safetensors")
    ddpm = load_ddpm(path, num_head_channels=TINY_KW["num_head_channels"])
    source = torch.zeros(1, 3, 32, 32)
    options = GuidedSamplerOptions(skip_timesteps=5)
    with pytest.raises(GuidanceError) as healthy:  # a healthy model with a NaN term: the term is named
        guided_sample(ddpm.unet, ddpm.schedule("10"), source, [Poison()], options=options)
    assert "poison became NaN/inf at guided step 0" in str(healthy.value) and "Lower that term's weight" in str(healthy.value)
    with torch.no_grad():
        ddpm.unet.out[2].bias.fill_(float("nan"))
    with pytest.raises(GuidanceError) as err:
        guided_sample(ddpm.unet, ddpm.schedule("10"), source, [ToTarget()], options=options)
    message = str(err.value)
    assert message.startswith(f"the diffusion model ({path}) produced NaN/inf at guided step 0 (respaced t=4), "
                              "before any guidance loss: the loss weights are not the cause")
    assert "Lower" not in message and "lower" not in message  # no advice to lower any weight


def test_nan_x0_from_the_model_is_not_blamed_on_the_weights():
    from core.diffusion.finite_watch import GuidanceError
    from core.latent import guide_x0
    from test_guided import ToTarget
    from test_x0_guidance import _latents, toy_decoder

    x0, ref = _latents()
    x0[1, 0, 0, 0] = float("nan")
    with pytest.raises(GuidanceError) as err:
        guide_x0(x0, toy_decoder(), [ToTarget(target=0.3, scale=1.0).prepare(None)], None, 0.1, ref)
    assert str(err.value).startswith("the diffusion model's x0 prediction was already NaN/inf before guidance")
    assert "lower the weight" not in str(err.value)
