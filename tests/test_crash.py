"""Crash safety, proven by killing real processes with SIGKILL: a worker mid-task, the engine
between receiving an event and acking it, and the nats-server itself mid-run. Each run still
finishes, and its history records exactly one success per task."""
from __future__ import annotations

import os
import signal
import time

import pytest

from support import check_replay, success_counts, wait_for
from nbhelpers import write_notebook

from nbflow.client import SyncClient
from nbflow.stack import NatsServer, Supervisor

FAST = {"NBFLOW_TASK_ACK_WAIT": "3", "NBFLOW_ENGINE_ACK_WAIT": "3"}


def chain_notebook(tmp_path, slow_s: float = 0.0):
    cells = ["%%task a\nx = 1"]
    cells.append(f"%%task b\nimport time\ntime.sleep({slow_s})\ny = x + 1")
    cells += ["%%task c\nz = y + 1", "%%task d\nprint(z)"]
    return write_notebook(tmp_path / "chain.ipynb", cells)


def finish(client, run, timeout=120):
    st = client.wait(run, timeout=timeout)
    check_replay(client, run)
    return st


@pytest.fixture
def crash_stack(nats_server, tmp_path, request):
    started = []

    def make(namespace, **kw):
        sup = Supervisor(nats_server.url, namespace=namespace, log_file=tmp_path / "stack.log",
                         env=FAST, **kw).start().supervise()
        started.append(sup)
        return sup
    yield make
    for s in started:
        s.stop()


def test_worker_killed_mid_task_is_redelivered(nats_server, crash_stack, tmp_path):
    sup = crash_stack("crash-worker", workers=2)
    with SyncClient(nats_server.url, namespace="crash-worker") as c:
        run = c.submit(str(chain_notebook(tmp_path, slow_s=3)), {})
        victim = wait_for(lambda: next((e["worker"] for e in c.history(run)
                                        if e.type == "TaskStarted" and e["key"] == "b"), None),
                          what="task b to start")
        pid = int(victim.rsplit("-", 1)[1])
        assert pid in sup.pids("worker")
        os.kill(pid, signal.SIGKILL)
        st = finish(c, run)
        assert st.state == "succeeded"
        assert success_counts(c, run) == {"a": 1, "b": 1, "c": 1, "d": 1}
        starts = [e["worker"] for e in c.history(run) if e.type == "TaskStarted" and e["key"] == "b"]
        assert len(starts) >= 2 and starts[0] == victim and starts[-1] != victim
        assert st.tasks["b"].attempt == 1          # a lost worker is not a failed attempt
        assert sup.restarts >= 1


@pytest.mark.parametrize("point", ["before_ack:3", "before_snapshot:3"])
def test_engine_killed_between_receiving_and_acking(nats_server, crash_stack, tmp_path, point):
    ns = "crash-engine-" + point.split(":")[0].replace("_", "-")
    sup = crash_stack(ns, workers=2, engine_env={"NBFLOW_CRASH_AT": point})
    with SyncClient(nats_server.url, namespace=ns) as c:
        runs = [c.submit(str(chain_notebook(tmp_path)), {}) for _ in range(3)]
        for run in runs:
            st = finish(c, run)
            assert st.state == "succeeded"
            assert success_counts(c, run) == {"a": 1, "b": 1, "c": 1, "d": 1}
        assert sup.restarts >= 1                   # the engine really died and came back


def test_nats_server_killed_mid_run_restarts_on_same_store(tmp_path):
    srv = NatsServer(tmp_path / "nats", sync_interval="1s").start()
    sup = Supervisor(srv.url, workers=2, namespace="crash-nats", env=FAST,
                     log_file=tmp_path / "stack.log").start().supervise()
    try:
        c = SyncClient(srv.url, namespace="crash-nats")
        run = c.submit(str(chain_notebook(tmp_path, slow_s=3)), {})
        wait_for(lambda: any(e.type == "TaskStarted" and e["key"] == "b" for e in c.history(run)),
                 what="task b to start")
        c.close()
        srv.kill()                                  # SIGKILL, mid-task
        srv = NatsServer(tmp_path / "nats", port=srv.port, sync_interval="1s").start()
        c = SyncClient(srv.url, namespace="crash-nats")
        st = finish(c, run, timeout=180)
        assert st.state == "succeeded"
        assert success_counts(c, run) == {"a": 1, "b": 1, "c": 1, "d": 1}
        c.close()
    finally:
        sup.stop()
        srv.stop()
