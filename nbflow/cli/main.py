"""The `nbflow` command. Thin: parse arguments, call compiler / client / stack, print."""
from __future__ import annotations

import os
import sys

import click

from nbflow.cli.common import _arun, _call, _dur, _local, _parse_params, _st, nats_options
from nbflow.cli.console import stats, ui
from nbflow.cli.workers import workers
from nbflow.cli.schedule import backfill, schedule, trigger
from nbflow.errors import NbflowError, UserError
from nbflow.kernelspec import kernel


class NbflowGroup(click.Group):
    """Turns expected errors into one clear line (and exit code 2) instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NbflowError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(getattr(e, "code", 2))


@click.group(cls=NbflowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nbflow-nats", prog_name="nbflow")
def main():
    """nbflow: run Jupyter notebooks as durable workflows on NATS JetStream.

    Mark cells with %%task, then `nbflow run NOTEBOOK`. With no NATS configured
    (no --nats, no NBFLOW_NATS_URL) an embedded stack is started for you.
    """


# --- compiler --------------------------------------------------------------------------------

def _load_workflow(path: str):
    """Compile; print the compiler's notes and warnings (each names its cells) to stderr."""
    from nbflow.compiler import compile_file

    wf = compile_file(path)
    for n in getattr(wf, "notes", []):
        click.echo(f"note: {n}", err=True)
    for w in getattr(wf, "warnings", []):
        click.secho(f"warning: {w}", fg="yellow", err=True)
    return wf


@click.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
              help="Write here: .bpmn/.xml (BPMN 2.0), .json (workflow IR). Default: print IR JSON.")
def compile(source, output):
    """Compile a notebook (or a BPMN 2.0 file) into a workflow.

    \b
    nbflow compile report.ipynb -o flow.bpmn      # BPMN 2.0 XML with diagram
    nbflow compile flow.bpmn -o workflow.json     # BPMN in, workflow IR out
    """
    wf = _load_workflow(source)
    if output is None:
        click.echo(wf.to_json(indent=2))
        return
    ext = os.path.splitext(output)[1].lower()
    if ext in (".bpmn", ".xml"):
        from nbflow.compiler.bpmn import to_bpmn

        text = to_bpmn(wf)
    elif ext == ".json":
        text = wf.to_json(indent=2)
    else:
        raise UserError(f"cannot write {output!r}: use a .bpmn, .xml or .json file name")
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    click.echo(f"wrote {output} ({len(wf.tasks)} tasks, version {wf.content_hash()})", err=True)


@click.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="dag.svg, dag.png, dag.pdf or dag.dot. Default: print DOT text.")
def show(source, output):
    """Draw the workflow's DAG with graphviz."""
    from nbflow.compiler import render

    wf = _load_workflow(source)
    if output is None:
        click.echo(render.to_dot(wf))
        return
    note = render.render(wf, output)
    if note:
        click.echo(note, err=True)
    else:
        click.echo(f"wrote {output}", err=True)


# --- running ---------------------------------------------------------------------------------

def _bundle_warnings_as_lines() -> None:
    """Files left out of the notebook's bundle: one 'warning: ...' line, not a source line."""
    import warnings

    from nbflow.runs import BundleWarning

    shown = warnings.showwarning

    def show(message, category, *a, **kw):
        if issubclass(category, BundleWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, *a, **kw)
    warnings.showwarning = show


@click.command()
@click.argument("notebook", type=click.Path(dir_okay=False))
@click.option("-p", "--param", "params", nargs=2, multiple=True, metavar="NAME VALUE",
              help="Set a parameter (repeatable). Values parse as JSON when they can.")
@click.option("--no-wait", is_flag=True, help="Print only the run id and return at once.")
@click.option("--reuse", is_flag=True,
              help="Reuse the outputs of each task whose fingerprint (its code, setup cells, "
                   "parameters it reads, options and upstream tasks) matches an earlier "
                   "successful execution; run only what changed.")
@click.option("--no-bundle", is_flag=True,
              help="Workers use the notebook's folder in place (a shared filesystem) instead "
                   "of a bundle of it (also NBFLOW_BUNDLE=0).")
