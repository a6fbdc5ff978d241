"""Time guided steps of DiffuseIT / Blended Diffusion: the pack's fast path vs the official step structure.

One configuration per process (peak RSS is a process-lifetime figure; ``bench/compare.py`` starts
one process per row). What is timed:

* **steps** -- ``--warmup`` + ``--steps`` guided steps from the top of the real program (DiffuseIT:
  the resampling repeats at t = K; Blended: t = 74), for the whole batch. The median of the
  measured steps x guided calls per image / batch is the *extrapolated* seconds per image
  (69 calls text, 129 image, 75 blended). Baseline steps with the semantic-divergence term off
  (t <= diff_iter) are cheaper; the extrapolation subtracts the measured DINO difference for those.
* **phases** -- the parts of one step run *separately* on fixed inputs at the same t, each
  ``--repeat`` times (median): the UNet forward without grad (only the baseline's step runs it),
  the UNet forward with graph, the UNet backward from x0 to x_t, the DINO terms' forward +
  backward (including the baseline's per-step source/reference forwards) and the CLIP terms'
  forward + backward on a fixed x0. "other" = step - the phases the step runs (range loss,
  p_mean_variance, the DDPM update, noise draws, blend, finite check, Python).

``--mode fast`` is the pack's code path: ``core.diffusion.guided_loop.guided_sample`` with the real terms (source
features prepared once, one DINO forward shared by the DINO terms, one differentiable UNet pass per
step, the batch as a batch dimension), SDPA attention, the UNet body in ``--dtype`` through
``convert_body``; optional ``--compile``, ``--grad-checkpoint``, ``--channels-last``.

``--mode baseline`` re-implements the official step structure here (nothing in ``core`` changes):
per step a no-grad UNet forward for the step *plus* a forward with grad for the guidance; rows one
at a time; DINO source-side features recomputed every step with one DINO forward per loss term as
upstream's ``Loss_vit`` (structure split into its self-similarity and contrastive halves, each with
its own source forward; semantic divergence against the previous call's x_in through a no-grad
forward, skipped when inactive; style [CLS] recomputed); UNet attention as upstream's
``QKVAttentionLegacy`` (explicit fp32 softmax(q k^T / sqrt d) v, no SDPA); fp32.
CLIP text embeddings are computed once per run in both modes (upstream does that too).

``--set key=value`` toggles single ingredients of a mode (ablations), e.g.
``--mode fast --set two_forwards=1``; the keys are the fields of :class:`Recipe`.

Works on CUDA (``--device auto`` picks it; timers synchronise, memory is
``torch.cuda.max_memory_allocated``). ``--tiny`` uses ``core.tiny_models``' sizes (smoke tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import models as bm  # noqa: E402
from bench.baseline import RowRun, _is_clip, _is_dino, attention_patch, recipe_steps  # noqa: E402
from bench.measure import (CLOCK, CLOCKS, Timer, cpu_name, cpu_snapshot, load_average,  # noqa: E402
                           others_cpu_share, sync)
from core.blended import BackgroundBlend  # noqa: E402
from core.diffuseit.clip_direction import PreparedCLIPDirectional  # noqa: E402
from core.diffusion.guided_loop import GuidedSamplerOptions, guided_sample, program  # noqa: E402
from core.diffusion.sampling import model_output  # noqa: E402
from core.diffusion.schedule import p_mean_variance  # noqa: E402
from core.tiny_models import (BLEND_PROMPT, SOURCE_TEXT, TARGET_TEXT, TINY_IMAGE_SIZE,  # noqa: E402,F401
                               preset_terms, smooth_image)

CALLS_PER_IMAGE = {"diffuseit-text": 69, "diffuseit-image": 129, "blended": 75}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_SIZE = TINY_IMAGE_SIZE  # image side of --tiny runs (full size: the model's 256)


@dataclass(frozen=True)
class Recipe:
    """The ingredients that differ between the official step structure and the pack's fast path."""

    two_forwards: bool = False  # official: a no-grad UNet forward for the step + one with grad for guidance
    recompute_source: bool = False  # official: DINO source-side features every step, one DINO forward per loss term
    serial: bool = False  # official (DiffuseIT): samples one after another instead of a batch dimension
    sdpa: bool = True  # UNet attention through scaled_dot_product_attention (else upstream's explicit fp32 softmax)
    dtype: str = "fp32"  # UNet body dtype (convert_body)
    clip_dtype: str = "auto"  # CLIP weights: auto = fp16 on CUDA, fp32 on CPU (the Load CLIP node's rule)
    dino_sdpa: bool = False  # DINOExtractor(fused_attention=...): the pack's default is the explicit form
    compile: bool = False  # torch.compile the UNet
    grad_checkpoint: bool = False  # unet.gradient_checkpointing
    channels_last: bool = False  # UNet weights (and so activations) in channels_last
    clip_checkpoint: bool = False  # ClipModel.gradient_checkpointing on every CLIP model

    @property
    def pack_path(self) -> bool:
        """True when the step is exactly core.diffusion.guided_loop.guided_sample's (no official-structure ingredient)."""
        return not (self.two_forwards or self.recompute_source or self.serial)


