"""Per-row memory of one guided step: the chunk_size estimate against the measured growth.

For a tiny preset at a given size, prints what ``core.diffusion.batching.one_row_bytes`` estimates
(saved-for-backward bytes of a one-row step, times ``PEAK_PER_SAVED``) and what one step of ``batch``
rows really adds per extra row: CUDA ``max_memory_allocated`` on a GPU, the process's peak RSS
(``ru_maxrss``) on a CPU. ``PEAK_PER_SAVED`` is set from these ratios.

    python -m bench.row_memory --method diffuseit-image --size 256 --batch 5 [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource

import torch
import torch.nn.functional as F

from core.diffusion import memory
from core.diffusion.batching import one_row_bytes
from core.diffusion.guided_loop import guided_sample
from core.tiny_models import PRESET_METHODS, smooth_image, tiny_preset_run


class _Stop(Exception):
    pass


def _stop(info: dict) -> None:
    raise _Stop


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=PRESET_METHODS, default="diffuseit-image")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    run = tiny_preset_run(args.method, 1, device=device)
    source = smooth_image(0, args.size).to(device)
    options = dataclasses.replace(run.options, resample_steps=1, range_restart_threshold=None)
    blend = run.blend
    if blend is not None:
        blend = dataclasses.replace(blend, mask=F.interpolate(blend.mask, size=(args.size, args.size)))
    estimate = one_row_bytes(run.ddpm.unet, run.schedule, source, run.terms, options=options, blend=blend)

    def step(rows: int) -> None:
        try:
            guided_sample(run.ddpm.unet, run.schedule, source.repeat(rows, 1, 1, 1), run.terms, options=options,
                          blend=blend, callback=_stop)
        except _Stop:
            pass

    step(1)
    one = peak_bytes(device)
    step(args.batch)
    per_row = (peak_bytes(device) - one) / (args.batch - 1)
    saved = estimate / memory.PEAK_PER_SAVED
    print(json.dumps({"method": args.method, "size": args.size, "batch": args.batch, "device": str(device),
                      "saved_mb": round(saved / 2**20, 1), "estimate_mb": round(estimate / 2**20, 1),
                      "measured_mb": round(per_row / 2**20, 1), "measured_per_saved": round(per_row / saved, 3)}))


if __name__ == "__main__":
    main()
