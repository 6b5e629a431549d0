"""The processes: `nbflow up`/`down` (the embedded stack), `nbflow user add` (its users),
`nbflow engine` and `nbflow worker`."""
from __future__ import annotations

import os
import sys

import click

from nbflow.cli.common import _arun, nats_options
from nbflow.errors import UserError


@click.command()
@click.option("--workers", type=int, default=None, help="Worker processes (default: CPU count; 0: nats-server and engine only).")
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="Data dir (default: NBFLOW_HOME or ~/.local/share/nbflow).")
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="nats-server port (default: 4222 if free).")
@click.option("--namespace", envvar="NBFLOW_NAMESPACE", default=None)
def up(workers, data, port, namespace):
    """Run the embedded stack in the foreground: nats-server, engine, workers."""
    from nbflow import stack

    try:
        sys.exit(stack.run_foreground(data, port, workers, namespace,
                                      echo=lambda m: click.echo(m, err=True)))
    except stack.StackError as e:
        raise UserError(str(e)) from None


@click.command()
@click.option("--data", type=click.Path(file_okay=False), default=None)
def down(data):
    """Stop the background embedded stack."""
    from nbflow import stack

    info = stack.down(data)
    if info:
        click.echo(f"stopped the nbflow stack at {info['url']} (pid {info['pid']})", err=True)
    else:
        click.echo("no nbflow stack is running", err=True)


@click.group()
def user():
    """Users and roles (engine, worker, author, approver, viewer): `add` one to the embedded
    stack; `conf` prints the roles for your own server or cluster."""


@user.command("add")
@click.argument("name")
@click.option("--role", "roles", multiple=True, required=True,
              help="A role (repeat for several): author, approver, viewer, worker, engine.")
@click.option("--data", default=None, help="The stack's data dir (default: NBFLOW_HOME).")
def user_add(name, roles, data):
    """Add a user; prints its password once (give it to them as NBFLOW_NATS_USER/_PASSWORD)."""
    from nbflow import stack

    try:
        pw = stack.add_user(name, list(roles), data)
    except ValueError as e:
        raise UserError(str(e)) from None
    click.echo(pw)
    click.echo(f"added {name} ({', '.join(roles)}): connect with NBFLOW_NATS_USER={name} "
               f"NBFLOW_NATS_PASSWORD=<the line above>", err=True)


@user.command("conf")
@click.option("--namespace", "namespaces", multiple=True,
              help="A namespace the roles cover (repeat for several; default: the default "
                   "namespace, or NBFLOW_NAMESPACE).")
@click.option("--user", "people", multiple=True, metavar="NAME=ROLE[,ROLE]",
              help="A person and their roles, e.g. ann=author or bob=approver,viewer (repeat; "
                   "default: the examples alice=author, bob=approver).")
def user_conf(namespaces, people):
    """Print the roles as a nats-server `authorization` block for your own server or cluster
    (deploy/nats/roles.conf); passwords come from nats-server's NBFLOW_<USER>_PASSWORD
    environment variables."""
    from nbflow.nats import auth
    from nbflow.nats.layout import default_namespace

    users = None
    if people:
        users = dict(auth.SERVICE_USERS)
        for spec in people:
            name, sep, roles = spec.partition("=")
            if not sep or not roles.strip():
                raise UserError(f"--user {spec!r}: write NAME=ROLE[,ROLE], e.g. ann=author")
            users[name.strip()] = [r.strip() for r in roles.split(",") if r.strip()]
    try:
        text = auth.template_conf(list(namespaces) or [default_namespace()], users)
    except ValueError as e:
        raise UserError(str(e)) from None
    click.echo(text, nl=False)
    vars_ = " ".join(auth.password_variable(u) for u in (users or auth.TEMPLATE_USERS))
    click.echo(f"set {vars_} in nats-server's environment", err=True)


@click.command()
@nats_options
@click.option("--replicas", type=int, default=None,
              help="Replicas for streams/buckets (cluster: 3). Default: 1 for new ones; "
                   "existing ones keep theirs (never lowered).")
def engine(nats_url, namespace, replicas):
    """Run the engine against a NATS server or cluster (run as many as you like)."""
    import logging

    from nbflow.stack import nats_url as resolve_url
    from nbflow.engine.engine import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    try:
        _arun(serve(resolve_url(nats_url), namespace, replicas))
    except KeyboardInterrupt:
        pass


@click.command()
@nats_options
@click.option("--queue", default="default", help="Task queue to serve (%%task --queue).")
@click.option("--concurrency", type=int, default=1, help="Tasks run at once by this worker.")
@click.option("--name", default=None, help="How this worker is named in runs and `nbflow "
              "workers` (default: HOST-PID).")
@click.option("--min-kernels", type=int, default=None,
              help="Scale warm kernels with the queue's demand, from this many ...")
@click.option("--max-kernels", type=int, default=None,
              help="... up to this many (tasks held at once = kernels; replaces --concurrency).")
@click.option("--max-memory", type=float, default=None, metavar="MB",
              help="With scaling: start no kernel that would take the worker and its kernels "
                   "over MB of RSS (the host always keeps NBFLOW_SCALE_RESERVE_MB, 512, free).")
def worker(nats_url, namespace, queue, concurrency, name, min_kernels, max_kernels, max_memory):
    """Run a worker: pulls tasks and executes them with papermill."""
    import logging

    # a worker reads notebooks with nbformat, whose validator imports jsonschema, which imports
    # rfc3987_syntax where it is installed (with jupyter_server): that import builds a Lark
    # grammar (1-5 s of a cold start) for an "iri" format check nbformat's schemas never use
    sys.modules.setdefault("rfc3987_syntax", None)

    if min_kernels is None and max_kernels is None:
        # the warm kernels start now, while the worker imports and connects, not on its first
        # task (a scaling worker sizes its pool itself)
        from nbflow.worker.kernels import registry as kernels

        kernels.configure(concurrency=concurrency)
        kernels.get_pool()

    from nbflow.stack import nats_url as resolve_url
    from nbflow.worker.worker import serve

    scale = None
    if min_kernels is not None or max_kernels is not None:
        lo = 1 if min_kernels is None else min_kernels
        hi = max(lo, 1, os.cpu_count() or 1) if max_kernels is None else max_kernels
        if lo < 1 or lo > hi:
            raise UserError(f"--min-kernels {lo} --max-kernels {hi}: need 1 <= min <= max")
        scale = {"min_kernels": lo, "max_kernels": hi, "max_memory_mb": max_memory}
    elif max_memory is not None:
        raise UserError("--max-memory bounds scaling: give --max-kernels N too")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    try:
        _arun(serve(resolve_url(nats_url), namespace, queue, concurrency, name=name,
                    scale=scale))
    except KeyboardInterrupt:
        pass
