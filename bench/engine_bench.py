"""Engine throughput against the raw JetStream floor, and engine memory over many runs.

Workflows are built as IR directly (no notebooks): task nodes with ``code = "pass"`` so they go
to a worker, and the worker is :mod:`nbflow.worker.noop`, which completes them instantly.
"""
from __future__ import annotations

import asyncio
import os
import sys
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


def map_workflow(n: int, name: str = "bench_map") -> Workflow:
    """One ``--map`` node over a parameter list of ``n`` items: what a user's map over a
    parameter costs (each instance's task message carries its element, not the list)."""
    nodes = [Node("start", "start"), Node("m", "task", code="pass", map_var="i", map_over="items"),
             Node("end", "end")]
    return Workflow(name, nodes=nodes, edges=[Edge("start", "m"), Edge("m", "end")],
                    params={"items": [0] * n}).validate()


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
        watch = await env.watch()
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


async def _raw(env: Env, fn, *args, suffix: str = "") -> float:
    from nbflow.nats.layout import Layout

    nc = await env.raw_connect()
    try:
        return await fn(nc, Layout(env.ns + "raw" + suffix), *args)
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
    """Engine RSS (child process, /proc VmRSS) before and after many one-task no-op runs.

    The warm-up runs as many runs at once as the measurement (two windows of 250): what is
    measured is what the engine keeps per finished run, not the high-water mark of more runs
    in flight than during the warm-up (a warm-up of 200 runs, 100 at a time, then 250 at a
    time, read as +13 % with the engine flat from the first 1,000 runs on)."""
    n = {"tiny": 20, "quick": 1000, "full": 10_000}[size]
    window = 250
    warm = min(2 * window, n)
    with Env("memory") as env:
        eng = env.engine()
        env.noop_worker(concurrency=64)
        wf = chain_workflow(1, "bench_one")
        await _nbflow_runs(env, wf, warm, window=window)
        await asyncio.sleep(0.5)
        before = rss_kb(eng.pid)
        t0 = time.perf_counter()
        await _nbflow_runs(env, wf, n, window=window, timeout=1800)
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


async def scaling(size: str = "full", chains: tuple[int, ...] | None = None,
                  maps: tuple[int, ...] | None = None) -> dict:
    """Per-step cost against run size (no-op workers): a chain at 10/100/1,000 steps and a
    ``--map`` at 10/100/1,000/10,000 instances, each beside its raw JetStream floor of the same
    size. chain_flatness = ms/step at the largest chain / at the smallest (1.0: flat)."""
    chains = chains or {"tiny": (5, 20), "quick": (10, 100, 1000), "full": (10, 100, 1000)}[size]
    maps = maps or {"tiny": (10, 50), "quick": (10, 100, 1000, 10_000),
                    "full": (10, 100, 1000, 10_000)}[size]
    out: dict = {}
    with Env("scaling") as env:
        await _raw(env, raw_chain, 5, suffix="warm")     # connections, streams, first paths
        raw_c = {n: await _raw(env, raw_chain, n, suffix=f"c{n}") for n in chains}
        raw_m = {n: await _raw(env, raw_fanout, 1, n, suffix=f"m{n}") for n in maps}
        env.engine()
        env.noop_worker(concurrency=256)
        await _nbflow_runs(env, chain_workflow(3, "warmup"), 1)
        for n in chains:
            nb_s, _ = await _nbflow_runs(env, chain_workflow(n, f"chain{n}"), 1)
            out[f"scaling_chain_{n}_ms_per_step"] = round(1000 * nb_s / n, 2)
            out[f"scaling_chain_{n}_raw_ms_per_step"] = round(1000 * raw_c[n] / n, 2)
            out[f"scaling_chain_{n}_ratio"] = round(raw_c[n] / nb_s, 3)
            print(f"[scaling] chain {n}: {1000 * nb_s / n:.2f} ms/step "
                  f"(floor {1000 * raw_c[n] / n:.2f})", file=sys.stderr, flush=True)
        for n in maps:
            nb_s, _ = await _nbflow_runs(env, map_workflow(n, f"map{n}"), 1, timeout=1800)
            out[f"scaling_map_{n}_s"] = round(nb_s, 3)
            out[f"scaling_map_{n}_ms_per_task"] = round(1000 * nb_s / n, 3)
            out[f"scaling_map_{n}_raw_ms_per_task"] = round(1000 * raw_m[n] / n, 3)
            out[f"scaling_map_{n}_ratio"] = round(raw_m[n] / nb_s, 3)
            print(f"[scaling] map {n}: {nb_s:.2f} s, {1000 * nb_s / n:.2f} ms/task "
                  f"(floor {1000 * raw_m[n] / n:.2f})", file=sys.stderr, flush=True)
    lo, hi = min(chains), max(chains)
    out["chain_flatness"] = round(out[f"scaling_chain_{hi}_ms_per_step"] /
                                  out[f"scaling_chain_{lo}_ms_per_step"], 2)
    if "scaling_chain_1000_ratio" in out:
        out["engine_chain_1000_ratio"] = out["scaling_chain_1000_ratio"]
    if "scaling_map_10000_s" in out:
        out["map10k_s"] = out["scaling_map_10000_s"]
    out["scaling_loadavg_1m"] = round(os.getloadavg()[0], 1)
    return out
