"""Timers and machine facts for the bench: wall or process-CPU clock, CUDA syncs, contention figures."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = {"name": "wall"}  # set by run(); "cpu" = this process's CPU time (robust on a shared, busy machine)


def clock() -> float:
    return CLOCKS[CLOCK["name"]]()


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def __call__(self, out: list):
        sync(self.device)
        t0 = clock()
        yield
        sync(self.device)
        out.append(clock() - t0)


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, machine busy CPU-s from /proc/stat, this process's CPU-s) for the contention figure."""
    busy = float("nan")
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        busy = (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime


def others_cpu_share(start: tuple[float, float, float], end: tuple[float, float, float]) -> float:
    """Fraction of the machine's CPU capacity used by *other* processes between two snapshots."""
    wall = end[0] - start[0]
    cores = os.cpu_count() or 1
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, others) / (wall * cores) if wall > 0 else float("nan")


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
