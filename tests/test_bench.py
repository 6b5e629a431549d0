"""The benchmark harness runs end to end with tiny sizes and prints its figures as JSON.
No timing assertions: figures on a shared CI box mean nothing; their presence does."""
from __future__ import annotations

import json
import subprocess
import sys

from support import REPO


def test_engine_benches_run_tiny_and_print_json():
    p = subprocess.run([sys.executable, "-m", "bench", "--only", "engine_chain,engine_fanout",
                        "--tiny", "--json"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    d = json.loads(last)
    for k in ("engine_chain_steps_per_s", "engine_chain_raw_steps_per_s", "engine_chain_ratio",
              "engine_fanout_steps_per_s", "engine_fanout_raw_steps_per_s",
              "engine_fanout_ratio", "goals"):
        assert k in d, k
    assert d["engine_chain_ratio"] > 0 and d["engine_fanout_ratio"] > 0
    assert "engine_chain_ratio" in d["goals"]
    assert "engine_chain" in p.stdout and "ratio" in p.stdout     # the table came first


def test_json_line_starts_with_the_headline_figures_in_order_and_no_auth_is_a_switch():
    from bench import FIGURES

    p = subprocess.run([sys.executable, "-m", "bench", "--only", "scaling", "--tiny", "--json",
                        "--no-auth"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout.strip().splitlines()[-1])
    assert list(d)[:len(FIGURES)] == FIGURES
    assert d["chain_flatness"] > 0 and d["auth"] is False
    assert d["scaling_chain_5_ms_per_step"] > 0 and d["scaling_map_50_ms_per_task"] > 0


def test_noop_worker_completes_tasks_in_process():
    """The noop worker as an async class: a task message in, one TaskSucceeded out, task acked."""
    import asyncio

    from bench.harness import Env

    async def go(env):

        from nbflow.nats import infra
        from nbflow.nats.layout import MSG_ID
        from nbflow.worker.noop import NoopWorker

        nc = await env.raw_connect()          # the bench's servers have credentials
        js = nc.jetstream()
        w = NoopWorker(nc, env.L, concurrency=8, started=True)
        await w.start()
        task = asyncio.create_task(w.run())
        msg = {"v": 1, "run": "r1", "params": {}, "key": "a", "node": "a", "attempt": 1,
               "queue": "default", "wf": "x", "inputs": {}}
        await js.publish(env.L.task_subject("default", "r1"), json.dumps(msg).encode(),
                         headers={MSG_ID: "task.r1.a.1"})
        sub = await js.pull_subscribe(env.L.history_subject("r1"), durable="t",
                                      stream=env.L.history_stream)
        got = []
        for _ in range(50):
            try:
                got += [json.loads(m.data)["type"] for m in await sub.fetch(2, timeout=0.2)]
            except asyncio.TimeoutError:
                pass
            if len(got) >= 2:
                break
        w.stop()
        await task
        # acked: the work queue empties (the worker sends acks with its next write or within
        # 20 ms, and the server drops an acked work-queue message asynchronously: a stream
        # info right after the ack may still count it)
        for _ in range(100):
            info = await js.stream_info(env.L.tasks_stream)
            if info.state.messages == 0:
                break
            await asyncio.sleep(0.1)
        await nc.close()
        assert infra and got == ["TaskStarted", "TaskSucceeded"]
        assert info.state.messages == 0
        assert w.done == 1

    with Env("noop") as env:
        asyncio.run(go(env))


def test_task_overhead_split_adds_up_to_each_tasks_overhead():
    """The split is built from the completion events' phases: per task, the phases (the task
    cell taken out of ``cells``) plus ``between`` equal the task's overhead; an event without
    phases (an older worker) is left out of the split."""
    from bench.notebook_bench import PHASES, chain_overheads, overhead_split
    from nbflow.core.events import Event

    snap = {"started": 100.0, "tasks": {
        "a": {"key": "a", "finished": 100.050, "exec_s": 0.010},
        "b": {"key": "b", "finished": 100.090, "exec_s": 0.001},
        "c": {"key": "c", "finished": 100.200, "exec_s": 0.0}}}
    evs = [Event("TaskSucceeded", "r", {"key": "a", "attempt": 1,
                                        "phases": {"started": 2.0, "cells": 20.0, "upload_nb": 3.0}}),
           Event("TaskSucceeded", "r", {"key": "b", "attempt": 1, "phases_prev_tail": 4.0,
                                        "phases": {"started": 1.0, "cells": 12.0, "odd": 0.5}}),
           Event("TaskSucceeded", "r", {"key": "c", "attempt": 1})]
    split = overhead_split(snap, evs)
    _, over = chain_overheads(snap)
    assert [n for n, _ in PHASES] == list(split)
    for i in range(2):
        total = sum(xs[i] for xs in split.values())
        assert abs(total - over[i] * 1000) < 1e-6, (i, total, over[i])
    assert split["cells"][:2] == [10.0, 11.0] and split["prev_tail"][:2] == [0.0, 4.0]
    assert split["other"] == [0.0, 0.5] and len(split["started"]) == 2


def test_every_bench_has_table_rows_and_the_console_bench_runs_with_credentials():
    """The full `python -m bench` ran every bench, then crashed printing the table (the console
    bench had no rows), and the console bench wrote run records as the owner, which only the
    engine may do since the roles are enforced: neither printed a figure."""
    from bench import BENCHES
    from bench.__main__ import ROWS

    assert set(BENCHES) <= set(ROWS), set(BENCHES) - set(ROWS)
    p = subprocess.run([sys.executable, "-m", "bench", "--only", "console_load", "--tiny",
                        "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout.strip().splitlines()[-1])
    assert d["auth"] is True and d["console_runs"] == 200
    assert d["console_page_ms_p95_worst"] > 0 and "console_load_error" not in d
    assert "console_load" in p.stdout                 # its rows in the table
