"""Shared fixtures: a real nats-server per session (free loopback port, temp store), an engine
and workers as real processes, and a client. Never a fake NATS."""
from __future__ import annotations

import os
import shutil

import pytest

# notebooks under tests/data are inputs (some deliberately broken), not nbval tests
collect_ignore_glob = ["data/*", "data/**/*"]

from support import DATA, HERE, REPO, SHARED  # noqa: E402,F401 - shared with the tests


def pytest_collection_modifyitems(config, items):
    """Tests marked needs_dot skip (saying why) where graphviz's `dot` is missing; CI has it."""
    if shutil.which("dot"):
        return
    skip = pytest.mark.skip(reason="graphviz's `dot` is not installed (apt-get install graphviz)")
    for item in items:
        if item.get_closest_marker("needs_dot"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Nothing a test does touches the user's data dir or a NATS the user has configured."""
    from support import environ

    home = tmp_path_factory.mktemp("nbflow-home")
    with environ(NBFLOW_HOME=str(home), NBFLOW_NATS_URL=None, NBFLOW_NAMESPACE=None):
        yield home
        # a test that reached the embedded default (e.g. `%flow run` in a kernel) started a
        # background stack in this home: it must not outlive the session
        from nbflow import stack

        stack.down(str(home))


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
