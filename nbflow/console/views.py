"""Server-rendered HTML of the console's pages. Pure functions of data: no I/O, no NATS.

Every user-provided string goes through :func:`e` (html.escape). Times are written as
``<time data-ts>`` in UTC and re-formatted in the viewer's zone by console.js; states are words
with a colour, never colour alone.
"""
from __future__ import annotations

import html
import json
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode

from nbflow.core.durations import elapsed
from nbflow.core.state import RUN_FINAL, RunState

PAGE_SIZE = 100
INBOX_SIZE = 50


def e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def q(x: str) -> str:
    return quote(str(x), safe="")


def when(ts: float | None, title: str = "") -> str:
    if not ts:
        return '<span class="muted">–</span>'
    dt = datetime.fromtimestamp(float(ts), timezone.utc)
    iso = dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return (f'<time datetime="{iso}" data-ts="{float(ts):.3f}"'
            f'{f" title={chr(34)}{e(title)}{chr(34)}" if title else ""}>'
            f'{dt.strftime("%Y-%m-%d %H:%M:%S")} UTC</time>')


def when_iso(text: str | None) -> str:
    if not text:
        return '<span class="muted">–</span>'
    try:
        dt = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return when(dt.timestamp())
    except ValueError:
        return e(text)


def dur(seconds: float | None) -> str:
    """core.durations.elapsed (340ms, 4.2s, 3m 05s, 2h 10m, 3d 04h); a muted dash when unknown."""
    return elapsed(seconds) or '<span class="muted">–</span>'


def badge(state: str) -> str:
    label = state.replace("_", " ")
    return f'<span class="state s-{e(state)}">{e(label)}</span>'


def run_duration(st: RunState, now: float | None = None) -> float | None:
    if not st.started:
        return None
    end = st.finished or (now or time.time())
    return end - st.started


class Ctx:
    """What every page needs: where the console lives, who is looking, a form token."""

    def __init__(self, root: str, user: str, may_approve: bool, xsrf_html: str,
                 pending: int = 0, flash: str = "", flash_kind: str = "info",
                 standalone: bool = False, error: str = ""):
        self.root, self.user, self.may_approve = root, user, may_approve
        self.xsrf, self.pending, self.flash, self.flash_kind = xsrf_html, pending, flash, flash_kind
        self.standalone, self.error = standalone, error

    def url(self, *parts: str, **params: Any) -> str:
        path = self.root + "/".join(q(p) for p in parts)
        params = {k: v for k, v in params.items() if v not in (None, "")}
        return path + ("?" + urlencode(params) if params else "")


NAV = (("inbox", "Inbox"), ("runs", "Runs"), ("schedules", "Schedules"), ("workers", "Workers"))


def page(ctx: Ctx, current: str, title: str, body: str, live: str = "", topic: str = "",
         target: str = "live") -> str:
    """The whole document. ``live``: URL of this page's fragment, fetched again when an event of
    ``topic`` arrives on the event stream (see console.js)."""
    nav = []
    for key, label in NAV:
        cur = ' aria-current="page"' if key == current else ""
        extra = (f' <span class="count nav-pending" aria-label="{ctx.pending} pending"'
                 f'{"" if ctx.pending else " hidden"}>{ctx.pending}</span>'
                 if key == "inbox" else "")
        nav.append(f'<a href="{e(ctx.url(key))}"{cur}>{label}{extra}</a>')
    nav.append(f'<a href="{e(ctx.url("metrics"))}">Metrics</a>')
    flash = (f'<div class="flash flash-{e(ctx.flash_kind)}" role="alert">{e(ctx.flash)}</div>'
             if ctx.flash else "")
    err = (f'<div class="flash flash-error" role="alert">{e(ctx.error)}</div>'
           if ctx.error else "")
    static = ctx.root + "static/"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · nbflow</title>
