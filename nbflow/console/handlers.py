"""Tornado handlers of the console, shared by the Jupyter server extension and `nbflow ui`.

The handlers are written once as mixins and combined with the host's base handler: Jupyter's
``JupyterHandler`` (its login, its user, its XSRF) or the standalone token handler. Who the user
is comes from the host; the console's own NATS credential does the work and records that user.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode, urlparse, parse_qsl, urlunparse

from tornado import web
from tornado.iostream import StreamClosedError

from nbflow.client import AlreadyDecided, NbflowError, whoami
from nbflow.console import stats, views
from nbflow.console.index import Console

STATIC = os.path.join(os.path.dirname(__file__), "static")


class ConsoleMixin:
    """What every console page does; mixed in before the host's RequestHandler."""

    @property
    def console(self) -> Console:
        return self.settings["nbflow_console"]

    @property
    def root(self) -> str:
        return self.settings["nbflow_root"]

    def user_name(self) -> str:
        u = self.current_user
        if u is None:
            return ""
        ip = getattr(self, "identity_provider", None)
        if ip is not None and type(ip).__module__ == "jupyter_server.auth.identity":
            # Jupyter's own token/password login has one anonymous user per browser (a random
            # id): on a personal server that is whoever started it (JupyterHub, or a custom
            # IdentityProvider, names real users instead)
            return whoami()
        for attr in ("username", "name"):
            v = getattr(u, attr, None)
            if v:
                return str(v)
        if isinstance(u, dict):
            return str(u.get("name") or u.get("username") or "")
        return str(u)

    def ctx(self) -> views.Ctx:
        user = self.user_name()
        c = self.console
        return views.Ctx(self.root, user, c.may_approve(user), self.xsrf_form_html(),
                         pending=c.pending_count,
                         flash=self.get_argument("flash", ""),
                         flash_kind=self.get_argument("fk", "info"),
                         standalone=self.settings.get("nbflow_standalone", False),
                         error=c.error)

    async def ready(self) -> bool:
        try:
            await self.console.wait_ready(timeout=60)
            return True
        except Exception as e:  # noqa: BLE001 - no NATS: say so on the page
            self.set_status(503)
            ctx = self.ctx()
            ctx.error = (f"The console cannot reach nbflow's NATS ({type(e).__name__}: {e}). "
                         f"Set NBFLOW_NATS_URL for the server, or start a stack with `nbflow up`.")
            self.finish(views.page(ctx, "", "nbflow console", ""))
            return False

    def render_page(self, current: str, title: str, body: str, topic: str = "") -> None:
        self.set_header("Cache-Control", "no-store")
        if self.get_argument("fragment", ""):
            self.finish(body)
            return
        u = urlparse(self.request.uri)
        qs = [(k, v) for k, v in parse_qsl(u.query) if k not in ("token", "flash", "fk")]
        live = u.path + "?" + urlencode(qs + [("fragment", "1")])
        self.finish(views.page(self.ctx(), current, title, body, live=live, topic=topic))

    def back(self, message: str, kind: str = "ok", to: str | None = None) -> None:
        """Redirect (303) to where the form was, with a one-line message."""
        target = to or self.get_argument("next", "") or self.request.headers.get("Referer", "") \
            or self.root + "inbox"
        u = urlparse(target)
        if u.netloc and u.netloc != self.request.host:
            target, u = self.root + "inbox", urlparse(self.root + "inbox")
        qs = [(k, v) for k, v in parse_qsl(u.query) if k not in ("flash", "fk", "fragment")]
        qs += [("flash", message), ("fk", kind)]
        self.redirect(urlunparse(("", "", u.path, "", urlencode(qs), u.fragment)), status=303)


def _authenticated(method):
    return web.authenticated(method)


class RootHandler(ConsoleMixin):
    @_authenticated
    def get(self):
        self.redirect(self.root + "inbox")


class InboxHandler(ConsoleMixin):
    @_authenticated
    async def get(self):
        if not await self.ready():
            return
        c = self.console
        pending = c.pending_approvals()
        show = pending if self.get_argument("all", "") else pending[:views.INBOX_SIZE]
        body = views.inbox(self.ctx(), show, c.decided_approvals(), c.workflows,
                           total=len(pending))
        self.render_page("inbox", "Inbox", body, topic="approval")


def _day(text: str, tzo: int) -> float | None:
    """A YYYY-MM-DD from a date input, at midnight in the viewer's zone (tzo: JS offset, min)."""
    if not text:
        return None
    try:
        d = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        raise web.HTTPError(400, f"date {text!r} is not YYYY-MM-DD") from None
    return d.timestamp() + tzo * 60


