"""Run All of a notebook in a real ipykernel (nbclient), pointed at the test stack."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat

from support import environ


def run_all(path: Path, nats_url: str, namespace: str = "itest", timeout: int = 120,
            allow_errors: bool = False):
    """Execute every cell as Jupyter's Run All does; the kernel sees the notebook's path as
    JupyterLab tells it (JPY_SESSION_NAME). Returns the executed notebook."""
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    with environ(NBFLOW_NATS_URL=nats_url, NBFLOW_NAMESPACE=namespace,
                 JPY_SESSION_NAME=str(path), NBFLOW_USER="analyst"):
        NotebookClient(nb, kernel_name="python3", timeout=timeout, allow_errors=allow_errors,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def outputs(nb, kind: str | None = None) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if kind is None or o.get("output_type") == kind]


def text(nb) -> str:
    """Everything the cells printed (stdout, stderr, text/plain results)."""
    parts = []
    for o in outputs(nb):
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        elif "data" in o:
            parts.append(o["data"].get("text/plain", ""))
        elif o.get("output_type") == "error":
            parts.append(f"{o['ename']}: {o['evalue']}")
    return "".join(parts)


def widget_views(nb) -> int:
    return sum(1 for o in outputs(nb)
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {}))


def start_kernel(cwd: Path, nats_url: str, namespace: str = "itest", notebook: Path | None = None):
    """A real python3 ipykernel (jupyter_client) pointed at the test stack; returns (km, kc)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    env = {**os.environ, "NBFLOW_NATS_URL": nats_url, "NBFLOW_NAMESPACE": namespace,
           "NBFLOW_USER": "analyst"}
    if notebook is not None:
        env["JPY_SESSION_NAME"] = str(notebook)
    km.start_kernel(env=env, cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def execute(kc, code: str, cell_id: str | None = None, timeout: float = 120) -> dict:
    """Execute as JupyterLab does (with the cell's id in the request's metadata); returns
    {'ok', 'stdout', 'stderr', 'error', 'data'}."""
    import time

    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": True}
    msg = kc.session.msg("execute_request", content,
                         metadata={"cellId": cell_id} if cell_id else {})
    kc.shell_channel.send(msg)
    msg_id = msg["header"]["msg_id"]
    out = {"stdout": "", "stderr": "", "error": "", "data": []}
    deadline = time.monotonic() + timeout
    while True:
        m = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        t, c = m["msg_type"], m["content"]
        if t == "stream":
            out[c["name"]] += c["text"]
        elif t == "error":
            out["error"] = f"{c['ename']}: {c['evalue']}"
        elif t in ("display_data", "execute_result"):
            out["data"].append(c["data"])
        elif t == "status" and c["execution_state"] == "idle":
            break
    while True:
        reply = kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    out["ok"] = reply["content"]["status"] == "ok"
    return out
