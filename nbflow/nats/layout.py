"""Every stream, KV bucket, object store, subject and header name nbflow uses, in one place.

A namespace (``--namespace`` / ``NBFLOW_NAMESPACE``) prefixes every name, so two namespaces on
one server never see each other's data. The empty namespace gives the plain names below.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

_NS_RE = re.compile(r"^[A-Za-z0-9_-]{0,32}$")
# a signal's name is one KV key token: no dots, wildcards, spaces or non-ASCII
SIGNAL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# nbflow.<ns>.… must never be a subject of the default namespace (nbflow.tasks.<q>.<run>, …)
RESERVED_NAMESPACES = frozenset({"history", "tasks", "timers", "control", "decide",
                                 "deadletter", "triggers"})

# Headers
MSG_ID = "Nats-Msg-Id"
SCHEDULE = "Nats-Schedule"
SCHEDULE_TARGET = "Nats-Schedule-Target"
SCHEDULE_TZ = "Nats-Schedule-Time-Zone"
SCHEDULER = "Nats-Scheduler"
SCHEDULE_NEXT = "Nats-Schedule-Next"

# How long JetStream remembers message ids: a redelivered or re-published step within this
# window is dropped by the server. Handlers are idempotent beyond it (state.apply ignores repeats).
DUPLICATE_WINDOW_S = 24 * 3600


def default_namespace() -> str:
    return os.environ.get("NBFLOW_NAMESPACE", "")


@dataclass(frozen=True)
class Layout:
    namespace: str = ""

    def __post_init__(self):
        if not _NS_RE.match(self.namespace):
            raise ValueError(
                f"namespace {self.namespace!r} is invalid: use up to 32 letters, digits, '_' or '-'"
            )
        if self.namespace.lower() in RESERVED_NAMESPACES:
            raise ValueError(
                f"namespace {self.namespace!r} is reserved: its subjects would fall inside the "
                f"default namespace's ({', '.join(sorted(RESERVED_NAMESPACES))}); pick another")

    # --- name helpers -------------------------------------------------------------------------
    @property
    def _sfx(self) -> str:           # stream / bucket suffix
        return f"_{self.namespace}" if self.namespace else ""

    @property
    def _subj(self) -> str:          # subject root
        return f"nbflow.{self.namespace}" if self.namespace else "nbflow"

    # --- streams ------------------------------------------------------------------------------
    @property
    def history_stream(self) -> str:
        return f"NBFLOW_HISTORY{self._sfx}"

    @property
    def tasks_stream(self) -> str:
        return f"NBFLOW_TASKS{self._sfx}"

    @property
    def timers_stream(self) -> str:
        return f"NBFLOW_TIMERS{self._sfx}"

    @property
    def deadletter_stream(self) -> str:
        return f"NBFLOW_DEADLETTER{self._sfx}"

    @property
    def triggers_stream(self) -> str:
        return f"NBFLOW_TRIGGERS{self._sfx}"

    # --- KV buckets and object store ----------------------------------------------------------
    @property
    def runs_bucket(self) -> str:
        return f"nbflow_runs{self._sfx}"

    @property
    def defs_bucket(self) -> str:
        return f"nbflow_defs{self._sfx}"

    @property
    def approvals_bucket(self) -> str:
        return f"nbflow_approvals{self._sfx}"

    @property
    def signals_bucket(self) -> str:
        return f"nbflow_signals{self._sfx}"

    @property
    def workers_bucket(self) -> str:
        return f"nbflow_workers{self._sfx}"

    @property
    def schedules_bucket(self) -> str:
        return f"nbflow_schedules{self._sfx}"

    @property
    def fps_bucket(self) -> str:
        """Fingerprint -> outputs of the latest succeeded execution (``run --reuse``)."""
        return f"nbflow_fps{self._sfx}"

    @property
    def artifacts_store(self) -> str:
        return f"nbflow_artifacts{self._sfx}"

    @property
    def engine_bucket(self) -> str:
        """Engine-only KV (no other role may read it): the key of the engine's message ids."""
        return f"nbflow_engine{self._sfx}"

    # --- subjects -----------------------------------------------------------------------------
    def history_subject(self, run: str = "*", kind: str = "*") -> str:
        """One subject per run and event kind: ``<root>.history.<run>.<kind>``. nats-server
        lets each role publish only the kinds it produces (a worker: its tasks' results; an
        author: RunStarted; the rest only the engine), and the engine dead-letters an event
        whose type is not its subject's kind. ``history_subject(run)`` matches all of a run."""
        return f"{self._subj}.history.{run}.{kind}"

    def history_legacy_subject(self, run: str) -> str:
        """Where a run's events were published before subjects carried the event kind. Read
        only: no role may publish there any more, so what it holds predates the upgrade."""
        return f"{self._subj}.history.{run}"

    def history_run(self, subject: str) -> str:
        """The run of a history subject."""
        return subject.rsplit(".", 2)[-2]

    def history_kind(self, subject: str) -> str:
        """The event kind of a history subject (what its publisher was allowed to send)."""
        return subject.rsplit(".", 1)[-1]

    def task_subject(self, queue: str = "*", run: str = "*") -> str:
        """Tasks of one run on one queue: workers filter by queue, cancel purges by run."""
        return f"{self._subj}.tasks.{queue}.{run}"

    def timer_schedule_subject(self, timer_id: str = "*") -> str:
        return f"{self._subj}.timers.sched.{timer_id}"

    def timer_fire_subject(self, timer_id: str = "*") -> str:
        return f"{self._subj}.timers.fire.{timer_id}"

    # -- schedules and triggers (engine/timers.py) --
    def cron_schedule_subject(self, name: str = "*") -> str:
        """Holds a schedule's ``Nats-Schedule`` message (one per schedule)."""
        return f"{self._subj}.timers.cron.{name}"

    def cron_tick_subject(self, name: str = "*") -> str:
        """Where nats-server publishes a schedule's fires."""
        return f"{self._subj}.timers.tick.{name}"

    def schedule_log_subject(self, name: str = "*") -> str:
        """What each fire of a schedule/trigger did: started, skipped, queued, refused."""
        return f"{self._subj}.timers.log.{name}"

    def cancel_subject(self, run: str = "*") -> str:
        """Core (non-persistent) subject: tells workers to interrupt a run's running tasks."""
        return f"{self._subj}.control.cancel.{run}"

    def decide_subject(self, user: str = "*", what: str = ">") -> str:
        """Requests to the engine's decide service (approvals, signals). nats-server lets a user
        publish only under its own name, so the engine takes the decider from this subject."""
        return f"{self._subj}.decide.{user}.{what}"

    def dead_letter_subject(self) -> str:
        return f"{self._subj}.deadletter"

    @property
    def history_wildcard(self) -> str:
        return f"{self._subj}.history.*.*"

    @property
    def timers_wildcard(self) -> str:
        return f"{self._subj}.timers.>"

    @property
    def tasks_wildcard(self) -> str:
        return f"{self._subj}.tasks.*.*"

    # --- consumers ----------------------------------------------------------------------------
    @property
    def engine_consumer(self) -> str:
        return "engine"

    @property
    def timers_consumer(self) -> str:
        return "engine_timers"

    @property
    def scheduler_consumer(self) -> str:
        return "scheduler"

    def trigger_consumer(self, name: str) -> str:
        return f"trigger_{name}"

    def worker_consumer(self, queue: str) -> str:
        return f"worker_{queue}"
