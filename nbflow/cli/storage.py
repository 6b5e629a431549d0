"""`nbflow gc`: free storage."""
from __future__ import annotations

import click

from nbflow.cli.common import _call, nats_options


@click.command()
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--days", type=float, default=None,
              help="Keep finished runs this many days (default: NBFLOW_RETENTION_DAYS or 30).")
@nats_options
def gc(dry_run, days, nats_url, namespace):
    """Free storage: finished runs past retention, orphaned artifacts and upload chunks, work
    dirs of workers that are gone. Running runs and anything a kept run names stay."""
    from nbflow import storage

    rep = _call(nats_url, namespace, lambda c: storage.gc(c, dry_run=dry_run, days=days))
    for line in rep.lines():
        click.echo(line)
