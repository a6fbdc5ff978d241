"""Back-to-back queue runs against one ComfyUI server, with the server's resident memory after each run.

A leak check, not a benchmark: :func:`soak` queues one prompt per run (the caller varies it, e.g. a new
seed, so ComfyUI's cache cannot answer it), waits for it to finish, and reads the resident set size
(``VmRSS`` in ``/proc/<pid>/status``) of the server process and every process below it. Linux only
(:func:`tree_rss` returns None elsewhere). Standard library only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .server import ComfyServer


def _status_kb(pid: int, field: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # "VmRSS:   123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from /proc/<pid>/stat's parent ids."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the fields after the last ')' are fixed
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def tree_rss(pid: int) -> Optional[tuple[int, int]]:
    """(resident kB of ``pid`` plus its descendants, number of processes), or None without /proc."""
    own = _status_kb(pid, "VmRSS")
    if own is None:
        return None
    procs = [pid] + descendants(pid)
    return sum(_status_kb(p, "VmRSS") or 0 for p in procs), len(procs)


def peak_rss_kb(pid: int) -> Optional[int]:
    """The process's own high-water mark (VmHWM)."""
    return _status_kb(pid, "VmHWM")


@dataclass
class SoakRow:
    run: int  # 1-based
    seconds: float  # wall time of this run (submit to finished)
    elapsed: float  # wall time since the first submit
    rss_mb: float  # server + descendants, after the run
    processes: int
    status: str


def soak(server: ComfyServer, make_prompt: Callable[[int], dict], runs: int, timeout: float = 300.0,
         on_row: Optional[Callable[[SoakRow], None]] = None) -> list[SoakRow]:
    """Queue ``make_prompt(i)`` for i = 0 .. runs-1 one after the other; one :class:`SoakRow` per run.
    Stops at the first run that does not succeed (its row says why)."""
    rows, start = [], time.monotonic()
    for i in range(runs):
        t0 = time.monotonic()
        result = server.run(make_prompt(i), timeout=timeout)
        measured = tree_rss(server.proc.pid) or (0, 0)
        row = SoakRow(run=i + 1, seconds=time.monotonic() - t0, elapsed=time.monotonic() - start,
                      rss_mb=measured[0] / 1024, processes=measured[1], status=result.status)
        if result.status != "success":
            row.status = f"{result.status}: {result.describe_error()}"
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if result.status != "success":
            break
    return rows