class RunsHandler(ConsoleMixin):
    @_authenticated
    async def get(self):
        if not await self.ready():
            return
        c = self.console
        f = {k: self.get_argument(k, "") for k in ("state", "notebook", "schedule", "since",
                                                    "until", "tzo")}
        try:
            tzo = int(f.get("tzo") or 0)
        except ValueError:
            tzo = 0
        until = _day(f["until"], tzo)
        runs = c.sorted_runs()
        match = views.runs_filter(runs, f["state"], f["notebook"], f["schedule"],
                                  _day(f["since"], tzo), until + 86400 if until else None)
        try:
            offset = max(0, int(self.get_argument("offset", "0")))
        except ValueError:
            offset = 0
        page = match[offset: offset + views.PAGE_SIZE]
        f = {k: v for k, v in f.items() if v}
        if self.get_argument("fragment", ""):
            body = views.runs_table(self.ctx(), page, len(match), f, offset)
        else:
            notebooks = sorted({st.name or st.source for st in runs if st.name or st.source})
            scheds = sorted({st.schedule.partition("@")[0] for st in runs if st.schedule})
            body = views.runs_page(self.ctx(), page, len(match), f, notebooks, scheds, offset)
        # live: refetch only the table (keeps the filter form as the user left it)
        self.set_header("Cache-Control", "no-store")
        if self.get_argument("fragment", ""):
            self.finish(body)
            return
        live = self.root + "runs?" + urlencode({**f, "offset": offset, "fragment": 1})
        self.finish(views.page(self.ctx(), "runs", "Runs", body, live=live, topic="run",
                               target="runs-table"))


class RunHandler(ConsoleMixin):
    @_authenticated
    async def get(self, run: str):
        if not await self.ready():
            return
        try:
            st = await self.console.run(run)
        except NbflowError as e:
            raise web.HTTPError(404, str(e)) from None
        wf = self.console.workflows.get(st.wf)
        svg = await self.console.svg(st)
        body = views.run_page(self.ctx(), st, wf, svg)
        self.render_page("runs", f"Run {st.run} · {st.name}", body, topic=f"run:{st.run}")


class RunActionHandler(ConsoleMixin):
    @_authenticated
    async def post(self, run: str, action: str):
        if not await self.ready():
            return
        c, user = self.console.client, self.user_name()
        try:
            if action == "cancel":
                await c.cancel(run, by=user)
                self.back(f"Cancel requested for run {run} by {user}.")
            elif action == "retry":
                new = await c.retry(run, by=user)
                self.back(f"Retrying run {run} as run {new}.", to=self.root + f"runs/{new}")
            elif action == "approve":
                task = self.get_argument("task")
                decision = self.get_argument("decision", "approve")
                if decision not in ("approve", "reject"):
                    raise web.HTTPError(400, "decision must be approve or reject")
                if not self.console.may_approve(user):
                    raise web.HTTPError(403, f"{user} may not decide approvals "
                                             f"(approvers: {', '.join(sorted(self.console.approvers or []))})")
                d = await self.console.decide(run, task, decision == "approve", user,
                                              self.get_argument("comment", ""))
                await self.console.settled(run, task)   # the page we return shows it decided
                self.back(f"{d['state'].capitalize()} {task} of run {run} as {d['by']}.")
            else:
                raise web.HTTPError(404)
        except AlreadyDecided as e:
            self.back(str(e), "error")
        except NbflowError as e:
            self.back(str(e), "error")


class ArtifactHandler(ConsoleMixin):
    @_authenticated
    async def get(self, run: str, key: str, what: str):
        if not await self.ready():
            return
        c = self.console.client
        try:
            if what == "logs":
                text = await c.logs(run, key)
                self.set_header("Content-Type", "text/plain; charset=utf-8")
                self.finish(text or "(no output)")
                return
            raw = await c.output(run, key)
        except NbflowError as e:
            raise web.HTTPError(404, str(e)) from None
        if what == "notebook.ipynb":
            self.set_header("Content-Type", "application/x-ipynb+json")
            self.set_header("Content-Disposition", f'attachment; filename="{run}-{key}.ipynb"')
            self.finish(raw)
            return
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(None, _notebook_html, raw)
        # outputs are the author's code's HTML: show them in a sandbox (no scripts, no cookies)
        self.set_header("Content-Security-Policy", "sandbox allow-popups; default-src 'self' "
                        "'unsafe-inline' data:; script-src 'none'")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(body)


def _notebook_html(raw: bytes) -> str:
    import nbformat
    from nbconvert import HTMLExporter

    from nbflow.core.tracebacks import strip_ansi, user_cells

    nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
    for cell in nb.cells:            # errors name the user's cell and lines, as the logs do
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                o["traceback"] = [user_cells(nb, strip_ansi("\n".join(o.get("traceback") or [])))]
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return body