@nats_options
def run(notebook, params, no_wait, reuse, no_bundle, nats_url, namespace):
    """Compile NOTEBOOK, start a run and follow it to the end.

    Exit code 0 only when the run succeeded. Ctrl-C detaches: the run goes on.
    Without --reuse every task executes (a scheduled pipeline reads fresh data).
    """
    wf = _load_workflow(notebook)          # refuse a bad notebook before anything is submitted
    _bundle_warnings_as_lines()

    async def go(c):
        run_id = await c.submit(wf, _parse_params(params, wf), reuse_outputs=reuse,
                                bundle=False if no_bundle else None)
        if no_wait:
            click.echo(run_id)
            return 0
        click.echo(f"run {click.style(run_id, bold=True)} of {wf.name} started "
                   f"({len(wf.tasks)} tasks)", err=True)
        from nbflow.cli.progress import follow

        try:
            st = await follow(c, run_id, wf)
        except (KeyboardInterrupt, asyncio_cancelled()):
            _detached(run_id)
            return 130
        await c.settled(st)        # `nbflow runs` / `status` right after show the final state
        _summary(st, wf)
        return 0 if st.state == "succeeded" else 1

    try:
        code = _call(nats_url, namespace, go)
    except KeyboardInterrupt:
        click.echo("\ninterrupted before the run id was known; see `nbflow runs`", err=True)
        code = 130
    sys.exit(code)


def asyncio_cancelled():
    import asyncio

    return asyncio.CancelledError


def _detached(run_id: str) -> None:
    click.echo(f"\ndetached; run {run_id} goes on. Watch it: nbflow status {run_id} · "
               f"nbflow logs {run_id} · cancel it: nbflow cancel {run_id}", err=True)


def _summary(st, wf) -> None:
    click.echo(f"\nrun {st.run}: {_st(st.state)} in {_dur((st.finished or 0) - st.started)}")
    from nbflow.core.state import reused_from, shown_state

    rows = [("task", "state", "attempts", "duration", "executed notebook")]
    for node in wf.tasks:
        ns = st.nodes.get(node.id)
        if ns is None:
            continue
        tasks = [t for t in st.tasks.values() if t.node == node.id]
        attempts = max((t.attempt for t in tasks), default=0)
        dur = (ns.finished - ns.started) if ns.finished and ns.started else None
        where = f"nbflow output {st.run} {node.id} -o {node.id}.ipynb" if any(
            t.notebook for t in tasks) else ""
        label = node.id if ns.count is None else f"{node.id} ×{ns.count}"
        shown = shown_state(st, node.id)
        if shown == "reused":
            where, attempts, dur = f"from run {reused_from(st, node.id)}", 0, None
        rows.append((label, shown, str(attempts or ""), _dur(dur), where))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, r in enumerate(rows):
        cells = [r[j].ljust(widths[j]) for j in range(4)]
        if i:
            cells[1] = _st(r[1]) + " " * (widths[1] - len(r[1]))
        click.echo("  " + "  ".join(cells) + "  " + r[4])
    if st.error:
        e = st.error
        click.secho(f"\n{e.get('key')} failed: {e.get('error')}", fg="red")
        if e.get("cell"):
            click.echo("in the cell:\n" + "\n".join("    " + ln for ln in e["cell"].splitlines()))
        if e.get("traceback"):
            click.echo(e["traceback"].rstrip())
        click.echo(f"\nfull log: nbflow logs {st.run} {e.get('node')} · "
                   f"after fixing: nbflow retry {st.run}")


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


# --- inspecting --------------------------------------------------------------------------------

def _run_row(st) -> dict:
    return {"id": st.run, "state": st.state, "workflow": st.name, "notebook": st.source,
            "started": st.started, "finished": st.finished, "by": st.by,
            "retry_of": st.retry_of or None, "schedule": st.schedule or None}


@click.command()
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON array, for scripts.")
@nats_options
def runs(limit, as_json, nats_url, namespace):
    """List recent runs."""
    import json as _json

    sts = _call(nats_url, namespace, lambda c: c.runs(limit))
    if as_json:
        click.echo(_json.dumps([_run_row(s) for s in sts], indent=2))
        return
    if not sts:
        click.echo("no runs yet: start one with `nbflow run NOTEBOOK`")
        return
    click.echo(f"{'run':<10} {'state':<10} {'started':<20} {'duration':>9}  workflow")
    for s in sts:
        dur = _dur((s.finished or __import__('time').time()) - s.started)
        click.echo(f"{s.run:<10} {_st(s.state)}{' ' * (10 - len(s.state))} "
                   f"{_local(s.started):<20} {dur:>9}  {s.name}")


