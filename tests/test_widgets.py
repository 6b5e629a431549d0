"""The run widgets. The model is tested without a kernel or browser (events in -> traitlet values
out); the view and the %flow commands against the real `stack` fixture."""
from __future__ import annotations

import threading
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from nbflow.compiler import compile_notebook
from nbflow.compiler.render import STATE_COLOURS
from nbflow.core.events import make
from nbflow.core.state import apply
from nbflow.core.durations import elapsed
from nbflow.widgets.model import RunModel, runs_rows

from support import finish, wait_for

pytestmark = pytest.mark.needs_dot      # the run view draws the DAG with graphviz

T0 = 1_700_000_000.0


def _wf():
    cells = [
        new_code_cell('regions = ["north", "south", "east"]', metadata={"tags": ["parameters"]}),
        new_code_cell("%%task prepare\nbase = 10"),
        new_code_cell("%%task by_region --map region in regions\ntotal = base + len(region)"),
        new_code_cell('%%task publish --approval "Publish the totals?"\nprint(total)'),
        new_code_cell("%%task go --wait-signal go_ahead --after prepare\nprint(go_ahead)"),
    ]
    return compile_notebook(cells, name="regional")


class Feed:
    """Events through state.apply, then through the model, as Client.watch would yield them."""

    def __init__(self, svg_calls: list | None = None):
        self.wf = _wf()
        self.st = None
        self.t = T0
        self.svg_calls = svg_calls if svg_calls is not None else []
        self.model = RunModel(self.wf, render_svg=self._svg)

    def _svg(self, wf, states):
        from nbflow.compiler import render

        self.svg_calls.append(dict(states))
        return render.to_svg(wf, states)

    def __call__(self, type_, **data):
        self.t += 1.5
        ev = make(type_, "r1", ts=self.t, **data)
        self.st, _ = apply(self.st, ev, self.wf)
        self.model.apply(ev, self.st, now=self.t)
        return self.model

    def start(self):
        return self("RunStarted", wf=self.wf.content_hash(), params={}, by="ann",
                    name="regional")


def rows_by_task(model):
    return {r["task"].split(" ")[0] if r["level"] == 0 else r["task"]: r for r in model.rows}


def test_map_instances_group_under_their_task_with_a_count():
    f = Feed()
    f.start()
    f("TaskStarted", key="prepare", attempt=1, worker="w-1")
    m = f("TaskSucceeded", key="prepare", attempt=1, worker="w-1")
    rows = rows_by_task(m)
    assert rows["by_region"]["task"] == "by_region 0/3"
    assert rows["by_region"]["state"] == "running"
    assert [r["task"] for r in m.rows if r["level"] == 1] == \
        ["by_region#0", "by_region#1", "by_region#2"]
    assert rows["prepare"]["worker"] == "w-1" and rows["prepare"]["duration"] == "1.5s"
    assert rows["prepare"]["started"] == time.strftime("%H:%M:%S", time.localtime(T0 + 3.0))
    for i in (0, 1):
        f("TaskStarted", key=f"by_region#{i}", attempt=1, worker=f"w-{i}")
        m = f("TaskSucceeded", key=f"by_region#{i}", attempt=1, outputs={"total": f"k{i}"})
    rows = rows_by_task(m)
    assert rows["by_region"]["task"] == "by_region 2/3"
    assert rows["by_region#1"]["state"] == "succeeded"
    assert rows["by_region#2"]["state"] == "queued"
    # progress in task units: prepare (1) + 2 of 3 instances; of prepare + 3 + publish + go
    assert (m.progress_value, m.progress_max) == (3, 6)
    assert m.run_state == "running"
    assert m.task_keys == ["prepare", "by_region#0", "by_region#1", "by_region#2"]


