"""RunView: a live ipywidget of one run (DAG, table, progress, logs, approvals, signals).

A thin view over :class:`~nbflow.widgets.model.RunModel`; its HTML pieces are in
:mod:`nbflow.widgets.htmlparts`, the kernel's shared client and last view in
:mod:`nbflow.widgets.session`. Threading (ipykernel 7): the run's history is watched on the
SyncClient's own event loop (a daemon thread); each update is handed to the kernel's asyncio
loop with ``call_soon_threadsafe`` and applied there, so widgets only change on the kernel's
loop and the kernel never blocks — other cells run while the view updates. Button callbacks call the client, which publishes; the engine waits, never the kernel.
"""
from __future__ import annotations

import asyncio
import html
import threading
import time
from typing import Any, Callable

import ipywidgets as widgets

from nbflow.client import SyncClient, whoami
from nbflow.core.state import RUN_FINAL as FINAL, RunState
from nbflow.errors import AlreadyDecided, NbflowError
from nbflow.widgets.htmlparts import (badge, download_html, legend_html, short_repr, table_html,
                                      task_cell_outputs)
from nbflow.widgets.model import RunModel, decision_text
# last_view, remember: importable from here too
from nbflow.widgets.session import kernel_loop, last_view, remember, shared_client  # noqa: F401


HISTORY_FOR_ETA = 200               # the most recent runs read for the ETA's medians


