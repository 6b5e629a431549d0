"""What the CLI's commands share: the --nats/--namespace options, a client per command, and
how times, durations, states and -p parameters are shown and parsed."""
from __future__ import annotations

import click

from nbflow.core.durations import elapsed as _dur  # noqa: F401 (the commands' name for it)


def nats_options(f):
    f = click.option("--namespace", envvar="NBFLOW_NAMESPACE", default="",
                     help="Namespace prefixing every stream, bucket and subject "
                          "[env NBFLOW_NAMESPACE].")(f)
    f = click.option("--nats", "nats_url", envvar="NBFLOW_NATS_URL", default=None,
                     help="NATS server URL(s), comma-separated [env NBFLOW_NATS_URL]. "
                          "Default: the embedded stack, started on demand.")(f)
    return f


def _arun(coro):
    import asyncio

    return asyncio.run(coro)


async def _with_client(nats_url, namespace, fn):
    from nbflow.client import Client

    from nbflow.nats import infra

    c = await Client.connect(nats_url, namespace)
    try:
        return await infra.guarded(c.nc, fn(c))     # a denied action says so, not a timeout
    finally:
        await c.close()


def _call(nats_url, namespace, fn):
    """Connect (starting the embedded stack on demand), ``await fn(client)``, close."""
    from nbflow.stack import nats_url as face_url

    return _arun(_with_client(face_url(nats_url), namespace, fn))


def _listing(rows, as_json: bool, *, empty: str, line, header: str | None = None,
             as_dict=None) -> None:
    """A list command's output: with ``--json`` one JSON array (each row through ``as_dict``),
    else ``empty`` when there are no rows, else ``header`` and one ``line(row)`` per row."""
    import json

    if as_json:
        click.echo(json.dumps([as_dict(r) if as_dict else r for r in rows], indent=2, default=str))
        return
    if not rows:
        click.echo(empty)
        return
    if header is not None:
        click.echo(header)
    for r in rows:
        click.echo(line(r))


def _local(ts) -> str:
    import time as _t

    return _t.strftime("%Y-%m-%d %H:%M:%S", _t.localtime(ts)) if ts else ""


_STATE_COLOUR = {"succeeded": "green", "failed": "red", "rejected": "magenta",
                 "cancelled": "yellow", "running": "cyan", "skipped": "bright_black",
                 "reused": "blue"}


def _st(state: str) -> str:
    return click.style(state, fg=_STATE_COLOUR.get(state))


def _parse_params(pairs, wf=None) -> dict:
    from nbflow.client import parse_param

    defaults = wf.params if wf is not None else {}
    return {k: parse_param(v, defaults.get(k)) for k, v in pairs}