def test_approval_panel_signal_panel_and_colours():
    f = Feed()
    f.start()
    m = f("TaskSucceeded", key="prepare", attempt=1)
    assert [s["name"] for s in m.signals] == ["go_ahead"]
    assert rows_by_task(m)["go"]["state"] == "waiting_signal"
    for i in range(3):
        m = f("TaskSucceeded", key=f"by_region#{i}", attempt=1, outputs={"total": f"k{i}"})
    [ap] = m.approvals
    assert (ap["node"], ap["prompt"], ap["state"]) == ("publish", "Publish the totals?", "pending")
    assert ap["inputs"] == {"total": "by_region"}
    assert m.node_states["publish"] == "awaiting_approval"
    assert STATE_COLOURS["awaiting_approval"].lower() in m.svg.lower()
    assert STATE_COLOURS["waiting_signal"].lower() in m.svg.lower()
    m = f("ApprovalDecided", node="publish", approved=True, by="bob", comment="ship it")
    [ap] = m.approvals
    assert (ap["state"], ap["by"], ap["comment"]) == ("approved", "bob", "ship it")
    assert ap["at_text"] == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.t))
    m = f("SignalSent", name="go_ahead", value=1, by="ann")
    assert m.signals == []
    for key in ("publish", "go"):
        m = f("TaskSucceeded", key=key, attempt=1)
    assert m.run_state == "succeeded"
    assert (m.progress_value, m.progress_max) == (6, 6)
    assert m.elapsed == elapsed(f.t - (T0 + 1.5))
    assert STATE_COLOURS["succeeded"].lower() in m.svg.lower()
    assert STATE_COLOURS["awaiting_approval"].lower() not in m.svg.lower().split("</title>", 1)[1] \
        or "legend" in m.svg.lower()


def test_svg_is_redrawn_only_when_a_node_changes_state():
    calls = []
    f = Feed(calls)
    f.start()
    f("TaskStarted", key="prepare", attempt=1)     # a task starting: node states unchanged
    assert len(calls) == 1
    f("TaskSucceeded", key="prepare", attempt=1)
    assert len(calls) == 2 and calls[-1]["prepare"] == "succeeded"


def test_failure_and_retry_rows():
    f = Feed()
    f.start()
    m = f("TaskFailed", key="prepare", attempt=1, error="ZeroDivisionError: x")
    assert m.run_state == "failed"
    assert "prepare: ZeroDivisionError" in m.error
    assert rows_by_task(m)["prepare"]["state"] == "failed"


def test_runs_rows_newest_first():
    f = Feed()
    f.start()
    a = f.st
    f2 = Feed()
    f2.t = T0 + 100
    f2.start()
    rows = runs_rows([a, f2.st], now=T0 + 200)
    assert [r["state"] for r in rows] == ["running", "running"]
    assert rows[0]["started"] > rows[1]["started"]
    assert rows[0]["duration"] == elapsed(200 - 101.5)


# --- the view against a real engine -------------------------------------------------------------

def _write(tmp_path, name, cells):
    p = tmp_path / name
    nbformat.write(new_notebook(cells=cells), p)
    return str(p)


@pytest.fixture
def approval_nb(tmp_path):
    return _write(tmp_path, "appr.ipynb", [
        new_code_cell("%%task prepare\nreport = {'rows': 3}"),
        new_code_cell('%%task publish --approval "Publish it?"\nprint("published", report)'),
    ])


