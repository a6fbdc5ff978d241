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


def test_pipelines_on_tiny_models(tmp_path):
    models = tmp_path / "models"
    made = run_cli("tiny-models", str(models))
    assert made.returncode == 0, made.stderr
    common = ["--models", str(models), "--ckpt", str(models / "guided_diffusion" / "256x256_diffusion_uncond.pt"),
              "--device", "cpu", "--respacing", "10", "--skip-timesteps", "8"]
    dino = ["--dino", str(models / "dino" / "dino_vitbase8_pretrain.pth")]
    text = run_cli("diffuseit-text", *common, *dino, "--resample-steps", "1", "--clip-models", "tiny-clip-vit",
                   "--image", f"{ROOT}/assets/chelsea.png", "--source-text", "cat", "--target-text", "tiger",
                   "--out", str(tmp_path / "text.png"))
    assert text.returncode == 0, text.stderr
    assert Image.open(tmp_path / "text.png").size == (256, 256)
    low = run_cli("diffuseit-text", *common, *dino, "--resample-steps", "1", "--clip-models", "tiny-clip-vit",
                  "--image", f"{ROOT}/assets/chelsea.png", "--source-text", "cat", "--target-text", "tiger",
                  "--low-memory", "--out", str(tmp_path / "text_low.png"))
    assert low.returncode == 0, low.stderr
    import numpy as np
    diff = np.abs(np.asarray(Image.open(tmp_path / "text.png"), dtype=int)
                  - np.asarray(Image.open(tmp_path / "text_low.png"), dtype=int))
    assert diff.max() <= 1  # checkpointing recomputes activations; only 8-bit rounding may differ
    # --models alone: the UNet and DINO files are found in its sub-folders (no --ckpt / --dino)
    models_only = ["--models", str(models), "--device", "cpu", "--respacing", "10", "--skip-timesteps", "8"]
    image = run_cli("diffuseit-image", *models_only, "--resample-steps", "1", "--image", f"{ROOT}/assets/chelsea.png",
                    "--style", f"{ROOT}/assets/coffee.png", "--out", str(tmp_path / "style.png"))
    assert image.returncode == 0, image.stderr
    blended = run_cli("blended", *common, "--clip-model", "tiny-clip-vit", "--image", f"{ROOT}/assets/coffee.png",
                      "--mask", f"{ROOT}/assets/coffee_mask.png", "--prompt", "latte art", "--samples", "2",
                      "--out", str(tmp_path / "edit.png"))
    assert blended.returncode == 0, blended.stderr
    lines = blended.stdout.strip().splitlines()
    assert len(lines) == 2 and all("clip_distance=" in line for line in lines)
    src = Image.open(f"{ROOT}/assets/coffee.png").convert("RGB")
    mask = Image.open(f"{ROOT}/assets/coffee_mask.png").convert("L")
    out = Image.open(lines[0].split("\t")[0]).convert("RGB")
    assert out.size == src.size
    import numpy as np
    keep = np.asarray(mask) == 0
    assert (np.asarray(out)[keep] == np.asarray(src)[keep]).all()  # outside the mask: the photo, unchanged


def test_failed_download_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Offline (or any network/HTTP error): exit code 2, the URL and where to put the file by hand; no partial file."""
    import os
    import urllib.error
    import urllib.request

    from core import cli

    class HalfDownload:
        headers = {"Content-Length": "100"}
        chunks = [b"x" * 10]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            if self.chunks:
                return self.chunks.pop()
            raise urllib.error.URLError("connection reset")

    name = "256x256_diffusion_uncond.pt"
    table = cli.known_downloads()
    target = tmp_path / table[name][0] / name
    for opener in (lambda url: (_ for _ in ()).throw(urllib.error.URLError("Name or service not known")),
                   lambda url: HalfDownload()):
        monkeypatch.setattr(urllib.request, "urlopen", opener)
        assert cli.main(["download", name, "--models", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert table[name][1] in err and str(target) in err and "Traceback" not in err
        assert os.listdir(target.parent) == []  # neither the file nor a .part


def test_blended_mask_is_the_red_channel(tmp_path, capsys):
    """The CLI reads the Blended mask by upstream's rule (spec 4.2, 9.7): any non-zero *red* value is edit;
    a pure green region (luminance 150, red 0) is kept, a pure red one (luminance 76) is edited."""
    import numpy as np

    from core.cli import main
    from core.io import load_mask_file
    from core.tiny_models import write_tiny_models

    models = tmp_path / "models"
    write_tiny_models(models, dino=False, lpips=False)
    source = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "image.png")
    mask = np.zeros((64, 64, 3), dtype=np.uint8)
    mask[8:24, 8:24] = (255, 0, 0)  # red: edit
    mask[40:56, 40:56] = (0, 255, 0)  # green: keep (its luminance is not zero)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    loaded = load_mask_file(str(tmp_path / "mask.png"))
    assert loaded.shape == (1, 1, 64, 64) and loaded[0, 0, 40:56, 40:56].max() == 0 and loaded[0, 0, 8:24, 8:24].min() == 1

    code = main(["blended", "--models", str(models), "--ckpt", str(models / "guided_diffusion" / "256x256_diffusion_uncond.pt"),
                 "--clip-model", "tiny-clip-vit", "--device", "cpu", "--respacing", "10", "--skip-timesteps", "8",
                 "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "a red ball",
                 "--out", str(tmp_path / "edit.png")])
    assert code == 0
    out = np.asarray(Image.open(capsys.readouterr().out.strip().splitlines()[0].split("\t")[0]).convert("RGB"))
    assert (out[40:56, 40:56] == source[40:56, 40:56]).all()  # the green square is kept
    assert (out[8:24, 8:24] != source[8:24, 8:24]).any()  # the red square is edited
    keep = np.ones((64, 64), dtype=bool)
    keep[8:24, 8:24] = False
    assert (out[keep] == source[keep]).all()


def test_blended_rank_criteria_improved_prints_every_component(tmp_path, capsys):
    import numpy as np

    from core.blended.rank_criteria import COMPONENTS, IMPROVED_CRITERIA
    from core.cli import main
    from core.tiny_models import write_tiny_models

    models = tmp_path / "models"
    write_tiny_models(models, dino=False, lpips=False)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    mask = np.zeros((48, 64, 3), dtype=np.uint8)
    mask[12:36, 16:48, 0] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    ckpt = models / "guided_diffusion" / "256x256_diffusion_uncond.pt"
    code = main(["blended", "--models", str(models), "--ckpt", str(ckpt),
                 "--clip-model", "tiny-clip-vit", "--device", "cpu", "--respacing", "10", "--skip-timesteps", "8",
                 "--samples", "2", "--rank-criteria", "improved", "--image", str(tmp_path / "image.png"),
                 "--mask", str(tmp_path / "mask.png"), "--prompt", "a red ball", "--out", str(tmp_path / "edit.png")])
    assert code == 0
    rows = [dict(field.split("=") for field in line.split("\t")[1:]) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and [list(row) for row in rows] == [["score", *COMPONENTS]] * 2
    for row in rows:  # printed to 4 decimals: the total of the rounded parts is within 5e-5 per weighted term
        total = sum(getattr(IMPROVED_CRITERIA, name) * float(row[name]) for name in COMPONENTS)
        assert abs(float(row["score"]) - total) <= 5e-5 * (1 + sum(IMPROVED_CRITERIA.weights().values()))
    assert float(rows[0]["score"]) <= float(rows[1]["score"])
