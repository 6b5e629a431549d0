"""Engine throughput against the raw JetStream floor, and engine memory over many runs.

Workflows are built as IR directly (no notebooks): task nodes with ``code = "pass"`` so they go
to a worker, and the worker is :mod:`nbflow.worker.noop`, which completes them instantly.
"""
from __future__ import annotations

import asyncio
import time

from nbflow.core.ir import Edge, Node, Workflow

from bench.harness import (Env, RunWatch, raw_chain, raw_fanout, rss_kb, wait_consumer)


def chain_workflow(n: int, name: str = "bench_chain") -> Workflow:
    ids = [f"s{i:04d}" for i in range(n)]
    nodes = [Node("start", "start")] + [Node(i, "task", code="pass") for i in ids] + \
        [Node("end", "end")]
    path = ["start", *ids, "end"]
    return Workflow(name, nodes=nodes, edges=[Edge(a, b) for a, b in zip(path, path[1:])]).validate()


def fanout_workflow(width: int, name: str = "bench_fanout") -> Workflow:
    ids = [f"p{i:03d}" for i in range(width)]
    nodes = [Node("start", "start")] + [Node(i, "task", code="pass") for i in ids] + \
        [Node("end", "end")]
    edges = [Edge("start", i) for i in ids] + [Edge(i, "end") for i in ids]
    return Workflow(name, nodes=nodes, edges=edges).validate()


async def _ready(env: Env, js) -> None:
    await wait_consumer(js, env.L.history_stream, env.L.engine_consumer, env)
    await wait_consumer(js, env.L.tasks_stream, env.L.worker_consumer("default"), env)


async def _nbflow_runs(env: Env, wf: Workflow, runs: int, timeout: float = 600.0,
                       window: int | None = None) -> tuple[float, dict]:
    """Submit ``runs`` runs of ``wf`` (at most ``window`` unfinished at once) and wait for all.
    Returns (seconds from the first submit to the last final snapshot, {run: snapshot})."""
    c = await env.connect()
    try:
        await _ready(env, c.js)
        watch = await RunWatch(c.nc, env.L).start()
        await c.put_workflow(wf)
        t0 = time.perf_counter()
        ids: list[str] = []
        if window is None or window >= runs:
            ids = list(await asyncio.gather(*(c.submit(wf, {}) for _ in range(runs))))
        else:
            for i in range(0, runs, window):
                batch = list(await asyncio.gather(*(c.submit(wf, {}) for _ in range(
                    min(window, runs - i)))))
                ids += batch
                await watch.wait(batch, timeout, env)
        snaps = await watch.wait(ids, timeout, env)
        dt = max(watch.final_at[r] for r in ids) - t0
        bad = [r for r, s in snaps.items() if s["state"] != "succeeded"]
        if bad:
            raise RuntimeError(f"{len(bad)} run(s) did not succeed: {snaps[bad[0]]['state']}")
        await watch.stop()
        return dt, snaps
    finally:
        await c.close()


async def _raw(env: Env, fn, *args) -> float:
    import nats

    from nbflow.nats.layout import Layout

    nc = await nats.connect(env.url)
    try:
        return await fn(nc, Layout(env.ns + "raw"), *args)
    finally:
        await nc.close()


async def engine_chain(size: str = "full") -> dict:
    n = {"tiny": 5, "quick": 200, "full": 200}[size]
    with Env("chain") as env:
        raw_s = await _raw(env, raw_chain, n)
        env.engine()
        env.noop_worker(concurrency=64)
        wf = chain_workflow(n)
        await _nbflow_runs(env, chain_workflow(3, "warmup"), 1)   # imports, consumers, caches
        nb_s, _ = await _nbflow_runs(env, wf, 1)
    nb_rate, raw_rate = n / nb_s, n / raw_s
    return {
        "engine_chain_steps": n,
        "engine_chain_steps_per_s": round(nb_rate, 1),
        "engine_chain_raw_steps_per_s": round(raw_rate, 1),
        "engine_chain_ms_per_step": round(1000 * nb_s / n, 2),
        "engine_chain_raw_ms_per_step": round(1000 * raw_s / n, 2),
        "engine_chain_ratio": round(nb_rate / raw_rate, 3),
    }


async def engine_fanout(size: str = "full") -> dict:
    runs, width = {"tiny": (3, 4), "quick": (50, 20), "full": (50, 20)}[size]
    with Env("fanout") as env:
        raw_s = await _raw(env, raw_fanout, runs, width)
        env.engine()
        env.noop_worker(concurrency=64)
        await _nbflow_runs(env, fanout_workflow(3, "warmup"), 2)
        nb_s, _ = await _nbflow_runs(env, fanout_workflow(width), runs)
    steps = runs * width
    nb_rate, raw_rate = steps / nb_s, steps / raw_s
    return {
        "engine_fanout_runs": runs, "engine_fanout_width": width,
        "engine_fanout_steps_per_s": round(nb_rate, 1),
        "engine_fanout_raw_steps_per_s": round(raw_rate, 1),
        "engine_fanout_wall_s": round(nb_s, 3),
        "engine_fanout_ratio": round(nb_rate / raw_rate, 3),
    }


async def memory(size: str = "full") -> dict:
    """Engine RSS (child process, /proc VmRSS) before and after many one-task no-op runs."""
    n = {"tiny": 20, "quick": 1000, "full": 10_000}[size]
    warm = min(200, n)
    with Env("memory") as env:
        eng = env.engine()
        env.noop_worker(concurrency=64)
        wf = chain_workflow(1, "bench_one")
        await _nbflow_runs(env, wf, warm, window=100)
        await asyncio.sleep(0.5)
        before = rss_kb(eng.pid)
        t0 = time.perf_counter()
        await _nbflow_runs(env, wf, n, window=250, timeout=1800)
        dt = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        after = rss_kb(eng.pid)
    return {
        "memory_runs": n,
        "memory_runs_per_s": round(n / dt, 1),
        "engine_rss_before_mb": round(before / 1024, 1),
        "engine_rss_after_mb": round(after / 1024, 1),
        "engine_rss_growth_pct": round(100.0 * (after - before) / before, 1) if before else None,
    }