<link rel="stylesheet" href="{e(static)}console.css">
<script defer src="{e(static)}console.js"></script>
</head>
<body data-events="{e(ctx.url('events'))}" data-live="{e(live)}" data-topic="{e(topic)}" data-target="{e(target)}">
<a class="skip" href="#main">Skip to content</a>
<header class="top"><nav aria-label="Console sections"><span class="brand">nbflow</span>
{' '.join(nav)}</nav>
<span class="who">Signed in as <strong class="user">{e(ctx.user)}</strong>{
    '' if ctx.may_approve else ' <span class="ro">(read-only)</span>'}</span></header>
{flash}{err}
<main id="main" tabindex="-1"><h1>{e(title)}</h1>
<p id="status" class="status" role="status" aria-live="polite"></p>
<div id="live">{body}</div>
</main></body></html>"""


# --- inbox ------------------------------------------------------------------------------------

_DECIDER = ' class="decider"'


def _by(ap: dict, attrs: str) -> str:
    """`` by <strong>WHO</strong>``; nothing when the run itself closed the approval (no person:
    e.g. not needed after a rejection elsewhere)."""
    if not ap.get("by") and ap.get("reason"):
        return ""
    return f' by <strong{attrs}>{e(ap.get("by") or "?")}</strong>'


def approval_card(ctx: Ctx, st: RunState, node: str, wf, pending: bool) -> str:
    ns = st.nodes[node]
    ap = ns.approval or {}
    n = None
    if wf is not None:
        try:
            n = wf.node(node)
        except Exception:  # noqa: BLE001 - a node the workflow no longer has
            n = None
    prompt = ap.get("prompt") or (n.approval if n else "") or f"Approve {node}?"
    label = n.label if n else node
    rows = []
    inputs = list(n.inputs) if n else []
    for name in inputs:
        src = (n.sources or {}).get(name) if n else None
        rows.append(f"<li><code>{e(name)}</code>" +
                    (f" from <strong>{e(src)}</strong>" + _len_note(st, src, name)
                     if src else "") + "</li>")
    params = "".join(f"<li><code>{e(k)}</code> = <code>{e(_short(json.dumps(v)))}</code></li>"
                     for k, v in (st.params or {}).items())
    ups = []
    preds = wf.predecessors(node) if wf is not None else []
    for p in preds:
        for t in (st.node_tasks(p) if p in st.nodes else []):
            if t.notebook:
                ups.append(f'<li><a href="{e(ctx.url("runs", st.run, "tasks", t.key, "notebook"))}">'
                           f'{e(t.key)}</a> ({badge(t.state)}, {dur(_tdur(t))})</li>')
    head = (f'<h2 id="ap-{e(st.run)}-{e(node)}"><span class="task">{e(label)}</span> '
            f'in <a href="{e(ctx.url("runs", st.run))}">{e(st.name or "run")} '
            f'<code>{e(st.run)}</code></a></h2>')
    meta = (f'<p class="meta">Started by {e(st.by or "?")} {when(st.started)}; '
            f'waiting since {when(ns.started)}</p>')
    body = [f'<p class="prompt">{e(prompt)}</p>', meta]
    if inputs:
        body.append(f'<div class="inputs"><h3>Inputs it will receive</h3><ul>{"".join(rows)}</ul></div>')
    if params:
        body.append(f'<div class="params"><h3>Run parameters</h3><ul>{params}</ul></div>')
    if ups:
        body.append(f'<div class="upstream"><h3>Upstream executed notebooks</h3><ul>{"".join(ups)}</ul></div>')
    if pending:
        if ctx.may_approve:
            fid = f"c-{st.run}-{node}"
            body.append(
                f'<form method="post" class="decide" action="{e(ctx.url("runs", st.run, "approve"))}">'
                f'{ctx.xsrf}<input type="hidden" name="task" value="{e(node)}">'
                f'<label for="{e(fid)}">Comment (recorded in the history)</label>'
                f'<textarea id="{e(fid)}" name="comment" rows="2"></textarea>'
                f'<div class="buttons"><button type="submit" name="decision" value="approve" '
                f'class="approve">Approve</button> <button type="submit" name="decision" '
                f'value="reject" class="reject">Reject</button></div></form>')
        else:
            body.append(f'<p class="ro-note">You ({e(ctx.user)}) may view this approval but not '
                        f'decide it.</p>')
    else:
        state = ap.get("state", ns.state)
        c = f' — “{e(ap.get("comment"))}”' if ap.get("comment") else ""
        reason = f' ({e(ap.get("reason"))})' if ap.get("reason") else ""
        body.append(f'<p class="decision">{badge(state)}{_by(ap, "")} '
                    f'{when(ap.get("at") or ns.finished)}{reason}{c}</p>')
    cls = "card pending" if pending else "card decided"
    return f'<article class="{cls}" data-run="{e(st.run)}" data-task="{e(node)}">{head}{"".join(body)}</article>'


def _len_note(st: RunState, src: str, name: str) -> str:
    lens = [t.lens.get(name) for t in (st.node_tasks(src) if src in st.nodes else [])
            if t.lens.get(name) is not None]
    if not lens:
        return ""
    return f" ({sum(lens)} items)" if len(lens) > 1 else f" (length {lens[0]})"


def _short(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _tdur(t) -> float | None:
    return (t.finished - t.started) if t.started and t.finished else None


def inbox(ctx: Ctx, pending: list, decided: list, workflows: dict,
          total: int | None = None) -> str:
    total = len(pending) if total is None else total
    parts = [f'<section aria-labelledby="h-pending"><h2 id="h-pending" class="sec">Waiting for a '
             f'decision <span class="count">{total}</span></h2>']
    if not pending:
        parts.append('<p class="empty">Nothing is waiting for a decision.</p>')
    for st, node in pending:
        parts.append(approval_card(ctx, st, node, workflows.get(st.wf), True))
    if total > len(pending):
        parts.append(f'<p><a href="{e(ctx.url("inbox", all=1))}">Show all {total} waiting '
                     f'(the {len(pending)} newest are shown)</a></p>')
    parts.append('</section><section aria-labelledby="h-decided"><h2 id="h-decided" class="sec">'
                 'Recently decided</h2>')
    if not decided:
        parts.append('<p class="empty">No decisions yet.</p>')
    for st, node in decided:
        parts.append(approval_card(ctx, st, node, workflows.get(st.wf), False))
    parts.append("</section>")
    return "".join(parts)


# --- runs -------------------------------------------------------------------------------------

def runs_filter(runs: list[RunState], state: str = "", notebook: str = "", schedule: str = "",
                since: float | None = None, until: float | None = None) -> list[RunState]:
    out = []
    for st in runs:
        if state and (st.state != state and not (state == "finished" and st.state in RUN_FINAL)):
            continue
        if notebook and (st.name or st.source) != notebook:
            continue
        if schedule and (st.schedule or "").partition("@")[0] != schedule:
            continue
        if since is not None and st.started < since:
            continue
        if until is not None and st.started >= until:
            continue
        out.append(st)
    return out


def runs_page(ctx: Ctx, rows: list[RunState], total: int, f: dict[str, str], notebooks: list[str],
              schedules: list[str], offset: int) -> str:
    def sel(name, label, options):
        opts = ['<option value="">any</option>'] + [
            f'<option value="{e(o)}"{" selected" if f.get(name) == o else ""}>{e(o)}</option>'
            for o in options]
        return (f'<label>{label} <select name="{name}">{"".join(opts)}</select></label>')
    states = ["running", "finished", "succeeded", "failed", "rejected", "cancelled"]
    form = (f'<form class="filters" method="get" action="{e(ctx.url("runs"))}" role="search">'
            f'{sel("state", "State", states)} {sel("notebook", "Notebook", notebooks)} '
            f'{sel("schedule", "Schedule", schedules)} '
            f'<label>From <input type="date" name="since" value="{e(f.get("since", ""))}"></label> '
            f'<label>To <input type="date" name="until" value="{e(f.get("until", ""))}"></label> '
            f'<button type="submit">Filter</button> <a href="{e(ctx.url("runs"))}">Clear</a></form>')
    return form + f'<div id="runs-table">{runs_table(ctx, rows, total, f, offset)}</div>'


def runs_table(ctx: Ctx, rows: list[RunState], total: int, f: dict[str, str], offset: int) -> str:
    now = time.time()
    body = []
    for st in rows:
        done = sum(1 for t in st.tasks.values() if t.state in ("succeeded", "skipped"))
        body.append(
            f'<tr data-run="{e(st.run)}" data-state="{e(st.state)}">'
            f'<td><a href="{e(ctx.url("runs", st.run))}"><code>{e(st.run)}</code></a></td>'
            f'<td>{e(st.name or st.source)}</td><td>{badge(st.state)}</td>'
            f'<td>{when(st.started)}</td><td>{dur(run_duration(st, now))}</td>'
            f'<td>{done}/{len(st.tasks)}</td><td>{e(st.by)}</td>'
            f'<td>{e((st.schedule or "").partition("@")[0])}</td></tr>')
    more = ""
    if offset + len(rows) < total:
        more = (f'<p><a href="{e(ctx.url("runs", **f, offset=offset + PAGE_SIZE))}">Older runs '
                f'({total - offset - len(rows)} more)</a></p>')
    cap = f"{total} run{'s' if total != 1 else ''}" + (
        f", showing {offset + 1}–{offset + len(rows)}" if total > len(rows) else "")
    if not rows:
        return '<p class="empty">No runs match.</p>'
    return (f'<div class="scroll"><table class="runs"><caption>{cap}</caption><thead><tr>'
            '<th scope="col">Run</th><th scope="col">Notebook</th><th scope="col">State</th>'
            '<th scope="col">Started</th><th scope="col">Duration</th><th scope="col">Tasks done</th>'
            '<th scope="col">By</th><th scope="col">Schedule</th></tr></thead><tbody>'
            + "".join(body) + "</tbody></table></div>" + more)


# --- one run ----------------------------------------------------------------------------------

def run_page(ctx: Ctx, st: RunState, wf, svg: str) -> str:
    now = time.time()
    params = ", ".join(f"{e(k)}={e(_short(json.dumps(v), 40))}" for k, v in st.params.items())
    facts = [("State", badge(st.state)), ("Notebook", e(st.name or st.source)),
             ("Started", f"{when(st.started)} by {e(st.by)}"),
             ("Finished", when(st.finished)), ("Duration", dur(run_duration(st, now))),
             ("Parameters", params or '<span class="muted">none</span>')]
    if st.schedule:
        facts.append(("Schedule", e(st.schedule)))
    if st.retry_of:
        facts.append(("Retry of", f'<a href="{e(ctx.url("runs", st.retry_of))}"><code>'
                                  f'{e(st.retry_of)}</code></a>'))
    dl = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    actions = []
    if st.state == "running":
        actions.append(f'<form method="post" action="{e(ctx.url("runs", st.run, "cancel"))}">'
                       f'{ctx.xsrf}<button type="submit" class="reject">Cancel run</button></form>')
    elif st.state != "succeeded":
        actions.append(f'<form method="post" action="{e(ctx.url("runs", st.run, "retry"))}">'
                       f'{ctx.xsrf}<button type="submit">Retry (reuse what succeeded)</button></form>')
    parts = [f'<div class="run-head" data-state="{e(st.state)}"><dl class="facts">{dl}</dl>'
             f'<div class="actions">{"".join(actions)}</div></div>']
    if st.error:
        parts.append(f'<div class="error-box" role="alert"><h2>Failure in '
                     f'{e(st.error.get("key", ""))}</h2><pre>{e(st.error.get("error", ""))}\n'
                     f'{e(st.error.get("traceback", ""))}</pre></div>')
    for node, ns in st.nodes.items():
        if ns.state == "awaiting_approval" and st.state == "running":
            parts.append(approval_card(ctx, st, node, wf, True))
    if svg:
        legend = "".join(f'<li>{badge(s)}</li>' for s in sorted(set(
            n.state for n in st.nodes.values())))
        parts.append(f'<section class="dag" aria-labelledby="h-dag"><h2 id="h-dag">Workflow</h2>'
                     f'<div class="svg" role="img" aria-label="Workflow graph; node states are in '
                     f'the task table below">{svg}</div><p class="legend-title">States in this run:</p>'
                     f'<ul class="legend" aria-label="States in this run">'
                     f'{legend}</ul></section>')
    parts.append(task_table(ctx, st, wf, now))
    decided = [(nid, ns) for nid, ns in st.nodes.items()
               if ns.approval and ns.approval.get("state") not in (None, "pending")]
    if decided:
        items = "".join(
            f'<li><strong>{e(nid)}</strong>: {badge(ns.approval.get("state", ""))}'
            f'{_by(ns.approval, _DECIDER)} '
            f'{when(ns.approval.get("at") or ns.finished)}'
            + (f' ({e(ns.approval["reason"])})' if not ns.approval.get("by")
               and ns.approval.get("reason") else "")
            + (f' — “{e(ns.approval.get("comment"))}”' if ns.approval.get("comment") else "")
            + "</li>" for nid, ns in decided)
        parts.append(f'<section><h2>Decisions</h2><ul class="decisions">{items}</ul></section>')
    return "".join(parts)


def task_table(ctx: Ctx, st: RunState, wf, now: float) -> str:
    rows = []
    for node, ns in st.nodes.items():
        if node in ("start", "end"):
            continue
        tasks = st.node_tasks(node) if node in st.nodes else []
        if not tasks:
            rows.append(f'<tr data-node="{e(node)}"><th scope="row">{e(node)}</th>'
                        f'<td>{badge(ns.state)}</td><td></td><td>{when(ns.started)}</td>'
                        f'<td>{dur((ns.finished - ns.started) if ns.finished and ns.started else None)}'
                        f'</td><td></td><td>{e(ns.reason)}</td></tr>')
            continue
        for t in tasks:
            links = []
            if t.attempt > 1 and not t.notebook:     # the earlier attempts' logs are there
                links.append(f'<a href="{e(ctx.url("runs", st.run, "tasks", t.key, "logs"))}">'
                             f'logs of attempts 1–{t.attempt - 1}</a>')
            if t.notebook:
                links.append(f'<a href="{e(ctx.url("runs", st.run, "tasks", t.key, "notebook"))}">'
                             f'notebook</a>')
                links.append(f'<a href="{e(ctx.url("runs", st.run, "tasks", t.key, "notebook.ipynb"))}" '
                             f'download="{e(st.run)}-{e(t.key)}.ipynb">download</a>')
                links.append(f'<a href="{e(ctx.url("runs", st.run, "tasks", t.key, "logs"))}">'
                             + ("logs (every attempt)" if t.attempt > 1 else "logs") + '</a>')
            d = _tdur(t) if t.finished else ((now - t.started) if t.started else None)
            note = t.error or t.reason or ("reused from the retried run" if t.reused else "")
            outs = ", ".join(f"{e(k)}" + (f" ({t.lens[k]})" if k in t.lens else "")
                             for k in t.outputs)
            rows.append(
                f'<tr data-node="{e(node)}" data-key="{e(t.key)}" data-state="{e(t.state)}">'
                f'<th scope="row">{e(t.key)}</th><td>{badge(t.state)}</td><td>{t.attempt}</td>'
                f'<td>{when(t.started or t.queued)}</td><td>{dur(d)}</td><td>{e(t.worker)}</td>'
                f'<td>{e(_short(note, 120))}{"<br>outputs: " + outs if outs else ""}'
                f'{"<br>" + " · ".join(links) if links else ""}</td></tr>')
    return ('<section aria-labelledby="h-tasks"><h2 id="h-tasks">Tasks</h2><div class="scroll">'
            '<table class="tasks"><thead><tr><th scope="col">Task</th><th scope="col">State</th>'
            '<th scope="col">Attempt</th><th scope="col">Started</th><th scope="col">Duration</th>'
            '<th scope="col">Worker</th><th scope="col">Details</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></div></section>")


# --- schedules --------------------------------------------------------------------------------

def schedules_page(ctx: Ctx, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ('<p class="empty">No schedules. Add one from a shell: <code>nbflow schedule add '
                'report.ipynb --cron "0 6 * * *"</code>, or <code>%flow schedule</code> in a '
                'notebook.</p>')
    body = []
    for s in rows:
        name = s["name"]
        state = "paused" if s.get("paused") else "active"
        btn = []
        if s.get("paused"):
            btn.append(_post(ctx, ("schedules", name, "resume"), "Resume", f"Resume schedule {name}"))
        else:
            btn.append(_post(ctx, ("schedules", name, "pause"), "Pause", f"Pause schedule {name}"))
        btn.append(_post(ctx, ("schedules", name, "run"), "Run now", f"Run schedule {name} now"))
        last = (f'<a href="{e(ctx.url("runs", s["last_run"]))}"><code>{e(s["last_run"])}</code></a> '
                + badge(s.get("last_run_state") or "starting")) if s.get("last_run") else \
            '<span class="muted">none yet</span>'
        nxt = s.get("next")
        nxt_html = when(nxt.timestamp()) if hasattr(nxt, "timestamp") else (
            '<span class="muted">paused</span>' if s.get("paused") else when_iso(nxt))
        body.append(
            f'<tr data-schedule="{e(name)}" data-state="{state}"><th scope="row">{e(name)}</th>'
            f'<td>{e(s.get("workflow") or s.get("notebook"))}</td>'
            f'<td><code>{e(s.get("cron"))}</code> {e(s.get("tz") or "")}</td>'
            f'<td>{badge(state)}</td><td>{nxt_html}</td><td>{when_iso(s.get("last_fire"))}</td>'
            f'<td>{last}</td><td>{dur(s.get("lag_s")) if s.get("lag_s") is not None else ""}</td>'
            f'<td class="actions">{"".join(btn)}</td></tr>')
    return ('<div class="scroll"><table class="schedules"><thead><tr><th scope="col">Name</th>'
            '<th scope="col">Notebook</th><th scope="col">When</th><th scope="col">State</th>'
            '<th scope="col">Next fire</th><th scope="col">Last fire</th><th scope="col">Last run</th>'
            '<th scope="col">Lag</th><th scope="col">Actions</th></tr></thead><tbody>'
            + "".join(body) + "</tbody></table></div>")


def _post(ctx: Ctx, path: tuple, label: str, aria: str) -> str:
    return (f'<form method="post" action="{e(ctx.url(*path))}">{ctx.xsrf}'
            f'<button type="submit" aria-label="{e(aria)}">{e(label)}</button></form>')


# --- workers ----------------------------------------------------------------------------------

def workers_page(ctx: Ctx, rows: list[dict[str, Any]], flight: dict, queued: dict[str, int]) -> str:
    qs = "".join(f"<li><code>{e(k)}</code>: {v} queued</li>" for k, v in sorted(queued.items()))
    head = f'<p>Queues: </p><ul class="queues">{qs}</ul>' if qs else \
        '<p class="muted">No task is waiting for a worker.</p>'
    if not rows:
        return head + '<p class="empty">No worker has reported in. Start one with ' \
                      '<code>nbflow up</code> or <code>nbflow worker</code>.</p>'
    body = []
    for w in rows:
        name = str(w.get("name", ""))
        tasks = flight.get(name, [])
        tl = ", ".join(f'<a href="{e(ctx.url("runs", r))}">{e(r)}</a>/{e(k)}' for r, k in tasks)
        mem = w.get("rss_mb")
        kern = w.get("kernels")
        body.append(
            f'<tr data-worker="{e(name)}"><th scope="row">{e(name)}</th><td>{e(w.get("queue"))}</td>'
            f'<td>{badge("alive" if w["alive"] else "gone")}</td>'
            f'<td>{e(kern if kern is not None else w.get("concurrency"))}</td>'
            f'<td>{e(w.get("in_flight", len(tasks)))}{": " + tl if tl else ""}</td>'
            f'<td>{e(w.get("done", 0))}</td>'
            f'<td>{e(f"{mem:.0f} MB") if isinstance(mem, (int, float)) else "–"}</td>'
            f'<td>{dur(w["age"])} ago</td><td>{e(w.get("host", ""))} {e(w.get("pid", ""))}</td></tr>')
    return head + ('<div class="scroll"><table class="workers"><thead><tr><th scope="col">Worker</th>'
                   '<th scope="col">Queue</th><th scope="col">Status</th><th scope="col">Kernels</th>'
                   '<th scope="col">Tasks in flight</th><th scope="col">Tasks done</th>'
                   '<th scope="col">Memory</th><th scope="col">Last heartbeat</th>'
                   '<th scope="col">Host, PID</th></tr></thead><tbody>' + "".join(body) +
                   "</tbody></table></div>")


def notebook_frame(ctx: Ctx, run: str, key: str, html_body: str) -> str:
    return html_body
