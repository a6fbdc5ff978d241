"""The guided loop never waits for the device: no read-backs between its NaN checks, no blocking copies.

On the ``meta`` device tensors have shapes but no data, so every host read of a device value
(``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, boolean-mask indexing, ``nonzero``) raises there.
Running each method's whole guided loop on ``meta`` therefore finds every place that would make the
host wait for a GPU each step; the only read-backs allowed are :class:`core.diffusion.guided_loop.FiniteWatch`'s,
every ``FiniteWatch.every`` steps (replaced here by a counter). DiffuseIT's range restart reads the
range loss back by design and is off here. Host-side work on CPU tensors (generators, step indices)
is unaffected.

The other way a step waits is a host-to-device copy: a plain ``.to(device)`` of (pageable) CPU memory
synchronises the stream. ``meta`` does not fail on those, so :class:`HostToDevice` records every one
(``aten._to_copy`` / ``copy_`` from a CPU tensor, an op mixing a CPU tensor that is not a 0-dim scalar
into a device op, ``torch.tensor(data, device=...)``). The per-step noise, indices and augmentation
parameters go through ``core.devices.to_device`` (pinned, non-blocking on CUDA) and are allowed; any
other copy after the first step (whose first use may fill a cache) fails the test.

The set-up is ``core.tiny_models.tiny_preset_run`` (tests never import ``bench/``).
"""

import dataclasses
import os
import sys
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import core.devices  # noqa: E402
from core.diffusion.finite_watch import FiniteWatch
from core.diffusion.guided_loop import guided_sample, program  # noqa: E402
from core.tiny_models import PRESET_METHODS, tiny_preset_run  # noqa: E402

META = torch.device("meta")
_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor}
# Copies that remain, by (file, function) of the pack frame nearest the copy, each with its reason; any
# other copy after the first step fails.
KNOWN: dict = {}


def _known(where: str) -> bool:
    place, _, function = where.split(" <- ")[0].partition(" ")
    return (place.split(":")[0], function) in KNOWN


class _Stop(Exception):
    pass


def _where() -> str:
    """The pack's frames of the current stack (the copy's origin)."""
    frames = [f for f in traceback.extract_stack()[:-3] if f.filename.startswith(ROOT) and "tests" not in f.filename]
    return " <- ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))


class HostToDevice(TorchDispatchMode):
    """Records host-to-device copies as (step, what, where); ``core.devices.to_device``'s are counted apart."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.step, self.copies, self.staged, self._in_to_device = 0, [], 0, 0
        original = core.devices.to_device

        def to_device(*args, **kwargs):
            self._in_to_device += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._in_to_device -= 1

        # every module that did `from .devices import to_device`
        for module in list(sys.modules.values()):
            if getattr(module, "to_device", None) is original:
                monkeypatch.setattr(module, "to_device", to_device)
        self.factories = _Factories(self)

    def record(self, what: str) -> None:
        if self._in_to_device:
            self.staged += 1
        else:
            self.copies.append((self.step, what, _where()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs or all(t.device.type == "cpu" for t in outs):  # host work (or a read of a CPU tensor)
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        name = func.__name__
        if name.startswith(("_to_copy", "copy_", "_copy_from")) and ins:
            self.record(f"{func}")
        elif any(t.dim() > 0 for t in ins):  # a CPU tensor fed into a device op: an implicit copy
            self.record(f"{func} with a CPU operand")
        return out

    def __enter__(self):
        self.factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.factories.__exit__(*exc)


class _Factories(TorchFunctionMode):
    """``torch.tensor(data, device=dev)`` copies from the host without reaching the dispatcher."""

    def __init__(self, owner: HostToDevice) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            data = args[0] if args else kwargs.get("data")
            if not (isinstance(data, torch.Tensor) and data.device.type != "cpu"):
                self.owner.record(f"{func.__name__}(..., device={kwargs['device']})")
        return func(*args, **kwargs)


def run_on_meta(method: str, monkeypatch, steps: int, batch: int = 2, **options):
    """The first ``steps`` guided steps of a preset on ``meta``; returns (x per step, FiniteWatch reads, copies)."""
    reads, seen = [], []
    monkeypatch.setattr(FiniteWatch, "check", lambda self: reads.append(len(self.pending)) or self.pending.clear())
    # 3 resampling repeats at DiffuseIT's top step, so the re-noising step runs too
    run = tiny_preset_run(method, batch, ncuts=2, resample_steps=3).to(META)
    opts = dataclasses.replace(run.options, **options)
    assert len(program(run.schedule, opts)) > steps
    copies = HostToDevice(monkeypatch)

    def callback(info):
        seen.append(info["x"])
        copies.step += 1
        if len(seen) == steps:
            raise _Stop

    with pytest.raises(_Stop), copies:
        guided_sample(run.ddpm.unet, run.schedule, run.source, run.terms, options=opts, blend=run.blend,
                      callback=callback)
    assert all(x.device == META and x.shape == run.source.shape for x in seen)
    return seen, reads, copies


@pytest.mark.parametrize("method", PRESET_METHODS)
def test_guided_loop_never_waits_for_the_device(method, monkeypatch):
    """The first 2 * every + 1 steps of each preset (resampling repeats, semantic divergence and the
    background blend included); meta kernels are slow, so not the whole program."""
    _, reads, copies = run_on_meta(method, monkeypatch, 2 * FiniteWatch.every + 1, range_restart_threshold=None)
    assert reads == [FiniteWatch.every, FiniteWatch.every]  # the flags of steps 0-15, read back twice
    late = [c for c in copies.copies if c[0] >= 1 and not _known(c[2])]
    assert not late, "blocking host-to-device copies after the first step:\n" + "\n".join(
        sorted({f"{what} at {where}" for _, what, where in late}))
    assert copies.staged > 0  # the per-step noise went through to_device (the mode does see copies)


def test_range_restart_reads_back_only_while_a_row_could_restart(monkeypatch):
    """With every row's restarts used up (max_restarts=0) the armed range restart never reads the loss back."""
    _, reads, _ = run_on_meta("diffuseit-image", monkeypatch, FiniteWatch.every + 1, range_restart_threshold=0.01,
                              max_restarts=0)
    assert reads == [FiniteWatch.every]


def test_copy_detector_sees_each_kind_of_copy(monkeypatch):
    """The detector itself: each way of copying host data to a device is recorded, to_device's apart."""
    copies = HostToDevice(monkeypatch)
    table = torch.arange(4.0, dtype=torch.float64)
    x = torch.ones(2, device=META)
    with copies:
        table.to(META)
        torch.empty(4, device=META).copy_(table)
        x[torch.tensor([0, 1])]
        torch.tensor([1.0, 2.0], device=META)
        x * torch.tensor(2.0)  # a CPU 0-dim scalar: read on the host, no copy
        core.devices.to_device(table, META)
    assert len(copies.copies) == 4 and copies.staged == 1
