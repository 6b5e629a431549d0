"""Shared fixtures: a real nats-server per session (free loopback port, temp store), an engine
and workers as real processes, and a client. Never a fake NATS."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

# notebooks under tests/data are inputs (some deliberately broken), not nbval tests
collect_ignore_glob = ["data/*", "data/**/*"]

HERE = Path(__file__).parent
DATA = HERE / "data"
REPO = HERE.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Nothing a test does touches the user's data dir or a NATS the user has configured."""
    home = tmp_path_factory.mktemp("nbflow-home")
    old = {k: os.environ.get(k) for k in ("NBFLOW_HOME", "NBFLOW_NATS_URL", "NBFLOW_NAMESPACE")}
    os.environ["NBFLOW_HOME"] = str(home)
    os.environ.pop("NBFLOW_NATS_URL", None)
    os.environ.pop("NBFLOW_NAMESPACE", None)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    from nbflow.stack import NatsServer

    srv = NatsServer(tmp_path_factory.mktemp("nats"), sync_interval="1s").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def stack(nats_server, tmp_path_factory):
    """Engine + 2 workers (real processes) in namespace 'itest'."""
    from nbflow.stack import Supervisor

    log = tmp_path_factory.mktemp("stacklog") / "stack.log"
    sup = Supervisor(nats_server.url, workers=2, namespace="itest", log_file=log).start()
    yield sup
    sup.stop()
    if os.environ.get("NBFLOW_SHOW_STACK_LOG"):
        print(log.read_text())


@pytest.fixture(scope="session")
def client(stack, nats_server):
    from nbflow.client import SyncClient

    c = SyncClient(nats_server.url, namespace="itest")
    yield c
    c.close()


def finish(client, run: str, timeout: float = 120.0):
    """Wait for a run to end, then prove its history replays to the stored snapshot."""
    st = client.wait(run, timeout=timeout)
    assert st is not None and st.is_final
    check_replay(client, run)
    return client.status(run)


def check_replay(client, run: str, timeout: float = 30.0) -> None:
    """Replay the run's history through state.py; it must equal the engine's snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        snap = client.status(run).to_dict()
        replayed = client.replay(run).to_dict()
        if snap == replayed or time.monotonic() > deadline:
            break
        time.sleep(0.05)   # the engine writes the snapshot just after the event is in history
    assert replayed == snap, f"replay of run {run} differs from its snapshot"


def success_counts(client, run: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ev in client.history(run):
        if ev.type == "TaskSucceeded":
            counts[ev["key"]] = counts.get(ev["key"], 0) + 1
    return counts
