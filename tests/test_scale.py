"""Outgrowing one machine: a hub without local workers, workers joining from elsewhere."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbhelpers import write_notebook
from support import finish, success_counts


def _children(pid: int) -> list[str]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [Path(f"/proc/{k}/cmdline").read_bytes().replace(b"\0", b" ").decode() for k in kids]


def test_up_with_zero_workers_is_a_hub_and_a_worker_joining_later_runs_the_tasks(tmp_path,
                                                                                 monkeypatch):
    from nbflow.client import SyncClient
    from nbflow.stack import free_port

    home, port = tmp_path / "hub", free_port()
    env = {**os.environ, "NBFLOW_NATS_URL": ""}
    hub = subprocess.Popen([sys.executable, "-m", "nbflow", "up", "--data", str(home), "--port",
                            str(port), "--workers", "0"], stderr=subprocess.PIPE, text=True,
                           env=env)
    worker = None
    try:
        line = hub.stderr.readline()
        assert "0 worker(s)" in line, line
        info = json.loads((home / "stack.json").read_text())
        kids = _children(info["pid"])
        assert len(kids) == 2, kids                   # nats-server and the engine, no worker
        assert any("nats-server" in k for k in kids) and any(" engine " in k for k in kids)

        effects = tmp_path / "effects.txt"
        nb = write_notebook(tmp_path / "proj" / "hello.ipynb", [
            f"%%task hello\nopen({str(effects)!r}, 'a').write('hello\\n')"])
        url = f"nats://127.0.0.1:{port}"
        # the hub requires credentials: this client (the owner) and the worker (its role) find
        # them in the hub's data dir
        monkeypatch.setenv("NBFLOW_HOME", str(home))
        with SyncClient(url) as c:
            run = c.submit(str(nb))
            # a worker on "another host": its own working dir, away from the notebook's folder
            elsewhere = tmp_path / "elsewhere"
            elsewhere.mkdir()
            worker = subprocess.Popen(
                [sys.executable, "-m", "nbflow", "worker", "--nats", url], cwd=elsewhere,
                env={**env, "NBFLOW_BUNDLE_CACHE": str(elsewhere / "cache"),
                     "NBFLOW_HOME": str(home), "NBFLOW_NATS_USER": "worker"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            st = finish(c, run)
            assert st.state == "succeeded"
            assert success_counts(c, run) == {"hello": 1}
        assert effects.read_text() == "hello\n"
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        hub.send_signal(signal.SIGINT)
        assert hub.wait(timeout=60) == 0


# --- workers that scale with demand, and `nbflow workers` ------------------------------------

def _kernel_pids(pid: int) -> list[int]:
    out = []
    for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"ipykernel" in Path(f"/proc/{k}/cmdline").read_bytes():
                out.append(int(k))
        except OSError:
            continue
    return out


def test_a_scaling_worker_grows_kernels_with_the_queue_and_shrinks_when_idle(nats_server,
                                                                            tmp_path):
    from support import wait_for

    from nbflow.client import SyncClient
    from nbflow.stack import Supervisor

    ns = "autoscale"
    sup = Supervisor(nats_server.url, workers=0, namespace=ns,
                     log_file=tmp_path / "stack.log").start()
    env = {**os.environ, "NBFLOW_NAMESPACE": ns, "NBFLOW_SCALE_IDLE_S": "1",
           "NBFLOW_PRESENCE_S": "0.5", "NBFLOW_NATS_URL": nats_server.url}
    worker = subprocess.Popen(
        [sys.executable, "-m", "nbflow", "worker", "--name", "elastic", "--min-kernels", "1",
         "--max-kernels", "3"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "worker.log", "wb"))
    try:
        wait_for(lambda: len(_kernel_pids(worker.pid)) == 1, 120, "one warm kernel at start")
        effects = tmp_path / "effects.txt"
        nb = write_notebook(tmp_path / "proj" / "fan.ipynb", [
            "%%task make\nitems = list(range(12))",
            f"%%task each --map i in items\nimport time\ntime.sleep(0.4)\n"
            f"open({str(effects)!r}, 'a').write(f'{{i}}\\n')\ndone = i"],
        )
        with SyncClient(nats_server.url, namespace=ns) as c:
            run = c.submit(str(nb))
            peak = 0
            while not c.status(run).is_final:
                peak = max(peak, len(_kernel_pids(worker.pid)))
                time.sleep(0.05)
            st = finish(c, run)
            assert st.state == "succeeded"
            assert sorted(success_counts(c, run).values()) == [1] * 13      # 12 + items
            assert sorted(map(int, effects.read_text().split())) == list(range(12))
            assert 2 <= peak <= 3, peak
            # idle again: back to the minimum
            wait_for(lambda: len(_kernel_pids(worker.pid)) == 1, 120, "shrink to 1 kernel")

            r = subprocess.run([sys.executable, "-m", "nbflow", "workers", "--json"], env=env,
                               capture_output=True, text=True, timeout=60)
            ws = [w for w in json.loads(r.stdout) if w["name"] == "elastic"]
            assert len(ws) == 1, r.stdout
            w = ws[0]
            assert w["queue"] == "default" and w["min_kernels"] == 1 and w["max_kernels"] == 3
            assert w["pid"] == worker.pid and w["done"] >= 12 and w["rss_mb"] > 0
            assert w["kernels_ready"] == w["kernels"] == 1, w      # idle: its one kernel ready
            table = subprocess.run([sys.executable, "-m", "nbflow", "workers"], env=env,
                                   capture_output=True, text=True, timeout=60).stdout
            assert "elastic" in table and "1/1 (1-3)" in table and "MB" in table, table
    finally:
        worker.terminate()
        worker.wait(30)
        sup.stop()


def test_the_scaler_follows_demand_one_step_down_at_a_time_and_stops_growing_at_memory_bounds(
        monkeypatch):
    from nbflow.worker import autoscale

    class Pool:
        def __init__(self):
            self.sizes = []

        def resize(self, n):
            self.sizes.append(n)

    monkeypatch.setattr(autoscale, "available_mb", lambda: 10_000.0)
    pool = Pool()
    s = autoscale.Scaler(pool, min_kernels=1, max_kernels=8, idle_s=0, reserve_mb=512)
    assert s.decide(in_flight=0, pending=3) == 3          # grows at once to the demand
    assert s.decide(in_flight=3, pending=50) == 8         # never past the maximum
    assert s.decide(in_flight=2, pending=0) == 7          # idle kernels go one per tick
    assert s.decide(in_flight=2, pending=0) == 6
    assert [s.decide(0, 0) for _ in range(8)][-1] == 1    # down to the minimum, not below
    # the host is short of memory: no kernel beyond the minimum starts
    monkeypatch.setattr(autoscale, "available_mb", lambda: 550.0)
    assert s.decide(in_flight=0, pending=20) == 1 and s.held_by_memory == 1
    # --max-memory: the worker tree may not pass it
    monkeypatch.setattr(autoscale, "available_mb", lambda: 10_000.0)
    monkeypatch.setattr(autoscale, "tree_rss_mb", lambda pid=None: 300.0)
    s2 = autoscale.Scaler(Pool(), min_kernels=1, max_kernels=8, idle_s=0, reserve_mb=0,
                          max_memory_mb=350)
    assert s2.decide(0, 20) == 1                          # 300 + ~80 per kernel > 350
    s3 = autoscale.Scaler(Pool(), min_kernels=1, max_kernels=8, idle_s=0, reserve_mb=0,
                          max_memory_mb=1000)
    assert s3.decide(0, 20) == 8
    with pytest.raises(ValueError, match="min-kernels"):
        autoscale.Scaler(Pool(), min_kernels=3, max_kernels=2)
