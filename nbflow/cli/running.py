"""`nbflow run` and `nbflow retry`: start a run, follow it to the end, print the summary."""
from __future__ import annotations

import os
import sys

import click

from nbflow.cli.common import _call, _dur, _parse_params, _st, nats_options
from nbflow.cli.compiling import _load_workflow


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
    if not nats_url and os.path.isfile(notebook):
        from nbflow.stack import start_background

        start_background()                 # the embedded stack starts while the notebook compiles
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
        return await _follow_to_end(c, run_id, wf)

    try:
        code = _call(nats_url, namespace, go)
    except KeyboardInterrupt:
        click.echo("\ninterrupted before the run id was known; see `nbflow runs`", err=True)
        code = 130
    sys.exit(code)


async def _follow_to_end(c, run_id: str, wf) -> int:
    """Show the run's progress until it ends, then its summary; the exit code (0: succeeded,
    1: not, 130: Ctrl-C detached — the run goes on)."""
    import asyncio

    from nbflow.cli.progress import follow

    try:
        st = await follow(c, run_id, wf)
    except (KeyboardInterrupt, asyncio.CancelledError):
        _detached(run_id)
        return 130
    await c.settled(st)        # `nbflow runs` / `status` right after show the final state
    _summary(st, wf)
    return 0 if st.state == "succeeded" else 1


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
        return await _follow_to_end(c, new, await c.workflow((await c.status(new)).wf))
    sys.exit(_call(nats_url, namespace, go))
