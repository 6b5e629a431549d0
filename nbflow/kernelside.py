"""Runs INSIDE a pooled kernel: a task notebook's code cells in one execute_request.

The worker (:mod:`nbflow.worker.kernels.onecall`) sends one execute whose code calls :func:`run`
with the cells' sources. For each cell in order it runs the cell with
``get_ipython().run_cell(source, store_history=True)`` — so magics, display, execute_result,
tracebacks and execution counts behave as in Jupyter, and the cell's outputs go out on iopub under
the one execute's msg_id — then publishes an end marker (ok or error, execution count). Iopub is
ordered, so the outputs before a cell's end marker (and after the previous one's) are that
cell's: an end marker also says the next cell starts (one marker per cell: each costs the kernel
a message). It stops at the first failing cell, as ``stop_on_error``.

A marker is an iopub message of type ``nbflow_cell`` (never recorded as an output), sent after
stdout/stderr were flushed, so everything the cell printed precedes it.

Before the cells, in the same execute, it can reset the namespace left by the kernel's last task
(``reset``: what ``nbflow.worker.kernels.kernel._RESET`` does) and enter the task's folder
(``cwd``: what ``_PRELUDE`` does), so a task in ``run``/``reuse`` isolation costs one execute.

A cell the kernel would run as a coroutine (top-level ``await``: IPython's own
``should_run_async`` says so) cannot run nested inside this execute (the kernel's event loop is
running it): :func:`run` stops before it with a ``fallback`` marker and the worker runs it and the
cells after it one execute each.

Imports nothing but the standard library (and IPython, already loaded in the kernel). The pool
executes this module's source into the kernel's ``_nbflow_pool`` module at warm-up, so it works in
a kernel whose environment cannot import nbflow (a plain papermill call with another kernel).
"""
from __future__ import annotations

import os
import sys

MSG_TYPE = "nbflow_cell"


def _flush(stream) -> None:
    """ipykernel's flush waits for its IO thread (a thread round trip): skipped when nothing was
    written since the last one (a marker is queued on that thread after any flush under way)."""
    if getattr(stream, "_buffers", None) == {}:
        return
    try:
        stream.flush()
    except Exception:  # noqa: BLE001 - a closed or replaced stream: nothing to order
        pass


def _send(ip, content: dict) -> None:
    """A marker on iopub, after everything printed so far (streams flushed first), bypassing
    display hooks (a capture in progress must not swallow it)."""
    _flush(sys.stdout)
    _flush(sys.stderr)
    pub = ip.display_pub
    msg = pub.session.msg(MSG_TYPE, content, parent=pub.parent_header)
    pub.session.send(pub.pub_socket, msg, ident=b"nbflow_cell")


def _reset(ip, home: str) -> None:
    """The namespace, In/Out and counts go; sys.path and env vars come back (as at warm-up);
    the cwd is ``home``."""
    m = sys.modules["_nbflow_pool"]
    os.chdir(home)                 # the last task's folder may be gone; reset needs a cwd
    ip.reset(new_session=True)
    sys.path[:] = m.path
    env, pristine = os.environ, m.environ
    if len(env) != len(pristine) or any(env.get(k) != v for k, v in pristine.items()):
        # only what changed (clearing and refilling it all costs ~2 ms of putenv calls)
        for k in [k for k in env if k not in pristine]:
            del env[k]
        for k, v in pristine.items():
            if env.get(k) != v:
                env[k] = v
    os.chdir(home)


def _enter(cwd: str, prev: str) -> None:
    """cwd and sys.path[0] = the task's folder (replacing ``prev``, the last one we set)."""
    os.chdir(cwd)
    if sys.path and sys.path[0] == prev:
        sys.path[0] = cwd
    else:
        sys.path.insert(0, cwd)


def _needs_loop(ip, source: str) -> bool:
    """IPython would run this cell as a coroutine (top-level ``await``, ``async for/with``)."""
    if "await" not in source and "async" not in source:
        return False                   # (transforming every cell twice costs ~0.3 ms each)
    try:
        transformed = ip.transform_cell(source)
        return bool(ip.should_run_async(source, transformed_cell=transformed,
                                        preprocessing_exc_tuple=None))
    except Exception:  # noqa: BLE001 - run_cell reports the error in the cell
        return False


def run(cells, reset: bool = False, home: str = "", cwd: str = "", prev: str = "",
        forget: bool = False) -> None:
    """Run ``cells`` (``[(index, source), ...]``) as described in the module doc. ``forget``:
    afterwards (whatever happened, but a fallback) drop the names the cells made (a --map chunk's
    instance: :func:`nbflow.io.forget` with the names kept at the chunk's start)."""
    from IPython import get_ipython

    ip = get_ipython()
    try:
        if reset:
            _reset(ip, home)
            prev = home
        if cwd:
            _enter(cwd, prev)
    except Exception as e:  # noqa: BLE001 - the worker discards this kernel
        _send(ip, {"event": "prep_failed", "ename": type(e).__name__, "evalue": str(e)})
        return
    try:
        for index, source in cells:
            if _needs_loop(ip, source):
                forget = False         # the worker runs the rest, then forgets
                _send(ip, {"event": "fallback", "index": index})
                return
            r = ip.run_cell(source, store_history=True)
            err = r.error_before_exec if r.error_before_exec is not None else r.error_in_exec
            ok = err is None
            _send(ip, {"event": "end", "index": index, "ok": ok,
                       "execution_count": r.execution_count,
                       "ename": "" if ok else type(err).__name__,
                       "evalue": "" if ok else str(err)})
            if not ok:
                return
            if getattr(ip, "exit_now", False):
                return                 # exit(): the kernel stops after this request; the
                                       # worker finds the rest unrun (as one request per cell)
    finally:
        if forget:
            from nbflow.io import forget as _forget

            keep = ip.user_ns.get("__nbflow_keep")
            if isinstance(keep, set):
                _forget(ip.user_ns, keep)
