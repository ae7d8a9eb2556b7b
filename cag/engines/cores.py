"""CPU threads that hold up when other work keeps the cores busy.

A decoding step splits its matrix products over threads that wait for each other after every operation, and
a thread that waits spins. When another process holds a core, the spinning thread takes the time slice of
the one it waits for: on 2 cores kept busy by other work, 32 tokens took 9.2 s with 2 threads and 0.9 s with
1. So a model whose thread count the user did not set takes, at each step, as many threads as the cores that
other work leaves idle: all CPU time spent on this process's cores (/proc/stat) less this process's own, over
the last quarter second. On a quiet machine that is every core, as before. Each output row is computed
whole by one thread in both engines' kernels, so an answer is the same bits whatever the count (tested).
"""

from __future__ import annotations

import os
import threading
import time

EVERY_S = 0.25  # how often the cores are looked at again (two small /proc reads)


class Cores:
    """How many threads a step should take now: between 1 and `most`."""

    def __init__(self, most: int):
        self.most = max(1, most)
        self._cpus = _cpus()
        self._lock = threading.Lock()
        self._at, self._busy, self._own = time.monotonic(), _busy_s(self._cpus), time.process_time()
        self._advice = self.most

    def threads(self) -> int:
        now = time.monotonic()
        if now - self._at < EVERY_S or self._busy is None:
            return self._advice
        with self._lock:
            if now - self._at >= EVERY_S:
                busy, own = _busy_s(self._cpus), time.process_time()
                if busy is not None:
                    others = ((busy - self._busy) - (own - self._own)) / (now - self._at)
                    self._advice = min(self.most, max(1, int(len(self._cpus) - others + 0.5)))
                self._at, self._busy, self._own = now, busy, own
        return self._advice


def _cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_s(cpus: set[int]) -> float | None:
    """CPU seconds spent on `cpus` by anything (not idle, not waiting for I/O) since boot; None off Linux."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(x) for x in fields[:8]]
        total += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return total / _TICK
