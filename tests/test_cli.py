"""The command line runs end to end on the tiny model and never overwrites outputs."""

import subprocess
import sys

from PIL import Image

from conftest import ROOT, fixture_path, load_json


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "core.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_sample_command_writes_new_files(tmp_path):
    kw = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]
    args = ["sample", "--ckpt", fixture_path("guided_diffusion", "tiny_unet.safetensors"), "--respacing", "5",
            "--overrides", f"num_head_channels={kw['num_head_channels']},image_size={kw['image_size']}", "--device", "cpu", "--out", str(tmp_path / "s.png"),
            "--seed", "3"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "5/5" in first.stderr  # tqdm bar with the respaced step count
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["s.png", "s_1.png"]
    a, b = (Image.open(tmp_path / f).tobytes() for f in files)
    assert a == b  # same seed, same device: same image
    assert Image.open(tmp_path / "s.png").size == (kw["image_size"], kw["image_size"])


def test_missing_checkpoint_message(tmp_path):
    result = run_cli("sample", "--ckpt", str(tmp_path / "256x256_diffusion_uncond.pt"))
    assert result.returncode != 0
    assert "models/guided_diffusion" in result.stderr and "openaipublic" in result.stderr
    assert "Traceback" not in result.stderr
