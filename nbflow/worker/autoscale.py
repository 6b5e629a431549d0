"""Warm kernels that follow demand, and what a worker reports about itself.

``nbflow worker --min-kernels 1 --max-kernels N``: every tick the scaler reads the queue's
pending count (the consumer info's ``num_pending``: tasks no worker has taken yet) and the tasks
in flight here, and sizes the kernel pool to ``in flight + pending`` within [min, max] — growing
at once, shrinking one kernel per tick only after ``idle_s`` without demand for it. A kernel is
added only while the host keeps ``reserve_mb`` of memory available (``MemAvailable``) and, with
``--max-memory``, while the worker's process tree stays under it. The worker takes at most as
many tasks as it has kernels, so pending tasks stay in the queue for other workers.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

log = logging.getLogger("nbflow.worker.autoscale")


# --- memory (Linux /proc; elsewhere the figures are 0 and memory bounds are not applied) ------

def rss_kb(pid: int) -> int:
    """VmRSS of a process in kB (0 if it is gone, or where /proc is not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def tree_rss_mb(pid: int | None = None) -> float:
    """RSS of a process and all its descendants (the worker and its kernels), in MB."""
    todo, seen, kb = [pid or os.getpid()], set(), 0
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        kb += rss_kb(p)
        todo += _children(p)
    return kb / 1024


def available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# --- the scaler --------------------------------------------------------------------------------

class Scaler:
    def __init__(self, pool, *, min_kernels: int = 1, max_kernels: int = 4,
                 idle_s: float | None = None, reserve_mb: float | None = None,
                 max_memory_mb: float | None = None, tick_s: float = 0.5):
        if min_kernels < 1 or max_kernels < min_kernels:
            raise ValueError(f"need 1 <= --min-kernels <= --max-kernels "
                             f"(got {min_kernels} and {max_kernels})")
        self.pool = pool
        self.min, self.max = min_kernels, max_kernels
        self.idle_s = float(os.environ.get("NBFLOW_SCALE_IDLE_S", "30")) if idle_s is None \
            else idle_s
        self.reserve_mb = float(os.environ.get("NBFLOW_SCALE_RESERVE_MB", "512")) \
            if reserve_mb is None else reserve_mb
        self.max_memory_mb = max_memory_mb
        self.tick_s = tick_s
        self.kernels = min_kernels                # the pool's size now
        self._wanted_at = time.monotonic()        # last time demand needed all current kernels
        self.peak = self.kernels
        self.held_by_memory = 0                   # ticks a wanted kernel was not started
        self.pool.resize(self.kernels)

    @property
    def capacity(self) -> int:
        """How many tasks this worker may hold at once: one per kernel."""
        return self.kernels

    def _memory_allows(self) -> bool:
        avail = available_mb()
        per_kernel = 80.0                          # ~67 MB measured, plus headroom
        if avail is not None and avail - per_kernel < self.reserve_mb:
            return False
        if self.max_memory_mb is not None:
            return tree_rss_mb() + per_kernel <= self.max_memory_mb
        return True

    def decide(self, in_flight: int, pending: int) -> int:
        """The pool size for this tick (and apply it)."""
        want = min(self.max, max(self.min, in_flight + pending))
        now = time.monotonic()
        new = self.kernels
        if want >= self.kernels:
            self._wanted_at = now
        if want > self.kernels:
            while new < want and self._memory_allows_n(new + 1):
                new += 1
            if new < want:
                self.held_by_memory += 1
        elif want < self.kernels and now - self._wanted_at >= self.idle_s:
            new = self.kernels - 1                 # one per tick: demand may come back
            self._wanted_at = now
        if new != self.kernels:
            log.info("kernels %d -> %d (in flight %d, pending %d)", self.kernels, new,
                     in_flight, pending)
            self.kernels = new
            self.peak = max(self.peak, new)
        self.pool.resize(new)                      # also trims kernels released over the size
        return new

    def _memory_allows_n(self, n: int) -> bool:
        return n <= self.min or self._memory_allows()

    async def run(self, pending, in_flight) -> None:
        """Every tick: ``await pending()`` (the queue's undelivered count), ``in_flight()``."""
        while True:
            try:
                p = await pending()
            except Exception as e:  # noqa: BLE001 - reconnecting: keep the current size
                log.debug("consumer info failed: %s", e)
                p = None
            if p is not None:
                self.decide(in_flight(), p)
            else:
                self.pool.resize(self.kernels)     # still trim kernels released meanwhile
            await asyncio.sleep(self.tick_s)
