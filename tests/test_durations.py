"""The one display format for durations (core.durations.elapsed), shown alike by every face."""
from __future__ import annotations

import pytest

from nbflow.core.durations import elapsed


@pytest.mark.parametrize("secs,shown", [
    (None, ""), (float("nan"), ""), (-2, "0ms"), (0, "0ms"), (0.34, "340ms"),
    (0.9996, "1.0s"),                  # rounds up into the next unit, never "1000ms"
    (3.24, "3.2s"), (59.96, "1m 00s"), (65, "1m 05s"), (7380, "2h 03m"), (90000, "1d 01h"),
    (3 * 86400 + 4 * 3600, "3d 04h")])
def test_elapsed(secs, shown):
    assert elapsed(secs) == shown


def test_every_face_shows_durations_the_same_way():
    from nbflow.cli.common import _dur
    from nbflow.console.views import dur

    for secs in (0.34, 3.24, 65, 7380, 90000):
        assert _dur(secs) == dur(secs) == elapsed(secs)
    assert _dur(None) == "" and "muted" in dur(None)     # the console marks unknown
