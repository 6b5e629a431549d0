"""Helpers shared by the tests (import them from here: `conftest` is ambiguous once
notebooks/ has its own conftest.py)."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

HERE = Path(__file__).parent
DATA = HERE / "data"
REPO = HERE.parent
SHARED = REPO.parent / "shared"


def finish(client, run: str, timeout: float = 120.0):
    """Wait for a run to end, then prove its history replays to the stored snapshot."""
    st = client.wait(run, timeout=timeout)
    assert st is not None and st.is_final
    check_replay(client, run)
    return client.status(run)


def check_replay(client, run: str, timeout: float = 30.0) -> None:
    """Replay the run's history through state.py; it must equal the engine's stored KV snapshot
    (read from the runs bucket itself: ``status()`` would fall back to replay and compare the
    replay with itself). A finished run without a snapshot fails."""
    deadline = time.monotonic() + timeout
    while True:
        snap = client.snapshot(run)
        replayed = client.replay(run)
        assert replayed is not None, f"run {run} has no history to replay"
        if snap is not None and snap.to_dict() == replayed.to_dict():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)   # the engine writes the snapshot just after the event is in history
    assert snap is not None, f"run {run} ({replayed.state}) has no snapshot in the runs bucket"
    assert replayed.to_dict() == snap.to_dict(), f"replay of run {run} differs from its snapshot"


def success_counts(client, run: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ev in client.history(run):
        if ev.type == "TaskSucceeded":
            counts[ev["key"]] = counts.get(ev["key"], 0) + 1
    return counts


def wait_for(cond, timeout=60.0, what="condition", every=0.05, retry=()):
    """The one polling helper: call ``cond`` until it returns something truthy (for states only
    visible by polling: widget traitlets, snapshots, a cluster forming) and return that; fail the
    test with ``what`` after ``timeout`` seconds. Exceptions of the types in ``retry`` count as
    "not yet" (the last one is named in the failure)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = cond()
        except retry as e:
            last, v = e, None
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                                 + (f" (last error: {last!r})" if last is not None else ""))
        time.sleep(every)


def stop_process(proc, timeout: float = 20.0) -> None:
    """The one way a test stops a child process it started: SIGTERM, then SIGKILL after
    ``timeout`` seconds."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _setenv(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def environ(**values):
    """Set environment variables (None: unset) for the block; put back what was there."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        _setenv(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            _setenv(k, v)


def ipython_shell():
    """The one test IPython shell of this process (IPython's globalipapp hands it out only to
    its first caller, so every test module gets it here)."""
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    start_ipython()
    return get_ipython()