MODES = {
    "fast": Recipe(),
    "baseline": Recipe(two_forwards=True, recompute_source=True, serial=True, sdpa=False, dtype="fp32",
                       clip_dtype="fp32"),
}


def parse_set(recipe: Recipe, items: Sequence[str]) -> Recipe:
    kinds = {f.name: f.type for f in dataclasses.fields(Recipe)}
    changes: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in kinds:
            raise SystemExit(f"--set: unknown recipe key {key!r}; choose from {sorted(kinds)}")
        if kinds[key] in ("bool", bool):
            changes[key] = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            changes[key] = value.strip()
    return replace(recipe, **changes)


# ------------------------------------------------------------------------------------- helpers


test_image = smooth_image  # a smooth random [-1, 1] image (1, 3, size, size)


# ----------------------------------------------------------------------------- the set-up


def checkpoint_clip(models: Sequence[Any]) -> None:
    """The pack's CLIP memory option (Load CLIP node / ``--low-memory``): each tower recomputes its
    activations in the backward, so only one ensemble member's graph is alive at a time."""
    for m in models:
        m.gradient_checkpointing = True


@dataclass
class Bench:
    method: str
    recipe: Recipe
    device: torch.device
    ddpm: Any
    unet: Any  # what the sampler calls (maybe torch.compile'd)
    schedule: Any
    options: GuidedSamplerOptions
    source: torch.Tensor  # (B, 3, 256, 256)
    terms: tuple
    blend: Optional[BackgroundBlend]
    diff_iter: Optional[int]
    info: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    def prepare(self, term: Any, source: torch.Tensor) -> Any:
        """term.prepare(source); CLIP terms once per batch size (their text embeddings are the costly part,
        computed once per run by upstream as well), so repeated set-ups here do not pay them again."""
        if not _is_clip(term):
            return term.prepare(source)
        key = (id(term), source.shape[0])
        if key not in self.cache:
            self.cache[key] = term.prepare(source)
        prepared = self.cache[key]
        if isinstance(prepared, PreparedCLIPDirectional):  # its one mutable cell (loss_prev) per run
            prepared = replace(prepared, last_loss=[None])
        return prepared


class _CachedTerm:
    """Hands guided_sample the bench's cached prepare (same prepared object as term.prepare would give)."""

    def __init__(self, term: Any, b: "Bench"):
        self.term, self.b, self.name = term, b, term.name

    def prepare(self, source: torch.Tensor) -> Any:
        return self.b.prepare(self.term, source)


