"""Outgrowing one machine: a hub without local workers, workers joining from elsewhere."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from nbhelpers import write_notebook
from support import finish, success_counts


def _children(pid: int) -> list[str]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [Path(f"/proc/{k}/cmdline").read_bytes().replace(b"\0", b" ").decode() for k in kids]


def test_up_with_zero_workers_is_a_hub_and_a_worker_joining_later_runs_the_tasks(tmp_path):
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
        with SyncClient(url) as c:
            run = c.submit(str(nb))
            # a worker on "another host": its own working dir, away from the notebook's folder
            elsewhere = tmp_path / "elsewhere"
            elsewhere.mkdir()
            worker = subprocess.Popen(
                [sys.executable, "-m", "nbflow", "worker", "--nats", url], cwd=elsewhere,
                env={**env, "NBFLOW_BUNDLE_CACHE": str(elsewhere / "cache")},
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
