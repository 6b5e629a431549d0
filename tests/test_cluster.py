"""nbflow on a 3-node NATS cluster: streams, KV buckets and the object store at replicas 3, an
engine and workers connected to all three nodes, one node SIGKILLed mid-run — every run still
completes, each task's success recorded once, replay equal to the snapshot."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import support
from support import check_replay, success_counts
from nbhelpers import write_notebook

from nbflow.client import SyncClient
from nbflow.nats import infra
from nbflow.nats.layout import Layout
from nbflow.stack import NatsServer, Supervisor, free_port

FAST = {"NBFLOW_TASK_ACK_WAIT": "3", "NBFLOW_ENGINE_ACK_WAIT": "3"}


def wait_for(cond, timeout=60.0, what="condition", every=0.1):
    # errors while the cluster is still forming mean "not yet"
    return support.wait_for(cond, timeout, what, every, retry=(Exception,))


class Cluster:
    """Three nats-servers with JetStream, clustered over loopback routes."""

    def __init__(self, base, name="nbflow-c3"):
        self.ports = [free_port() for _ in range(3)]
        self.cports = [free_port() for _ in range(3)]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.cports)
        self.nodes = [
            NatsServer(base / f"n{i}", port=self.ports[i], name=f"n{i}", extra_conf=(
                f"cluster {{\n  name: {name}\n  listen: 127.0.0.1:{self.cports[i]}\n"
                f"  routes: [{routes}]\n}}\n"))
            for i in range(3)]

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self) -> "Cluster":
        for n in self.nodes:
            n.start()
        wait_for(lambda: asyncio.run(self._js_ready()), 60, "the JetStream meta leader")
        return self

    async def _js_ready(self) -> bool:
        nc = await infra.connect(self.url, reconnect=False)
        try:
            await nc.jetstream().account_info()
            return True
        finally:
            await nc.close()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def node_named(self, name: str) -> NatsServer:
        return next(n for n in self.nodes if n.name == name)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path).start()
    yield c
    c.stop()


async def _replicas(url: str, L: Layout) -> dict[str, int]:
    """name -> configured replicas, for every stream nbflow uses (KV and object store are
    streams too: KV_<bucket>, OBJ_<store>)."""
    nc = await infra.connect(url, reconnect=False)
    try:
        js = nc.jetstream()
        names = [L.history_stream, L.tasks_stream, L.timers_stream, L.deadletter_stream,
                 *(f"KV_{b}" for b in (L.runs_bucket, L.defs_bucket, L.approvals_bucket,
                                       L.signals_bucket, L.workers_bucket, L.schedules_bucket)),
                 f"OBJ_{L.artifacts_store}"]
        return {n: (await js.stream_info(n)).config.num_replicas for n in names}
    finally:
        await nc.close()


async def _ensure(url: str, L: Layout, replicas: int | None) -> None:
    nc = await infra.connect(url, reconnect=False)
    try:
        if replicas is None:
            await infra.ensure(nc.jetstream(), L)           # what workers and clients do
        else:
            await infra.ensure(nc.jetstream(), L, replicas=replicas)
    finally:
        await nc.close()


def test_ensure_replicas_3_covers_streams_kv_and_object_store(cluster):
    L = Layout("r3")
    asyncio.run(_ensure(cluster.url, L, 3))
    reps = asyncio.run(_replicas(cluster.url, L))
    assert reps == {n: 3 for n in reps}, reps
    asyncio.run(_ensure(cluster.url, L, 3))                 # idempotent
    assert asyncio.run(_replicas(cluster.url, L)) == reps


def test_worker_and_client_ensure_keep_replicas_3(cluster):
    L = Layout("keep3")
    asyncio.run(_ensure(cluster.url, L, 3))                 # `nbflow engine --replicas 3`
    asyncio.run(_ensure(cluster.url, L, None))              # a worker / client connecting
    reps = asyncio.run(_replicas(cluster.url, L))
    assert reps == {n: 3 for n in reps}, reps


# ensure() used to lower replicas (see the test above); workers and engines of the
# kill test still start through this shim (every ensure() asks for 3); it can go.
_R3_SHIM = (
    "import sys, nbflow.nats.infra as i\n"
    "_ensure = i.ensure\n"
    "async def ensure(js, layout, replicas=1, **kw):\n"
    "    return await _ensure(js, layout, max(replicas or 1, 3), **kw)\n"
    "i.ensure = ensure\n"
    "from nbflow.cli.main import main\n"
    "sys.argv[0] = 'nbflow'\n"
    "main()\n")


class ShimSupervisor(Supervisor):
    def _spawn(self, name):
        kind = name.split("-")[0]
        cmd = [sys.executable, "-c", _R3_SHIM, kind, "--nats", self.url]
        if kind == "engine":
            cmd += ["--replicas", "3"]
        env = {**os.environ, "NBFLOW_NAMESPACE": self.namespace, **self.env}
        out = open(self.log_file, "ab")
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        out.close()
        self.procs[name] = p
        return p


async def _stream_leader(url: str, stream: str) -> str:
    nc = await infra.connect(url, reconnect=False)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.cluster.leader
    finally:
        await nc.close()


def test_kill_one_node_mid_run_every_run_completes(cluster, tmp_path, monkeypatch):
    ns = "cluster"
    L = Layout(ns)
    real_ensure = infra.ensure

    async def r3_ensure(js, layout, replicas=1, **kw):    # the shim, for this process's client
        return await real_ensure(js, layout, max(replicas or 1, 3), **kw)
    monkeypatch.setattr(infra, "ensure", r3_ensure)
    asyncio.run(_ensure(cluster.url, L, 3))
    sup = ShimSupervisor(cluster.url, workers=2, engines=1, namespace=ns, env=FAST,
                         log_file=tmp_path / "stack.log").start().supervise()
    try:
        nb = write_notebook(tmp_path / "c.ipynb", [
            "%%task a\nimport time\ntime.sleep(1)\nx = 1",
            "%%task b --map i in items\ny = i * x",
            "%%task c\nimport time\ntime.sleep(1)\nz = sum(y)",
            "%%task d\nprint(z)",
        ], params="items = [1, 2, 3]")
        with SyncClient(cluster.url, namespace=ns) as c:
            runs = [c.submit(str(nb), {}) for _ in range(4)]
            wait_for(lambda: any(e.type == "TaskSucceeded" for e in c.history(runs[0])), 120,
                     "the first task to finish")
        # the worst node to lose: the one leading the history stream
        leader = asyncio.run(_stream_leader(cluster.url, L.history_stream))
        cluster.node_named(leader).kill()
        # JetStream elects new leaders (meta and per stream) within seconds
        wait_for(lambda: asyncio.run(_stream_leader(cluster.url, L.history_stream)) not in
                 (None, "", leader), 60, "a new history stream leader")
        # a new client (the CLI connects per command; Client does not reconnect) on all 3 urls;
        # while the streams elect new leaders its ensure() may time out: retry, as a user would
        def client():
            try:
                return SyncClient(cluster.url, namespace=ns)
            except Exception:  # noqa: BLE001 - NbflowError('... refused ...: nats: timeout')
                return None
        with wait_for(client, 90, "a client to connect after the node loss") as c:
            for run in runs:
                st = c.wait(run, timeout=180)
                assert st.state == "succeeded", st.error
                check_replay(c, run)
                assert success_counts(c, run) == {"a": 1, "b#0": 1, "b#1": 1, "b#2": 1,
                                                  "c": 1, "d": 1}
            assert c.load_output(runs[-1], "c", "z") == 6
            # the history stream moved to a surviving node and still has three replicas
            new_leader = asyncio.run(_stream_leader(cluster.url, L.history_stream))
            assert new_leader and new_leader != leader
        reps = asyncio.run(_replicas(cluster.url, L))
        assert reps == {n: 3 for n in reps}, reps
    finally:
        sup.stop()


# --- the deployment recipe (deploy/) on loopback -------------------------------------------

DEPLOY = Path(__file__).parent.parent / "deploy"


def _sub(text: str, old: str, new: str) -> str:
    assert old in text, f"the recipe no longer has {old!r}: update this test with it"
    return text.replace(old, new)


def _recipe_node(i: int, ports, cports, lports, base: Path, roles: str) -> Path:
    """deploy/nats/nI.conf with only hosts, ports and the store moved to loopback / tmp;
    ``roles``: the roles.conf beside it."""
    d = base / f"n{i}"
    d.mkdir(parents=True)
    text = (DEPLOY / "nats" / f"n{i}.conf").read_text()
    text = _sub(text, "listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{ports[i - 1]}")
    text = _sub(text, "http: 127.0.0.1:8222", "")
    text = _sub(text, "store_dir: /var/lib/nats/jetstream", f'store_dir: "{d / "js"}"')
    text = _sub(text, "listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{cports[i - 1]}")
    text = _sub(text, "listen: 0.0.0.0:7422", f"listen: 127.0.0.1:{lports[i - 1]}")
    for j in (1, 2, 3):
        text = _sub(text, f"nats-route://n{j}:6222", f"nats-route://127.0.0.1:{cports[j - 1]}")
    (d / "nbflow.conf").write_text(text)
    (d / "roles.conf").write_text(roles)
    return d / "nbflow.conf"


def _env_file() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "env" / "nbflow.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def _unit_command(unit: str, env: dict[str, str], instance: str) -> list[str]:
    """The nbflow arguments of a unit's ExecStart, with ${VAR} and %i/%H filled in."""
    import configparser
    import re
    import shlex

    text = (DEPLOY / "systemd" / unit).read_text().replace("\\\n", " ")
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(text)
    argv = shlex.split(cp["Service"]["ExecStart"])
    assert argv[0].endswith("/nbflow"), argv
    filled = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a)
              .replace("%i", instance).replace("%H", "host") for a in argv[1:]]
    return filled


