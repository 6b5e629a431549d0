"""``%flow schedule`` and ``%flow schedules`` (listed in ``nbflow.magics.core.COMMANDS``).

    %flow schedule --cron "0 6 * * *" [--tz Europe/London] [--name N] [--catchup latest]
                   [--overlap skip] [name=value ...]
    %flow schedules
"""
from __future__ import annotations

import argparse
import html
import shlex
from typing import Any

from nbflow.errors import NbflowError, WorkflowError
from nbflow.magics.notebook import current_notebook_path


class _Parser(argparse.ArgumentParser):
    def error(self, message):            # one line, no SystemExit inside a kernel
        raise WorkflowError(f"%flow schedule: {message}")


def _parser() -> _Parser:
    p = _Parser(prog="%flow schedule", add_help=False)
    p.add_argument("--cron", required=True)
    p.add_argument("--tz", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--catchup", choices=["none", "latest", "all"], default="latest")
    p.add_argument("--overlap", choices=["skip", "queue", "allow"], default="skip")
    p.add_argument("--replace", action="store_true")
    p.add_argument("--notebook", default=None, help="default: this notebook")
    p.add_argument("params", nargs="*", metavar="name=value")
    return p


def _call(fn):
    from nbflow.client import SyncClient
    from nbflow.schedules.api import Schedules

    from nbflow.stack import nats_url

    sc = SyncClient(nats_url())
    try:
        return sc._call(fn(Schedules(sc.aclient)))
    except NbflowError as e:
        raise WorkflowError(str(e)) from None
    finally:
        sc.close()


def flow_schedule(shell: Any, args: str) -> dict:
    ns = _parser().parse_args(shlex.split(args))
    pairs = []
    for p in ns.params:
        k, eq, v = p.partition("=")
        if not eq or not k:
            raise WorkflowError(f"%flow schedule: parameters are name=value, got {p!r}")
        pairs.append((k, v))
    path = ns.notebook or current_notebook_path(shell, "schedule")
    d = _call(lambda s: s.add(path, ns.cron, tz=ns.tz, params=pairs, name=ns.name,
                              catchup=ns.catchup, overlap=ns.overlap, replace=ns.replace))
    from nbflow.schedules.cron import parse_spec, utcnow

    nxt = parse_spec(d["cron"], d["tz"]).next_after(utcnow()).astimezone()
    print(f"schedule {d['name']}: {d['workflow']} {d['cron']!r} ({d['tz']}), "
          f"next run {nxt:%Y-%m-%d %H:%M:%S %Z}")
    return d


def schedules_html(rows: list[dict]) -> str:
    if not rows:
        return "<p>no schedules yet: <code>%flow schedule --cron \"0 6 * * *\"</code></p>"
    head = ("name", "notebook", "cron", "tz", "next run", "last run", "state")
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        nxt = "paused" if r.get("paused") else (
            r["next"].astimezone().strftime("%Y-%m-%d %H:%M:%S") if r.get("next") else "")
        cells = (r["name"], r.get("workflow", ""), r["cron"], r.get("tz", ""), nxt,
                 r.get("last_run") or "", r.get("last_run_state") or "")
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def flow_schedules(shell: Any, args: str):
    rows = _call(lambda s: s.list())
    try:
        import ipywidgets as w

        return w.HTML(schedules_html(rows))
    except ImportError:
        from IPython.display import HTML

        return HTML(schedules_html(rows))
