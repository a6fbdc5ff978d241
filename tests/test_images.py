"""Image files: 16-bit grayscale is scaled to [0, 1], not clipped at 255."""

import numpy as np
import pytest
import torch
from PIL import Image

from core.io import load_image, load_image_pil


def ramp16(path, dtype="<u2"):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp.astype(dtype)).save(path)
    return ramp


@pytest.mark.parametrize("dtype", ["<u2", ">u2", "int32"])  # I;16, I;16B (as TIFF), I
def test_sixteen_bit_ramp_is_scaled(tmp_path, dtype):
    path = tmp_path / ("ramp.tif" if dtype != "<u2" else "ramp.png")
    ramp = ramp16(path, dtype)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I;16B", "I;16L", "I")
    x = load_image(str(path))
    assert x.shape == (1, 3, 64, 64)
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535.0) * 2 - 1
    for c in range(3):
        assert torch.allclose(x[0, c], expected, atol=1e-6)
    assert float((x >= 1).float().mean()) < 0.01  # clipped, 99.6% of the ramp was white

    # the upstream-exact loader (DiffuseIT CLI) scales to 8 bits before its LANCZOS resize
    y = load_image_pil(str(path), 64)
    assert torch.allclose(y[0, 0], expected, atol=1.0 / 255)


def test_eight_bit_files_unchanged(tmp_path):
    rgb = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    x = load_image(str(tmp_path / "rgb.png"))
    assert torch.equal(x[0], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 * 2 - 1)
