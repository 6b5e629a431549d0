"""Durations: the one parser and the one display format.

``seconds`` parses ``30s``, ``10m``, ``2h``, ``1d``, ``1h30m``, ``250ms`` or plain seconds; used by
``%%task --timeout/--retry-delay/...`` (compiler) and ``@every`` schedules. Pure: callers turn
``None`` (not a duration) into their own error with their own advice. ``human`` is its inverse
(text the parser reads back, for messages). ``elapsed`` is how every face shows how long
something took (the CLI's tables, the console's pages, the widgets).
"""
from __future__ import annotations

import math
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


def elapsed(seconds: float | None) -> str:
    """How long something took, for people: 340ms, 4.2s, 3m 05s, 2h 10m, 3d 04h; '' when
    unknown (None, NaN). Negative (clock skew) shows as 0."""
    if seconds is None:
        return ""
    s = float(seconds)
    if not math.isfinite(s):
        return ""
    s = max(0.0, s)
    if round(s * 1000) < 1000:
        return f"{s * 1000:.0f}ms"
    if round(s, 1) < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h:02d}h"
