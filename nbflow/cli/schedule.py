"""`nbflow schedule ...`, `nbflow backfill`, `nbflow trigger ...` (hooked into cli.main)."""
from __future__ import annotations

import json
import time

import click

from nbflow.cli.common import _listing, _local, _st, nats_options
from nbflow.errors import UserError


def _call(nats_url, namespace, fn):
    from nbflow.schedules.api import run_sync

    from nbflow.stack import nats_url as face_url

    return run_sync(fn, face_url(nats_url), namespace)


def _ts(dt) -> str:
    return _local(dt.timestamp()) if dt is not None else ""


def _iso_local(s: str | None) -> str:
    if not s:
        return ""
    from nbflow.schedules.cron import parse_iso

    return _local(parse_iso(s).timestamp())


@click.group()
def schedule():
    """Run a notebook on a schedule (cron), kept durably in NATS.

    \b
    nbflow schedule add report.ipynb --cron "0 6 * * *" --tz Europe/London -p day today
    nbflow schedule list
    nbflow schedule pause NAME · resume NAME · rm NAME · run-now NAME · log NAME
    """


@schedule.command("add")
@click.argument("notebook", type=click.Path(dir_okay=False))
@click.option("--cron", required=True,
              help='5-field cron ("0 6 * * *"), 6 fields with seconds first ("*/10 * * * * *"), '
                   "@hourly, @daily, @weekly, @monthly, @yearly or @every 30s.")
@click.option("--tz", default=None, help="IANA time zone the cron is read in (default UTC).")
@click.option("-p", "--param", "params", nargs=2, multiple=True, metavar="NAME VALUE",
              help="A parameter for every run (repeatable).")
@click.option("--name", default=None, help="Schedule name (default: the notebook's name).")
@click.option("--catchup", type=click.Choice(["none", "latest", "all"]), default="latest",
              show_default=True, help="Fires missed while the engine was down: start none, "
                                      "the latest, or all of them.")
@click.option("--overlap", type=click.Choice(["skip", "queue", "allow"]), default="skip",
              show_default=True, help="A fire while the previous run still runs: skip it "
                                      "(recorded), queue it, or start it anyway.")
@click.option("--replace", is_flag=True, help="Replace a schedule of the same name.")
@nats_options
def add(notebook, cron, tz, params, name, catchup, overlap, replace, nats_url, namespace):
    """Schedule NOTEBOOK. Each fire starts one run; a notebook parameter `scheduled_for`
    receives the fire time (ISO-8601 UTC)."""
    from nbflow.schedules.cron import parse_spec
    from nbflow.errors import ScheduleError

    try:
        parse_spec(cron, tz)                # refuse before connecting
    except ScheduleError as e:
        raise UserError(str(e)) from None
    d = _call(nats_url, namespace, lambda s: s.add(
        notebook, cron, tz=tz, params=list(params), name=name, catchup=catchup,
        overlap=overlap, replace=replace))
    spec = parse_spec(d["cron"], d["tz"])
    from nbflow.schedules.cron import utcnow

    click.echo(f"schedule {click.style(d['name'], bold=True)}: {d['workflow']} {d['cron']!r}"
               f" ({d['tz']}), next run {_ts(spec.next_after(utcnow()))}")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True)
@nats_options
def list_(as_json, nats_url, namespace):
    """Schedules with their next fire (local time), last run and its state."""
    def line(r) -> str:
        nxt = "paused" if r.get("paused") else _ts(r["next"])
        state = r.get("last_run_state") or ""
        return (f"{r['name']:<20} {r['cron']:<18} {r['tz']:<16} {nxt:<20} "
                f"{(r.get('last_run') or '-'):<16} {_st(state) if state else ''}")
    _listing(_call(nats_url, namespace, lambda s: s.list()), as_json, line=line,
             empty="no schedules: add one with `nbflow schedule add NOTEBOOK --cron ...`",
             header=f"{'name':<20} {'cron':<18} {'tz':<16} {'next run':<20} {'last run':<16} "
                    "state")


def _by_name(command: str, method: str, done: str, doc: str):
    """`nbflow schedule COMMAND NAME`: call the schedules API's ``method(name)``, say ``done``."""
    @schedule.command(command, help=doc)
    @click.argument("name")
    @nats_options
    def cmd(name, nats_url, namespace):
        _call(nats_url, namespace, lambda s: getattr(s, method)(name))
        click.echo(f"{done} {name}", err=True)
    return cmd


