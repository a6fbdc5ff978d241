"""Many sources x many samples as batches, in chunks, with one running progress count.

Upstream runs its samples one after another; here they are rows of one batch (or of a few chunks
when memory is short). Rows are independent runs, so the result does not depend on the chunking.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch

from . import memory
from .guided_loop import GuidedResult, GuidedSamplerOptions, guided_sample, program
from .schedule import DiffusionSchedule


def sample_many(unet: torch.nn.Module, schedule: DiffusionSchedule, sources: torch.Tensor, terms: Sequence[Any], *,
                samples_per_image: int = 1, seed: int = 0, chunk_size: int = 0,
                options: GuidedSamplerOptions = GuidedSamplerOptions(), blend: Any = None,
                callback: Optional[Callable[[dict], None]] = None, learn_sigma: bool = True,
                first_row: int = 0, free_memory: memory.FreeMemory = None) -> GuidedResult:
    """Run several source images x several samples as batches (instead of upstream's serial loop).

    Rows are image-major (all samples of image 0, then image 1, ...) and row r is row ``first_row + r``
    of the run seeded with ``seed`` (generators from ``core.diffusion.sampling.row_seed(seed, first_row + r)``), so
    the result does not depend on ``chunk_size`` (0 = everything in one batch) and row r is reproduced
    alone by a one-row call with ``first_row=r``. The callback's ``i`` and ``total`` count steps over all chunks.
    ``losses`` (per term, per step, ``[rows]``) are the chunks' logs side by side in row order (:func:`concat_losses`).

    ``chunk_size`` 0 runs all rows at once when they fit in memory, else as many at a time as fit
    (:mod:`core.diffusion.memory`: the device's free memory -- ``free_memory`` bytes or a
    ``device -> bytes`` function such as ComfyUI's, by default :func:`memory.free_memory` -- against one
    row's measured cost). An out-of-memory error becomes a :class:`memory.ChunkMemoryError` naming
    ``chunk_size`` and a value to use.
    """
    if samples_per_image < 1:
        raise ValueError(f"samples_per_image must be >= 1, got {samples_per_image}")
    rows = sources.repeat_interleave(samples_per_image, dim=0)
    if chunk_size > 0 and chunk_size < rows.shape[0]:
        for value in list(terms) + ([blend] if blend is not None else []):
            _check_rows(value, rows.shape[0])
    n = rows.shape[0]
    row_bytes = None
    if chunk_size <= 0 and n > 1:
        available = _available(free_memory, next(unet.parameters()).device)
        if available is not None:  # unknown (meta, MPS): all at once, as before
            row_bytes = one_row_bytes(unet, schedule, rows[:1], [select_rows(t, 0, 1, n) for t in terms],
                                      options=options, blend=select_rows(blend, 0, 1, n) if blend is not None else None,
                                      learn_sigma=learn_sigma)
            chunk_size = memory.pick_chunk_size(n, row_bytes, available)
    chunk = n if chunk_size <= 0 else min(chunk_size, n)
    chunks = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    images, samples, restarts, losses = [], [], [], []
    relay = ProgressRelay(callback, runs=len(chunks), steps_per_run=len(program(schedule, options)))
    for lo, hi in chunks:
        part_terms = [select_rows(term, lo, hi, n) for term in terms]
        part_blend = select_rows(blend, lo, hi, n) if blend is not None else None
        try:
            res = guided_sample(unet, schedule, rows[lo:hi], part_terms, seed=seed, options=options, blend=part_blend,
                                callback=relay.next_run(), learn_sigma=learn_sigma, first_row=first_row + lo)
        except Exception as exc:  # noqa: BLE001 -- only allocator failures are turned into advice
            if not memory.is_out_of_memory(exc):
                raise
            out_of_memory = True  # raised below, once this frame no longer holds the failed step's tensors
        else:
            out_of_memory = False
        if out_of_memory:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise memory.memory_error(hi - lo, n, row_bytes)
        images.append(res.images)
        samples.append(res.samples)
        restarts.extend(res.restarts)
        losses.append((hi - lo, res.losses))
    return GuidedResult(images=torch.cat(images), samples=torch.cat(samples), restarts=restarts,
                        losses=concat_losses(losses))


def _available(free_memory: memory.FreeMemory, device: torch.device) -> Optional[int]:
    if free_memory is None:
        return memory.free_memory(device)
    return free_memory(device) if callable(free_memory) else int(free_memory)


class _ProbeDone(Exception):
    """Stops the one-row probe after its first guided step."""


def one_row_bytes(unet: torch.nn.Module, schedule: DiffusionSchedule, row: torch.Tensor, terms: Sequence[Any], *,
                  options: GuidedSamplerOptions, blend: Any = None, learn_sigma: bool = True) -> int:
    """Estimated peak bytes one row adds to a guided step: one step of ``row`` alone (its own generators,
    so no caller's random stream moves) with autograd's saved tensors counted, times
    :data:`memory.PEAK_PER_SAVED`."""
    def stop(info: dict) -> None:
        raise _ProbeDone

    def step() -> None:
        try:
            guided_sample(unet, schedule, row, terms, seed=0, options=dataclasses.replace(options, resample_steps=1),
                          blend=blend, callback=stop, learn_sigma=learn_sigma)
        except _ProbeDone:
            pass

    return int(memory.saved_bytes(step) * memory.PEAK_PER_SAVED)


def concat_losses(parts: Sequence[tuple[int, dict]]) -> dict:
    """Per-step loss logs of consecutive row chunks -> one log over all rows, in row order.

    ``parts`` holds ``(rows, {name: [per-step tensor [rows]]})`` per chunk. Step k of the result is the
    chunks' step k side by side (``[all rows]``); a chunk that took fewer steps (another chunk ran
    longer after range restarts) has NaN in the steps it did not take, so every step has every row.
    """
    names = [name for _, log in parts for name in log]
    out: dict = {}
    for name in dict.fromkeys(names):
        steps = max(len(log.get(name, ())) for _, log in parts)
        like = next(v[0] for _, log in parts for v in [log.get(name)] if v)
        out[name] = [torch.cat([log[name][k].reshape(-1) if k < len(log.get(name, ()))
                                else torch.full((rows,), float("nan"), dtype=like.dtype, device=like.device)
                                for rows, log in parts]) for k in range(steps)]
    return out


def planned_steps(schedule: DiffusionSchedule, options: GuidedSamplerOptions, rows: int, chunk_size: int = 0) -> int:
    """Guided steps :func:`sample_many` will take for ``rows`` rows without restarts (chunks run one after another)."""
    chunks = 1 if chunk_size <= 0 else -(-rows // chunk_size)
    return len(program(schedule, options)) * chunks


def select_rows(value: Any, lo: int, hi: int, n: int) -> Any:
    """The part of a term/blend that serves rows lo:hi of n: its own ``select`` if it has one, else a
    per-row ``mask`` field sliced (masks of batch 1 serve every row)."""
    if hasattr(value, "select"):
        return value.select(lo, hi)
    mask = getattr(value, "mask", None)
    if isinstance(mask, torch.Tensor) and mask.shape[0] == n and n > 1 and dataclasses.is_dataclass(value):
        return dataclasses.replace(value, mask=mask[lo:hi])
    return value


def _check_rows(value: Any, n: int) -> None:
    mask = getattr(value, "mask", None)
    if isinstance(mask, torch.Tensor) and mask.shape[0] not in (1, n):
        raise ValueError(f"{type(value).__name__}.mask has batch {mask.shape[0]} but there are {n} sample rows; "
                         "give one mask, or one per row (images x samples)")


class ProgressRelay:
    """Turns the per-run ``{i, total}`` of several consecutive runs into one running count.

    ``total`` = steps already taken + the current run's own total + the planned steps of the runs still
    to come, so a progress bar ends exactly full even when range restarts lengthen a run.
    """

    def __init__(self, callback: Optional[Callable[[dict], None]], runs: int, steps_per_run: int):
        self.callback, self.left, self.steps_per_run = callback, runs, steps_per_run
        self.done = 0

    def next_run(self) -> Callable[[dict], None]:
        self.left -= 1
        base = self.done

        def relay(info: dict) -> None:
            self.done = base + info["i"] + 1
            if self.callback is not None:
                self.callback(dict(info, i=base + info["i"], total=base + info["total"] + self.left * self.steps_per_run))

        return relay
