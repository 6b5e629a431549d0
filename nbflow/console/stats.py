"""Figures over run history: success rate and duration percentiles per notebook and task (for
`nbflow stats` and the console), and the Prometheus metrics served at ``/nbflow/metrics``."""
from __future__ import annotations

import bisect
import re
import time
from typing import Any, Iterable

from nbflow.core.state import RUN_FINAL, RunState

# task duration histogram buckets, seconds
BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


def parse_window(text: str | None) -> float | None:
    """'24h', '7d', '90m', '3600' (seconds), 'all' -> seconds (None: all of history)."""
    if text is None or str(text).strip().lower() in ("", "all"):
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"window {text!r} is not a duration: use e.g. 90m, 24h, 7d or all")
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of a non-empty list; None for an empty one."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(q / 100 * len(v) + 0.5)) - 1))
    return v[k]


def task_durations(st: RunState) -> Iterable[tuple[str, float, str]]:
    """(task node, seconds, state) of each finished task of a run (reused ones excluded)."""
    for t in st.tasks.values():
        if t.reused or t.started is None or t.finished is None:
            continue
        if t.state in ("succeeded", "failed"):
            yield t.node, max(0.0, t.finished - t.started), t.state


def run_label(st: RunState) -> str:
    return st.name or st.source or st.wf[:12]


def summary(runs: Iterable[RunState], window: float | None = None,
            now: float | None = None) -> dict[str, Any]:
    """Success rate and p50/p95 durations per notebook and per task, over runs started in the
    last ``window`` seconds (all runs when None). Durations are of finished runs/tasks."""
    now = time.time() if now is None else now
    since = None if window is None else now - window
    by_nb: dict[str, dict[str, Any]] = {}
    by_task: dict[tuple[str, str], list[float]] = {}
    total = {"runs": 0, "finished": 0, "succeeded": 0, "running": 0}
    for st in runs:
        if since is not None and st.started < since:
            continue
        nb = run_label(st)
        row = by_nb.setdefault(nb, {"runs": 0, "finished": 0, "succeeded": 0, "running": 0,
                                    "states": {}, "_d": []})
        for agg in (row, total):
            agg["runs"] += 1
            if st.state in RUN_FINAL:
                agg["finished"] += 1
            if st.state == "succeeded":
                agg["succeeded"] += 1
            if st.state == "running":
                agg["running"] += 1
        row["states"][st.state] = row["states"].get(st.state, 0) + 1
        if st.state in RUN_FINAL and st.finished:
            row["_d"].append(st.finished - st.started)
        for node, secs, _ in task_durations(st):
            by_task.setdefault((nb, node), []).append(secs)
    notebooks = {}
    for nb, row in sorted(by_nb.items()):
        d = row.pop("_d")
        notebooks[nb] = {**row, "success_rate": _rate(row), "p50_s": percentile(d, 50),
                         "p95_s": percentile(d, 95)}
    tasks = [{"notebook": nb, "task": task, "count": len(d), "p50_s": percentile(d, 50),
              "p95_s": percentile(d, 95)} for (nb, task), d in sorted(by_task.items())]
    return {"window_s": window, "since": since, "now": now, **total,
            "success_rate": _rate(total), "notebooks": notebooks, "tasks": tasks}


def _rate(row: dict[str, Any]) -> float | None:
    return round(row["succeeded"] / row["finished"], 4) if row["finished"] else None


def median_task_durations(runs: Iterable[RunState], name: str) -> dict[str, float]:
    """Task node -> median seconds in past runs of notebook ``name`` (for ETAs)."""
    d: dict[str, list[float]] = {}
    for st in runs:
        if run_label(st) == name:
            for node, secs, state in task_durations(st):
                if state == "succeeded":
                    d.setdefault(node, []).append(secs)
    return {k: percentile(v, 50) for k, v in d.items()}


# --- Prometheus -------------------------------------------------------------------------------

