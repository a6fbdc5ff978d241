"""Guided sampling: one differentiable UNet pass per step serves both the step and the gradient.

Both papers guide a DDPM by the gradient of losses on the predicted x0 taken w.r.t. x_t through the
UNet (manifold-constrained gradient), applied as a mean shift scaled by the step's variance (DDPM,
Dhariwal & Nichol eq. 10) or as a score correction (DDIM, eq. 14). The official code runs the UNet
twice per step (once without grad for the step, once with grad inside cond_fn); both passes give the
same values, so here a single forward with grad provides the posterior *and* the gradient.

Options cover both methods: DiffuseIT's resampling start (repeat the first guided step N times,
re-noising in between) and range restart; Blended Diffusion's background blend after every step.
Rows of a batch are independent runs (their own noise streams, their own restarts): row r draws from
generators seeded by ``core.sampling.row_seed(seed, r)`` (a SplitMix64 mix of seed and row, so nearby
seeds share no row), and a batch of N equals N serial runs with the same seed and ``first_row`` 0..N-1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .guidance import StepContext
from .sampling import STREAM_AUGMENT, NoiseSource, ddim_step, ddpm_step, model_output, row_seed
from .devices import to_device
from .schedule import DiffusionSchedule, MeanVariance, extract, p_mean_variance, q_sample


class GuidanceError(RuntimeError):
    """A guidance loss or its gradient stopped being finite."""


@dataclass(frozen=True)
class GuidedSamplerOptions:
    """How the guided loop runs. Defaults are the official DDPM settings shared by both papers."""

    sampler: str = "ddpm"  # "ddpm" or "ddim"
    skip_timesteps: int = 0  # respaced steps skipped at the start; the loop starts at N-1-skip
    resample_steps: int = 1  # DiffuseIT: the first guided step runs this many times (10 upstream)
    resample_beta: str = "previous"  # upstream re-noises with beta_{K-1} ("previous"); "exact" uses beta_K
    eta: float = 0.0
    clip_denoised: bool = False
    range_restart_threshold: Optional[float] = None  # DiffuseIT: restart a row when its weighted range loss exceeds this
    max_restarts: int = 3  # upstream restarts without limit; a random or diverging model would never finish

    def __post_init__(self) -> None:
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        if self.resample_steps < 1:
            raise ValueError(f"resample_steps must be >= 1, got {self.resample_steps}")
        if self.resample_beta not in ("previous", "exact"):
            raise ValueError(f"resample_beta must be 'previous' or 'exact', got {self.resample_beta!r}")


@dataclass
class GuidedResult:
    """``images``: the last step's x0 prediction (what both official codes save, after the background
    paste for Blended Diffusion); ``samples``: the final x; ``restarts``: per-row restart counts."""

    images: torch.Tensor
    samples: torch.Tensor
    restarts: list = field(default_factory=list)
    losses: dict = field(default_factory=dict)


def program(schedule: DiffusionSchedule, options: GuidedSamplerOptions) -> list[tuple[int, bool]]:
    """The step list: (respaced index, re-noise afterwards). The top step repeats resample_steps times."""
    top = schedule.num_timesteps - 1 - options.skip_timesteps
    if not 0 <= top < schedule.num_timesteps:
        raise ValueError(f"skip_timesteps must be in [0, {schedule.num_timesteps - 1}], got {options.skip_timesteps}")
    steps = [(top, r < options.resample_steps - 1) for r in range(options.resample_steps)]
    return steps + [(k, False) for k in range(top - 1, -1, -1)]


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def renoise_one_step(schedule: DiffusionSchedule, x: torch.Tensor, t_index: torch.Tensor, noise: torch.Tensor,
                     options: GuidedSamplerOptions) -> torch.Tensor:
    """Go back up one level: x <- sqrt(1 - beta) x + sqrt(beta) z (DiffuseIT's resampling, spec 3.3).

    Upstream passes t-1, i.e. uses beta_{K-1} to climb from level K-1 to K; ``resample_beta="exact"``
    uses beta_K instead.
    """
    idx = t_index - 1 if options.resample_beta == "previous" else t_index
    beta = extract(schedule.betas, idx.clamp(min=0), x)
    return torch.sqrt(1 - beta) * x + torch.sqrt(beta) * noise


def guided_sample(unet: torch.nn.Module, schedule: DiffusionSchedule, source: torch.Tensor, terms: Sequence[Any], *,
                  seed: int = 0, options: GuidedSamplerOptions = GuidedSamplerOptions(), blend: Any = None,
                  y: Optional[torch.Tensor] = None, noise_source: Any = None,
                  callback: Optional[Callable[[dict], None]] = None, learn_sigma: bool = True,
                  first_row: int = 0) -> GuidedResult:
    """Translate/edit ``source`` ([B,3,H,W] in [-1,1], one row per sample) under the guidance ``terms``.

    ``terms`` are guidance-term values (see ``core.guidance``); each is prepared once here. ``blend``
    (optional) has ``prepare(source) -> prepared`` with ``prepared.after_step(x, t_index, noise_source, schedule)``
    and ``prepared.finalize(x0)`` (Blended Diffusion). ``callback`` gets ``{i, total, t_index, t, x,
    predicted_x0, losses}`` after each step and may raise to stop (Cancel).

    Seeds: row b is row ``first_row + b`` of the run seeded with ``seed``; its noise comes from
    ``row_seed(seed, first_row + b)`` and its augmentations from ``row_seed(seed, first_row + b, STREAM_AUGMENT)``
    (``core.sampling.row_seed``). Row r of a batch is therefore reproduced alone by
    ``guided_sample(unet, schedule, source[r:r + 1], terms, seed=seed, first_row=r)``.
    """
    device = next(unet.parameters()).device
    source = source.to(device, torch.float32)
    batch = source.shape[0]
    noise = noise_source if noise_source is not None else NoiseSource(seed, batch, device, first_row)
    steps = program(schedule, options)
    prepared = [term.prepare(source) for term in terms]
    blender = blend.prepare(source) if blend is not None else None
    top = steps[0][0]
    state: dict = {}
    if noise_source is None:
        # per-row generators for random augmentations (CLIP cuts, cutouts): row b depends on (seed, first_row + b) only
        state["generator"] = state["cutout_generator"] = [
            torch.Generator("cpu").manual_seed(row_seed(seed, first_row + b, STREAM_AUGMENT)) for b in range(batch)]
    if blender is not None and getattr(blender, "mask", None) is not None:
        state["blend_mask"] = blender.mask  # masked losses without a mask of their own follow the blend

    def start(rows: torch.Tensor, x: Optional[torch.Tensor]) -> torch.Tensor:  # rows: CPU bool [B]
        eps = noise.randn(source.shape[1:], kind="start", rows=rows)
        fresh = q_sample(schedule, source, torch.full((batch,), top, device=device, dtype=torch.long), eps)
        return fresh if x is None else torch.where(_rows(to_device(rows, device), x).bool(), fresh, x)

    x = start(torch.ones(batch, dtype=torch.bool), None)
    position = torch.zeros(batch, dtype=torch.long)  # index into `steps`, per row (rows restart alone)
    restarts = [0] * batch
    image = torch.zeros_like(source)
    total, i = len(steps), 0
    loss_log: dict = {}
    finite = FiniteWatch()
    while bool((position < len(steps)).any()):  # `position` lives on the CPU: no device sync
        active_cpu = position < len(steps)
        t_list = [steps[min(p, len(steps) - 1)][0] for p in position.tolist()]
        renoise_list = [p < len(steps) and steps[p][1] for p in position.tolist()]
        active, t_index = to_device(active_cpu, device), to_device(torch.tensor(t_list), device)
        ctx = StepContext(t_index=t_index, t=schedule.model_timesteps(t_index), x_t=x, schedule=schedule,
                          source=source, prev_x0=state.get("prev_x0"), step=i, extras=state)
        mv, grad, per_term = guidance_gradient(unet, schedule, x, t_index, prepared, ctx, active,
                                               options.clip_denoised, y, learn_sigma)
        finite.record(per_term, grad, i, t_list)
        x_t = x
        z = noise.randn(source.shape[1:], kind="step")
        if options.sampler == "ddpm":
            nxt, x0 = ddpm_step(schedule, mv, x_t, t_index, z, grad), mv.pred_xstart
        else:
            nxt, x0 = ddim_step(schedule, mv, x_t, t_index, z, options.eta, grad)
        if blender is not None:
            nxt = blender.after_step(nxt, t_index, noise, schedule)
        if any(renoise_list):
            renoise = to_device(torch.tensor(renoise_list), device)
            up = renoise_one_step(schedule, nxt, t_index, noise.randn(source.shape[1:], kind="resample"), options)
            nxt = torch.where(_rows(renoise, nxt).bool(), up, nxt)
        keep = _rows(active, x)
        x = nxt * keep + x * (1 - keep)
        image = x0 * keep + image * (1 - keep)
        state["prev_x0"] = x0
        for name, value in per_term.items():
            loss_log.setdefault(name, []).append(value.detach())
        position = position + active_cpu.long()
        # only read the range loss back when some row could restart: not during the resampling repeats
        # at the top step, and never again once every row has used its restarts
        restart_armed = (options.range_restart_threshold is not None and "range" in per_term
                         and any(t < top and a and n < options.max_restarts
                                 for t, a, n in zip(t_list, active_cpu.tolist(), restarts)))
        if restart_armed or i % FiniteWatch.every == FiniteWatch.every - 1:
            finite.check()  # a restart decision reads the losses back anyway; otherwise every few steps
        restart = _restart_rows(per_term, options, t_list, top, active_cpu, restarts) if restart_armed else None
        if restart is not None:
            x = start(restart, x)
            position = torch.where(restart, torch.zeros_like(position), position)
        total = i + 1 + int((len(steps) - position).clamp(min=0).max())  # grows only when a row restarts
        if callback is not None:
            callback({"i": i, "total": total, "t_index": t_list[0], "t": int(schedule.timestep_map[t_list[0]]),
                      "x": x, "predicted_x0": x0, "losses": per_term})
        i += 1
    finite.check()
    if blender is not None:
        image = blender.finalize(image)
    return GuidedResult(images=image, samples=x, restarts=restarts, losses=loss_log)


def guidance_gradient(unet: torch.nn.Module, schedule: DiffusionSchedule, x: torch.Tensor, t_index: torch.Tensor,
                      prepared: Sequence[Any], ctx: StepContext, active: Optional[torch.Tensor] = None,
                      clip_denoised: bool = False, y: Optional[torch.Tensor] = None,
                      learn_sigma: bool = True) -> tuple[MeanVariance, Optional[torch.Tensor], dict]:
    """One UNet forward with grad: p(x_{t-1}|x_t) statistics (detached) and g = -d(sum of losses)/d x_t.

    ``ctx.x_t`` is replaced by the grad-tracking copy of ``x`` so terms that mix x_t into their input
    (Blended Diffusion, DiffuseIT's noise mix) differentiate through it too. Returns the per-term
    per-row losses as well.
    """
    x_in = x.detach().requires_grad_(True)
    ctx.x_t = x_in
    for p in prepared:  # terms publish what the previous step left them (e.g. DiffuseIT's loss_prev)
        if hasattr(p, "before_step"):
            p.before_step(ctx)
    with torch.enable_grad():
        out = model_output(unet, x_in, t_index, schedule, y).float()
        mv = p_mean_variance(schedule, out, x_in, t_index, clip_denoised, learn_sigma)
        per_term = {p.name: p(mv.pred_xstart, ctx) for p in prepared}
        grad = None
        if per_term:
            weights = active.to(torch.float32) if active is not None else 1.0
            total = sum((v.float() * weights).sum() for v in per_term.values())
            if total.requires_grad:
                grad = -torch.autograd.grad(total, x_in)[0]
    ctx.x_t = x_in.detach()
    return MeanVariance(*(v.detach() for v in mv)), grad, {k: v.detach() for k, v in per_term.items()}


class FiniteWatch:
    """Collects per-step "is every loss and the gradient finite" flags on the device and reads them
    back every ``every`` steps (and at the end), so the step loop does not wait for the GPU each step.

    A NaN is still reported with the first guided step, the term it appeared in, the row that went bad
    and *that row's* timestep (rows restart alone, so rows of one step can be at different timesteps);
    at most ``every`` steps run on after it. Flags are kept per row: ``(terms [+ gradient], rows)``.
    """

    every = 8

    def __init__(self) -> None:
        self.pending: list = []

    @staticmethod
    def _per_row(finite: torch.Tensor) -> torch.Tensor:
        return finite.reshape(1) if finite.dim() == 0 else finite.reshape(finite.shape[0], -1).all(1)

    def record(self, per_term: dict, grad: Optional[torch.Tensor], step: int,
               t_index: Union[int, Sequence[int]]) -> None:
        """Queue this step's finiteness flags; ``t_index`` is the respaced index of every row (or one int)."""
        flags = [self._per_row(torch.isfinite(v.detach())) for v in per_term.values()]
        if grad is not None:
            flags.append(self._per_row(torch.isfinite(grad.detach())))
        if flags:
            rows = max(f.shape[0] for f in flags)
            t_rows = [int(t_index)] * rows if isinstance(t_index, int) else [int(t) for t in t_index]
            self.pending.append((step, t_rows, list(per_term), torch.stack([f.expand(rows) for f in flags])))

    def check(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        ok = torch.stack([flags.all() for *_, flags in pending]).cpu()  # the one host sync
        if bool(ok.all()):
            return
        step, t_rows, names, flags = pending[int((~ok).nonzero()[0])]
        flags = flags.cpu()
        bad = [name for name, good in zip(names, flags.all(1).tolist()) if not good]
        what = f"loss term(s) {', '.join(bad)}" if bad else "the guidance gradient"
        rows = (~flags.all(0)).nonzero().flatten().tolist()
        row = rows[0]
        where = f"(respaced t={t_rows[row] if row < len(t_rows) else t_rows[0]})"
        if len(t_rows) > 1:
            where += f" in row {row}"
            if len(rows) > 1:
                where += " (also " + ", ".join(f"row {r} at t={t_rows[r]}" for r in rows[1:] if r < len(t_rows)) + ")"
        raise GuidanceError(f"{what} became NaN/inf at guided step {step} {where}. "
                            "Lower that term's weight, use fp32, or check the inputs (an all-black or constant "
                            "image can make normalised features undefined).")


def _restart_rows(per_term: dict, options: GuidedSamplerOptions, t_list: list, top: int,
                  active: torch.Tensor, restarts: list) -> Optional[torch.Tensor]:
    """DiffuseIT's range restart (spec 3.6): below the top step, a row whose range loss is too large starts
    over. Returns the rows to restart as a CPU bool tensor, or None."""
    range_loss = per_term["range"].detach().cpu()  # the decision needs the values on the host
    over = (range_loss > options.range_restart_threshold) & (torch.tensor(t_list) < top) & active
    over &= torch.tensor([n < options.max_restarts for n in restarts])
    if not bool(over.any()):
        return None
    for b in over.nonzero().flatten().tolist():
        restarts[b] += 1
    return over


def sample_many(unet: torch.nn.Module, schedule: DiffusionSchedule, sources: torch.Tensor, terms: Sequence[Any], *,
                samples_per_image: int = 1, seed: int = 0, chunk_size: int = 0,
                options: GuidedSamplerOptions = GuidedSamplerOptions(), blend: Any = None,
                callback: Optional[Callable[[dict], None]] = None, learn_sigma: bool = True,
                first_row: int = 0) -> GuidedResult:
    """Run several source images x several samples as batches (instead of upstream's serial loop).

    Rows are image-major (all samples of image 0, then image 1, ...) and row r is row ``first_row + r``
    of the run seeded with ``seed`` (generators from ``core.sampling.row_seed(seed, first_row + r)``), so
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
