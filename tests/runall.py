"""Run All of a notebook in a real ipykernel (nbclient), pointed at the test stack."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat


def run_all(path: Path, nats_url: str, namespace: str = "itest", timeout: int = 120,
            allow_errors: bool = False):
    """Execute every cell as Jupyter's Run All does; the kernel sees the notebook's path as
    JupyterLab tells it (JPY_SESSION_NAME). Returns the executed notebook."""
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    env = {"NBFLOW_NATS_URL": nats_url, "NBFLOW_NAMESPACE": namespace,
           "JPY_SESSION_NAME": str(path), "NBFLOW_USER": "analyst"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, kernel_name="python3", timeout=timeout, allow_errors=allow_errors,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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
