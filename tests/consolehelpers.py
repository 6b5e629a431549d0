"""Helpers for the console's tests: start `nbflow ui` or a Jupyter server with the extension as
subprocesses, and a tiny HTTP session (cookies + the XSRF form field) over urllib."""
from __future__ import annotations

import contextlib
import http.cookiejar
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from support import REPO, stop_process

HERE = Path(__file__).parent


class Session:
    def __init__(self, base: str, token: str | None = None):
        self.base, self.token = base, token
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                  _NoRedirect())

    def get(self, path: str, **params) -> tuple[int, str, dict]:
        if self.token:
            params.setdefault("token", self.token)
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        return self._open(urllib.request.Request(url))

    def post(self, path: str, **form) -> tuple[int, str, dict]:
        xsrf = next((c.value for c in self.jar if c.name == "_xsrf"), None)
        if xsrf is None:                      # a page sets the cookie first
            self.get("/nbflow/inbox")
            xsrf = next(c.value for c in self.jar if c.name == "_xsrf")
        data = urllib.parse.urlencode({**form, "_xsrf": xsrf}).encode()
        return self._open(urllib.request.Request(self.base + path, data=data, method="POST"))

    def _open(self, req):
        try:
            with self.opener.open(req, timeout=60) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace"), dict(e.headers)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **kw):
        return None


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return                             # answering (403 without a token is fine)
        except Exception:  # noqa: BLE001 - not listening yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)


def _started(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Wait for the server; one that never answers is stopped, not left behind."""
    try:
        wait_http(url, proc, log)
    except BaseException:
        stop(proc)
        raise


stop = stop_process          # the console tests' name for it


def stack_env(nats_url: str, **extra) -> dict:
    env = {**os.environ, "NBFLOW_NATS_URL": nats_url, "NBFLOW_NAMESPACE": "itest",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)] +
                                         ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    env.update(extra)
    return env


def start_ui(tmp: Path, nats_url: str, port: int, token: str, **env) -> subprocess.Popen:
    log = tmp / "ui.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbflow", "ui", "--port", str(port), "--token", token,
         "--no-browser"], env=stack_env(nats_url, **env), stdout=open(log, "wb"),
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _started(f"http://127.0.0.1:{port}/nbflow/login", proc, log)
    return proc


@contextlib.contextmanager
def running_ui(tmp: Path, nats_url: str, token: str, user: str):
    """A standalone `nbflow ui` on a free port as ``user``, for the block; yields its URL."""
    from nbflow.stack import free_port

    port = free_port()
    proc = start_ui(tmp, nats_url, port, token, NBFLOW_USER=user)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def jupyter_env(tmp: Path, nats_url: str, **extra) -> dict:
    conf = tmp / "jconf"
    settings = conf / "lab" / "user-settings" / "@jupyterlab"
    (settings / "apputils-extension").mkdir(parents=True, exist_ok=True)
    (settings / "docmanager-extension").mkdir(parents=True, exist_ok=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (settings / "docmanager-extension" / "plugin.jupyterlab-settings").write_text(
        json.dumps({"autosave": False}))
    # what the installed etc/jupyter/jupyter_server_config.d/nbflow.json does (an editable
    # install does not place that file)
    (conf / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": {"nbflow.console": True}}}))
    return stack_env(nats_url, JUPYTER_CONFIG_DIR=str(conf),
                     JUPYTER_DATA_DIR=str(tmp / "jdata"), JUPYTER_RUNTIME_DIR=str(tmp / "jrun"),
                     IPYTHONDIR=str(tmp / "ipy"), **extra)


def start_jupyter(tmp: Path, nats_url: str, port: int, app: str = "server", args=(),
                  **env) -> subprocess.Popen:
    """`jupyter server` (or lab) with the console enabled (see jupyter_env)."""
    root = tmp / "root"
    root.mkdir(exist_ok=True)
    log = tmp / f"{app}.log"
    cmd = [sys.executable, "-m", "jupyter", app, "--allow-root", "--no-browser",
           "--ip", "127.0.0.1", "--port", str(port), f"--ServerApp.root_dir={root}",
           *args]
    if app == "lab":
        cmd += ["--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    proc = subprocess.Popen(cmd, env=jupyter_env(tmp, nats_url, **env), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _started(f"http://127.0.0.1:{port}/api/status", proc, log)
    return proc
