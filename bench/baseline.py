"""The official step structure, re-implemented for the bench only (nothing in ``core`` changes).

Per step a no-grad UNet forward for the step *plus* a forward with grad inside the guidance; rows
one at a time; DINO source-side features recomputed every step with one DINO forward per loss term
(upstream's ``Loss_vit``); UNet attention as guided-diffusion's ``QKVAttentionLegacy``. Each
ingredient is switched by a :class:`bench.bench_guided.Recipe` field, so the fast path and every
ablation run through the same loop (:class:`RowRun`) when the bench is not timing ``guided_sample``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from core.diffusion import unet as unet_mod
from core.blended.losses import MaskedCLIPLoss
from core.diffuseit.clip_direction import CLIPDirectionalLoss
from core.diffusion.guidance import Replay, StepContext, StepState, noise_mixed_input
from core.diffusion.finite_watch import FiniteWatch
from core.diffusion.guided_loop import guidance_gradient, program, renoise_one_step
from core.diffusion.sampling import STREAM_AUGMENT, NoiseSource, ddpm_step, model_output, row_seed
from core.diffusion.schedule import p_mean_variance, q_sample
from core.diffuseit.dino_losses import DINOStructureLoss, DINOStyleLoss, SemanticDivergence

if TYPE_CHECKING:
    from bench.bench_guided import Bench


def legacy_attention_forward(self: unet_mod.AttentionBlock, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """guided-diffusion's QKVAttentionLegacy: q, k scaled by d^-1/4, einsum, softmax in fp32, einsum."""
    b, c, *spatial = x.shape
    flat = x.reshape(b, c, -1)
    qkv = self.qkv(self.norm(flat))
    heads, d, length = self.num_heads, c // self.num_heads, flat.shape[-1]
    if self.new_order:
        q, k, v = qkv.reshape(b, 3, heads, d, length).unbind(1)
    else:
        q, k, v = qkv.reshape(b, heads, 3, d, length).unbind(2)
    q, k, v = (z.reshape(b * heads, d, length) for z in (q, k, v))
    scale = 1 / math.sqrt(math.sqrt(d))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, length)
    return (flat + self.proj_out(a)).reshape(b, c, *spatial)


@contextlib.contextmanager
def attention_patch(sdpa: bool):
    """Swap core.diffusion.unet.AttentionBlock.forward for the legacy explicit attention (bench process only)."""
    if sdpa:
        yield
        return
    original = unet_mod.AttentionBlock.forward
    unet_mod.AttentionBlock.forward = legacy_attention_forward
    try:
        yield
    finally:
        unet_mod.AttentionBlock.forward = original


