"""The one duration parser: ``30s``, ``10m``, ``2h``, ``1d``, ``1h30m``, ``250ms`` or plain seconds.

Used by ``%%task --timeout/--retry-delay/...`` (compiler) and ``@every`` schedules. Pure: callers
turn ``None`` (not a duration) into their own error with their own advice.
"""
from __future__ import annotations

import re
from typing import Any

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_NUMBER_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_DURATION_RE = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h|d|w))+")
_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d|w)")


def seconds(text: Any) -> float | None:
    """Seconds, or None when ``text`` is not a duration (negative numbers included)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text) if text >= 0 else None
    s = str(text).strip().lower().replace(" ", "")
    if _NUMBER_RE.fullmatch(s):
        return float(s)
    if s and _DURATION_RE.fullmatch(s):
        return float(sum(float(n) * UNITS[u] for n, u in _PART_RE.findall(s)))
    return None


def human(s: float) -> str:
    """600 -> '10m', 90 -> '1m30s', 3600 -> '1h', 2.5 -> '2.5s' (the inverse, for messages)."""
    if s < 60:
        return f"{s:g}s"
    s = int(round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v)
