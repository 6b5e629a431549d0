"""The runs console under a large history: page load times with 10,000 runs.

Synthetic history: run snapshots of a real workflow (prepare -> publish with an approval) are
written to the runs bucket as the engine would leave them (93% succeeded, 5% failed, 2% waiting
for approval), so no engine or worker is needed. The console (the same tornado app as
`nbflow ui`) runs in this process; pages are fetched over HTTP from a thread, one at a time.

    python -m bench --only console_load          # or: python -m bench.console_bench [N]
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import urllib.request

from bench.harness import Env

PAGES = ["inbox", "runs", "runs?state=failed", "runs?notebook=console_bench&offset=5000",
         "run", "schedules", "workers", "metrics"]


def _workflow():
    from nbflow.core.ir import Edge, Node, Workflow

    nodes = [Node("start", "start"), Node("prepare", "task", code="report = 1", outputs=["report"]),
             Node("publish", "task", code="print(report)", inputs=["report"],
                  sources={"report": "prepare"}, approval="Publish?"),
             Node("end", "end")]
    edges = [Edge("start", "prepare"), Edge("prepare", "publish", data=["report"]),
             Edge("publish", "end")]
    return Workflow("console_bench", nodes=nodes, edges=edges).validate()


def _snapshot(i: int, wf_hash: str, now: float, rng: random.Random) -> dict:
    started = now - (10_000 - i) * 60 - rng.random() * 30
    roll = rng.random()
    state = "running" if roll < 0.02 else ("failed" if roll < 0.07 else "succeeded")
    t1 = started + 0.2 + rng.random()
    t2 = t1 + 1 + rng.random() * 5
    tasks = {"prepare": {"key": "prepare", "node": "prepare", "state": "succeeded",
                         "queued": started, "started": started + 0.1, "finished": t1,
                         "worker": f"w-{i % 4}", "outputs": {"report": f"o.{i}"},
                         "lens": {"report": 3}, "notebook": f"nb.{i}"}}
    nodes = {"start": {"state": "succeeded", "started": started, "finished": started},
             "prepare": {"state": "succeeded", "started": started, "finished": t1},
             "publish": {"state": "awaiting_approval", "started": t1,
                         "approval": {"prompt": "Publish?", "state": "pending"}},
             "end": {"state": "pending"}}
    if state != "running":
        ok = state == "succeeded"
        tasks["publish"] = {"key": "publish", "node": "publish",
                            "state": "succeeded" if ok else "failed", "queued": t1 + 1,
                            "started": t1 + 1.1, "finished": t2, "worker": f"w-{i % 4}",
                            "error": "" if ok else "ValueError: bad"}
        nodes["publish"] = {"state": "succeeded" if ok else "failed", "started": t1,
                            "finished": t2,
                            "approval": {"prompt": "Publish?", "state": "approved",
                                         "by": "ann", "at": t1 + 1}}
        nodes["end"] = {"state": "succeeded" if ok else "pending"}
    return {"run": f"r{i:07d}", "wf": wf_hash, "name": "console_bench", "params": {"day": i},
            "state": state, "started": started, "finished": None if state == "running" else t2,
            "by": "bench", "seq": 10, "events": 10, "nodes": nodes, "tasks": tasks}


def _get(url: str) -> tuple[float, int]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        r.read()
        code = r.status
    return time.perf_counter() - t, code


def _p(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[max(0, min(len(v) - 1, int(round(q / 100 * len(v) + 0.5)) - 1))]


async def console_load(size: str = "full", runs: int | None = None, loads: int = 20) -> dict:
    """Page load p50/p95 (ms) per page with ``runs`` runs (10,000 full, 2,000 quick, 200 tiny)
    in history; the goal is p95 < 300 ms for every page."""
    from nbflow.console.index import Console
    from nbflow.console.standalone import make_app
    from nbflow.stack import free_port

    n = runs or {"tiny": 200, "quick": 2000, "full": 10_000}[size]
    loads = 5 if size == "tiny" else loads
    rng = random.Random(7)
    with Env("console") as env:
        c = await env.connect()
        h = await c.put_workflow(_workflow())
        # run records are the engine's to write (the owner may only read them)
        raw = await env.raw_connect()
        kv = await raw.jetstream().key_value(env.L.runs_bucket)
        now = time.time()
        t0 = time.perf_counter()
        # in bursts of 100: 500 puts in flight at once timed out on the embedded stack's
        # fsync-per-write store (the full bench failed here)
        for start in range(0, n, 100):
            await asyncio.gather(*(kv.put(f"r{i:07d}", json.dumps(_snapshot(i, h, now, rng)).encode())
                                   for i in range(start, min(n, start + 100))))
        write_s = time.perf_counter() - t0
        await raw.close()
        await c.close()

        # the console connects as the stack's owner (a viewer would do): its credentials by
        # the environment, as a console started by `nbflow ui` on a server finds them
        if env.auth:
            os.environ.update(env.role_env(env.owner))
        console = Console(env.url, env.ns)
        app = make_app(console, "bench", "bench-user")
        port = free_port()
        server = app.listen(port, "127.0.0.1")
        try:
            t0 = time.perf_counter()
            await console.wait_ready(timeout=300)
            index_s = time.perf_counter() - t0
            assert len(console.runs) == n, (len(console.runs), n)
            base = f"http://127.0.0.1:{port}/nbflow/"
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _get, base + "inbox?token=bench")   # warm up
            ids = [f"r{rng.randrange(n):07d}" for _ in range(loads)]
            out: dict[str, float] = {"console_runs": n, "console_write_s": round(write_s, 2),
                                     "console_index_s": round(index_s, 2)}
            worst = 0.0
            for page in PAGES:
                times = []
                for k in range(loads):
                    path = f"runs/{ids[k]}" if page == "run" else page
                    url = base + path + ("&" if "?" in path else "?") + "token=bench"
                    secs, code = await loop.run_in_executor(None, _get, url)
                    assert code == 200, (url, code)
                    times.append(secs * 1000)
                key = page.split("?")[0] + ("_filtered" if "?" in page else "")
                if page.startswith("runs?notebook"):
                    key = "runs_page51"
                out[f"console_{key}_ms_p50"] = round(_p(times, 50), 1)
                out[f"console_{key}_ms_p95"] = round(_p(times, 95), 1)
                worst = max(worst, _p(times, 95))
            out["console_page_ms_p95_worst"] = round(worst, 1)
            return out
        finally:
            server.stop()
            await console.close()
            for k in ("NBFLOW_NATS_USER", "NBFLOW_NATS_PASSWORD"):
                os.environ.pop(k, None)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    res = asyncio.run(console_load(runs=n))
    for k, v in res.items():
        print(f"{k:40} {v}")
