"""Nothing the user made is lost: outputs are checked before any work, never overwritten, even by
concurrent saves; input images are upright (EXIF) and in [-1, 1] or refused."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from core.io import check_model_range, check_output_path, load_image, load_image_pil, load_mask_file, save_image


def _solid(value: float) -> torch.Tensor:
    return torch.full((1, 3, 4, 4), value)


def test_concurrent_saves_to_one_name_keep_every_result(tmp_path):
    """8 writers x 5 saves to one name at the same time: 40 files, each holding what one save wrote."""
    target = str(tmp_path / "out.png")
    barrier, written, errors = threading.Barrier(8), [], []
    levels = {(w, k): (w * 5 + k) / 39 * 2 - 1 for w in range(8) for k in range(5)}

    def writer(w: int) -> None:
        barrier.wait()
        try:
            for k in range(5):
                written.append(((w, k), save_image(_solid(levels[w, k]), target)[0]))
        except Exception as exc:  # surfaced below with the thread's name
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    names = [name for _, name in written]
    assert len(names) == 40 and len(set(names)) == 40
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(n) for n in names)
    for key, name in written:  # every file holds its own save's pixels, none was overwritten
        expected = round((levels[key] + 1) / 2 * 255)
        assert np.asarray(Image.open(name)).max() == expected == np.asarray(Image.open(name)).min()


def test_concurrent_processes_keep_every_result(tmp_path):
    """Separate processes (two CLI runs at once) saving to one name each get their own file."""
    code = ("import sys, torch; from core.io import save_image; "
            "[save_image(torch.full((1, 3, 4, 4), float(sys.argv[1])), sys.argv[2]) for _ in range(10)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(v), str(tmp_path / "x.png")], cwd=ROOT)
             for v in (-1.0, 0.0, 1.0, 0.5)]
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 40 and files[0] == "x.png"
    counts = np.unique([int(np.asarray(Image.open(tmp_path / f))[0, 0, 0]) for f in files], return_counts=True)
    assert counts[0].tolist() == [0, 128, 191, 255] and counts[1].tolist() == [10, 10, 10, 10]


def test_batch_numbering_and_formats(tmp_path):
    a = save_image(torch.zeros(2, 3, 4, 4), str(tmp_path / "b.jpg"))
    b = save_image(torch.zeros(2, 3, 4, 4), str(tmp_path / "b.jpg"))
    assert [os.path.basename(p) for p in a + b] == ["b_000.jpg", "b_001.jpg", "b_000_1.jpg", "b_001_1.jpg"]
    assert Image.open(a[0]).format == "JPEG"
    assert Image.open(save_image(torch.zeros(1, 3, 4, 4), str(tmp_path / "noext"))[0]).format == "PNG"


def test_unknown_extension_is_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match=r"--out .*unknown image extension '\.pgn'; use one of \.png"):
        check_output_path(tmp_path / "out.pgn", "--out")
    with pytest.raises(ValueError, match="unknown image extension"):
        save_image(torch.zeros(1, 3, 4, 4), str(tmp_path / "out.txt"))
    assert os.listdir(tmp_path) == []


def test_path_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"mine")
    for out in (tmp_path / "photo.png" / "out.png", tmp_path / "photo.png" / "deeper" / "out.png"):
        with pytest.raises(ValueError, match=r"photo\.png' is a file, not a folder"):
            check_output_path(out)
    assert (tmp_path / "photo.png").read_bytes() == b"mine"


def test_folder_as_output_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a folder; give a file name inside it"):
        check_output_path(tmp_path)


def test_folder_that_accepts_no_files_is_refused(tmp_path):
    """A read-only folder; as root (where permissions do not stop writes) /sys, which refuses new files to root too."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        probe_ok = True
        try:
            (ro / "probe").write_bytes(b"")
            (ro / "probe").unlink()
        except OSError:
            probe_ok = False
        folder = "/sys" if probe_ok else str(ro)  # probe_ok: root, chmod does not stop it
        with pytest.raises(ValueError, match=rf"cannot be written: folder '{folder}' does not accept new files"):
            check_output_path(os.path.join(folder, "sub", "out.png"), "--out")
        assert not os.path.exists(os.path.join(folder, "sub"))
    finally:
        ro.chmod(0o755)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "core.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_refuses_bad_outputs_before_loading_anything(tmp_path):
    """The checkpoint does not exist: the output error must come first (nothing was loaded or sampled)."""
    (tmp_path / "f").write_text("x")
    missing = str(tmp_path / "none.pt")
    cases = {("--out", str(tmp_path / "o.gif")): "unknown image extension '.gif'",
             ("--out", str(tmp_path / "f" / "o.png")): "is a file, not a folder"}
    for (flag, value), message in cases.items():
        run = _cli("sample", "--ckpt", missing, flag, value)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith("error: --out")
    run = _cli("blended", "--ckpt", missing, "--image", "x.png", "--mask", "m.png", "--prompt", "p", "--top-k", "0",
               "--out", str(tmp_path / "b.png"))
    assert run.returncode == 2 and run.stderr.strip() == (
        "error: --top-k must be >= 1 (omit it to keep every sample), got 0")


