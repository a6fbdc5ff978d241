"""Markdown tables from bench_guided JSON lines: every row, fast/baseline speed-ups, one-ingredient ablations.

    python -m bench.report bench/results/cpu.jsonl
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from typing import Iterable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_guided as bg  # noqa: E402


def label(r: dict) -> str:
    """mode, plus the recipe keys that differ from that mode's defaults (dtype shown in its own column)."""
    base = bg.MODES[r["mode"]]
    diff = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["recipe"].items()
            if hasattr(base, k) and getattr(base, k) != v and k != "dtype" and not (k == "clip_dtype" and v == "auto")]
    return r["mode"] + (f" + {', '.join(diff)}" if diff else "")


def _same_setting(a: dict, b: dict) -> bool:
    return (a["method"] == b["method"] and a.get("clip_models") == b.get("clip_models") and a["ncuts"] == b["ncuts"]
            and a["tiny"] == b["tiny"] and a["device"] == b["device"] and a.get("clock") == b.get("clock")
            and a["threads"] == b["threads"])


def _pct(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def rows_table(rows: Sequence[dict]) -> str:
    head, sep = bg.HEADER.split("\n")
    out = [head.replace("| mode |", "| variant |") + " others' CPU |", sep + "---:|"]
    for r in rows:
        line = bg.format_row(r).replace(f"| {r['mode']} |", f"| {label(r)} |", 1)
        out.append(line + f" {_pct(r.get('others_cpu_share_steps'))} |")
    return "\n".join(out)


def speedup_table(rows: Sequence[dict]) -> str:
    out = ["| method | fast variant | dtype | batch | fast s/image | baseline s/image | speed-up | peak MiB fast / baseline |",
           "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if label(r) != "fast":
            continue
        bases = [b for b in rows if label(b) == "baseline" and _same_setting(r, b)]
        if not bases:
            continue
        b = bases[0]
        speed = b["s_per_image_extrapolated"] / r["s_per_image_extrapolated"]
        out.append(f"| {r['method']} | {label(r)} | {r['recipe']['dtype']} | {r['batch']} | "
                   f"{r['s_per_image_extrapolated']:.0f} | {b['s_per_image_extrapolated']:.0f} | {speed:.2f}x | "
                   f"{r['peak_mb']:.0f} / {b['peak_mb']:.0f} |")
    return "\n".join(out)


def ablation_table(rows: Sequence[dict]) -> str:
    """Each fast variant against the plain fast rows of the same method / dtype / batch (median if repeated)."""
    out = ["| method | dtype | batch | variant | step s | plain fast step s | change | peak MiB (plain fast) |",
           "|---|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        if r["mode"] != "fast" or label(r) == "fast":
            continue
        plain = [p for p in rows if label(p) == "fast" and _same_setting(r, p) and p["batch"] == r["batch"]
                 and p["recipe"]["dtype"] == r["recipe"]["dtype"]]
        if not plain:
            continue
        ref = statistics.median(p["step_s"] for p in plain)
        ref_mem = statistics.median(p["peak_mb"] for p in plain)
        out.append(f"| {r['method']} | {r['recipe']['dtype']} | {r['batch']} | {label(r)} | {r['step_s']:.1f} | "
                   f"{ref:.1f} | {r['step_s'] / ref - 1:+.0%} | {r['peak_mb']:.0f} ({ref_mem:.0f}) |")
    return "\n".join(out)


def load(paths: Iterable[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def print_report(rows: Sequence[dict]) -> None:
    failed = [r for r in rows if "failed" in r]
    rows = [r for r in rows if "failed" not in r]
    for r in failed:
        print(f"failed: bench_guided {' '.join(r['argv'])}: {r['failed']}")
    if not rows:
        print("(no rows)")
        return
    r0 = rows[0]
    print(f"device: {r0['device']} ({r0['device_name']}), torch {r0['torch']}, threads {r0['threads']}, "
          f"clock {r0.get('clock', 'wall')}")
    print()
    print(rows_table(rows))
    print()
    print(speedup_table(rows))
    abl = ablation_table(rows)
    if abl.count("\n") > 1:
        print()
        print(abl)


def main(argv: Optional[Sequence[str]] = None) -> None:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        raise SystemExit("usage: python -m bench.report RESULTS.jsonl [...]")
    print_report(load(paths))


if __name__ == "__main__":
    main()
