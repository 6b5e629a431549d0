"""Sites joined by leaf nodes: a hub (nats-server with JetStream, the engine, a worker) and a site
(a nats-server without JetStream, joined to the hub by a leaf connection, whose worker takes only
its queue: ``%%task --queue site-b``). The hub goes down while the site runs tasks it holds, for
longer than the tasks' ack wait, and comes back: the site's tasks finish during the outage, their
results are recorded when the link returns, and nothing is lost or run twice."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from nbhelpers import write_notebook
from support import finish, success_counts, wait_for

from nbflow.nats import infra
from nbflow.stack import NatsServer, Supervisor, free_port

NS = "sites"


def _leaf_listen(port: int) -> str:
    return f'leafnodes {{\n  listen: "127.0.0.1:{port}"\n}}\n'


def _leaf_remote(port: int) -> str:
    return f'leafnodes {{\n  remotes: [ {{ url: "nats-leaf://127.0.0.1:{port}" }} ]\n}}\n'


async def _jetstream_through(url: str) -> bool:
    nc = await infra.connect(infra.ConnectOptions(url, domain="hub"), reconnect=False)
    try:
        await nc.jetstream().account_info()
        return True
    finally:
        await nc.close()


def _lines(p) -> list[str]:
    return p.read_text().splitlines() if p.exists() else []


@pytest.fixture
def sites(tmp_path):
    leaf_port = free_port()
    hub = NatsServer(tmp_path / "hub", name="hub", domain="hub",
                     extra_conf=_leaf_listen(leaf_port)).start()
    site = NatsServer(tmp_path / "site", name="site-b", jetstream=False,
                      extra_conf=_leaf_remote(leaf_port)).start()
    wait_for(lambda: _try(lambda: asyncio.run(_jetstream_through(site.url))), 60,
             "JetStream through the site's leaf connection")
    yield hub, site, leaf_port
    site.stop()
    hub.stop()


def _try(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - not connected yet
        return False


def test_a_site_keeps_running_its_tasks_through_a_hub_outage(sites, tmp_path):
    from nbflow.client import SyncClient

    hub, site, leaf_port = sites
    effects, release = tmp_path / "effects.txt", tmp_path / "release"
    nb = write_notebook(tmp_path / "proj" / "twosites.ipynb", [
        "import os, time",
        "%%task prep\nitems = [0, 1, 2]",
        f"%%task far --queue site-b --map i in items\n"
        f"open({str(effects)!r}, 'a').write(f'start {{i}}\\n')\n"
        f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.05)\n"
        f"open({str(effects)!r}, 'a').write(f'end {{i}}\\n')\nout = i * 10",
        "%%task gather\ntotal = sum(out)\nprint('total', total)",
    ])
    hub_sup = Supervisor(hub.url, workers=1, namespace=NS, log_file=tmp_path / "hub.log").start()
    site_log = tmp_path / "site-worker.log"
    elsewhere = tmp_path / "site-b-host"
    elsewhere.mkdir()
    env = {**os.environ, "NBFLOW_NAMESPACE": NS, "NBFLOW_TASK_ACK_WAIT": "3",
           "NBFLOW_JS_DOMAIN": "hub",                   # the site reaches the hub's JetStream
           "NBFLOW_BUNDLE_CACHE": str(elsewhere / "bundles")}
    with open(site_log, "wb") as out:
        site_worker = subprocess.Popen(
            [sys.executable, "-m", "nbflow", "worker", "--nats", site.url, "--queue", "site-b",
             "--concurrency", "4", "--name", "site-b-worker"], cwd=elsewhere, env=env,
            stdout=out, stderr=subprocess.STDOUT)
    try:
        with SyncClient(hub.url, namespace=NS) as c:
            run = c.submit(str(nb))
            wait_for(lambda: sorted(_lines(effects)) == ["start 0", "start 1", "start 2"], 180,
                     "the site to hold all three tasks")
            hub.kill()                                   # the hub and the link are gone
            time.sleep(4)                                # past the tasks' 3 s ack wait
            hub2 = NatsServer(tmp_path / "hub", port=hub.port, name="hub", domain="hub",
                              extra_conf=_leaf_listen(leaf_port)).start()
            try:
                # the hub redelivers the unacked tasks; the site worker keeps running each once
                wait_for(lambda: "came back while running here" in site_log.read_text(), 120,
                         "a redelivery of a task the site still runs")
                release.touch()                          # the site's tasks finish
                st = finish(c, run, timeout=300)
                assert st.state == "succeeded", (st.to_dict(), site_log.read_text()[-3000:])
                counts = success_counts(c, run)
                assert counts == {"prep": 1, "far#0": 1, "far#1": 1, "far#2": 1, "gather": 1}
                assert sorted(_lines(effects)) == sorted(
                    [f"start {i}" for i in range(3)] + [f"end {i}" for i in range(3)])
                workers = {ev["key"]: ev.get("worker") for ev in c.history(run)
                           if ev.type == "TaskSucceeded"}
                assert {workers[f"far#{i}"] for i in range(3)} == {"site-b-worker"}
                assert workers["prep"] != "site-b-worker"
                assert "total 30" in c.logs(run, "gather")
            finally:
                hub2.stop()
    finally:
        site_worker.terminate()
        site_worker.wait(30)
        hub_sup.stop()