class SchedulesHandler(ConsoleMixin):
    @_authenticated
    async def get(self):
        if not await self.ready():
            return
        rows = await self.console.schedule_rows()
        self.render_page("schedules", "Schedules", views.schedules_page(self.ctx(), rows),
                         topic="schedule")


class ScheduleActionHandler(ConsoleMixin):
    @_authenticated
    async def post(self, name: str, action: str):
        if not await self.ready():
            return
        from nbflow.schedules.api import Schedules

        s, user = Schedules(self.console.client), self.user_name()
        try:
            if action == "pause":
                await s.pause(name, by=user)
                msg = f"Paused schedule {name}."
            elif action == "resume":
                await s.resume(name, by=user)
                msg = f"Resumed schedule {name}."
            elif action == "run":
                rid = await s.run_now(name, by=user)
                msg = f"Started run {rid} of schedule {name}."
            else:
                raise web.HTTPError(404)
        except NbflowError as e:
            self.back(str(e), "error")
            return
        self.console.publish({"kind": "schedule", "name": name})
        self.back(msg)


class WorkersHandler(ConsoleMixin):
    @_authenticated
    async def get(self):
        if not await self.ready():
            return
        c = self.console
        body = views.workers_page(self.ctx(), c.live_workers(), c.in_flight(),
                                  c.queued_by_queue())
        self.render_page("workers", "Workers", body, topic="workers")


class MetricsHandler(ConsoleMixin):
    @_authenticated
    async def get(self):
        if not await self.ready():
            return
        from prometheus_client import CONTENT_TYPE_LATEST

        col = self.console.collector
        try:
            col.schedules = await self.console.schedule_rows()
        except Exception:  # noqa: BLE001 - schedules unreadable: the rest still counts
            col.schedules = []
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(stats.metrics_text(col))


class StatsHandler(ConsoleMixin):
    @_authenticated
    async def get(self):
        if not await self.ready():
            return
        try:
            window = stats.parse_window(self.get_argument("window", "24h"))
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(stats.summary(self.console.runs.values(), window)))


class EventsHandler(ConsoleMixin):
    """Server-sent events: one line of JSON per change (run snapshot, worker, schedule)."""

    @_authenticated
    async def get(self):
        c = self.console
        try:
            await c.connect()
        except Exception:  # noqa: BLE001
            raise web.HTTPError(503) from None
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")
        q = c.subscribe()
        self._q = q
        try:
            self.write("retry: 2000\n\n")
            await self.flush()
            while True:
                try:
                    msg = await asyncio.wait_for(q.get(), 15)
                    self.write(f"data: {json.dumps(msg)}\n\n")
                except asyncio.TimeoutError:
                    self.write(": keep-alive\n\n")
                await self.flush()
        except (StreamClosedError, asyncio.CancelledError):
            pass
        finally:
            c.unsubscribe(q)

    def on_connection_close(self):
        q = getattr(self, "_q", None)
        if q is not None:
            self.console.unsubscribe(q)
            q.put_nowait({"kind": "bye"})


class StaticHandler(web.StaticFileHandler):
    def set_extra_headers(self, path):
        self.set_header("Cache-Control", "no-cache")


ROUTES = [
    (r"/?", RootHandler),
    (r"/inbox", InboxHandler),
    (r"/runs", RunsHandler),
    (r"/runs/([^/]+)", RunHandler),
    (r"/runs/([^/]+)/(cancel|retry|approve)", RunActionHandler),
    (r"/runs/([^/]+)/tasks/([^/]+)/(notebook|notebook\.ipynb|logs)", ArtifactHandler),
    (r"/schedules", SchedulesHandler),
    (r"/schedules/([^/]+)/(pause|resume|run)", ScheduleActionHandler),
    (r"/workers", WorkersHandler),
    (r"/metrics", MetricsHandler),
    (r"/api/stats", StatsHandler),
    (r"/events", EventsHandler),
]


def handlers(prefix: str, base: type) -> list[tuple]:
    """URL specs under ``prefix`` (e.g. '/nbflow' or '/user/ann/nbflow'), each handler mixed
    into ``base`` (the host's RequestHandler class)."""
    out: list[tuple] = []
    for pattern, mixin in ROUTES:
        cls = type(mixin.__name__, (mixin, base), {})
        out.append((prefix + pattern, cls))
    out.append((prefix + r"/static/(.*)", StaticHandler, {"path": STATIC}))
    return out


def settings(console: Console, root: str, standalone: bool = False) -> dict[str, Any]:
    return {"nbflow_console": console, "nbflow_root": root, "nbflow_standalone": standalone}


__all__ = ["handlers", "settings", "ConsoleMixin", "STATIC", "time"]