class RunView(widgets.VBox):
    """Live view of run ``run``. ``.run`` is its id, ``.wait()`` blocks until it ends (use it in
    scripts and in a last cell; the view itself never blocks the kernel)."""

    def __init__(self, run: str, client: SyncClient | None = None, *, user: str | None = None,
                 watch: bool = True, render_svg: Callable | None = None):
        self.client = client or shared_client()
        st = self.client.status(run)
        self.run: str = st.run
        self.wf = self.client.workflow(st.wf)
        self.model = RunModel(self.wf, render_svg=render_svg)
        self.retried: RunView | None = None
        self._loop = kernel_loop()
        self._pending: tuple[Any, RunState] | None = None
        self._pending_lock = threading.Lock()
        self._scheduled = False
        self._inputs: dict[str, dict[str, str]] = {}      # approval node -> input name -> repr
        self._details_for: tuple[str, str] | None = None  # (key, state) shown in details
        self._approval_widgets: dict[str, dict[str, widgets.Widget]] = {}
        self._signal_widgets: dict[str, dict[str, widgets.Widget]] = {}
        self._build(user)
        super().__init__(children=self._children)
        self.add_class("nbflow-runview")
        self.model.observe(self._render, names=["events", "run_state"])
        self.model.observe(self._render_header, names=["elapsed", "eta"])
        self._apply(None, st)              # show the snapshot at once; the watch refines it
        if not st.is_final:                # the ETA: median task durations of earlier runs
            self._bg(self.client.aclient.runs(limit=HISTORY_FOR_ETA), self._got_history,
                     on_error=lambda _e: None)     # no ETA is no harm
        self._watch_future = None
        self._ticker = None
        if watch and not st.is_final:
            self.start_watch()

    # --- construction -------------------------------------------------------------------------
    def _build(self, user: str | None) -> None:
        self.header = widgets.HTML()
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="progress",
                                            bar_style="info")
        self.svg = widgets.HTML()
        self.legend = widgets.HTML(legend_html())
        self.table = widgets.HTML()
        self.status = widgets.HTML()            # last action's result / error
        self.user_box = widgets.Text(value=user or whoami(), description="as",
                                     layout=widgets.Layout(width="220px"))
        self.cancel_button = widgets.Button(description="Cancel", button_style="warning",
                                            icon="stop")
        self.retry_button = widgets.Button(description="Retry", icon="redo")
        self.cancel_button.on_click(lambda _b: self.cancel())
        self.retry_button.on_click(lambda _b: self.retry())
        self.approvals_box = widgets.VBox()
        self.signals_box = widgets.VBox()
        self.task_select = widgets.Dropdown(options=[], description="task")
        self.task_select.observe(lambda _c: self._show_details(force=True), names="value")
        self.logs = widgets.HTML()
        self.outputs = widgets.Output()
        self.download = widgets.HTML()
        self.retry_box = widgets.VBox()
        details = widgets.VBox([self.task_select, self.download,
                                widgets.HTML("<b>outputs</b>"), self.outputs,
                                widgets.HTML("<b>logs</b>"), self.logs])
        self._children = [
            self.header,
            widgets.HBox([self.progress, self.cancel_button, self.retry_button, self.user_box]),
            self.status, self.approvals_box, self.signals_box,
            self.svg, self.legend, self.table, details, self.retry_box,
        ]

    # --- updates: watch thread -> kernel loop -> model -> widgets -------------------------
    def start_watch(self) -> None:
        self._watch_future = asyncio.run_coroutine_threadsafe(self._watch(), self.client.loop)
        if self._loop is not None:
            self._ticker = self._loop.create_task(self._tick())

    async def _watch(self) -> None:
        try:
            async for ev, st in self.client.aclient.watch(self.run):
                self._deliver(ev, st)     # a value: fold never changes a state it returned
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - show it; the run goes on without the view
            self._to_kernel(self._set_status, f"watch stopped: {type(e).__name__}: {e}", True)

    def _deliver(self, ev, st: RunState) -> None:
        """Keep only the newest pending update (a late view catching up from history renders
        once, not once per event)."""
        with self._pending_lock:
            self._pending = (ev, st)
            if self._scheduled:
                return
            self._scheduled = True
        self._to_kernel(self._flush)

    def _flush(self) -> None:
        with self._pending_lock:
            pending, self._pending, self._scheduled = self._pending, None, False
        if pending is not None:
            self._apply(*pending)

    def _to_kernel(self, fn: Callable, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)
        else:
            fn(*args)

    def _bg(self, coro, then: Callable[[Any], None], on_error: Callable | None = None) -> None:
        """Run ``coro`` on the client's loop; hand its result to ``then`` on the kernel loop."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.client.loop)

        def done(f):
            try:
                res = f.result()
            except Exception as e:  # noqa: BLE001
                self._to_kernel(on_error or (lambda e: self._set_status(str(e), True)), e)
                return
            self._to_kernel(then, res)
        fut.add_done_callback(done)

    def _apply(self, ev, st: RunState) -> None:
        if self.model.state is not None and st.events < self.model.state.events:
            return                                     # an older state arrived late
        self.model.apply(ev, st, now=time.time() if not st.is_final else None)

    async def _tick(self) -> None:
        while self.model.run_state not in FINAL:
            await asyncio.sleep(1.0)
            self.model.tick(time.time())

    def _got_history(self, runs: list[RunState]) -> None:
        from nbflow.console.stats import median_task_durations, run_label

        if self.model.state is None:
            return
        earlier = [r for r in runs if r.run != self.run]
        self.model.set_medians(median_task_durations(earlier, run_label(self.model.state)),
                               time.time())

    # --- rendering ----------------------------------------------------------------------------
    def _render_header(self, _change=None) -> None:
        m = self.model
        err = (f"<div style='color:#D55E00'>{html.escape(m.error)}</div>" if m.error else "")
        self.header.value = (
            f"<div class='nbflow-header' data-state='{html.escape(m.run_state)}'>"
            f"<b>{html.escape(m.name)}</b> run <code>{html.escape(m.run)}</code> "
            f"{badge(m.run_state)} <span class='nbflow-elapsed'>{html.escape(m.elapsed)}"
            f"</span>" + (f" · <span class='nbflow-eta'>{html.escape(m.eta)}</span>"
                          if m.eta else "") + f"{err}</div>")

    def _render(self, _change=None) -> None:
        m = self.model
        self._render_header()
        self.progress.max, self.progress.value = m.progress_max, m.progress_value
        self.progress.description = f"{m.progress_value}/{m.progress_max}"
        self.progress.bar_style = {"succeeded": "success", "failed": "danger",
                                   "rejected": "danger", "cancelled": "warning"}.get(
            m.run_state, "info")
        if self.svg.value != m.svg:
            self.svg.value = m.svg
        self.table.value = table_html(m.rows)
        # a finished run cannot be cancelled: grey, not a faded orange that still looks live
        self.cancel_button.disabled = m.run_state in FINAL
        self.cancel_button.button_style = "" if m.run_state in FINAL else "warning"
        self.cancel_button.tooltip = (f"the run is {m.run_state}" if m.run_state in FINAL
                                      else "cancel this run")
        self.retry_button.disabled = m.run_state in ("running", "succeeded")
        opts = list(m.task_keys)
        if list(self.task_select.options) != opts:
            keep = self.task_select.value
            self.task_select.options = opts
            if keep in opts:
                self.task_select.value = keep
            elif opts:
                self.task_select.value = opts[0]      # show something: the first task
        self._render_approvals()
        self._render_signals()
        self._show_details()

    def _render_approvals(self) -> None:
        rows = []
        for ap in self.model.approvals:
            node = ap["node"]
            w = self._approval_widgets.get(node)
            if w is None:
                w = self._approval_widgets[node] = self._approval_widget(node)
            if ap["inputs"] and node not in self._inputs and ap["state"] == "pending":
                self._inputs[node] = {n: "…" for n in ap["inputs"]}
                self._bg(self._load_inputs(ap["inputs"]), lambda r, n=node: self._got_inputs(n, r))
            inputs = self._inputs.get(node, {})
            summary = "".join(f"<li><code>{html.escape(k)}</code> = {html.escape(v)}</li>"
                              for k, v in inputs.items())
            w["text"].value = (
                f"<div class='nbflow-approval' data-node='{html.escape(node)}'>"
                f"<b>approval: {html.escape(node)}</b> — {html.escape(ap['prompt'])}"
                + (f"<ul>{summary}</ul>" if summary else "")
                + f"<div class='nbflow-decision'>{html.escape(decision_text(ap))}</div></div>")
            pending = ap["state"] == "pending"
            for b in (w["approve"], w["reject"], w["comment"]):
                b.disabled = not pending
            w["buttons"].layout.display = None if pending else "none"
            rows.append(w["box"])
        if tuple(rows) != self.approvals_box.children:
            self.approvals_box.children = tuple(rows)

    def _approval_widget(self, node: str) -> dict[str, widgets.Widget]:
        text = widgets.HTML()
        approve = widgets.Button(description="Approve", button_style="success", icon="check")
        reject = widgets.Button(description="Reject", button_style="danger", icon="times")
        comment = widgets.Text(placeholder="comment (optional)", description="comment")
        approve.on_click(lambda _b: self.approve(node, True, comment.value))
        reject.on_click(lambda _b: self.approve(node, False, comment.value))
        buttons = widgets.HBox([approve, reject, comment])
        return {"text": text, "approve": approve, "reject": reject, "comment": comment,
                "buttons": buttons, "box": widgets.VBox([text, buttons])}

    async def _load_inputs(self, inputs: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, producer in inputs.items():
            try:
                out[name] = short_repr(await self.client.aclient.load_output(self.run, producer,
                                                                             name))
            except Exception as e:  # noqa: BLE001 - best effort: say why
                out[name] = f"(not available: {type(e).__name__})"
        return out

    def _got_inputs(self, node: str, summary: dict[str, str]) -> None:
        self._inputs[node] = summary
        self._render_approvals()

    def _render_signals(self) -> None:
        rows = []
        for sig in self.model.signals:
            name = sig["name"]
            w = self._signal_widgets.get(name)
            if w is None:
                label = widgets.HTML(f"<b>signal</b> <code>{html.escape(name)}</code> "
                                     f"(task {html.escape(sig['node'])} waits for it)")
                value = widgets.Text(placeholder='JSON value, e.g. 42 or "ok"',
                                     description="value")
                send = widgets.Button(description="Send", icon="paper-plane")
                send.on_click(lambda _b, n=name, v=value: self.signal(n, v.value))
                w = self._signal_widgets[name] = {"value": value, "send": send,
                                                  "box": widgets.HBox([label, value, send])}
            rows.append(w["box"])
        if tuple(rows) != self.signals_box.children:
            self.signals_box.children = tuple(rows)

    def _show_details(self, force: bool = False) -> None:
        key = self.task_select.value
        st = self.model.state
        if not key or st is None or key not in st.tasks:
            return
        t = st.tasks[key]
        mark = (key, f"{t.state}.{t.attempt}")
        if mark == self._details_for and not force:
            return
        self._details_for = mark
        self._bg(self._fetch_details(key), lambda r, k=key: self._got_details(k, r))

    async def _fetch_details(self, key: str) -> dict[str, Any]:
        import nbformat

        c = self.client.aclient
        logs = await c.logs(self.run, key)
        st = await c.status(self.run)
        raw = b""
        if st.tasks.get(key) and st.tasks[key].notebook:
            raw = await c.output(self.run, key)
        return {"logs": logs, "raw": raw, "nb": nbformat.reads(raw.decode(), as_version=4) if raw else {}}

    def _got_details(self, key: str, d: dict[str, Any]) -> None:
        if key != self.task_select.value:
            return
        self.logs.value = (f"<pre class='nbflow-logs' style='max-height:300px;overflow:auto'>"
                           f"{html.escape(d['logs'] or '(no output yet)')}</pre>")
        self.outputs.outputs = tuple(task_cell_outputs(d["nb"]))
        self.download.value = download_html(self.run, key, d["raw"]) if d["raw"] else ""

    def _set_status(self, text: str, error: bool = False) -> None:
        colour = "#D55E00" if error else "#006B4F"
        self.status.value = (f"<div class='nbflow-status' style='color:{colour}'>"
                             f"{html.escape(text)}</div>")

    # --- actions (button callbacks; also callable from code) ----------------------------------
    @property
    def user(self) -> str:
        return self.user_box.value.strip() or whoami()

    def approve(self, task: str, approved: bool = True, comment: str = "") -> dict | None:
        try:
            d = self.client.approve(self.run, task, approved=approved, by=self.user,
                                    comment=comment)
        except AlreadyDecided as e:
            self._set_status(str(e), error=True)
            return None
        except NbflowError as e:
            self._set_status(str(e), error=True)
            return None
        self._set_status(f"{task}: {d['state']} by {d['by']}")
        return d

    def signal(self, name: str, value_text: str) -> bool:
        import json

        try:
            value = json.loads(value_text) if value_text.strip() else None
        except ValueError as e:
            self._set_status(f"signal {name}: not JSON ({e}); quote text like \"ok\"", True)
            return False
        try:
            self.client.signal(self.run, name, value, by=self.user)
        except NbflowError as e:
            self._set_status(str(e), error=True)
            return False
        self._set_status(f"signal {name} sent")
        return True

    def cancel(self) -> bool:
        try:
            self.client.cancel(self.run, by=self.user)
        except NbflowError as e:
            self._set_status(str(e), error=True)
            return False
        self._set_status("cancel requested")
        return True

    def retry(self, same_code: bool = False) -> "RunView | None":
        """A new run with the notebook file as it is now (the fix), reusing unchanged tasks;
        ``same_code``: rerun the code this run ran."""
        try:
            new = self.client.retry(self.run, by=self.user, same_code=same_code)
        except NbflowError as e:
            self._set_status(str(e), error=True)
            return None
        self.retried = RunView(new, self.client, user=self.user)
        self.retry_box.children = (widgets.HTML(f"<b>retry</b>: run <code>{new}</code>"),
                                   self.retried)
        self._set_status(f"retrying as run {new}")
        return self.retried

    # --- blocking helpers for scripts and last cells ------------------------------------------
    def wait(self, timeout: float | None = None) -> RunState:
        """Block until the run ends; the view shows the final state."""
        st = self.client.wait(self.run, timeout=timeout)
        self._apply(None, st)
        return st

    def wait_until(self, task: str, *states: str, timeout: float = 120.0):
        """Block until ``task`` is in one of ``states`` (e.g. 'awaiting_approval'); returns its
        NodeState. For unattended notebooks that decide or signal from code."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.client.status(self.run)
            ns = st.nodes.get(task)
            if ns is None:
                raise NbflowError(f"run {self.run} has no task {task!r}")
            if ns.state in states:
                return ns
            if st.is_final or time.monotonic() > deadline:
                raise NbflowError(f"task {task!r} of run {self.run} is {ns.state} (run "
                                  f"{st.state}), not {' or '.join(states)}")
            time.sleep(0.2)

    def status_now(self) -> RunState:
        return self.client.status(self.run)

    def close(self) -> None:
        if self._watch_future is not None:
            self._watch_future.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
        super().close()

    def __repr__(self) -> str:
        return f"<RunView run={self.run} {self.model.run_state}>"

    # Shown once: `%flow run` displays the view itself and returns it; the same cell's output
    # hook would otherwise draw it a second time.
    _shown_in: int | None = None

    def _ipython_display_(self) -> None:
        from IPython import get_ipython
        from IPython.display import display

        ip = get_ipython()
        count = getattr(ip, "execution_count", None)
        if self._shown_in is not None and self._shown_in == count:
            self._shown_in = None
            return
        display(self._repr_mimebundle_(), raw=True)
