"""The `nbflow` command as a user types it: real subprocesses against a real NATS."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from support import DATA, finish
from nbhelpers import write_notebook


def nbflow(*args, env=None, timeout=180, **kw):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "nbflow", *args], capture_output=True,
                          text=True, env=e, timeout=timeout, **kw)


@pytest.fixture
def on_stack(nats_server, stack):
    return {"NBFLOW_NATS_URL": nats_server.url, "NBFLOW_NAMESPACE": "itest"}


def test_run_no_wait_then_inspect(on_stack, client, tmp_path):
    r = nbflow("run", "--no-wait", str(DATA / "diamond.ipynb"), "-p", "n", "4", env=on_stack)
    assert r.returncode == 0, r.stderr
    run = r.stdout.strip()
    assert len(run) == 8 and run.isalnum()           # only the id: scriptable
    assert finish(client, run).state == "succeeded"

    st = json.loads(nbflow("status", run, "--json", env=on_stack).stdout)
    assert st["state"] == "succeeded" and st["params"]["n"] == 4
    rows = json.loads(nbflow("runs", "--json", env=on_stack).stdout)
    row = next(r for r in rows if r["id"] == run)
    assert {"id", "state", "workflow", "notebook", "started", "finished"} <= set(row)
    assert row["workflow"] == "diamond" and row["finished"] >= row["started"]
    hist = json.loads(nbflow("history", run, "--json", env=on_stack).stdout)   # one document
    assert hist[0]["type"] == "RunStarted"
    assert hist[-1]["type"] == "RunFinished" and hist[-1]["state"] == "succeeded"
    assert sum(1 for h in hist if h["type"] == "TaskSucceeded") == 4
    assert "-2" in nbflow("logs", run, "d", env=on_stack).stdout   # sum(0,2) - sum(1,3)
    out = tmp_path / "d.ipynb"
    r = nbflow("output", run, "d", "-o", str(out), env=on_stack)
    assert r.returncode == 0, r.stderr
    nb = nbformat.read(str(out), as_version=4)
    assert "papermill" in nb.metadata                  # as papermill wrote it
    # a unique prefix of the id is enough
    assert json.loads(nbflow("status", run[:6], "--json", env=on_stack).stdout)["run"] == run


def test_run_follows_to_the_end_and_exit_code_tells_failure(on_stack, tmp_path):
    ok = nbflow("run", str(DATA / "chain.ipynb"), env=on_stack)
    assert ok.returncode == 0, ok.stderr
    assert "succeeded" in ok.stdout and "nbflow output" in ok.stdout
    nb = write_notebook(tmp_path / "bad.ipynb", ["%%task boom\nraise ValueError('no data for day')"])
    bad = nbflow("run", str(nb), env=on_stack)
    assert bad.returncode == 1
    assert "ValueError: no data for day" in bad.stdout
    assert "nbflow retry" in bad.stdout


def test_bad_notebook_is_refused_before_submitting(on_stack, client):
    before = len(client.runs(1000))
    r = nbflow("run", str(DATA / "bad_cycle.ipynb"), env=on_stack)
    assert r.returncode == 2
    assert "cycle" in r.stderr and "Traceback" not in r.stderr
    assert len(client.runs(1000)) == before


def test_unreachable_nats_says_so_in_one_line(tmp_path):
    from nbflow.stack import free_port

    r = nbflow("runs", "--nats", f"nats://127.0.0.1:{free_port()}", timeout=30)
    assert r.returncode == 2
    assert "cannot reach NATS" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_run_is_a_clear_error(on_stack):
    r = nbflow("status", "nosuchrun", env=on_stack)
    assert r.returncode == 2 and "no run 'nosuchrun'" in r.stderr


def test_ctrl_c_detaches_and_leaves_the_run_going(on_stack, client, tmp_path):
    nb = write_notebook(tmp_path / "slow.ipynb", ["%%task slow\nimport time\ntime.sleep(60)"])
    p = subprocess.Popen([sys.executable, "-m", "nbflow", "run", str(nb)], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **on_stack})
    line = p.stderr.readline()                        # "run XXXX of slow started"
    assert line.startswith("run "), line
    run = re.sub(r"\x1b\[[0-9;]*m", "", line).split()[1]
    while "running" not in line:                      # Ctrl-C while it follows the run
        line = p.stderr.readline()
        assert line, "nbflow run ended before its task ran"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130
    assert f"nbflow cancel {run}" in err and "goes on" in err
    assert client.status(run).state == "running"     # detached, not cancelled
    client.cancel(run)
    assert finish(client, run).state == "cancelled"


def test_approve_and_signal_from_the_shell(on_stack, client, tmp_path):
    nb = write_notebook(tmp_path / "gate.ipynb", [
        '%%task gate --approval "Ship it?"',
        "%%task wait_go --wait-signal go --after gate\nprint('go =', go)",
    ])
    run = client.submit(str(nb), {})
    from test_run import client_watch_until

    client_watch_until(client, run, lambda s: s.nodes["gate"].state == "awaiting_approval")
    r = nbflow("approve", run, "gate", "--comment", "fine", "--as", "dana", env=on_stack)
    assert r.returncode == 0, r.stderr
    again = nbflow("approve", run, "gate", "--reject", env=on_stack)
    assert again.returncode == 2 and "already approved by dana" in again.stderr
    client_watch_until(client, run, lambda s: s.nodes["wait_go"].state == "waiting_signal")
    assert nbflow("signal", run, "go", '{"n": 3}', env=on_stack).returncode == 0
    assert finish(client, run).state == "succeeded"
    assert "go = {'n': 3}" in client.logs(run, "wait_go")


def test_embedded_stack_on_demand_up_and_down(tmp_path):
    """The README's main command: no NATS configured -> a local stack starts by itself."""
    home = tmp_path / "home"
    env = {"NBFLOW_HOME": str(home), "NBFLOW_NATS_URL": "", "NBFLOW_NAMESPACE": ""}
    try:
        r = nbflow("run", str(DATA / "chain.ipynb"), env=env, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        info = json.loads((home / "stack.json").read_text())
        assert info["url"].startswith("nats://127.0.0.1:")
        assert (home / "jetstream").is_dir()             # data lives in the data dir
        again = nbflow("up", "--data", str(home), env=env, timeout=30)
        assert again.returncode == 2 and "already running" in again.stderr
        runs = json.loads(nbflow("runs", "--json", env=env).stdout)
        assert [r["state"] for r in runs] == ["succeeded"]
    finally:
        d = nbflow("down", "--data", str(home), env=env, timeout=60)
    assert "stopped" in d.stderr
    assert not (home / "stack.json").exists()


def test_a_stack_this_process_started_is_reaped_when_it_stops(tmp_path):
    """A notebook kernel starts the embedded stack in the background (`%flow run`) and later
    stops it (`%flow down`): the stopped stack is that process's own child, so `down` must reap
    it, not wait out its timeout on a zombie and SIGKILL it."""
    from nbflow import stack

    home = tmp_path / "home"
    stack.ensure_background(str(home))
    pid = json.loads((home / "stack.json").read_text())["pid"]
    assert stack.down(str(home), timeout=120)["pid"] == pid
    with pytest.raises(ChildProcessError):            # reaped by down, not left a zombie
        os.waitpid(pid, os.WNOHANG)
    assert not (home / "stack.json").exists()         # it stopped itself cleanly


def test_up_in_the_foreground_and_ctrl_c_stops_everything(tmp_path):
    from nbflow.stack import free_port

    home = tmp_path / "up"
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "nbflow", "up", "--data", str(home), "--port",
                          str(port), "--workers", "1"], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "NBFLOW_NATS_URL": ""})
    line = p.stderr.readline()                        # printed once everything is started
    assert f"nats://127.0.0.1:{port}" in line and "Ctrl-C" in line, line
    info = json.loads((home / "stack.json").read_text())
    children = Path(f"/proc/{info['pid']}/task/{info['pid']}/children").read_text().split()
    assert len(children) == 3                         # nats-server, engine, one worker
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 0
    assert not (home / "stack.json").exists()
    assert not any(Path(f"/proc/{c}").exists() and "zombie" not in
                   Path(f"/proc/{c}/status").read_text().lower() for c in children)
