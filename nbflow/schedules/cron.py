"""Cron specs, pure: parse and validate a schedule, compute fire times, name its runs.

No I/O, no nbflow imports beyond the core: tested like ``core/state.py``.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from nbflow.core import durations
from nbflow.errors import ScheduleError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
ISO = "%Y-%m-%dT%H:%M:%SZ"

_PREDEFINED = {
    "@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0", "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime(ISO)


def parse_iso(s: str) -> datetime:
    return datetime.strptime(s, ISO).replace(tzinfo=timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _parse_every(text: str) -> float:
    """The period of ``@every DURATION`` (the one duration syntax), whole seconds >= 1s."""
    total = durations.seconds(text) if text else None
    if total is None:
        raise ScheduleError(f"@every {text!r}: use a duration like 30s, 5m, 1h30m")
    if total < 1 or total != int(total):
        raise ScheduleError(f"@every {text!r}: the period must be a whole number of seconds >= 1s")
    return total


@dataclass(frozen=True)
class Spec:
    """A parsed schedule: ``server`` is what nats-server gets in ``Nats-Schedule``."""
    text: str
    tz: str = "UTC"
    cron6: str | None = None        # 6-field cron, seconds first
    every: float | None = None      # @every period in seconds

    @property
    def server(self) -> str:
        return self.cron6 if self.cron6 else f"@every {int(self.every)}s"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def _it(self, start: datetime) -> croniter:
        return croniter(self.cron6, start.astimezone(self.zone), second_at_beginning=True)

    def next_after(self, dt: datetime) -> datetime:
        """The first fire strictly after ``dt`` (for @every: on the grid anchored at ``dt``)."""
        if self.every:
            return dt + timedelta(seconds=self.every)
        return self._it(dt).get_next(datetime).astimezone(timezone.utc)

    def prev_before(self, dt: datetime) -> datetime:
        """The last fire strictly before ``dt`` (for @every: ``dt`` minus one period)."""
        if self.every:
            return dt - timedelta(seconds=self.every)
        return self._it(dt).get_prev(datetime).astimezone(timezone.utc)

    def floor(self, dt: datetime) -> datetime:
        """The last fire at or before ``dt`` (whole seconds)."""
        dt = dt.replace(microsecond=0)
        if self.every:
            return dt
        return self.prev_before(dt + timedelta(seconds=1))

    def between(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Fire times t with after < t <= until."""
        t = self.next_after(after)
        while t <= until:
            yield t
            t = self.next_after(t)

    def fire_of_tick(self, next_header: str | None, stamp: datetime | None) -> datetime:
        """The fire a server tick stands for: one period before its ``Nats-Schedule-Next``
        (deterministic for every engine and redelivery), else its timestamp on the grid."""
        if next_header:
            try:
                nxt = datetime.strptime(next_header.strip(), ISO).replace(tzinfo=timezone.utc)
                return self.prev_before(nxt)
            except ValueError:
                pass
        return self.floor(stamp or utcnow())


def parse_spec(cron: str, tz: str | None = None) -> Spec:
    """Validate and normalise a schedule. Raises ScheduleError with a clear sentence."""
    tz = tz or "UTC"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, IsADirectoryError):
        raise ScheduleError(f"unknown time zone {tz!r} (use an IANA name like Europe/London "
                            f"or UTC)") from None
    text = (cron or "").strip()
    low = text.lower()
    if low.startswith("@every"):
        return Spec(text, tz, every=_parse_every(text[6:].strip()))
    if low in _PREDEFINED:
        return Spec(text, tz, cron6=_PREDEFINED[low])
    if low.startswith("@"):
        raise ScheduleError(f"unknown schedule {text!r}: use a cron expression, "
                            f"{', '.join(sorted(set(_PREDEFINED)))} or @every DURATION")
    fields = text.split()
    if len(fields) == 5:
        cron6 = "0 " + " ".join(fields)
    elif len(fields) == 6:
        cron6 = " ".join(fields)
    else:
        raise ScheduleError(f"bad cron expression {text!r}: use 5 fields (minute hour day month "
                            f"weekday, e.g. \"0 6 * * *\") or 6 with seconds first")
    if not croniter.is_valid(cron6, second_at_beginning=True):
        raise ScheduleError(f"bad cron expression {text!r}: a field is out of range or "
                            f"malformed (e.g. \"0 6 * * *\" is 06:00 every day)")
    try:
        croniter(cron6, utcnow(), second_at_beginning=True).get_next(datetime)
    except Exception as e:  # noqa: BLE001 - e.g. 31 Feb never happens
        raise ScheduleError(f"bad cron expression {text!r}: {e}") from None
    return Spec(text, tz, cron6=cron6)


def check_name(name: str, what: str = "schedule") -> str:
    if not NAME_RE.match(name or ""):
        raise ScheduleError(f"{what} name {name!r} is invalid: use lowercase letters, digits, "
                            f"'-' or '_' (up to 48, starting with a letter or digit)")
    return name


def default_name(notebook: str) -> str:
    stem = os.path.splitext(os.path.basename(notebook))[0].lower()
    return (re.sub(r"[^a-z0-9_-]+", "-", stem).strip("-_") or "schedule")[:48]


def schedule_run_id(name: str, fire_iso: str) -> str:
    """Deterministic: one run per (schedule, fire time). 14 chars of [a-z0-9-]."""
    return "s-" + hashlib.sha256(f"{name}|{fire_iso}".encode()).hexdigest()[:12]


def trigger_run_id(name: str, seq: int) -> str:
    return "t-" + hashlib.sha256(f"{name}|{seq}".encode()).hexdigest()[:12]


