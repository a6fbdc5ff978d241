"""Many sources x many samples as batches, in chunks, with one running progress count.

Upstream runs its samples one after another; here they are rows of one batch (or of a few chunks
when memory is short). Rows are independent runs, so the result does not depend on the chunking.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch

from .guided_loop import GuidedResult, GuidedSamplerOptions, guided_sample, program
from .schedule import DiffusionSchedule


def sample_many(unet: torch.nn.Module, schedule: DiffusionSchedule, sources: torch.Tensor, terms: Sequence[Any], *,
                samples_per_image: int = 1, seed: int = 0, chunk_size: int = 0,
                options: GuidedSamplerOptions = GuidedSamplerOptions(), blend: Any = None,
                callback: Optional[Callable[[dict], None]] = None, learn_sigma: bool = True,
                first_row: int = 0) -> GuidedResult:
    """Run several source images x several samples as batches (instead of upstream's serial loop).

    Rows are image-major (all samples of image 0, then image 1, ...) and row r is row ``first_row + r``
    of the run seeded with ``seed`` (generators from ``core.diffusion.sampling.row_seed(seed, first_row + r)``), so
    the result does not depend on ``chunk_size`` (0 = everything in one batch) and row r is reproduced
    alone by a one-row call with ``first_row=r``. The callback's ``i`` and ``total`` count steps over all chunks.
    ``losses`` (per term, per step, ``[rows]``) are the chunks' logs side by side in row order (:func:`concat_losses`).
    """
    if samples_per_image < 1:
        raise ValueError(f"samples_per_image must be >= 1, got {samples_per_image}")
    rows = sources.repeat_interleave(samples_per_image, dim=0)
    if chunk_size > 0 and chunk_size < rows.shape[0]:
        for value in list(terms) + ([blend] if blend is not None else []):
            _check_rows(value, rows.shape[0])
    n = rows.shape[0]
    chunk = n if chunk_size <= 0 else min(chunk_size, n)
    chunks = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    images, samples, restarts, losses = [], [], [], []
    relay = ProgressRelay(callback, runs=len(chunks), steps_per_run=len(program(schedule, options)))
    for lo, hi in chunks:
        part_terms = [select_rows(term, lo, hi, n) for term in terms]
        part_blend = select_rows(blend, lo, hi, n) if blend is not None else None
        res = guided_sample(unet, schedule, rows[lo:hi], part_terms, seed=seed, options=options, blend=part_blend,
                            callback=relay.next_run(), learn_sigma=learn_sigma, first_row=first_row + lo)
        images.append(res.images)
        samples.append(res.samples)
        restarts.extend(res.restarts)
        losses.append((hi - lo, res.losses))
    return GuidedResult(images=torch.cat(images), samples=torch.cat(samples), restarts=restarts,
                        losses=concat_losses(losses))


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
