"""``rotate_nearest`` (the pack's CLIP-cut rotation) is torchvision's tensor rotate, bit for bit.

It replaces ``TF.rotate(x, angle, NEAREST, expand=False, fill=None)``, which copies its matrix to the
device with a blocking ``torch.tensor(..., device=...)`` per call; values and input gradients must be
identical (torch.equal) for the angles and sizes DiffuseIT's cuts use.
"""

import os
import sys

import pytest
import torch
import torchvision.transforms.functional as TF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from core.diffuseit.clip_direction import rotate_nearest  # noqa: E402

EDGE_ANGLES = [0.0, 10.0, -10.0, 90.0, -90.0, 45.0, 180.0, 1e-7, -1e-7, 9.999999]
SHAPES = [(3, 32, 32), (3, 31, 47), (3, 47, 31), (3, 224, 224), (3, 256, 256), (1, 1, 5, 7), (2, 3, 33, 64), (4, 16, 16)]


def _angles(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return EDGE_ANGLES + [float(a) for a in torch.empty(n).uniform_(-10, 10, generator=g)]


def _reference(x, angle):
    return TF.rotate(x, angle, TF.InterpolationMode.NEAREST, expand=False, fill=None)


def _value_and_grad(fn, x, angle, weight):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, angle)
    (y * weight).sum().backward()
    return y.detach(), x.grad


def _check(shape, angles, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    x = torch.rand(shape, generator=g).to(device=device, dtype=dtype)
    weight = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    for angle in angles:
        ours, ours_grad = _value_and_grad(rotate_nearest, x, angle, weight)
        ref, ref_grad = _value_and_grad(_reference, x, angle, weight)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        assert torch.equal(ours, ref), f"values differ: shape {shape} angle {angle!r}"
        assert torch.equal(ours_grad, ref_grad), f"gradients differ: shape {shape} angle {angle!r}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_torchvision_rotate(shape):
    _check(shape, _angles(60 if shape[-1] < 200 else 25, seed=len(shape) * 1000 + shape[-1]))


def test_equals_torchvision_rotate_float64_and_uint8():
    _check((3, 31, 47), _angles(10, seed=1), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (3, 31, 47), generator=g, dtype=torch.uint8)
    for angle in _angles(10, seed=3):
        assert torch.equal(rotate_nearest(x, angle), _reference(x, angle))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="optional extra: a CUDA GPU (the CI machines have none)")
@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 31, 47), (3, 224, 224), (2, 3, 33, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_equals_torchvision_rotate_cuda(shape):
    _check(shape, _angles(40, seed=shape[-1]), device="cuda")
    # and the CUDA result is the CPU result
    x = torch.rand(shape, generator=torch.Generator().manual_seed(5))
    for angle in _angles(10, seed=6):
        assert torch.equal(rotate_nearest(x.cuda(), angle).cpu(), rotate_nearest(x, angle))


def test_meta_device_has_the_shape():
    x = torch.empty(3, 31, 47, device="meta")
    assert rotate_nearest(x, 7.5).shape == (3, 31, 47)