class _Isolated:
    """A prepared term that runs its own DINO forward (clears the shared-feature cache first)."""

    def __init__(self, inner: Any, name: str, gate: Optional[int] = None):
        self.inner, self.name, self.gate = inner, name, gate

    def __call__(self, predicted_x0: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.gate is not None and not bool((ctx.t_index > self.gate).any()):
            # upstream's use_dir = t > diff_iter: no forward at all when the term is off
            return predicted_x0.new_zeros(predicted_x0.shape[0])
        ctx.state.dino_features.clear()
        return self.inner(predicted_x0, ctx)

    def before_step(self, ctx: StepContext) -> None:
        if hasattr(self.inner, "before_step"):
            self.inner.before_step(ctx)


def _is_dino(term: Any) -> bool:
    return isinstance(term, (DINOStructureLoss, DINOStyleLoss, SemanticDivergence))


def _is_clip(term: Any) -> bool:
    return isinstance(term, (CLIPDirectionalLoss, MaskedCLIPLoss))


class RowRun:
    """One group of rows (all rows, or a single row when serial) run through the guided steps."""

    def __init__(self, b: Bench, rows: list[int], seed: int):
        self.b, self.rows = b, rows
        self.source = b.source[rows]
        n = len(rows)
        self.noise = NoiseSource(seed, n, b.device, first_row=rows[0])
        self.state = StepState()
        self.generators = [torch.Generator("cpu").manual_seed(row_seed(seed, r, STREAM_AUGMENT)) for r in rows]
        self.blender = b.blend.prepare(self.source) if b.blend is not None else None
        self.blend_mask = self.blender.mask if self.blender is not None else None
        self.prev_x0: Optional[torch.Tensor] = None
        self.prev_vit_input: Optional[torch.Tensor] = None
        rec = b.recipe
        # terms prepared once per run: everything in the fast path; CLIP / range / divergence in the baseline
        self.persistent = {}
        for i, term in enumerate(b.terms):
            if not (rec.recompute_source and isinstance(term, (DINOStructureLoss, DINOStyleLoss))):
                self.persistent[i] = b.prepare(term, self.source)
        if rec.recompute_source:
            self.prev_vit_input = self.source  # upstream: prev = x_src at the first call
        top = program(b.schedule, b.options)[0][0]
        self.x = q_sample(b.schedule, self.source, torch.full((n,), top, device=b.device, dtype=torch.long),
                          self.noise.randn(self.source.shape[1:], kind="start"))

    def prepared_for_step(self, only: Optional[Callable[[Any], bool]] = None) -> list:
        """This step's prepared terms. Baseline: DINO structure / style prepared now (source and style
        features recomputed), structure split into its two halves, every DINO term on its own forward."""
        rec, out = self.b.recipe, []
        for i, term in enumerate(self.b.terms):
            if only is not None and not only(term):
                continue
            if not rec.recompute_source:
                out.append(self.persistent[i])
            elif isinstance(term, DINOStructureLoss):
                halves = (("dino_ssim", replace(term, lambda_contra=0.0)), ("dino_contra", replace(term, lambda_ssim=0.0)))
                out.extend(_Isolated(half.prepare(self.source), name) for name, half in halves)
            elif isinstance(term, DINOStyleLoss):
                out.append(_Isolated(term.prepare(self.source), term.name))
            elif isinstance(term, SemanticDivergence):
                out.append(_Isolated(self.persistent[i], term.name, gate=term.diff_iter))
            else:
                out.append(self.persistent[i])
        return out

    def context(self, t_index: torch.Tensor, x_t: torch.Tensor, step: int, state: Optional[StepState] = None) -> StepContext:
        b = self.b
        return StepContext(t_index=t_index, t=b.schedule.model_timesteps(t_index), x_t=x_t, schedule=b.schedule,
                           source=self.source, prev_x0=self.prev_x0, step=step, generators=self.generators,
                           blend_mask=self.blend_mask, state=self.state if state is None else state,
                           replay=Replay(prev_vit_input=self.prev_vit_input))

    def step(self, i: int, k: int, renoise: bool) -> dict:
        b, rec = self.b, self.b.recipe
        n = len(self.rows)
        t_index = torch.full((n,), k, device=b.device, dtype=torch.long)
        ctx = self.context(t_index, self.x, i)
        prepared = self.prepared_for_step()
        mv0 = None
        if rec.two_forwards:  # upstream p_sample: the step's own no-grad UNet call
            with torch.no_grad():
                out = model_output(b.unet, self.x, t_index, b.schedule).float()
                mv0 = p_mean_variance(b.schedule, out, self.x, t_index, b.options.clip_denoised)
        mv, grad, per_term = guidance_gradient(b.unet, b.schedule, self.x, t_index, prepared, ctx, None,
                                               b.options.clip_denoised)
        if mv0 is not None:
            mv = mv0
        watch = FiniteWatch()
        watch.record(per_term, grad, i, k)
        watch.check()
        z = self.noise.randn(self.source.shape[1:], kind="step")
        nxt = ddpm_step(b.schedule, mv, self.x, t_index, z, grad)
        if self.blender is not None:
            nxt = self.blender.after_step(nxt, t_index, self.noise, b.schedule)
        if renoise:
            nxt = renoise_one_step(b.schedule, nxt, t_index, self.noise.randn(self.source.shape[1:], kind="resample"),
                                   b.options)
        self.prev_x0 = mv.pred_xstart
        if rec.recompute_source:  # upstream: prev <- x_in after every call
            self.prev_vit_input = noise_mixed_input(mv.pred_xstart, replace(ctx, x_t=self.x)).detach()
        self.x = nxt
        return {"mean": mv.mean, "grad": grad, "losses": per_term}


def recipe_steps(b: Bench, n_steps: int, on_step: Callable[[int], None], seed: int = 0) -> list[RowRun]:
    """n_steps guided steps of the program's top, interleaving the row groups within each step."""
    batch = b.source.shape[0]
    groups = [[r] for r in range(batch)] if b.recipe.serial else [list(range(batch))]
    runs = [RowRun(b, rows, seed) for rows in groups]
    on_step(-1)  # set-up (start noise, prepared terms) done
    for i, (k, renoise) in enumerate(program(b.schedule, b.options)[:n_steps]):
        for run in runs:
            run.step(i, k, renoise)
        on_step(i)
    return runs