class Tally:
    """Runs by (state, notebook) and task-duration histograms, kept up to date one run change
    at a time (a scrape then costs the number of series, not the number of runs)."""

    def __init__(self):
        self.states: dict[tuple[str, str], int] = {}
        self.hist: dict[tuple[str, str], list] = {}     # -> [bucket counts..., sum, count]
        self._runs: dict[str, tuple[tuple[str, str], list[tuple[str, float]]]] = {}

    def update(self, run: str, st: RunState | None) -> None:
        old = self._runs.pop(run, None)
        if old is not None:
            self._apply(old, -1)
        if st is not None:
            new = ((st.state, run_label(st)), [(node, secs) for node, secs, _ in task_durations(st)])
            self._runs[run] = new
            self._apply(new, 1)

    def _apply(self, contrib, sign: int) -> None:
        key, durations = contrib
        self.states[key] = self.states.get(key, 0) + sign
        if not self.states[key]:
            del self.states[key]
        nb = key[1]
        for node, secs in durations:
            h = self.hist.get((nb, node))
            if h is None:
                h = self.hist[(nb, node)] = [0] * len(BUCKETS) + [0.0, 0]
            h[bisect.bisect_left(BUCKETS, secs)] += sign      # the first bucket with secs <= le
            h[-2] += sign * secs
            h[-1] += sign
            if not h[-1]:
                del self.hist[(nb, node)]


class ConsoleCollector:
    """Reads the console's live index at scrape time (no state of its own)."""

    def __init__(self, console):
        self.console = console
        self.schedules: list[dict[str, Any]] = []     # refreshed by the handler before a scrape

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        c = self.console
        g = GaugeMetricFamily("nbflow_runs", "Runs in history by state and notebook",
                              labels=["state", "notebook"])
        for (state, nb), n in sorted(c.tally.states.items()):
            g.add_metric([state, nb], n)
        yield g

        h = HistogramMetricFamily("nbflow_task_duration_seconds",
                                  "Duration of finished task attempts (latest attempt per task)",
                                  labels=["notebook", "task"])
        for (nb, task), counts in sorted(c.tally.hist.items()):
            cum, buckets = 0, []
            for b, n in zip(BUCKETS, counts):
                cum += n
                buckets.append((_le(b), cum))
            h.add_metric([nb, task], buckets, counts[-2])
        yield h

        q = GaugeMetricFamily("nbflow_queue_depth", "Tasks queued for a worker, per queue",
                              labels=["queue"])
        for name, n in sorted(c.queued_by_queue().items()):
            q.add_metric([name], n)
        yield q

        yield GaugeMetricFamily("nbflow_pending_approvals", "Approvals awaiting a decision",
                                value=len(c.pending_approvals()))

        lag = GaugeMetricFamily("nbflow_schedule_lag_seconds",
                                "Seconds from a schedule's last fire time to its run's start",
                                labels=["schedule"])
        paused = GaugeMetricFamily("nbflow_schedule_paused", "1 when a schedule is paused",
                                   labels=["schedule"])
        for s in self.schedules:
            paused.add_metric([s["name"]], 1 if s.get("paused") else 0)
            if s.get("lag_s") is not None:
                lag.add_metric([s["name"]], s["lag_s"])
        yield lag
        yield paused

        slots = GaugeMetricFamily("nbflow_worker_kernels",
                                  "Kernels of each live worker (its slots where not reported)",
                                  labels=["worker", "queue"])
        busy = GaugeMetricFamily("nbflow_worker_tasks_in_flight",
                                 "Tasks running on each live worker", labels=["worker", "queue"])
        flight = c.in_flight()
        mem = GaugeMetricFamily("nbflow_worker_rss_bytes",
                                "Memory of each live worker with its kernels",
                                labels=["worker", "queue"])
        for w in c.live_workers():
            if not w["alive"]:
                continue
            labels = [str(w.get("name", "")), str(w.get("queue", ""))]
            if isinstance(w.get("rss_mb"), (int, float)):
                mem.add_metric(labels, w["rss_mb"] * 2 ** 20)
            slots.add_metric(labels, w.get("kernels", w.get("concurrency", 1)))
            busy.add_metric(labels, w.get("in_flight", len(flight.get(w.get("name"), []))))
        yield slots
        yield busy
        yield mem


def _le(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(float(b))


def metrics_text(collector: ConsoleCollector) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return generate_latest(reg)
