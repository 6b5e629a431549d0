"""Reading runs: `nbflow runs`, `status`, `history`, `logs`, `output`."""
from __future__ import annotations

import click

from nbflow.cli.common import _call, _dur, _listing, _local, _st, nats_options


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
    import time

    def line(s) -> str:
        dur = _dur((s.finished or time.time()) - s.started)
        return (f"{s.run:<10} {_st(s.state)}{' ' * (10 - len(s.state))} "
                f"{_local(s.started):<20} {dur:>9}  {s.name}")
    _listing(_call(nats_url, namespace, lambda c: c.runs(limit)), as_json, as_dict=_run_row,
             empty="no runs yet: start one with `nbflow run NOTEBOOK`", line=line,
             header=f"{'run':<10} {'state':<10} {'started':<20} {'duration':>9}  workflow")


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
