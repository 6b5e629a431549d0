"""binder/: `start` brings a stack up before handing over; `postBuild` succeeds in a fresh
virtualenv and installs the nbflow kernel there."""
from __future__ import annotations

import json
import os
import site
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO

BINDER = REPO / "binder"


def test_files_are_there_and_executable():
    assert "graphviz" in (BINDER / "apt.txt").read_text().split()
    assert "-e ." in (BINDER / "requirements.txt").read_text().splitlines()
    for name in ("postBuild", "start"):
        assert os.access(BINDER / name, os.X_OK), f"binder/{name} is not executable"


def test_start_brings_a_stack_up_then_execs(tmp_path, monkeypatch):
    from nbflow import stack

    home = tmp_path / "home"
    env = {**os.environ, "NBFLOW_HOME": str(home)}
    env.pop("NBFLOW_NATS_URL", None)
    try:
        res = subprocess.run([str(BINDER / "start"), sys.executable, "-c", "print('handed over')"],
                             env=env, capture_output=True, text=True, timeout=90)
        assert res.returncode == 0, res.stderr
        assert "handed over" in res.stdout          # exec "$@" ran the server command
        info = json.loads((home / "stack.json").read_text())
        host, _, port = info["url"].rpartition("//")[2].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=2):
            pass
        from nbflow.client import SyncClient

        monkeypatch.setenv("NBFLOW_HOME", str(home))   # where the stack's credentials are
        with SyncClient(info["url"]) as c:     # a real JetStream answers
            assert c.runs() == []
    finally:
        stack.down(str(home))
    assert stack.read_stack(home) is None or not stack._connectable(info["url"])


@pytest.mark.slow
def test_postbuild_in_a_fresh_virtualenv(tmp_path):
    # Binder's environment has the requirements installed before postBuild runs: the new venv
    # sees the packages of the Python running this suite (itself maybe a venv, whose packages
    # `--system-site-packages` would not show), after its own
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "VIRTUAL_ENV": str(venv), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONHOME", None)
    res = subprocess.run(["bash", str(BINDER / "postBuild")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    spec = json.loads((venv / "share/jupyter/kernels/nbflow/kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (nbflow)"
    assert os.path.realpath(spec["argv"][0]).startswith(os.path.realpath(venv)) or \
        spec["argv"][0].startswith(str(venv))
    # the venv's nbflow is this checkout (editable), and the kernel's python imports it
    out = subprocess.run([spec["argv"][0], "-c", "import nbflow, os; print(nbflow.__file__)"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().startswith(str(REPO / "nbflow")), out
