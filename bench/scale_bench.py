"""Workers that scale with demand: a --map on one worker whose kernels grow 1 -> 8 with the
queue, against the same worker with 8 fixed slots (the default shape: 8 slots + 1 spare = 9
warm kernels). Figures: wall time (submit -> run final), peak and idle RSS of the worker's
process tree (worker + kernels), peak kernels.

``python -m bench --only autoscale`` or, from Python, ``asyncio.run(autoscale("quick"))``.
"""
from __future__ import annotations

import asyncio
import os
import time

from bench.harness import Env, cmdline, descendants, rss_kb
from bench.notebook_bench import _connected, map_notebook

MAX_KERNELS = 8


def _tree(pid: int) -> tuple[float, int]:
    """(RSS MB of the process and its descendants, live kernels among them)."""
    kids = descendants(pid)
    kb = rss_kb(pid) + sum(rss_kb(k) for k in kids)
    return kb / 1024, sum(1 for k in kids if "ipykernel" in cmdline(k))


async def _sampled(env: Env, c, watch, path: str, pid: int) -> tuple[float, float, int]:
    """Run the notebook, sampling the worker tree every 250 ms: (seconds, peak MB, peak kernels)."""
    from nbflow.compiler import compile_notebook

    wf = compile_notebook(path)
    await c.put_workflow(wf)
    peak_mb, peak_k = 0.0, 0
    t0 = time.perf_counter()
    run = await c.submit(wf, {})
    waiter = asyncio.create_task(watch.wait([run], 3600, env))
    while not waiter.done():
        mb, k = _tree(pid)
        peak_mb, peak_k = max(peak_mb, mb), max(peak_k, k)
        await asyncio.sleep(0.25)               # a /proc scan is not free on a loaded host
    snap = waiter.result()[run]
    if snap["state"] != "succeeded":
        raise RuntimeError(f"run {run} {snap['state']}: {snap.get('error')}")
    return watch.final_at[run] - t0, peak_mb, peak_k


async def _until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.1)
    return False


async def autoscale(size: str = "full") -> dict:
    items, sleep = {"tiny": (16, 0.05), "quick": (200, 0.1), "full": (200, 0.1)}[size]
    out: dict = {"autoscale_items": items, "autoscale_task_sleep_s": sleep,
                 "autoscale_ideal_s": round(items * sleep / MAX_KERNELS, 3)}
    with Env("autoscale") as env:
        path = map_notebook(str(env.dir / "map.ipynb"), items, sleep)
        warm = map_notebook(str(env.dir / "warm.ipynb"), 2, 0.0)
        env.engine()
        shapes = (("fixed", ["--concurrency", str(MAX_KERNELS)], {}),
                  ("elastic", ["--min-kernels", "1", "--max-kernels", str(MAX_KERNELS)],
                   {"NBFLOW_SCALE_IDLE_S": "2"}))
        for label, args, wenv in shapes:
            p = env.spawn(label, ["-m", "nbflow", "worker", "--nats", env.url, "--namespace",
                                  env.ns, *args], wenv)
            c, watch = await _connected(env, 1)
            try:
                want = MAX_KERNELS + 1 if label == "fixed" else 1
                await _until(lambda: _tree(p.pid)[1] >= want, 120)
                from nbflow.compiler import compile_notebook

                w = compile_notebook(warm)                       # imports, first task paths
                await watch.wait([await c.submit(w, {})], 300, env)
                await _until(lambda: _tree(p.pid)[1] <= want, 60)   # elastic: back to 1
                idle_mb, idle_k = _tree(p.pid)
                dt, peak_mb, peak_k = await _sampled(env, c, watch, path, p.pid)
                out[f"autoscale_{label}_s"] = round(dt, 3)
                out[f"autoscale_{label}_peak_mb"] = round(peak_mb, 1)
                out[f"autoscale_{label}_idle_mb"] = round(idle_mb, 1)
                out[f"autoscale_{label}_idle_kernels"] = idle_k
                out[f"autoscale_{label}_peak_kernels"] = peak_k
                print(f"[autoscale] {label}: {dt:.1f} s, peak {peak_mb:.0f} MB, idle "
                      f"{idle_mb:.0f} MB, kernels idle {idle_k} peak {peak_k}", flush=True)
                if label == "elastic":
                    t0 = time.monotonic()
                    shrunk = await _until(lambda: _tree(p.pid)[1] <= 1, 60)
                    out["autoscale_elastic_shrink_s"] = round(time.monotonic() - t0, 1) \
                        if shrunk else None
            finally:
                await watch.stop()
                await c.close()
                env.stop(label)
    out["autoscale_time_ratio"] = round(out["autoscale_elastic_s"] / out["autoscale_fixed_s"], 3)
    out["autoscale_peak_mb_ratio"] = round(out["autoscale_elastic_peak_mb"] /
                                           out["autoscale_fixed_peak_mb"], 3)
    out["autoscale_loadavg_1m"] = round(os.getloadavg()[0], 1)   # the host was shared
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(asyncio.run(autoscale(sys.argv[1] if len(sys.argv) > 1 else "quick")),
                     indent=2))
