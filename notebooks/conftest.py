"""`pytest --nbval-lax notebooks/`: each example notebook runs in a fresh python3 kernel against
an embedded stack of its own (a temp NBFLOW_HOME), stopped when the session ends."""
from __future__ import annotations

import os
import tempfile

import pytest

_HOME = tempfile.mkdtemp(prefix="nbflow-notebooks-")


def pytest_configure(config):
    # before any kernel starts: kernels inherit this environment
    os.environ["NBFLOW_HOME"] = _HOME
    os.environ.pop("NBFLOW_NATS_URL", None)
    os.environ.pop("NBFLOW_NAMESPACE", None)
    os.environ.setdefault("NBFLOW_USER", "nbval")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # what Jupyter's server sets: lets `%flow run` / `%flow show` find the notebook's file
    path = str(getattr(item, "path", "") or getattr(item, "fspath", ""))
    if path.endswith(".ipynb"):
        os.environ["JPY_SESSION_NAME"] = path


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    # only the notebook's own kernel is told: a test file run after it in the same process (the
    # suite runs on several) must not find a notebook its kernel does not run
    if str(getattr(item, "path", "") or getattr(item, "fspath", "")).endswith(".ipynb"):
        os.environ.pop("JPY_SESSION_NAME", None)


def pytest_sessionfinish(session, exitstatus):
    from nbflow import stack

    try:
        stack.down(_HOME)
    except Exception as e:  # noqa: BLE001 - never started, or already gone
        print(f"nbflow: stack.down: {e}")