def setup(method: str, recipe: Recipe, batch: int, *, steps: int, clip_models: Optional[Sequence[str]] = None,
          ncuts: int = 8, tiny: bool = False, device: Optional[str] = None, seed: int = 0) -> Bench:
    if method not in CALLS_PER_IMAGE:
        raise SystemExit(f"--method must be one of {sorted(CALLS_PER_IMAGE)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict = {}
    if recipe.dtype == "fp16" and dev.type == "cpu":
        print("note: fp16 convolutions on CPU run on a slow reference path (see bench/README.md)", file=sys.stderr)
    ddpm, info["build_unet_s"] = bm.build_unet(recipe.dtype, str(dev), tiny)
    unet = ddpm.unet
    unet.gradient_checkpointing = recipe.grad_checkpoint
    if recipe.channels_last:
        unet.to(memory_format=torch.channels_last)
    call = torch.compile(unet) if recipe.compile else unet
    size = TINY_SIZE if tiny else ddpm.image_size  # the UNet is convolutional: tiny runs use small images
    source = test_image(seed, size).to(dev).repeat(batch, 1, 1, 1)
    clip_dtype = recipe.clip_dtype
    if clip_dtype == "auto":
        clip_dtype = "fp16" if dev.type == "cuda" else "fp32"
    dino, clip = None, []
    if method.startswith("diffuseit"):
        dino, info["build_dino_s"] = bm.build_dino(str(dev), tiny, fused_attention=recipe.dino_sdpa)
    if method != "diffuseit-image":
        names = clip_models or (bm.DIFFUSEIT_CLIP if method == "diffuseit-text" else bm.BLENDED_CLIP)
        names = names if method == "diffuseit-text" else names[:1]
        clip, info["build_clip_s"] = bm.build_clip(names, str(dev), tiny, DTYPES[clip_dtype])
        if recipe.clip_checkpoint:
            checkpoint_clip(clip)
        info["clip_models"] = list(names)
    # the preset's terms, schedule, options and blend: shared with the tests' tiny runs (core.tiny_models)
    run = preset_terms(method, ddpm, source, dino=dino, clip=clip, ncuts=ncuts, seed=seed, resample_steps=steps)
    schedule, options, terms, blend, diff_iter = run.schedule, run.options, run.terms, run.blend, run.diff_iter
    info["ncuts"] = ncuts
    info["clip_dtype"] = clip_dtype if (method != "diffuseit-image") else None
    b = Bench(method, recipe, dev, ddpm, call, schedule, options, source, terms, blend, diff_iter, info)
    t0 = time.perf_counter()
    with torch.no_grad():
        for size in sorted({1 if recipe.serial else batch, batch}):
            for term in terms:
                if _is_clip(term):
                    b.prepare(term, source[:size])
    info["clip_prepare_s"] = time.perf_counter() - t0
    return b


class _Stop(Exception):
    pass


def pack_steps(b: Bench, n_steps: int, on_step: Callable[[int], None], seed: int = 0) -> None:
    """The pack's own guided_sample, stopped (through its callback) after n_steps."""
    def callback(info: dict) -> None:
        on_step(info["i"])
        if info["i"] + 1 >= n_steps:
            raise _Stop

    try:
        guided_sample(b.unet, b.schedule, b.source, [_CachedTerm(t, b) for t in b.terms], seed=seed, options=b.options, blend=b.blend,
                      callback=callback, learn_sigma=b.ddpm.learn_sigma)
    except _Stop:
        pass


# ------------------------------------------------------------------------------------ phases


def _grad_inputs(total: torch.Tensor, inputs: list) -> None:
    if total.requires_grad:
        torch.autograd.grad(total, inputs, allow_unused=True)


def measure_phases(b: Bench, repeat: int, seed: int = 0) -> dict:
    """Median seconds of each phase of one step for the whole batch (summed over row groups)."""
    batch = b.source.shape[0]
    groups = [[r] for r in range(batch)] if b.recipe.serial else [list(range(batch))]
    runs = [RowRun(b, rows, seed) for rows in groups]
    timer = Timer(b.device)
    top = program(b.schedule, b.options)[0][0]
    samples: dict[str, list] = {k: [] for k in ("unet_nograd", "unet_fwd", "unet_bwd", "dino", "dino_off", "clip")}
    has_dino = any(_is_dino(t) for t in b.terms)
    has_clip = any(_is_clip(t) for t in b.terms)
    for _ in range(repeat):
        acc = {k: [] for k in samples}
        for run in runs:
            n = len(run.rows)
            t_index = torch.full((n,), top, device=b.device, dtype=torch.long)
            x = run.x.detach()
            with torch.no_grad(), timer(acc["unet_nograd"]):
                model_output(b.unet, x, t_index, b.schedule).float()
            x_in = x.clone().requires_grad_(True)
            with torch.enable_grad():
                with timer(acc["unet_fwd"]):
                    out = model_output(b.unet, x_in, t_index, b.schedule).float()
                    mv = p_mean_variance(b.schedule, out, x_in, t_index, b.options.clip_denoised)
                cot = torch.randn_like(mv.pred_xstart) * 1e-3
                with timer(acc["unet_bwd"]):
                    torch.autograd.grad(mv.pred_xstart, x_in, cot)
            x0_fixed = mv.pred_xstart.detach()
            for name, pick, k in (("dino", _is_dino, top), ("dino_off", _is_dino, 0), ("clip", _is_clip, top)):
                if (name.startswith("dino") and not has_dino) or (name == "clip" and not has_clip):
                    continue
                ti = torch.full((n,), k, device=b.device, dtype=torch.long)
                x0 = x0_fixed.clone().requires_grad_(True)
                xt = x.clone().requires_grad_(True)
                ctx = run.context(ti, xt, 0, dataclasses.replace(run.state, dino_features={}))
                with torch.enable_grad(), timer(acc[name]):
                    prepared = run.prepared_for_step(pick)
                    total = sum(p(x0, ctx).float().sum() for p in prepared)
                    _grad_inputs(total, [x0, xt])
        for k, v in acc.items():
            if v:
                samples[k].append(sum(v))
    return {k: statistics.median(v) for k, v in samples.items() if v}


# -------------------------------------------------------------------------------------- main


def memory_now(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == "cuda" else bm.rss_mb()


def run(args: argparse.Namespace) -> dict:
    recipe = parse_set(replace(MODES[args.mode], dtype=args.dtype if args.dtype else MODES[args.mode].dtype,
                               compile=args.compile or MODES[args.mode].compile,
                               grad_checkpoint=args.grad_checkpoint or MODES[args.mode].grad_checkpoint,
                               channels_last=args.channels_last or MODES[args.mode].channels_last), args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK["name"] = args.clock
    clip_models = [m for m in args.clip_models.split(",") if m] if args.clip_models else None
    load0 = load_average()
    snap0 = cpu_snapshot()
    n_total = args.warmup + args.steps
    with attention_patch(recipe.sdpa), torch.inference_mode(False):
        b = setup(args.method, recipe, args.batch, steps=n_total, clip_models=clip_models, ncuts=args.ncuts,
                  tiny=args.tiny, device=args.device, seed=args.seed)
        dev = b.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        mem_models = memory_now(dev)
        stamps: list[tuple[float, float]] = []  # (wall, process CPU) after set-up / each step

        def on_step(i: int) -> None:
            sync(dev)
            stamps.append((time.perf_counter(), time.process_time()))

        sync(dev)
        snap_t0 = cpu_snapshot()
        stamps.append((time.perf_counter(), time.process_time()))
        if recipe.pack_path:
            pack_steps(b, n_total, on_step, args.seed)
            first = 1  # stamps = [start, step0, step1, ...]; step 0 includes the terms' prepare
        else:
            recipe_steps(b, n_total, on_step, args.seed)
            first = 2  # stamps = [start, set-up done, step0, step1, ...]
        by_clock = {}
        for c, name in enumerate(("wall", "cpu")):
            times = [stamps[i + 1][c] - stamps[i][c] for i in range(first, len(stamps) - 1)]
            lead = stamps[first][c] - stamps[0][c]  # set-up + first step
            # the first step is the warm-up; with --warmup 0 it is measured too (set-up included)
            by_clock[name] = ([lead] + times) if args.warmup == 0 else times[args.warmup - 1:]
            by_clock[name + "_first"] = lead
        measured = by_clock[args.clock]
        prepare_and_first = by_clock[args.clock + "_first"]
        peak_steps = (torch.cuda.max_memory_allocated(dev) / 2 ** 20) if dev.type == "cuda" else bm.peak_rss_mb()
        snap_steps = cpu_snapshot()
        phases = measure_phases(b, args.repeat, args.seed) if args.repeat > 0 else {}
    step = statistics.median(measured) if measured else float("nan")
    calls = CALLS_PER_IMAGE[args.method]
    progs = program(b.schedule, b.options if args.method == "blended" else replace(b.options, resample_steps=10))
    inactive = sum(1 for k, _ in progs if b.diff_iter is not None and k <= b.diff_iter)
    used = ["unet_fwd", "unet_bwd", "dino", "clip"] + (["unet_nograd"] if recipe.two_forwards else [])
    phase_sum = sum(phases.get(k, 0.0) for k in used)
    dino_saving = max(0.0, phases.get("dino", 0.0) - phases.get("dino_off", phases.get("dino", 0.0)))
    per_image = (calls * step - inactive * dino_saving) / args.batch
    result = {
        "method": args.method, "mode": args.mode, "recipe": dataclasses.asdict(recipe), "batch": args.batch,
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "tiny": args.tiny,
        "clock": args.clock, "steps_measured": measured, "steps_wall_s": by_clock["wall"], "steps_cpu_s": by_clock["cpu"],
        "step_s": step, "prepare_and_first_step_s": prepare_and_first,
        "phases_s": phases, "other_s": step - phase_sum if phases else None,
        "calls_per_image": calls, "inactive_divergence_calls": inactive,
        "s_per_image_extrapolated": per_image,
        "memory_models_mb": mem_models, "peak_mb": peak_steps, "step_memory_mb": peak_steps - mem_models,
        "memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "RSS (VmHWM, process lifetime)",
        "load_avg": [load0, load_average()], "others_cpu_share_steps": others_cpu_share(snap_t0, snap_steps),
        "others_cpu_share_total": others_cpu_share(snap0, cpu_snapshot()), **b.info,
    }
    return result


def format_row(r: dict) -> str:
    ph = r["phases_s"]

    def f(k: str) -> str:
        return f"{ph[k]:.2f}" if k in ph else "-"

    nograd = f("unet_nograd") if r["recipe"]["two_forwards"] else f"({f('unet_nograd')})"
    other = f"{r['other_s']:.2f}" if r["other_s"] is not None else "-"
    return (f"| {r['method']} | {r['mode']} | {r['recipe']['dtype']} | {r['batch']} | {r['step_s']:.2f} | {nograd} | "
            f"{f('unet_fwd')} | {f('unet_bwd')} | {f('dino')} | {f('clip')} | {other} | "
            f"{r['s_per_image_extrapolated']:.0f} | {r['peak_mb']:.0f} | {r['step_memory_mb']:.0f} |")


HEADER = ("| method | mode | dtype | batch | step s | UNet fwd no-grad | UNet fwd | UNet bwd | DINO | CLIP | other | "
          "s/image (extrapolated) | peak MiB | step MiB |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=sorted(CALLS_PER_IMAGE), default="diffuseit-text")
    ap.add_argument("--mode", choices=sorted(MODES), default="fast")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="UNet body dtype (baseline: fp32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="measured guided steps")
    ap.add_argument("--warmup", type=int, default=1, help="guided steps run before measuring")
    ap.add_argument("--repeat", type=int, default=1, help="repeats of the separate phase timings (0 = skip)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    ap.add_argument("--grad-checkpoint", action="store_true", help="unet.gradient_checkpointing = True")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one recipe ingredient, e.g. two_forwards=1, sdpa=0, serial=1")
    ap.add_argument("--clip-models", default="", help="comma list (default: the method's; DiffuseIT: RN50,RN50x4,ViT-B-32,RN50x16,ViT-B-16)")
    ap.add_argument("--ncuts", type=int, default=8)
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or this process's CPU time (use with --threads 1 on a shared, busy CPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="append the result as one JSON line to this file")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if args.clock == "cpu" and (args.device or "").startswith("cuda"):
        raise SystemExit("--clock cpu measures host CPU time; on CUDA use --clock wall")
    result = run(args)
    print(HEADER)
    print(format_row(result))
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
