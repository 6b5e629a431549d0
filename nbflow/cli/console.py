"""`nbflow ui` (the runs console, standalone) and `nbflow stats` (its summary in the shell)."""
from __future__ import annotations

import json

import click

from nbflow.cli.common import _call, _dur, nats_options
from nbflow.errors import UserError


@click.command("ui")
@click.option("--port", type=int, default=8765, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--ip", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; the token guards it).")
@click.option("--token", envvar="NBFLOW_UI_TOKEN", default=None,
              help="Sign-in token (default: a new random one) [env NBFLOW_UI_TOKEN].")
@click.option("--approvers", envvar="NBFLOW_APPROVERS", default=None,
              help="Comma-separated users who may decide approvals (default: anyone signed in).")
@click.option("--no-browser", is_flag=True, help="Do not open a browser.")
@nats_options
def ui(port, ip, token, approvers, no_browser, nats_url, namespace):
    """The runs console in the browser: inbox, runs, schedules, workers, metrics."""
    import asyncio

    from nbflow.console.standalone import serve

    def ready(url):
        click.echo(f"nbflow console: {url}", err=True)
        click.echo("Press Ctrl-C to stop.", err=True)
        if not no_browser:
            import webbrowser

            try:
                webbrowser.open(url)
            except Exception:  # noqa: BLE001 - no browser here: the URL is printed
                pass

    try:
        asyncio.run(serve(port, ip, token, nats_url, namespace, approvers, on_ready=ready))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise UserError(f"cannot listen on {ip}:{port} ({e.strerror}); pass --port") from None


@click.command("stats")
@click.option("--window", default="24h", show_default=True,
              help="Runs started within this long ago (90m, 24h, 7d, all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@nats_options
def stats(window, as_json, nats_url, namespace):
    """Success rate and p50/p95 durations per notebook and task."""
    from nbflow.console import stats as S

    try:
        secs = S.parse_window(window)
    except ValueError as e:
        raise UserError(str(e)) from None

    async def go(c):
        return await c.runs(limit=10 ** 9)

    out = S.summary(_call(nats_url, namespace, go), secs)
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    rate = out["success_rate"]
    click.echo(f"{out['runs']} runs in {'all history' if secs is None else 'the last ' + window}"
               f": {out['succeeded']} succeeded of {out['finished']} finished"
               + (f" ({rate:.0%})" if rate is not None else "") + f", {out['running']} running")
    if not out["notebooks"]:
        return
    click.echo("")
    click.echo(f"{'notebook':<28} {'runs':>5} {'success':>8} {'p50':>10} {'p95':>10}")
    for nb, r in out["notebooks"].items():
        sr = "" if r["success_rate"] is None else f"{r['success_rate']:.0%}"
        click.echo(f"{nb[:28]:<28} {r['runs']:>5} {sr:>8} {_dur(r['p50_s']):>10} "
                   f"{_dur(r['p95_s']):>10}")
    if out["tasks"]:
        click.echo("")
        click.echo(f"{'notebook / task':<40} {'count':>5} {'p50':>10} {'p95':>10}")
        for t in out["tasks"]:
            name = f"{t['notebook']} / {t['task']}"
            click.echo(f"{name[:40]:<40} {t['count']:>5} {_dur(t['p50_s']):>10} "
                       f"{_dur(t['p95_s']):>10}")
