"""Fault injection for the kill tests (NBFLOW_CRASH_AT): where the engine may be killed."""
from __future__ import annotations

import os
import signal


def _crash_point(name: str) -> None:
    """Fault injection for the kill tests: NBFLOW_CRASH_AT=<point>[:<nth>] kills us with SIGKILL."""
    spec = os.environ.get("NBFLOW_CRASH_AT", "")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    count = _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if count >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts: dict[str, int] = {}