def test_the_deploy_recipe_runs_on_loopback(tmp_path, monkeypatch):
    import secrets

    from nbflow.stack import _wait_port, nats_server_binary

    ports, cports, lports = ([free_port() for _ in range(3)] for _ in range(3))
    servers = []
    procs = []
    # the operator's steps (deploy/README.md, Credentials): roles.conf from `nbflow user conf`,
    # a password per user in the servers' environment, each process its own user's
    gen = subprocess.run([sys.executable, "-m", "nbflow", "user", "conf", "--namespace",
                          "recipe", "--user", "alice=author"], capture_output=True, text=True,
                         check=True)
    roles = gen.stdout
    pw = {u: secrets.token_urlsafe(18) for u in ("engine", "worker", "viewer", "alice")}
    assert all(f"NBFLOW_{u.upper()}_PASSWORD" in gen.stderr for u in pw)
    server_env = {**os.environ, **{f"NBFLOW_{u.upper()}_PASSWORD": p for u, p in pw.items()}}
    for k in ("NBFLOW_NATS_USER", "NBFLOW_NATS_PASSWORD"):
        monkeypatch.delenv(k, raising=False)

    def role(u):
        return {"NBFLOW_NATS_USER": u, "NBFLOW_NATS_PASSWORD": pw[u]}
    try:
        for i in (1, 2, 3):
            conf = _recipe_node(i, ports, cports, lports, tmp_path / "hub", roles)
            log = open(conf.parent / "server.log", "wb")
            servers.append(subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log,
                                            stderr=subprocess.STDOUT, env=server_env))
        for p in ports:
            _wait_port("127.0.0.1", p, 30)
        env_file = _env_file()
        url = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
        assert env_file["NBFLOW_NATS_URL"].count("nats://") == 3
        env_file.update(NBFLOW_NATS_URL=url, NBFLOW_MAX_KERNELS="2",   # a shared 2-core machine
                        NBFLOW_NAMESPACE="recipe")
        with pytest.raises(infra.ConnectError, match="(?i)authorization violation"):
            asyncio.run(_js_ready(url))                    # no credentials: refused
        for k, v in role("engine").items():              # this test's own checks, below
            monkeypatch.setenv(k, v)
        wait_for(lambda: asyncio.run(_js_ready(url)), 60, "the JetStream meta leader")

        def start(unit, instance, role_dir):
            role_dir.mkdir(parents=True)
            env = {**os.environ, **env_file, "PYTHONUNBUFFERED": "1",
                   "NBFLOW_BUNDLE_CACHE": str(role_dir / "bundles"), **FAST,
                   **role("engine" if "engine" in unit else "worker")}
            out = open(role_dir / "log", "wb")
            p = subprocess.Popen([sys.executable, "-m", "nbflow",
                                  *_unit_command(unit, env_file, instance)],
                                 cwd=role_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)          # its own process tree
            procs.append(p)
            return p

        for i in ("1", "2"):
            start("nbflow-engine@.service", i, tmp_path / f"engine-host-{i}")
        for i in ("1", "2"):
            start("nbflow-worker@.service", i, tmp_path / f"worker-host-{i}")

        proj = tmp_path / "analyst" / "sales"
        proj.mkdir(parents=True)
        (proj / "salesutil.py").write_text("def load(p):\n    return [int(x) for x in "
                                           "open(p).read().split()]\n")
        (proj / "sales.txt").write_text("5 6 7\n")
        nb = write_notebook(proj / "daily.ipynb", [
            "from salesutil import load",
            "%%task extract\nrows = load('sales.txt')",
            "%%task by_item --map r in rows\ndouble = 2 * r",
            "%%task total\nresult = sum(double)\nprint('total', result)",
        ])
        with wait_for(lambda: _try_client(url, **role("alice")), 90, "a client") as c:
            runs = [c.submit(str(nb)) for _ in range(2)]
            for run in runs:
                st = c.wait(run, timeout=300)
                assert st.state == "succeeded", st.error
                check_replay(c, run)
                assert success_counts(c, run) == {"extract": 1, "by_item#0": 1, "by_item#1": 1,
                                                  "by_item#2": 1, "total": 1}
                assert "total 36" in c.logs(run, "total")
            ran_on = {ev.get("worker") for run in runs for ev in c.history(run)
                      if ev.type == "TaskSucceeded"}
            assert ran_on <= {"host-1", "host-2"} and ran_on, ran_on
            assert {w["name"] for w in c.workers()} >= {"host-1", "host-2"}
        reps = asyncio.run(_replicas(url, Layout("recipe")))
        assert reps == {n: 3 for n in reps}, reps
        # each worker that ran tasks unpacked the notebook's folder once, into its own cache
        for name in ran_on:
            cache = tmp_path / f"worker-{name}" / "bundles"
            unpacked = [d for d in cache.iterdir() if d.is_dir() and not d.name.startswith(".")]
            assert len(unpacked) == 1 and (unpacked[0] / "salesutil.py").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        for s in servers:
            s.terminate()
            s.wait(30)


async def _js_ready(url: str) -> bool:
    nc = await infra.connect(url, reconnect=False)
    try:
        await nc.jetstream().account_info()
        return True
    finally:
        await nc.close()


def _try_client(url: str, **auth):
    try:
        return SyncClient(url, namespace="recipe", user=auth.get("NBFLOW_NATS_USER"),
                          password=auth.get("NBFLOW_NATS_PASSWORD"))
    except Exception:  # noqa: BLE001 - streams still electing leaders
        return None
