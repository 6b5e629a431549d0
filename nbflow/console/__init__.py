"""The runs console: inbox of approvals, runs, one run's DAG and tasks, schedules, workers and
Prometheus metrics, as a Jupyter server extension at ``<base_url>/nbflow/`` and standalone as
``nbflow ui``.

Enabled by default through ``etc/jupyter/jupyter_server_config.d/nbflow.json`` (installed with
the package). Configure with ``c.NbflowConsole.approvers = ["ann", "bob"]`` (or
``NBFLOW_APPROVERS=ann,bob``; unset: everyone who can sign in may decide),
``c.NbflowConsole.nats_url`` / ``namespace`` (else NBFLOW_NATS_URL / NBFLOW_NAMESPACE, else the
embedded stack).
"""
from __future__ import annotations


def _jupyter_server_extension_points():
    return [{"module": "nbflow.console"}]


def _load_jupyter_server_extension(serverapp) -> None:
    from jupyter_server.base.handlers import JupyterHandler
    from jupyter_server.utils import url_path_join

    from nbflow.console.handlers import handlers, settings
    from nbflow.console.index import Console

    cfg = serverapp.config.get("NbflowConsole", {})
    console = Console(cfg.get("nats_url"), cfg.get("namespace"), cfg.get("approvers"))
    web_app = serverapp.web_app
    base = web_app.settings.get("base_url", "/")
    prefix = url_path_join(base, "nbflow")
    web_app.settings.update(settings(console, prefix + "/"))
    web_app.add_handlers(".*$", handlers(prefix, JupyterHandler))
    serverapp.log.info("nbflow console at %s/", prefix)


# the older name, for jupyter_server < 2 and notebook 6
load_jupyter_server_extension = _load_jupyter_server_extension
