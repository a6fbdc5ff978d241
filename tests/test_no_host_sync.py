"""The guided loop never reads a device value back to the host between its NaN read-backs.

On the ``meta`` device tensors have shapes but no data, so every host read of a device value
(``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, boolean-mask indexing, ``nonzero``) raises there.
Running each method's whole guided loop on ``meta`` therefore finds every place that would make the
host wait for a GPU each step; the only read-backs allowed are :class:`core.diffusion.guided_loop.FiniteWatch`'s,
every ``FiniteWatch.every`` steps (replaced here by a counter). DiffuseIT's range restart reads the
range loss back by design and is off here. Host-side work on CPU tensors (generators, step indices)
is unaffected.
"""

import dataclasses
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_guided as bg  # noqa: E402
from core.encoders.clip import ClipModel  # noqa: E402
from core.diffusion.finite_watch import FiniteWatch
from core.diffusion.guided_loop import guided_sample, program  # noqa: E402

META = torch.device("meta")


def to_meta(b: bg.Bench) -> None:
    b.ddpm.unet.to(META)
    for term in b.terms:
        for f in dataclasses.fields(term):
            value = getattr(term, f.name)
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, ClipModel):
                    item.module.to(META)
                elif isinstance(item, torch.nn.Module):
                    item.to(META)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["diffuseit-text", "diffuseit-image", "blended"])
def test_guided_loop_reads_back_only_every_few_steps(method, monkeypatch):
    """The first 2 * every + 1 steps of each preset (resampling repeats, semantic divergence and the
    background blend included); meta kernels are slow, so not the whole program."""
    reads, seen = [], []
    monkeypatch.setattr(FiniteWatch, "check", lambda self: reads.append(len(self.pending)) or self.pending.clear())
    b = bg.setup(method, bg.MODES["fast"], 2, steps=1, tiny=True, device="cpu", ncuts=2)
    to_meta(b)
    blend = dataclasses.replace(b.blend, mask=b.blend.mask.to(META)) if b.blend is not None else None
    options = dataclasses.replace(b.options, range_restart_threshold=None)
    n = 2 * FiniteWatch.every + 1
    assert len(program(b.schedule, options)) > n

    def callback(info):
        seen.append(info["x"])
        if len(seen) == n:
            raise _Stop

    with pytest.raises(_Stop):
        guided_sample(b.ddpm.unet, b.schedule, b.source.to(META), b.terms, options=options, blend=blend,
                      callback=callback)
    assert all(x.device == META and x.shape == b.source.shape for x in seen)
    assert reads == [FiniteWatch.every, FiniteWatch.every]  # the flags of steps 0-15, read back twice


def test_range_restart_reads_back_only_while_a_row_could_restart(monkeypatch):
    """With every row's restarts used up (max_restarts=0) the armed range restart never reads the loss back."""
    reads = []
    monkeypatch.setattr(FiniteWatch, "check", lambda self: reads.append(len(self.pending)) or self.pending.clear())
    b = bg.setup("diffuseit-image", bg.MODES["fast"], 1, steps=1, tiny=True, device="cpu", ncuts=2)
    to_meta(b)
    options = dataclasses.replace(b.options, range_restart_threshold=0.01, max_restarts=0)
    seen = []

    def callback(info):
        seen.append(info["i"])
        if len(seen) == FiniteWatch.every + 1:
            raise _Stop

    with pytest.raises(_Stop):
        guided_sample(b.ddpm.unet, b.schedule, b.source.to(META), b.terms, options=options, callback=callback)
    assert reads == [FiniteWatch.every]
