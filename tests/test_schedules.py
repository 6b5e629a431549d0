"""Schedules: a cron fires on the server, each fire starts exactly one run (two engines too),
pause/resume/rm, catch-up after downtime, overlap skip, backfill, refusals when adding, and
durable timers inside a workflow (--sleep / --at). Real nats-server, real engine processes."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from _sched_helpers import SCHED, fires, private_stack, until
from nbflow.schedules.cron import parse_iso, parse_spec, schedule_run_id

TICK = str(SCHED / "tick.ipynb")


def _settled(s, name: str) -> bool:
    """Every tick the server made for ``name`` has been handled (one started run each)."""
    ticks = s.count(s.L.cron_tick_subject(name))
    return ticks > 0 and len(s.starts(name + "@")) == ticks


def _assert_one_run_per_fire(s, name: str) -> list[str]:
    evs = s.starts(name + "@")
    per_run = Counter(ev.run for ev in evs)
    assert max(per_run.values()) == 1, f"a run was started twice: {per_run.most_common(2)}"
    fs = fires(evs)
    assert len(set(fs)) == len(fs), "two runs for one fire"
    for ev in evs:
        fire = ev["schedule"].partition("@")[2]
        assert ev.run == schedule_run_id(name, fire)
        assert ev["params"]["scheduled_for"] == fire
    return fs


def _contiguous(fs: list[str]) -> bool:
    ts = [parse_iso(f) for f in sorted(fs)]
    return all((b - a) == timedelta(seconds=1) for a, b in zip(ts, ts[1:]))


def test_per_second_cron_two_engines_start_exactly_one_run_per_fire(nats_server, tmp_path):
    # (one engine: test_pause_resume_rm and the catch-up test check the same invariant)
    with private_stack(nats_server, tmp_path, engines=2) as (s, sup, ns):
        s.add(TICK, "* * * * * *", name="every-second", overlap="allow")
        until(lambda: len(s.starts("every-second@")) >= 4, 30, "4 runs")
        s.pause("every-second")
        until(lambda: _settled(s, "every-second"), 20, "every tick handled")
        fs = _assert_one_run_per_fire(s, "every-second")
        ticks = s.count(s.L.cron_tick_subject("every-second"))
        assert len(fs) == ticks >= 4
        assert _contiguous(fs), f"fires are not one second apart: {fs}"


def test_pause_resume_rm(nats_server, tmp_path):
    with private_stack(nats_server, tmp_path) as (s, sup, ns):
        s.add(TICK, "*/1 * * * * *", name="prr", overlap="allow")
        until(lambda: len(s.starts("prr@")) >= 1, 20, "a first run")

        s.pause("prr")
        assert s.count(s.L.cron_schedule_subject("prr")) == 0      # server won't fire again
        (row,) = s.list()
        assert row["paused"] and row["next"] is None
        until(lambda: _settled(s, "prr"), 20, "ticks before the pause handled")
        before = len(s.starts("prr@"))

        s.resume("prr")
        assert s.count(s.L.cron_schedule_subject("prr")) == 1
        until(lambda: len(s.starts("prr@")) > before, 20, "runs after resume")
        (row,) = s.list()
        assert not row["paused"] and row["next"] is not None and row["last_run"]

        s.rm("prr")
        assert s.count(s.L.cron_schedule_subject("prr")) == 0
        assert s.list() == []
        from nbflow.errors import NbflowError

        with pytest.raises(NbflowError, match="no schedule 'prr'"):
            s.pause("prr")
        changes = [c["change"] for c in s.changes("prr") if "change" in c]
        assert changes == ["added", "paused", "resumed", "removed"]
        _assert_one_run_per_fire(s, "prr")


def test_catchup_after_the_engine_was_down(nats_server, tmp_path):
    names = {"cu-all": "all", "cu-latest": "latest", "cu-none": "none"}
    with private_stack(nats_server, tmp_path) as (s, sup, ns):
        for name, policy in names.items():
            s.add(TICK, "* * * * * *", name=name, catchup=policy, overlap="allow")
        for name in names:
            until(lambda: len(s.starts(name + "@")) >= 1, 20, f"a run of {name}")
        sup.stop()                                   # the only engine goes away
        seen = {n: s.count(s.L.cron_tick_subject(n)) for n in names}
        # the server keeps firing; wait until several fires were missed
        until(lambda: all(s.count(s.L.cron_tick_subject(n)) >= seen[n] + 5 for n in names),
              20, "fires while the engine is down")
        sup.start()                                  # same namespace: catch-up runs at start
        until(lambda: all(any(e["type"] == "catchup" for e in s.log(n)) for n in names),
              30, "catch-up")
        for name in names:
            until(lambda: len(s.starts(name + "@")) > 1, 20, f"runs after restart of {name}")
        for name, policy in names.items():
            s.pause(name)
        for name, policy in names.items():
            (ev,) = [e for e in s.log(name) if e["type"] == "catchup"]
            assert ev["policy"] == policy and ev["missed"] >= 2, ev
            last = parse_iso(ev["fire"])
            window = {(last - timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
                      for i in range(ev["missed"])}
            started = set(_assert_one_run_per_fire(s, name))
            if policy == "all":
                assert window <= started
                assert _contiguous(sorted(started))
            elif policy == "latest":
                assert started & window == {ev["fire"]}
            else:
                assert not started & window
            # after the missed window, every fire runs again
            assert any(f > ev["fire"] for f in started)


def test_overlap_skip_is_recorded(nats_server, tmp_path):
    # no workers: the first run never finishes, so every later fire overlaps it
    with private_stack(nats_server, tmp_path, workers=0) as (s, sup, ns):
        s.add(TICK, "* * * * * *", name="ovl")                   # --overlap skip is the default
        until(lambda: sum(e["type"] == "skipped" for e in s.log("ovl")) >= 3, 20, "skips")
        s.pause("ovl")
        until(lambda: s.count(s.L.cron_tick_subject("ovl")) == len(
            [e for e in s.log("ovl") if e["type"] in ("started", "skipped")]), 20, "settle")
        (first,) = s.starts("ovl@")
        skipped = [e for e in s.log("ovl") if e["type"] == "skipped"]
        assert all(first.run in e["reason"] for e in skipped)
        assert all(e["fire"] > first["schedule"].partition("@")[2] for e in skipped)
        # a skipped fire has no run
        assert not any(s.run(s.sc.aclient.has_run(e["run"])) for e in skipped)
        assert len(s.starts("ovl@")) == 1


def test_overlap_queue_starts_when_the_previous_run_ends(nats_server, tmp_path):
    with private_stack(nats_server, tmp_path, workers=0) as (s, sup, ns):
        s.add(TICK, "* * * * * *", name="q", overlap="queue")
        until(lambda: sum(e["type"] == "queued" for e in s.log("q")) >= 2, 20, "queued fires")
        s.pause("q")
        (first,) = s.starts("q@")
        queued = sorted(e["fire"] for e in s.log("q") if e["type"] == "queued")
        s.sc.cancel(first.run)                      # the previous run ends ...
        until(lambda: len(s.starts("q@")) == 2, 20, "the queued fire to start")
        second = [e for e in s.starts("q@") if e.run != first.run][0]
        assert second["params"]["scheduled_for"] == queued[0]   # ... and the oldest goes next
        assert any(e["type"] == "started" and e.get("queued") for e in s.log("q"))


def test_backfill_bounded_and_idempotent(nats_server, tmp_path):
    import threading

    # no workers: runs stay running until we cancel one, which lets backfill start the next
    with private_stack(nats_server, tmp_path, workers=0) as (s, sup, ns):
        s.add(TICK, "0 6 * * *", tz="Europe/London", name="daily")
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(s.backfill(
            "daily", "2026-11-01", "2026-11-03", max_parallel=2, wait_timeout=60)))
        t.start()
        until(lambda: len(s.starts("daily@")) == 2, 20, "two backfill runs")
        assert t.is_alive() and len(s.starts("daily@")) == 2     # bounded: waits for one
        first = sorted(s.starts("daily@"), key=lambda e: e.seq)[0]
        s.sc.cancel(first.run)
        until(lambda: len(s.starts("daily@")) == 3, 20, "the third run after one ended")
        for ev in s.starts("daily@"):
            if not s.sc.status(ev.run).is_final:
                s.sc.cancel(ev.run)
        t.join(60)
        assert not t.is_alive()
        assert len(out["started"]) == 3 and out["existing"] == []
        evs = {ev.run: ev for ev in s.starts("daily@")}
        # 06:00 in London is 06:00 UTC in November (GMT)
        assert sorted(ev["params"]["scheduled_for"] for ev in evs.values()) == [
            "2026-11-01T06:00:00Z", "2026-11-02T06:00:00Z", "2026-11-03T06:00:00Z"]
        assert all(r == schedule_run_id("daily", evs[r]["params"]["scheduled_for"])
                   for r in out["started"])
        # again: every fire time has its run already
        again = s.backfill("daily", "2026-11-01", "2026-11-03")
        assert again == {"started": [], "existing": out["started"]}
        # run-now starts one more run, recorded as the last run
        rid = s.run_now("daily")
        (row,) = s.list()
        assert row["last_run"] == rid
        s.rm("daily")


def _cli(*args):
    from nbflow.cli.main import main

    return CliRunner().invoke(main, list(args), catch_exceptions=True)


@pytest.mark.parametrize("args, message", [
    (["--cron", "61 * * * *"], "bad cron expression '61 * * * *'"),
    (["--cron", "0 6 * *"], "bad cron expression '0 6 * *': use 5 fields"),
    (["--cron", "@fortnightly"], "unknown schedule '@fortnightly'"),
    (["--cron", "@every 0s"], "@every '0s'"),
    (["--cron", "0 6 * * *", "--tz", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
    (["--cron", "0 6 * * *", "-p", "nope", "1"], "unknown parameter 'nope'"),
])
def test_bad_schedules_are_refused_with_a_clear_message(nats_server, args, message):
    r = _cli("schedule", "add", TICK, *args, "--nats", nats_server.url, "--namespace", "sched-bad")
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    r = _cli("schedule", "list", "--nats", nats_server.url, "--namespace", "sched-bad")
    assert "no schedules" in r.output


def test_missing_notebook_is_refused(nats_server, tmp_path):
    r = _cli("schedule", "add", str(tmp_path / "gone.ipynb"), "--cron", "0 6 * * *",
             "--nats", nats_server.url, "--namespace", "sched-bad")
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output


def test_cli_add_list_rm(nats_server):
    ns = ["--nats", nats_server.url, "--namespace", "sched-cli"]
    r = _cli("schedule", "add", TICK, "--cron", "@daily", "--tz", "Europe/London", *ns)
    assert r.exit_code == 0, r.output
    assert "schedule tick" in r.output
    r = _cli("schedule", "list", *ns)
    assert "tick" in r.output and "@daily" in r.output and "Europe/London" in r.output
    r = _cli("schedule", "add", TICK, "--cron", "@daily", *ns)
    assert r.exit_code == 2 and "exists already" in r.output
    assert _cli("schedule", "rm", "tick", *ns).exit_code == 0
    assert "no schedules" in _cli("schedule", "list", *ns).output


def test_spec_forms():
    assert parse_spec("0 6 * * *").cron6 == "0 0 6 * * *"
    assert parse_spec("*/10 * * * * *").cron6 == "*/10 * * * * *"
    assert parse_spec("@hourly").server == "0 0 * * * *"
    assert parse_spec("@every 1m30s").every == 90
    s = parse_spec("0 6 * * *", "Europe/London")
    summer = s.next_after(datetime(2026, 7, 1, tzinfo=timezone.utc))
    assert summer == datetime(2026, 7, 1, 5, 0, tzinfo=timezone.utc)      # 06:00 BST
    # a tick's fire time is one period before its Nats-Schedule-Next: same for every engine
    assert s.fire_of_tick("2026-07-02T05:00:00Z", None) == summer
    assert parse_spec("@every 30s").fire_of_tick("2026-07-01T00:00:30Z", None) == \
        datetime(2026, 7, 1, tzinfo=timezone.utc)


# --- durable timers inside a workflow ---------------------------------------------------------

def _timer_fired_before_after(client, run):
    evs = client.history(run)
    types = [(e.type, e.get("key")) for e in evs]
    fired = types.index(("TimerFired", "wait"))
    started_after = types.index(("TaskStarted", "after"))
    assert fired < started_after


def test_sleep_task_end_to_end(client):
    from support import finish

    run = client.submit(str(SCHED / "sleepy.ipynb"))
    st = finish(client, run, timeout=60)
    assert st.state == "succeeded"
    _timer_fired_before_after(client, run)


def test_at_task_end_to_end(client, tmp_path):
    import nbformat
    from support import finish
    from nbformat.v4 import new_code_cell, new_notebook

    # far enough ahead that the run starts before it even on a loaded machine (the submit
    # compiles and bundles first): an --at already past when the run starts sets no timer
    at = (datetime.now(timezone.utc) + timedelta(seconds=8)).strftime("%Y-%m-%dT%H:%M:%SZ")
    nb = new_notebook(cells=[new_code_cell(f"%%task wait --at {at}"),
                             new_code_cell("%%task after --after wait\nb = 1")])
    path = tmp_path / "at.ipynb"
    nbformat.write(nb, str(path))
    run = client.submit(str(path))
    st = finish(client, run, timeout=60)
    assert st.state == "succeeded"
    _timer_fired_before_after(client, run)
    # the waiting ended at --at: the next task started no earlier (TimerFired.ts is when the
    # timer was set, so we look at the task that followed it)
    started = [e for e in client.history(run) if e.type == "TaskStarted" and e["key"] == "after"]
    assert started[0].ts >= parse_iso(at).timestamp() - 0.01


def test_flow_schedule_magics(nats_server, monkeypatch):
    from nbflow.errors import WorkflowError
    from nbflow.magics.core import FLOW_COMMANDS

    monkeypatch.setenv("NBFLOW_NATS_URL", nats_server.url)
    monkeypatch.setenv("NBFLOW_NAMESPACE", "sched-magic")

    class Shell:
        user_ns = {"__session__": TICK}
    d = FLOW_COMMANDS["schedule"](Shell(), '--cron "0 6 * * *" --name nightly scheduled_for=x')
    assert d["name"] == "nightly" and d["notebook"] == TICK and d["params"] == {
        "scheduled_for": "x"}
    with pytest.raises(WorkflowError, match="bad cron"):
        FLOW_COMMANDS["schedule"](Shell(), '--cron "nope"')
    view = FLOW_COMMANDS["schedules"](Shell(), "")
    assert "nightly" in view.value and "0 6 * * *" in view.value