@click.command()
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True)
@nats_options
def status(run_id, as_json, nats_url, namespace):
    """Show a run's state and each task's."""
    import json as _json

    async def go(c):
        st = await c.status(run_id)
        return st, await c.workflow(st.wf)
    st, wf = _call(nats_url, namespace, go)
    if as_json:
        click.echo(_json.dumps(st.to_dict(), indent=2, default=str))
        return
    from nbflow.core.state import reused_from, shown_state

    click.echo(f"run {st.run} · {st.name} · {_st(st.state)} · started {_local(st.started)}"
               + (f" · took {_dur(st.finished - st.started)}" if st.finished else ""))
    for node in wf.tasks:
        ns = st.nodes.get(node.id)
        if ns is None:
            continue
        shown = shown_state(st, node.id)
        extra = f" from run {reused_from(st, node.id)}" if shown == "reused" else ""
        if ns.count is not None:
            done = sum(1 for t in st.tasks.values() if t.node == node.id and
                       t.state in ("succeeded", "skipped"))
            extra = f" {done}/{ns.count}"
        if ns.state == "awaiting_approval":
            extra += f"  ← nbflow approve {st.run} {node.id}"
        if ns.state == "waiting_signal":
            extra += f"  ← nbflow signal {st.run} {node.wait_signal} VALUE"
        click.echo(f"  {node.id:<24} {_st(shown)}{extra}")
    if st.error:
        click.secho(f"error in {st.error.get('key')}: {st.error.get('error')}", fg="red")


@click.command()
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="A JSON array of the events.")
@nats_options
def history(run_id, as_json, nats_url, namespace):
    """The run's event log, replayed from the history stream."""
    import json as _json

    evs = _call(nats_url, namespace, lambda c: c.history(run_id))
    if as_json:
        click.echo(_json.dumps([{"seq": ev.seq, **ev.to_dict()} for ev in evs], indent=2,
                               default=str))
        return
    for ev in evs:
        detail = " ".join(f"{k}={v}" for k, v in ev.data.items()
                          if k in ("key", "attempt", "node", "name", "by", "approved", "error",
                                   "kind", "worker", "reason", "state"))
        click.echo(f"{_local(ev.ts)}  #{ev.seq:<6} {ev.type:<16} {detail}")
        for node, saved in sorted((ev.get("reuse") or {}).items()):
            origin = saved.get("from") or ev.get("retry_of", "")
            click.echo(f"{'':<19}  {'':<7} {'':<16} {node} reused from run {origin}")


@click.command()
@click.argument("run_id", metavar="RUN")
@click.argument("task", required=False)
@nats_options
def logs(run_id, task, nats_url, namespace):
    """Prints, warnings and errors of the executed notebooks of a run (or one TASK)."""
    click.echo(_call(nats_url, namespace, lambda c: c.logs(run_id, task)))


@click.command()
@click.argument("run_id", metavar="RUN")
@click.argument("task")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), required=True,
              help="Where to write the executed notebook (.ipynb).")
@nats_options
def output(run_id, task, out, nats_url, namespace):
    """Save the executed notebook of TASK, as papermill wrote it."""
    data = _call(nats_url, namespace, lambda c: c.output(run_id, task))
    with open(out, "wb") as f:
        f.write(data)
    click.echo(f"wrote {out}", err=True)


@click.command()
@click.argument("run_id", metavar="RUN")
@nats_options
def cancel(run_id, nats_url, namespace):
    """Cancel a run: queued tasks never start, running ones are interrupted."""
    _call(nats_url, namespace, lambda c: c.cancel(run_id))
    click.echo(f"cancelling run {run_id}", err=True)


@click.command()
@click.argument("run_id", metavar="RUN")
@click.option("--no-wait", is_flag=True, help="Print only the new run id.")
@click.option("--same-code", is_flag=True,
              help="Rerun the code RUN ran (its stored version), not the notebook file as it "
                   "is now.")
@nats_options
def retry(run_id, no_wait, same_code, nats_url, namespace):
    """Start a new run of a failed run: the notebook is compiled again from its file (so your
    fix runs), with the same parameters; tasks that succeeded and did not change are not
    executed again (their outputs are reused)."""
    async def go(c):
        new = await c.retry(run_id, same_code=same_code)
        if no_wait:
            click.echo(new)
            return 0
        click.echo(f"run {new} retries {run_id}", err=True)
        from nbflow.cli.progress import follow

        st = await c.status(new)
        wf = await c.workflow(st.wf)
        st = await follow(c, new, wf)
        await c.settled(st)
        _summary(st, wf)
        return 0 if st.state == "succeeded" else 1
    sys.exit(_call(nats_url, namespace, go))


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


# --- every command of `nbflow`, grouped by concern (click lists them alphabetically) ----------

COMMANDS = (
    compile, show,                                  # the compiler
    run, up, down, user, engine, worker,            # running, the embedded stack's users
    runs, status, history, logs, output,            # reading runs
    workers,                                        # the workers seen
    cancel, retry, approve, signal_cmd,             # steering runs
    gc,                                             # storage
    schedule, backfill, trigger,                    # schedules and triggers
    ui, stats,                                      # the console
    kernel,                                         # the Jupyter kernelspec
)
for _command in COMMANDS:
    main.add_command(_command)