pause = _by_name("pause", "pause", "paused",
                 "Stop firing (the schedule message is removed from the server).")
resume = _by_name("resume", "resume", "resumed",
                  "Fire again from now on (fires missed while paused are not caught up).")
rm = _by_name("rm", "rm", "removed", "Remove a schedule (its runs stay).")


@schedule.command("run-now")
@click.argument("name")
@nats_options
def run_now(name, nats_url, namespace):
    """Start a run of the schedule now; prints its run id."""
    click.echo(_call(nats_url, namespace, lambda s: s.run_now(name)))


@schedule.command("log")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@nats_options
def log_(name, as_json, nats_url, namespace):
    """What each fire did (started, skipped, queued, refused, catch-up) and who changed it."""
    async def go(s):
        return await s.log(name), await s.changes(name)
    events, changes = _call(nats_url, namespace, go)
    if as_json:
        click.echo(json.dumps({"fires": events, "changes": changes}, indent=2, default=str))
        return
    for c in changes:
        click.echo(f"{_local(c.get('at'))}  {c.get('change', 'changed'):<10} by {c.get('by')}")
    for e in events:
        extra = " ".join(f"{k}={e[k]}" for k in ("run", "reason", "missed", "policy")
                         if e.get(k) is not None)
        click.echo(f"{_local(e.get('ts'))}  {e['type']:<10} fire {e.get('fire')}  {extra}")


@click.command()
@click.argument("name")
@click.option("--from", "start", required=True, help="First day (2026-11-01) or ISO time.")
@click.option("--to", "end", required=True, help="Last day, inclusive (2026-11-07) or ISO time.")
@click.option("--max-parallel", type=int, default=4, show_default=True,
              help="Runs in flight at once; waits for runs to finish before starting more.")
@nats_options
def backfill(name, start, end, max_parallel, nats_url, namespace):
    """Start the runs schedule NAME would have started between --from and --to.
    Fire times that already have a run are skipped."""
    t0 = time.time()

    def on(what, rid, fire):
        click.echo(f"{what:<9} {rid}  {fire}", err=True)
    out = _call(nats_url, namespace, lambda s: s.backfill(name, start, end, max_parallel,
                                                          on_event=on))
    click.echo(f"backfill {name}: {len(out['started'])} run(s) started, "
               f"{len(out['existing'])} already there ({time.time() - t0:.0f} s)")


@click.group()
def trigger():
    """Start a run for every message on a NATS subject.

    \b
    nbflow trigger add orders.ipynb --subject orders.created --param-from-json payload
    nbflow trigger list · rm NAME
    """


@trigger.command("add")
@click.argument("notebook", type=click.Path(dir_okay=False))
@click.option("--subject", required=True, help="NATS subject (wildcards allowed).")
@click.option("--param-from-json", "param", default=None, metavar="PARAM",
              help="Notebook parameter that receives the message body (JSON-decoded if it "
                   "parses, else text).")
@click.option("--validate", default=None, metavar="SUBJECT",
              help='Ask SUBJECT (request/reply) first; a reply {"ok": false, "reason": ...} '
                   "refuses the run.")
@click.option("--name", default=None)
@click.option("-p", "--param", "params", nargs=2, multiple=True, metavar="NAME VALUE")
@nats_options
def trigger_add(notebook, subject, param, validate, name, params, nats_url, namespace):
    """Run NOTEBOOK for each message on --subject (a re-published Nats-Msg-Id runs once)."""
    d = _call(nats_url, namespace, lambda s: s.trigger_add(
        notebook, subject, name=name, param=param, validate=validate, params=list(params)))
    click.echo(f"trigger {click.style(d['name'], bold=True)}: {d['workflow']} on {d['subject']}")


@trigger.command("list")
@click.option("--json", "as_json", is_flag=True)
@nats_options
def trigger_list(as_json, nats_url, namespace):
    def line(r) -> str:
        return (f"{r['name']:<20} {r['subject']:<24} {r['workflow']:<20} "
                f"{'param=' + r['param'] if r.get('param') else ''}"
                f"{' validate=' + r['validate'] if r.get('validate') else ''}")
    _listing(_call(nats_url, namespace, lambda s: s.trigger_list()), as_json, line=line,
             empty="no triggers: add one with `nbflow trigger add NOTEBOOK --subject ...`")


@trigger.command("rm")
@click.argument("name")
@nats_options
def trigger_rm(name, nats_url, namespace):
    _call(nats_url, namespace, lambda s: s.trigger_rm(name))
    click.echo(f"removed trigger {name}", err=True)
