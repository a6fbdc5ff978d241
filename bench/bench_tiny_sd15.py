"""Cost of the tiny SD1.5 checkpoint: writing it, and loading and sampling it in a real ComfyUI (CPU).

    python bench/bench_tiny_sd15.py [--steps 4] [--size 64] [--json out.json]

Writes ``checkpoints/tiny_sd15.safetensors`` (``core.tiny_sd``) into a temporary models folder
(process CPU time, wall time, peak RSS growth of the writer, file size), adds the TAESD pairs, then
runs ``tests/e2e/tiny_sd15_check.py`` with the e2e tests' ComfyUI (``tests/e2e/comfy_env``): Load
Checkpoint time, CLIP Text Encode time, KSampler seconds per step (euler, CFG 7, batch 1, after a
warm-up run), VAE Decode time, each as wall and process-CPU seconds. Wall times on a shared machine include waiting for a core; the load
average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    from core import tiny_sd
    from e2e import comfy_env

    row: dict = {"load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="tiny-sd15-bench-") as models:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu0, wall0 = time.process_time(), time.perf_counter()
        path = tiny_sd.write_tiny_sd15(os.path.join(models, tiny_sd.SD15_FOLDER))
        row["write_cpu_s"], row["write_wall_s"] = time.process_time() - cpu0, time.perf_counter() - wall0
        row["write_peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        row["file_mb"] = path.stat().st_size / 1e6
        row["parameters_m"] = tiny_sd.sd15_layout()["parameters"] / 1e6
        tiny_sd.write_tiny_vae_approx(os.path.join(models, "vae_approx"))
        env = comfy_env.ensure_comfy()
        clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        proc = subprocess.run([str(env.python), os.path.join(ROOT, "tests", "e2e", "tiny_sd15_check.py"),
                               str(env.comfy_dir), models, "--steps", str(args.steps), "--size", str(args.size)],
                              capture_output=True, text=True, env=clean)
        if proc.returncode != 0:
            sys.exit(f"ComfyUI run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        check = json.loads(proc.stdout.strip().splitlines()[-1])
    row["model_type"] = check["model_type"]
    row.update({f"{k}{clock}": check[f"{k}{clock}"] for k in ("load", "encode", "step", "vae_decode")
                for clock in ("_s", "_cpu_s")})
    row["comfyui"], row["steps"], row["size"] = env.version, args.steps, args.size
    for key, value in row.items():
        print(f"{key:>26}: {value:.3f}" if isinstance(value, float) else f"{key:>26}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
