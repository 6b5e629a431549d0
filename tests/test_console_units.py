"""Pure parts of the console: metric tallies kept per change agree with a recount, stats
percentiles and windows, and pages escape what users wrote."""
from __future__ import annotations

import random
import time

import pytest

import sys

from nbflow.console import stats, views
from nbflow.core.state import RunState
from support import REPO

sys.path.insert(0, str(REPO))                   # bench/ is not an installed package
from bench.console_bench import _snapshot, _workflow  # noqa: E402 - synthetic history


def _runs(n, seed=3):
    wf = _workflow()
    rng, now = random.Random(seed), time.time()
    return wf, [RunState.from_dict(_snapshot(i, wf.content_hash(), now, rng)) for i in range(n)]


def test_tally_kept_per_change_equals_a_recount():
    _, runs = _runs(300)
    t = stats.Tally()
    for st in runs:
        t.update(st.run, st)
    for st in runs[:50]:                      # a run changes: the old contribution goes
        st2 = RunState.from_dict({**st.to_dict(), "state": "cancelled"})
        t.update(st.run, st2)
    for st in runs[50:80]:                    # and deleted runs leave nothing behind
        t.update(st.run, None)
    live = [RunState.from_dict({**s.to_dict(), "state": "cancelled"}) for s in runs[:50]] + runs[80:]
    want: dict = {}
    for st in live:
        want[(st.state, "console_bench")] = want.get((st.state, "console_bench"), 0) + 1
    assert t.states == want
    for task in ("prepare", "publish"):
        ds = [secs for st in live for node, secs, _ in stats.task_durations(st) if node == task]
        h = t.hist[("console_bench", task)]
        assert h[-1] == len(ds) and h[-2] == pytest.approx(sum(ds))
        for i, le in enumerate(stats.BUCKETS):
            assert sum(h[: i + 1]) == sum(1 for d in ds if d <= le)


def test_summary_rates_and_percentiles():
    _, runs = _runs(200)
    s = stats.summary(runs, None)
    nb = s["notebooks"]["console_bench"]
    finished = [r for r in runs if r.state != "running"]
    assert nb["finished"] == len(finished)
    assert nb["success_rate"] == round(sum(r.state == "succeeded" for r in runs) / len(finished), 4)
    d = sorted(r.finished - r.started for r in finished)
    assert d[0] <= nb["p50_s"] <= nb["p95_s"] <= d[-1]
    assert stats.percentile([1, 2, 3, 4], 50) == 2 and stats.percentile([5], 95) == 5
    assert stats.summary(runs, window=1)["runs"] == 0        # nothing started in the last second


def test_window_parsing_says_what_is_wrong():
    assert stats.parse_window("90m") == 5400 and stats.parse_window("all") is None
    with pytest.raises(ValueError, match="is not a duration"):
        stats.parse_window("tomorrow")


def test_pages_escape_user_text():
    wf, runs = _runs(3)
    st = runs[0]
    st.by = "<script>alert(1)</script>"
    st.nodes["publish"].approval = {"prompt": "<img src=x onerror=alert(1)>", "state": "pending"}
    st.nodes["publish"].state = "awaiting_approval"
    ctx = views.Ctx("/nbflow/", "<b>u</b>", True, "")
    html = views.inbox(ctx, [(st, "publish")], [], {st.wf: wf}) + \
        views.runs_table(ctx, runs, 3, {}, 0)
    assert "<script>" not in html and "<img" not in html and "&lt;script&gt;" in html


def test_install_enables_the_server_extension_and_ships_the_launcher_entry():
    """What `pip install` places (an editable install does not place data files, so this reads
    the declarations): the server extension enabled, the prebuilt JupyterLab extension."""
    import json
    import tomllib

    proj = tomllib.loads((REPO / "pyproject.toml").read_text())
    files = proj["tool"]["setuptools"]["data-files"]
    conf = files["etc/jupyter/jupyter_server_config.d"]
    assert len(conf) == 1
    enabled = json.loads((REPO / conf[0]).read_text())["ServerApp"]["jpserver_extensions"]
    assert enabled == {"nbflow.console": True}
    import nbflow.console as ext

    assert ext._jupyter_server_extension_points() == [{"module": "nbflow.console"}]
    lab = REPO / "nbflow" / "console" / "labextension"
    assert json.loads((lab / "package.json").read_text())["name"] == "nbflow-console"
    assert list((lab / "static").glob("remoteEntry.*.js"))
    assert "share/jupyter/labextensions/nbflow-console/static" in files
