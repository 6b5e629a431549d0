"""RunsList: recent runs (state, start, duration, notebook), each with a button that opens its
RunView below the list. ``%flow runs`` shows one."""
from __future__ import annotations

import html
import os

import ipywidgets as widgets

from nbflow.client import SyncClient
from nbflow.widgets.model import runs_rows
from nbflow.widgets.htmlparts import badge
from nbflow.widgets.runview import RunView
from nbflow.widgets.session import shared_client


class RunsList(widgets.VBox):
    def __init__(self, client: SyncClient | None = None, limit: int = 20,
                 user: str | None = None):
        self.client = client or shared_client()
        self.limit, self.user = limit, user
        self.rows: list[dict] = []
        self.opened: RunView | None = None
        self.list_box = widgets.VBox()
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.view_box = widgets.VBox()
        super().__init__([self.refresh_button, self.list_box, self.view_box])
        self.add_class("nbflow-runs")
        self.refresh()

    def refresh(self) -> None:
        self.rows = runs_rows(self.client.runs(self.limit))
        lines = []
        for r in self.rows:
            b = widgets.Button(description=r["run"], tooltip=f"open run {r['run']}",
                               layout=widgets.Layout(width="110px"))
            b.on_click(lambda _b, run=r["run"]: self.open_run(run))
            text = widgets.HTML(
                f"{badge(r['state'])} <b>{html.escape(r['name'])}</b> "
                f"started {html.escape(r['started'])}, {html.escape(r['duration'])} "
                f"<span style='color:#666'>{html.escape(os.path.basename(r['notebook'] or ''))}"
                f"</span>")
            lines.append(widgets.HBox([b, text]))
        if not lines:
            lines = [widgets.HTML("no runs yet: <code>%flow run</code> starts one")]
        self.list_box.children = tuple(lines)

    # not ``open``: ipywidgets calls ``Widget.open()`` (no arguments) on every new widget
    def open_run(self, run: str) -> RunView:
        if self.opened is not None:
            self.opened.close()
        self.opened = RunView(run, self.client, user=self.user)
        self.view_box.children = (self.opened,)
        return self.opened
