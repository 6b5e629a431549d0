"""What a schedule does at a fire, pure: catch-up, overlap, the state it keeps.

The engine side (:mod:`nbflow.schedules.scheduler`) does the I/O around these decisions; they are
tested without NATS, like ``core/state.py``.
"""
from __future__ import annotations

from datetime import datetime

from nbflow.schedules.cron import Spec, iso

CATCHUP = ("none", "latest", "all")
OVERLAP = ("skip", "queue", "allow")
CATCHUP_GRACE_S = 2.0          # fires younger than this are left to their tick (not "missed")
CATCHUP_MAX = 1000             # at most this many missed fires are started by --catchup all


def tick_ignored(d: dict, fire_iso: str) -> bool:
    """A tick of a paused schedule that fired after the pause."""
    return bool(d.get("paused")) and fire_iso > d.get("paused_at", "")


def accounted_for(st: dict, fire_iso: str) -> bool:
    """A fire at or before the last recorded one, not waiting in the queue: catch-up handled it."""
    return bool(st.get("last_fire")) and fire_iso <= st["last_fire"] \
        and fire_iso not in (st.get("queued") or [])


def may_overlap(d: dict, prev: str | None, rid: str) -> bool:
    """Whether the previous run must be checked before starting ``rid`` (``--overlap``)."""
    return d.get("overlap", "skip") != "allow" and bool(prev) and prev != rid


def advance(st: dict, fire_iso: str, run: str | None, queue: str | None = None) -> dict:
    """The schedule's state after a fire (a new dict): last fire, queue, last run, count."""
    st = dict(st)
    if fire_iso > st.get("last_fire", ""):
        st["last_fire"] = fire_iso
    q = [f for f in st.get("queued") or [] if f != fire_iso]
    if queue:
        q.append(queue)
    st["queued"] = sorted(set(q))
    if run:
        st["last_run"], st["last_run_fire"] = run, fire_iso
        st["fires"] = st.get("fires", 0) + 1
    return st


def missed_fires(spec: Spec, last: datetime, now: datetime) -> list[str]:
    """Fire times after ``last`` up to ``now``, the latest ``CATCHUP_MAX`` of them."""
    missed: list[str] = []
    for t in spec.between(last, now):
        missed.append(iso(t))
        if len(missed) > CATCHUP_MAX:
            missed.pop(0)
    return missed


def catchup_todo(policy: str, missed: list[str]) -> list[str]:
    """The missed fires to start under ``--catchup`` none/latest/all."""
    return {"none": [], "latest": missed[-1:], "all": missed}[policy]


def declares(wf, param: str) -> bool:
    return param in wf.param_names()


def unknown_params(wf, params: dict) -> list[str]:
    return sorted(set(params) - wf.param_names())
