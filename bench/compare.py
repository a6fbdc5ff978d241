"""Fast path vs official step structure, side by side: one bench_guided process per row, then ratios.

    python -m bench.compare --methods diffuseit-text,diffuseit-image,blended --batches 1,4 --dtypes fp32,bf16

Every configuration runs in a fresh ``python -m bench.bench_guided`` process (peak RSS is a
process-lifetime figure), in the order baseline first, then the fast variants, so neighbouring rows
see similar machine load; the JSON lines go to ``--out``. The baseline runs samples one after
another, so its seconds per image do not depend on the batch: it runs at ``--baseline-batches``
(default 1) and every fast row of a method is compared with it. ``--ablate KEY=VALUE[;KEY=VALUE]``
adds fast-mode rows with single official ingredients switched back (e.g. ``two_forwards=1``,
``recompute_source=1``, ``sdpa=0``), at the first batch and dtype. ``--in-process`` runs the rows in
this process (tests; memory figures then overlap).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_guided as bg  # noqa: E402
from bench import report  # noqa: E402


def bench_args(method: str, mode: str, dtype: str, batch: int, args: argparse.Namespace, sets: Sequence[str] = ()) -> list[str]:
    out = ["--method", method, "--mode", mode, "--dtype", dtype, "--batch", str(batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--repeat", str(args.repeat), "--ncuts", str(args.ncuts)]
    if args.clip_models:
        out += ["--clip-models", args.clip_models]
    if args.tiny:
        out.append("--tiny")
    if args.device:
        out += ["--device", args.device]
    if args.threads:
        out += ["--threads", str(args.threads)]
    out += ["--clock", args.clock]
    for flag in ("compile", "grad_checkpoint", "channels_last"):
        if getattr(args, flag) and mode == "fast":
            out.append("--" + flag.replace("_", "-"))
    for s in sets:
        out += ["--set", s]
    return out


def run_one(argv: list[str], in_process: bool) -> dict:
    if in_process:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            return bg.main(argv)
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as tmp:
        path = tmp.name
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.bench_guided", *argv, "--json", path], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            # a row that dies (e.g. killed by the kernel's OOM killer: return code -9) is reported, not fatal
            why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else f"exit code {proc.returncode}"
            tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln][-3:]
            print(f"  FAILED: {why} {' | '.join(tail)}", file=sys.stderr)
            return {"failed": why, "argv": argv, "stderr_tail": tail}
        with open(path) as f:
            return json.loads(f.readline())
    finally:
        os.unlink(path)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="diffuseit-text,diffuseit-image,blended")
    ap.add_argument("--batches", default="1,4", help="fast-mode batch sizes")
    ap.add_argument("--baseline-batches", default="1")
    ap.add_argument("--dtypes", default="fp32,bf16", help="fast-mode UNet dtypes (baseline is fp32)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--ncuts", type=int, default=8)
    ap.add_argument("--clip-models", default="")
    ap.add_argument("--ablate", action="append", default=[], help="KEY=VALUE[;KEY=VALUE] fast-mode variant")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--no-plain", action="store_true", help="only the --ablate rows of the fast mode")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--in-process", action="store_true")
    ap.add_argument("--out", default="", help="append every result as a JSON line")
    args = ap.parse_args(argv)

    plan: list[list[str]] = []
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = [int(b) for b in args.batches.split(",") if b]
    for method in [m for m in args.methods.split(",") if m]:
        if not args.skip_baseline:
            for batch in [int(b) for b in args.baseline_batches.split(",") if b]:
                plan.append(bench_args(method, "baseline", "fp32", batch, args))
        for dtype in dtypes if not args.no_plain else ():
            for batch in batches:
                plan.append(bench_args(method, "fast", dtype, batch, args))
        for ab in args.ablate:
            plan.append(bench_args(method, "fast", dtypes[0], batches[0], args, [s for s in ab.split(";") if s]))
    rows = []
    t0 = time.perf_counter()
    for argv_one in plan:
        print(f"[{time.perf_counter() - t0:6.0f} s] bench_guided {' '.join(argv_one)}", file=sys.stderr, flush=True)
        r = run_one(argv_one, args.in_process)
        rows.append(r)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(f"total wall time {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    report.print_report(rows)
    return rows


if __name__ == "__main__":
    main()
