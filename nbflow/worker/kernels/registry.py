"""The process-global pools, one per kernel name and isolation: shaped by :func:`configure` or
the env vars ``NBFLOW_POOL_SIZE``, ``NBFLOW_ISOLATION``, ``NBFLOW_KERNEL``; started on first use
(:func:`get_pool`), all stopped at exit."""
from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from nbflow.worker.kernels.pool import ISOLATIONS, KernelPool

_config: dict[str, Any] = {}
_pools: dict[tuple[str, str], KernelPool] = {}
_pools_lock = threading.Lock()
_atexit = False


def _defaults() -> dict:
    return {
        "size": int(_config.get("size") or os.environ.get("NBFLOW_POOL_SIZE") or 2),
        "isolation": _config.get("isolation") or os.environ.get("NBFLOW_ISOLATION") or "run",
        "kernel_name": _config.get("kernel_name") or os.environ.get("NBFLOW_KERNEL") or "python3",
    }


def configure(size: int | None = None, isolation: str | None = None,
              kernel_name: str | None = None, concurrency: int | None = None) -> dict:
    """Set the process-global pool's shape (``concurrency`` slots -> size = slots + 1 spare).
    Existing pools whose shape changed are shut down; new ones start lazily on first use."""
    if isolation is not None and isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, not {isolation!r}")
    if concurrency is not None and size is None:
        size = concurrency + 1
    for k, v in (("size", size), ("isolation", isolation), ("kernel_name", kernel_name)):
        if v is not None:
            _config[k] = v
    d = _defaults()
    with _pools_lock:
        stale = [key for key, p in _pools.items() if p.size != d["size"]]
        old = [_pools.pop(key) for key in stale]
    for p in old:
        p.shutdown()
    return d


def get_pool(kernel_name: str | None = None, isolation: str | None = None) -> KernelPool:
    """The process-global pool for a kernel name and isolation (started on first use)."""
    global _atexit
    d = _defaults()
    key = (kernel_name or d["kernel_name"], isolation or d["isolation"])
    with _pools_lock:
        p = _pools.get(key)
        if p is None or p._closed:
            p = _pools[key] = KernelPool(size=d["size"], isolation=key[1], kernel_name=key[0])
            if not _atexit:
                atexit.register(shutdown_pool)
                _atexit = True
        return p


def live_kernels() -> int:
    """Kernels of every process-global pool (none are started by asking)."""
    with _pools_lock:
        ps = list(_pools.values())
    return sum(p.kernels for p in ps if not p._closed)


def ready_kernels() -> int:
    """Kernels of every process-global pool that are idle: ready for a task now."""
    with _pools_lock:
        ps = list(_pools.values())
    return sum(p.stats()["idle"] for p in ps if not p._closed)


def shutdown_pool() -> None:
    """Stop every pooled kernel of this process."""
    with _pools_lock:
        ps = list(_pools.values())
        _pools.clear()
    for p in ps:
        p.shutdown()
