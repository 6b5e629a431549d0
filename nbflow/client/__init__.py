"""The Python client that the CLI, the magics and the widgets share. Async first::

    async with Client.connect() as c:
        run = await c.submit("report.ipynb", {"day": "2026-11-20"})
        async for ev, state in c.watch(run):
            ...

and the same calls, synchronously, on :class:`SyncClient` (its event loop runs in a background
thread, so it works inside Jupyter too).

The calls live in one module per concern, put together in :class:`Client`:
``session`` (connecting, who the user is, the decide service), ``reading`` (status, history,
replay, watch, runs), ``steering`` (cancel, approve, signal, retry), ``outputs`` (notebooks,
logs, output values) and ``api`` (Client, SyncClient, run_once, parse_param).
"""
from nbflow.client.api import Client, SyncClient, parse_param, run_once
from nbflow.client.session import resolve_url
from nbflow.client.steering import check_signal_name
from nbflow.core.events import Event, task_key
from nbflow.core.ir import Workflow, WorkflowError
from nbflow.core.state import RUN_FINAL, RunState
from nbflow.errors import AlreadyDecided, Conflict, NatsError, NbflowError, NotFound, Transient
from nbflow.runs import BundleWarning, Runs, new_run_id, whoami

__all__ = ["Client", "SyncClient", "NbflowError", "AlreadyDecided", "Conflict", "NatsError",
           "NotFound", "Transient", "new_run_id", "whoami", "parse_param", "resolve_url",
           "run_once", "check_signal_name", "RUN_FINAL", "RunState", "Event", "task_key",
           "Workflow", "WorkflowError", "BundleWarning", "Runs"]