def _rotated_jpeg(path, orientation: int) -> np.ndarray:
    """A 6x4 (w x h) image with a red left column, stored with an EXIF orientation tag; returns the pixels
    an upright viewer shows (Pillow's own transpose of the stored pixels, by the EXIF spec)."""
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[:, :2, 0] = 255
    stored = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=100, subsampling=0, exif=exif)
    return pixels


@pytest.mark.parametrize("orientation,method", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
                                                (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied(tmp_path, orientation, method):
    path = tmp_path / "phone.jpg"
    _rotated_jpeg(path, orientation)
    with Image.open(path) as im:
        upright = np.asarray(im.convert("RGB").transpose(method), dtype=np.float32) / 255 * 2 - 1
    loaded = load_image(str(path))[0].permute(1, 2, 0).numpy()
    assert loaded.shape == upright.shape  # 6 and 4 swap for 90/270 degrees
    assert np.abs(loaded - upright).max() < 1e-6
    pil = load_image_pil(str(path), 8)[0]
    assert pil.shape == (3, 8, 8)
    expect_red_left = {6: "top", 8: "bottom", 3: "right"}[orientation]  # where the red column ends up
    red = pil[0].numpy() > 0
    side = {"top": red[0].all() and not red[-1].any(), "bottom": red[-1].all() and not red[0].any(),
            "right": red[:, -1].all() and not red[:, 0].any()}[expect_red_left]
    assert side
    mask = load_mask_file(str(path))
    assert mask.shape[-2:] == tuple(upright.shape[:2])


def test_images_outside_minus_one_one_are_refused():
    with pytest.raises(ValueError, match=r"source has values in \[0, 255\]; images must be in \[-1, 1\]: use x / 127\.5 - 1"):
        check_model_range(torch.tensor([0.0, 255.0]), "source")
    with pytest.raises(ValueError, match="images must be in"):
        check_model_range(torch.tensor([0.0, float("nan")]), "style")
    check_model_range(torch.tensor([-1.0005, 1.0005]), "source")  # resampling overshoot within RANGE_SLACK
    check_model_range(torch.empty(1, 3, 2, 2, device="meta"), "source")  # no values to check


def test_pipelines_refuse_0_255_images_before_sampling():
    from core import load_ddpm
    from core.blended import blended_edit
    from core.diffuseit.pipeline import diffuseit_image
    from conftest import fixture_path, load_json

    kw = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]
    ddpm_tiny = load_ddpm(fixture_path("guided_diffusion", "tiny_unet.safetensors"),
                          num_head_channels=kw["num_head_channels"])

    size = ddpm_tiny.image_size
    big = torch.rand(1, 3, size, size) * 255
    ok = torch.rand(1, 3, size, size) * 2 - 1
    with pytest.raises(ValueError, match=r"^source has values in"):
        diffuseit_image(ddpm_tiny, None, big, ok)
    with pytest.raises(ValueError, match=r"^style has values in"):
        diffuseit_image(ddpm_tiny, None, ok, big)
    with pytest.raises(ValueError, match=r"^image has values in"):
        blended_edit(ddpm_tiny, None, big, torch.ones(1, 1, size, size), "a ball")
    with pytest.raises(ValueError, match=r"^top_k must be >= 1"):
        blended_edit(ddpm_tiny, None, ok, torch.ones(1, 1, size, size), "a ball", top_k=0)