def test_runview_live_approval_race_and_outputs(client, approval_nb):
    from nbflow.widgets.runview import RunView

    run = client.submit(approval_nb, {})
    view = RunView(run, client, user="alice")
    assert view.run == run
    # the model updates first, then the view draws its box: wait for what is read next
    wait_for(lambda: view.model.approvals and view.model.approvals[0]["state"] == "pending"
             and view.approvals_box.children, what="the approval to show")
    box = view.approvals_box.children[0]
    wait_for(lambda: "{&#x27;rows&#x27;: 3}" in box.children[0].value
             or "{'rows': 3}" in box.children[0].value, what="the input summary")
    # two people click at once: exactly one decision, the loser is told who decided
    results = {}

    def decide(who):
        try:
            results[who] = client.approve(run, "publish", by=who)
        except Exception as e:  # noqa: BLE001
            results[who] = e
    threads = [threading.Thread(target=decide, args=(w,)) for w in ("carol", "dave")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [w for w, r in results.items() if isinstance(r, dict)]
    losers = [r for r in results.values() if not isinstance(r, dict)]
    assert len(winners) == 1 and len(losers) == 1
    assert f"already approved by {winners[0]}" in str(losers[0])
    # the view's own button now loses too, and says so
    w = view._approval_widgets["publish"]
    w["approve"].click()
    assert f"already approved by {winners[0]}" in view.status.value
    st = finish(client, run)
    assert st.state == "succeeded"
    assert [e.type for e in client.history(run)].count("ApprovalDecided") == 1
    wait_for(lambda: view.model.run_state == "succeeded", what="the view to see the end")
    assert f"approved by {winners[0]}" in box.children[0].value
    assert view.progress.value == view.progress.max == 2
    assert view.cancel_button.disabled
    assert view.cancel_button.button_style == ""      # grey on a finished run, not orange
    view.task_select.value = "publish"
    wait_for(lambda: "published" in view.logs.value, what="the task's logs")
    assert any("published" in (o.get("text") or "") for o in view.outputs.outputs)
    assert 'download="' in view.download.value and "base64," in view.download.value
    view.close()


def test_late_view_catches_up_and_reject_with_comment(client, approval_nb):
    from nbflow.widgets.runview import RunView

    run = client.submit(approval_nb, {})
    wait_for(lambda: client.status(run).nodes["publish"].state == "awaiting_approval",
             what="awaiting approval")
    view = RunView(run, client, user="erin")
    assert view.model.approvals[0]["state"] == "pending"
    view._approval_widgets["publish"]["comment"].value = "numbers look off"
    view._approval_widgets["publish"]["reject"].click()
    assert client.wait(run, timeout=60).state == "rejected"
    wait_for(lambda: view.model.run_state == "rejected", what="the view to see the rejection")
    text = view.approvals_box.children[0].children[0].value
    assert "rejected by erin" in text and "numbers look off" in text
    assert not view.retry_button.disabled
    new = view.retry()
    assert new is not None and new.run != run and view.retried is new
    new.client.cancel(new.run)
    assert new.wait(timeout=60).state == "cancelled"
    view.close()
    new.close()


def test_approval_timeout_rejects(client, tmp_path):
    nb = _write(tmp_path, "timeout.ipynb", [
        new_code_cell('%%task publish --approval "Quick?" --approval-timeout 2s\nprint(1)'),
    ])
    run = client.submit(nb, {})
    st = finish(client, run, timeout=60)
    assert st.state == "rejected"
    ap = st.nodes["publish"].approval
    assert (ap["state"], ap["reason"]) == ("rejected", "timeout")
    from nbflow.widgets.model import approvals, decision_text

    assert "timeout" in decision_text(approvals(st, client.workflow(st.wf))[0])


def test_signal_panel_sends(client, tmp_path):
    from nbflow.widgets.runview import RunView

    nb = _write(tmp_path, "sig.ipynb", [
        new_code_cell("%%task go --wait-signal go_ahead\nprint('value', go_ahead)"),
    ])
    run = client.submit(nb, {})
    view = RunView(run, client)
    wait_for(lambda: view.signals_box.children, what="the signal panel")
    w = view._signal_widgets["go_ahead"]
    w["value"].value = "not json"
    w["send"].click()
    assert "not JSON" in view.status.value
    w["value"].value = '{"n": 7}'
    w["send"].click()
    st = finish(client, run)
    assert st.state == "succeeded" and st.signals["go_ahead"] == {"n": 7}
    assert "value {'n': 7}" in client.logs(run, "go")
    view.close()


def test_a_reused_task_has_its_own_state_and_colour_in_the_runview_model():
    from statehelpers import Sim, chain

    from nbflow.compiler.render import STATE_COLOURS
    from nbflow.widgets.model import RunModel, table_rows

    wf = chain(2)
    first = Sim(wf, run="old1")
    first.start()
    first.run_workers()
    t0 = {k: dict(t.__dict__) for k, t in first.st.tasks.items() if t.node == "t0"}
    sim = Sim(wf, run="r2")
    sim.start(reuse={"t0": {"state": "succeeded", "count": None, "tasks": t0, "from": "old1"}})
    rows = {r["node"]: r for r in table_rows(sim.st, wf)}
    assert rows["t0"]["state"] == "reused" and rows["t0"]["worker"] == "from run old1"
    assert rows["t1"]["state"] != "reused"
    m = RunModel(wf, render_svg=lambda wf, states: "")
    m.apply(None, sim.st, wf)
    assert m.node_states["t0"] == "reused"
    assert STATE_COLOURS["reused"] not in (STATE_COLOURS["succeeded"], STATE_COLOURS["skipped"])


# --- the ETA: median task durations of earlier runs, along the longest remaining path ----------

def test_eta_follows_the_longest_remaining_path_and_names_what_it_cannot_tell():
    from nbflow.widgets.model import eta, eta_text

    f = Feed()
    f.start()
    med = {"prepare": 10.0, "by_region": 20.0, "publish": 5.0, "go": 3.0}
    # prepare -> by_region -> publish (10 + 20 + 5) is longer than prepare -> go (10 + 3);
    # the approval and the signal are waits nobody can time: named, not counted
    assert eta(f.st, f.wf, med, f.t) == (35.0, " + waiting for an approval (publish), "
                                               "a signal (go)")
    assert f.model.eta == ""                       # earlier runs not read yet: nothing shown
    f.model.set_medians(med, f.t)
    assert f.model.eta == f"ETA ~{elapsed(35.0)} + waiting for an approval (publish), a signal (go)"
    f("TaskStarted", key="prepare", attempt=1, worker="w1")
    assert eta(f.st, f.wf, med, f.t + 4)[0] == 31.0           # 6 s of prepare left
    assert eta(f.st, f.wf, med, f.t + 60)[0] == 25.0          # slower than usual: 0 left
    f.model.tick(f.t + 4)
    assert f.model.eta.startswith(f"ETA ~{elapsed(31.0)} + ")
    # a task that never executed before: no number rather than a wrong one
    less = {k: v for k, v in med.items() if k != "by_region"}
    assert eta_text(f.st, f.wf, less, f.t) == \
        "no ETA: task by_region has no earlier execution to go by"
    f("CancelRequested", by="ann")
    assert f.model.eta == "" and eta(f.st, f.wf, med, f.t) == (None, "")


def test_runview_shows_an_eta_from_earlier_runs(client, tmp_path):
    from nbflow.widgets.runview import RunView

    nb = _write(tmp_path, "eta.ipynb", [
        new_code_cell("%%task load\nrows = [1, 2, 3]"),
        new_code_cell("%%task go --wait-signal go_ahead\nprint(len(rows), go_ahead)"),
    ])
    first = client.submit(nb, {})
    client.signal(first, "go_ahead", 1)
    assert finish(client, first).state == "succeeded"
    run = client.submit(nb, {})
    view = RunView(run, client)
    wait_for(lambda: "waiting for a signal (go)" in view.model.eta,
             what=f"an ETA in the view (it says {view.model.eta!r})")
    assert view.model.eta.startswith("ETA ~")
    assert "nbflow-eta" in view.header.value and "waiting for a signal (go)" in view.header.value
    client.signal(run, "go_ahead", 2)
    assert finish(client, run).state == "succeeded"
    wait_for(lambda: view.model.run_state == "succeeded", what="the view to see the end")
    assert view.model.eta == "" and "nbflow-eta" not in view.header.value
    view.close()
