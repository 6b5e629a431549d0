"""What every benchmark shares: its own nats-server, child processes it always stops, a unique
namespace, waiting for runs through the snapshot KV, RSS readings and the raw JetStream floor.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nbflow.nats.layout import MSG_ID, Layout
from nbflow.core.state import RUN_FINAL
from nbflow.worker.autoscale import rss_kb  # noqa: F401 (the benchmarks import it from here)

_LIVE: set[subprocess.Popen] = set()

# Servers start WITH credentials, as the embedded stack does (engine, worker and owner users with
# their roles); `python -m bench --no-auth` sets NBFLOW_BENCH_AUTH=0 to measure what auth costs.
def auth_on() -> bool:
    return os.environ.get("NBFLOW_BENCH_AUTH", "1") != "0"


def _kill_all() -> None:
    """Last resort (atexit / SIGTERM): no child of ours outlives the benchmark."""
    for p in list(_LIVE):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)      # our children lead their own session
            except OSError:
                try:
                    p.kill()
                except OSError:
                    pass
    _LIVE.clear()


atexit.register(_kill_all)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Env:
    """A nats-server on a free port with a temp store, a unique namespace, and the child
    processes started for one benchmark. Use as a context manager: everything is stopped on
    exit, errors and Ctrl-C included."""

    def __init__(self, name: str, keep: bool = False):
        self.name = name
        self.ns = f"b{name[:12]}{secrets.token_hex(3)}".replace("_", "")
        self.L = Layout(self.ns)
        self.dir = Path(tempfile.mkdtemp(prefix=f"nbflow-bench-{name}-"))
        # the benches' notebooks live here, next to the nats store and the workers' homes:
        # keep those out of the notebooks' bundles
        (self.dir / ".nbflowignore").write_text("nats/\nhome/\n*.log\n")
        self.keep = keep
        self.server = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.auth = auth_on()
        self.creds: dict | None = None

    def __enter__(self) -> "Env":
        from nbflow.stack import NatsServer

        conf = ""
        if self.auth:                # the stack's users and roles (nats/auth.py)
            from nbflow.nats import auth

            home = self.dir / "home"
            home.mkdir(parents=True, exist_ok=True)
            self.creds = auth.ensure_credentials(home, "bench")
            conf = auth.authorization_conf(self.creds, [self.L])
        # sync_interval as the embedded stack: fsync every second, JetStream still writes each msg
        self.server = NatsServer(self.dir / "nats", sync_interval="1s", extra_conf=conf)
        try:
            self.server.start()
        finally:
            if self.server.proc is not None:
                _LIVE.add(self.server.proc)
        if self.auth:
            self._create_streams()
        return self

    def password(self, user: str) -> str:
        return self.creds["users"][user]["password"]

    @property
    def owner(self) -> str:
        return self.creds["owner"]

    def role_env(self, role: str) -> dict[str, str]:
        """How a child of this role connects (as the embedded stack's children do)."""
        if not self.auth:
            return {}
        return {"NBFLOW_NATS_USER": role, "NBFLOW_NATS_PASSWORD": self.password(role)}

    def _create_streams(self) -> None:
        """As the embedded stack: the engine user creates the streams before workers start
        (workers may not create streams). In a thread: benches call this inside their loop."""
        import concurrent.futures

        from nbflow.nats import infra

        async def go():
            nc = await self.raw_connect()
            try:
                await infra.ensure(nc.jetstream(), self.L, look_first=False)
            finally:
                await nc.close()
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            ex.submit(asyncio.run, go()).result()

    def __exit__(self, *exc) -> None:
        self.stop_all()
        if self.server is not None:
            self.server.stop()
            _LIVE.discard(self.server.proc)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def url(self) -> str:
        return self.server.url

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None,
              role: str = "worker") -> subprocess.Popen:
        e = dict(os.environ)
        e["NBFLOW_NAMESPACE"] = self.ns
        e["NBFLOW_NATS_URL"] = self.url
        e["NBFLOW_HOME"] = str(self.dir / "home")
        e.setdefault("PYTHONUNBUFFERED", "1")
        e.update(self.role_env(role))
        e.update(env or {})
        log = open(self.dir / f"{name}.log", "ab")
        # own session: a Ctrl-C reaches us only, and we stop children in order
        p = subprocess.Popen([sys.executable, *args], env=e, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = p
        _LIVE.add(p)
        return p

    def engine(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.spawn("engine", ["-m", "nbflow", "engine", "--nats", self.url,
                                     "--namespace", self.ns], env, role="engine")

    def noop_worker(self, concurrency: int = 64, name: str = "noop") -> subprocess.Popen:
        return self.spawn(name, ["-m", "nbflow.worker.noop", "--nats", self.url,
                                 "--namespace", self.ns, "--concurrency", str(concurrency)])

    def worker(self, name: str = "worker", concurrency: int = 1, queue: str = "default",
               env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.spawn(name, ["-m", "nbflow", "worker", "--nats", self.url, "--namespace",
                                 self.ns, "--concurrency", str(concurrency), "--queue", queue], env)

    def stop(self, name: str, timeout: float = 10.0) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        kids = descendants(p.pid)          # kernels may leave the process group: stop them too
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait()
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        _LIVE.discard(p)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def log_tail(self, name: str, n: int = 2000) -> str:
        f = self.dir / f"{name}.log"
        return f.read_text(errors="replace")[-n:] if f.exists() else ""

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log_tail(name)}")

    async def connect(self):
        """A client as the stack's owner (author + approver), as a person submitting runs."""
        from nbflow.client import Client

        if not self.auth:
            return await Client.connect(self.url, namespace=self.ns)
        return await Client.connect(self.url, namespace=self.ns, user=self.owner,
                                    password=self.password(self.owner))

    async def raw_connect(self):
        """A plain NATS connection that may do anything (the engine user): raw floors and
        watching the runs bucket."""
        import nats

        if not self.auth:
            return await nats.connect(self.url)
        return await nats.connect(self.url, user="engine", password=self.password("engine"))

    async def watch(self) -> "RunWatch":
        nc = await self.raw_connect()
        w = await RunWatch(nc, self.L).start()
        w.own_nc = nc
        return w


async def wait_consumer(js, stream: str, durable: str, env: Env | None = None,
                        timeout: float = 60.0) -> None:
    """Until a process has created its durable consumer (i.e. it is serving)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await js.consumer_info(stream, durable)
            return
        except Exception:  # noqa: BLE001 - not yet
            if env is not None:
                env.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"consumer {durable} on {stream} did not appear in {timeout}s")
            await asyncio.sleep(0.05)


class RunWatch:
    """Final snapshots of runs, seen live on the runs KV subject (a core subscription: no
    polling, no consumer). ``await wait(runs)`` returns {run: snapshot dict}."""

    def __init__(self, nc, L: Layout):
        self.nc, self.L = nc, L
        self.own_nc = None
        self.final: dict[str, dict[str, Any]] = {}
        self.final_at: dict[str, float] = {}
        self._changed = asyncio.Event()

    async def start(self) -> "RunWatch":
        self.sub = await self.nc.subscribe(f"$KV.{self.L.runs_bucket}.>", cb=self._on)
        return self

    async def _on(self, msg) -> None:
        try:
            d = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(d, dict) and d.get("state") in RUN_FINAL:
            run = d["run"]
            if run not in self.final:
                self.final[run] = d
                self.final_at[run] = time.perf_counter()
                self._changed.set()

    async def wait(self, runs, timeout: float = 300.0, env: Env | None = None) -> dict:
        runs = list(runs)
        deadline = time.monotonic() + timeout
        while True:
            if all(r in self.final for r in runs):
                return {r: self.final[r] for r in runs}
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 1.0)
            except asyncio.TimeoutError:
                if env is not None:
                    env.check_alive()
                if time.monotonic() > deadline:
                    missing = [r for r in runs if r not in self.final]
                    raise TimeoutError(f"{len(missing)} run(s) not finished after {timeout}s, "
                                       f"e.g. {missing[:3]}")

    async def stop(self) -> None:
        await self.sub.unsubscribe()
        if self.own_nc is not None:
            await self.own_nc.close()


def _task_bytes(run: str, key: str, i: int) -> bytes:
    """A task message as big as the engine's dispatch."""
    return json.dumps({"v": 1, "run": run, "params": {}, "key": key, "node": key, "attempt": 1,
                       "queue": "default", "wf": "0123456789abcdef", "inputs": {},
                       "timeout": None, "isolation": None}, separators=(",", ":")).encode()


def _event_bytes(run: str, key: str) -> bytes:
    return json.dumps({"v": 1, "type": "TaskSucceeded", "run": run, "ts": time.time(),
                       "key": key, "attempt": 1, "outputs": {}, "exec_s": 0.0, "duration": 0.0,
                       "worker": "raw"}, separators=(",", ":")).encode()


async def raw_chain(nc, L: Layout, n: int) -> float:
    """The floor of a chain: per step publish a task, pull it, publish its result event, ack the
    task, pull the event, ack it — one at a time, on the same streams nbflow uses. Seconds."""
    from nbflow.nats import infra

    js = nc.jetstream()
    await infra.ensure(js, L)
    run = "rawchain" + secrets.token_hex(3)
    tsubj, hsubj = L.task_subject("rawq", run), L.history_subject(run, "TaskSucceeded")
    tsub = await js.pull_subscribe(tsubj, durable="raw_worker", stream=L.tasks_stream)
    hsub = await js.pull_subscribe(hsubj, durable="raw_engine", stream=L.history_stream)
    t0 = time.perf_counter()
    for i in range(n):
        key = f"s{i}"
        await js.publish(tsubj, _task_bytes(run, key, i), headers={MSG_ID: f"task.{run}.{key}.1"})
        (m,) = await tsub.fetch(1, timeout=5)
        await js.publish(hsubj, _event_bytes(run, key), headers={MSG_ID: f"done.{run}.{key}.1"})
        await m.ack()
        (e,) = await hsub.fetch(1, timeout=5)
        json.loads(e.data)
        await e.ack()
    dt = time.perf_counter() - t0
    await tsub.unsubscribe()
    await hsub.unsubscribe()
    return dt


async def raw_fanout(nc, L: Layout, runs: int, width: int, batch: int = 64) -> float:
    """The floor of a fan-out: every run publishes its ``width`` tasks at once (async publishes),
    a worker loop pulls them in batches and publishes result events, an orchestrator loop pulls
    and acks the events; all concurrent, batched as the engine and noop worker batch. Seconds."""
    from nbflow.nats import infra

    js = nc.jetstream()
    await infra.ensure(js, L)
    tag = secrets.token_hex(3)
    tsubj = L.task_subject("rawq")
    tsub = await js.pull_subscribe(tsubj, durable="raw_fworker", stream=L.tasks_stream)
    hsub = await js.pull_subscribe(L.history_subject("*"), durable="raw_fengine",
                                   stream=L.history_stream)
    total = runs * width
    done = asyncio.Event()
    got = 0

    async def worker():
        n = 0
        while n < total:
            try:
                ms = await tsub.fetch(batch, timeout=1)
            except asyncio.TimeoutError:
                continue
            futs = []
            for m in ms:
                t = json.loads(m.data)
                futs.append(await js.publish_async(
                    L.history_subject(t["run"], "TaskSucceeded"),
                    _event_bytes(t["run"], t["key"]),
                    headers={MSG_ID: f"done.{t['run']}.{t['key']}.1"}))
            for f in futs:
                await f
            for m in ms:
                await m.ack()
            n += len(ms)

    async def orchestrator():
        nonlocal got
        while got < total:
            try:
                ms = await hsub.fetch(256, timeout=1)
            except asyncio.TimeoutError:
                continue
            for m in ms:
                json.loads(m.data)
                await m.ack()
            got += len(ms)
        done.set()

    async def start_run(r: int):
        run = f"rawfan{tag}{r}"
        futs = [await js.publish_async(L.task_subject("rawq", run), _task_bytes(run, f"p{i}", i),
                                       headers={MSG_ID: f"task.{run}.p{i}.1"})
                for i in range(width)]
        for f in futs:
            await f

    t0 = time.perf_counter()
    wt, ot = asyncio.create_task(worker()), asyncio.create_task(orchestrator())
    await asyncio.gather(*(start_run(r) for r in range(runs)))
    await asyncio.wait_for(done.wait(), 300)
    dt = time.perf_counter() - t0
    await asyncio.gather(wt, ot)
    await tsub.unsubscribe()
    await hsub.unsubscribe()
    return dt


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
