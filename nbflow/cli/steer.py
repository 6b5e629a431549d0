"""Steering runs: `nbflow cancel`, `approve`, `signal`."""
from __future__ import annotations

import click

from nbflow.cli.common import _call, nats_options


@click.command()
@click.argument("run_id", metavar="RUN")
@nats_options
def cancel(run_id, nats_url, namespace):
    """Cancel a run: queued tasks never start, running ones are interrupted."""
    _call(nats_url, namespace, lambda c: c.cancel(run_id))
    click.echo(f"cancelling run {run_id}", err=True)


@click.command()
@click.argument("run_id", metavar="RUN")
@click.argument("task")
@click.option("--reject", is_flag=True, help="Reject instead of approve.")
@click.option("--comment", default="", help="Why (recorded in the history).")
@click.option("--as", "by", default=None,
              help="Who decides, on a server without users only (default: JUPYTERHUB_USER or "
                   "OS user). With credentials the decision is recorded under the NATS user, "
                   "and --as may not name anyone else.")
@nats_options
def approve(run_id, task, reject, comment, by, nats_url, namespace):
    """Approve (or --reject) a task awaiting approval."""
    d = _call(nats_url, namespace, lambda c: c.approve(run_id, task, not reject, by, comment))
    click.echo(f"{d['state']} {task} of run {run_id} as {d['by']}", err=True)


@click.command("signal")
@click.argument("run_id", metavar="RUN")
@click.argument("name")
@click.argument("value", required=False, default="null")
@nats_options
def signal_cmd(run_id, name, value, nats_url, namespace):
    """Send signal NAME (VALUE parsed as JSON when it can be) to a waiting run."""
    from nbflow.client import parse_param

    _call(nats_url, namespace, lambda c: c.signal(run_id, name, parse_param(value)))
    click.echo(f"sent {name} to run {run_id}", err=True)
