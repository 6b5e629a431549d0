"""The embedded stack supervises for real: a SIGKILLed `nbflow up` leaves no orphans, the next
`nbflow up` and `nbflow run` use ONE nats-server on the store, and earlier runs are intact.
Processes are counted by their command lines, not by reading our own bookkeeping."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import wait_for
from nbhelpers import write_notebook

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="counts processes through /proc")


def procs_with(word: str) -> dict[int, str]:
    """pid -> command line of every process whose command line contains ``word``."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if word in cmd:
            out[int(p)] = cmd
    return out


def servers_on(home: Path) -> list[int]:
    return [p for p, cmd in procs_with(str(home)).items() if "nats-server" in cmd]


def nbflow(home: Path, *args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbflow", *args], env=_env(home),
                          capture_output=True, text=True, timeout=timeout)


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NBFLOW_NATS_URL", "NBFLOW_NAMESPACE", "NBFLOW_FAULTS")}
    env["NBFLOW_HOME"] = str(home)
    return env


def start_up(home: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "nbflow", "up", "--workers", "1", "--port", "0"],
                         env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _stack_pid(home) == p.pid, 60, "nbflow up to write stack.json")
    return p


def _stack_pid(home: Path):
    try:
        return json.loads((home / "stack.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _nb(tmp_path: Path) -> str:
    return str(write_notebook(tmp_path / "two.ipynb", ["%%task a\nx = 1", "%%task b\nprint(x + 1)"]))


def test_sigkilled_up_leaves_no_orphans_and_one_server(tmp_path):
    home = tmp_path / "home"
    nb = _nb(tmp_path)
    up1 = start_up(home)
    stack1 = json.loads((home / "stack.json").read_text())
    first = nbflow(home, "run", nb)
    assert first.returncode == 0, first.stderr
    kids = procs_with(stack1["url"])                 # engine and workers: --nats <url>
    assert len(kids) >= 2 and servers_on(home) == [stack1["server_pid"]]
    up1.send_signal(signal.SIGKILL)
    up1.wait()
    # the killed supervisor's nats-server, engine and workers die with it
    wait_for(lambda: not servers_on(home), 30, "the orphaned nats-server to exit")
    wait_for(lambda: not set(kids) & set(procs_with(stack1["url"])), 30,
             "the orphaned engine and workers to exit")
    assert (home / "stack.json").exists()          # stale: the next `up` must not trust it

    up2 = start_up(home)
    try:
        second = nbflow(home, "run", nb)
        assert second.returncode == 0, second.stderr
        assert len(servers_on(home)) == 1                   # one server on the store
        runs = nbflow(home, "runs")
        assert runs.returncode == 0, runs.stderr
        ids = [ln.split()[1] for ln in (first.stderr + second.stderr).splitlines()
               if ln.startswith("run ")]
        assert len(ids) == 2
        for run_id in ids:
            assert run_id in runs.stdout                    # the earlier run is intact
    finally:
        up2.send_signal(signal.SIGTERM)
        up2.wait(30)
    wait_for(lambda: not servers_on(home), 30, "the stack to stop its server")


def test_orphan_server_on_the_store_is_stopped_not_shared(tmp_path):
    """A nats-server left on the store by a dead stack (stale stack.json): the next `nbflow run`
    stops it and starts exactly one server of its own; the store is never opened twice."""
    from nbflow.stack import NatsServer, StackError

    home = tmp_path / "home"
    home.mkdir()
    orphan = NatsServer(home).start()
    try:
        with pytest.raises(StackError, match="in use by another nats-server"):
            NatsServer(home).start(timeout=2)            # the store lock holds
        (home / "stack.json").write_text(json.dumps({
            "pid": 2 ** 22 + 7, "url": orphan.url, "port": orphan.port,
            "server_pid": orphan.proc.pid}))
        res = nbflow(home, "run", _nb(tmp_path))
        assert res.returncode == 0, res.stderr
        assert orphan.proc.poll() is not None            # the orphan was stopped
        assert len(servers_on(home)) == 1
    finally:
        orphan.kill()
        nbflow(home, "down", timeout=60)
    wait_for(lambda: not servers_on(home), 30, "the stack to stop its server")
