"""The bench scripts' code paths on tiny models (no timing assertions), and fast == baseline numerically.

``bench/bench_guided.py`` and ``bench/compare.py`` run here with ``--tiny`` for one measured step so
they cannot rot. The official step structure the bench re-implements (two UNet forwards, serial rows,
per-step source features with one DINO forward per loss term, legacy attention) must give the same
guided mean and gradient as the pack's single pass: within 1e-4 relative in fp32. The bf16 UNet body
and fp16 UNet bodies and CLIP weights are compared with fp32 under the tolerances measured in bench/README.md.
"""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_guided as bg  # noqa: E402
from bench import compare  # noqa: E402
from core.diffusion.guided_loop import program  # noqa: E402

METHODS = ("diffuseit-text", "diffuseit-image", "blended")
FP32_RTOL = 1e-4
# Low-precision UNet body + CLIP weights vs fp32 on the tiny models at 64 px: measured relative L2 error of
# the guidance gradient over diffuseit-text / blended x seeds 0-2 (bench/README.md, "Accuracy"):
# bf16 3.2e-3 .. 4.0e-3, fp16 3.9e-4 .. 7.1e-4; asserted with a 5x margin
LOW_PRECISION_RTOL = {"bf16": 2e-2, "fp16": 4e-3}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast and immune to a busy machine's straggling threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def first_step(method: str, recipe: bg.Recipe, batch: int = 2, seed: int = 0):
    """Guided mean and gradient of the first step for every row, through RowRun (the bench's loop)."""
    with bg.attention_patch(recipe.sdpa):
        b = bg.setup(method, recipe, batch, steps=1, tiny=True, device="cpu", ncuts=2, seed=seed)
        groups = [[r] for r in range(batch)] if recipe.serial else [list(range(batch))]
        runs = [bg.RowRun(b, rows, seed) for rows in groups]
        k, _ = program(b.schedule, b.options)[0]
        outs = [run.step(0, k, False) for run in runs]
    return torch.cat([o["mean"] for o in outs]), torch.cat([o["grad"] for o in outs]), b


@pytest.mark.parametrize("method", METHODS)
def test_fast_equals_baseline_fp32(method):
    mean_f, grad_f, _ = first_step(method, bg.MODES["fast"])
    mean_b, grad_b, _ = first_step(method, bg.MODES["baseline"])
    assert grad_f.abs().max() > 0
    assert rel(grad_b, grad_f) < FP32_RTOL, f"gradient differs by {rel(grad_b, grad_f):.2e}"
    assert rel(mean_b, mean_f) < FP32_RTOL


def test_clip_checkpoint_same_gradient():
    _, grad_f, _ = first_step("diffuseit-text", bg.MODES["fast"], batch=1)
    _, grad_c, _ = first_step("diffuseit-text", bg.Recipe(clip_checkpoint=True), batch=1)
    assert rel(grad_c, grad_f) < 1e-6


def test_bench_loop_equals_guided_sample():
    """The bench's step loop with the fast recipe is the pack's guided_sample (same x after 2 steps)."""
    recipe = bg.MODES["fast"]
    b = bg.setup("diffuseit-image", recipe, 2, steps=2, tiny=True, device="cpu", ncuts=2)
    runs = bg.recipe_steps(b, 2, lambda i: None)
    xs = []

    def cb(info):
        xs.append(info["x"].clone())
        if info["i"] == 1:
            raise bg._Stop

    try:
        bg.guided_sample(b.unet, b.schedule, b.source, [bg._CachedTerm(t, b) for t in b.terms], options=b.options,
                         callback=cb)
    except bg._Stop:
        pass
    assert rel(runs[0].x, xs[-1]) < 1e-6


@pytest.mark.parametrize("dtype", sorted(LOW_PRECISION_RTOL))
@pytest.mark.parametrize("method", ("diffuseit-text", "blended"))
def test_low_precision_close_to_fp32(method, dtype):
    """The GPU setting: UNet body and CLIP weights in bf16/fp16, losses and the gradient in fp32."""
    _, grad32, _ = first_step(method, bg.MODES["fast"], batch=1)
    _, grad_lp, b = first_step(method, bg.Recipe(dtype=dtype, clip_dtype=dtype), batch=1)
    assert b.ddpm.unet.body_dtype == bg.DTYPES[dtype]
    clips = [m for t in b.terms for m in (getattr(t, "ensemble", None) or [getattr(t, "clip", None)]) if m is not None]
    assert clips and all(c.dtype == bg.DTYPES[dtype] for c in clips)
    assert grad_lp.dtype == torch.float32
    err = rel(grad_lp, grad32)
    assert 0 < err < LOW_PRECISION_RTOL[dtype], f"{dtype} gradient off by {err:.2e}"


def test_bench_guided_cli_tiny(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    result = bg.main(["--tiny", "--method", "diffuseit-text", "--mode", "baseline", "--steps", "1", "--warmup", "1",
                      "--batch", "1", "--ncuts", "2", "--repeat", "1", "--json", str(out), "--set", "serial=0"])
    assert result["recipe"]["serial"] is False and result["recipe"]["two_forwards"] is True
    assert len(result["steps_measured"]) == 1
    assert {"unet_fwd", "unet_bwd", "dino", "clip", "unet_nograd"} <= set(result["phases_s"])
    assert json.loads(out.read_text().splitlines()[0])["method"] == "diffuseit-text"
    assert "| diffuseit-text | baseline |" in capsys.readouterr().out


def test_compare_tiny(tmp_path, capsys):
    rows = compare.main(["--tiny", "--methods", "blended", "--batches", "1", "--dtypes", "fp32", "--steps", "1",
                         "--ncuts", "2", "--repeat", "0", "--in-process", "--out", str(tmp_path / "c.jsonl"),
                         "--ablate", "two_forwards=1"])
    text = capsys.readouterr().out
    assert "| speed-up |" in text and "fast + two_forwards=1" in text and len(rows) == 3
