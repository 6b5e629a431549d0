"""Engine + workers as child processes; a child that dies is restarted."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nbflow.stack.files import open_private
from nbflow.stack.procs import child_setup


def child_env(namespace: str | None) -> dict[str, str]:
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
        env = {**child_env(self.namespace), **self.env, **self.role_env.get(kind, {})}
        if kind == "engine" and name not in self._spawned:
            env.update(self.engine_env)            # e.g. fault injection: first start only
        self._spawned.add(name)
        out = open_private(Path(self.log_file)) if self.log_file else subprocess.DEVNULL
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL,
                             preexec_fn=child_setup(self.die_with_parent))
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
