"""One of the UNet's convolutions (256 -> 256 channels, 3x3, 64x64, batch 1) per dtype: is a dtype usable here?

    python -m bench.conv_dtype [--device cpu|cuda] [--repeat 5]

On CPUs without a native half-precision convolution kernel fp16 falls back to a slow reference path;
this prints the per-call time of fp32 / bf16 / fp16 so the full benchmark can skip a dtype that would
take hours (bench/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def time_conv(dtype: torch.dtype, device: str, repeat: int, threads: int = 0) -> float:
    if threads:
        torch.set_num_threads(threads)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device, dtype)
    x = torch.randn(1, 256, 64, 64, device=device, dtype=dtype)
    times = []
    with torch.no_grad():
        conv(x)
        for _ in range(repeat):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            conv(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print("| dtype | ms per conv | vs fp32 |\n|---|---:|---:|")
    ref = None
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        t = time_conv(dtype, args.device, args.repeat if name != "fp16" or args.device != "cpu" else 1, args.threads)
        ref = ref or t
        print(f"| {name} | {t * 1000:.1f} | {t / ref:.1f}x |")


if __name__ == "__main__":
    main()
