"""Run All in a real ipykernel (nbclient): the %flow commands and gated cells of a valid
pipeline never raise and never act before they should."""
from __future__ import annotations

from nbhelpers import write_notebook
from runall import outputs, run_all, text, widget_views
from support import finish


def test_flow_runs_displays_and_opens_a_run(client, nats_server, tmp_path):
    src = write_notebook(tmp_path / "one.ipynb", ["%%task hello\nx = 1"])
    run = client.submit(str(src))
    finish(client, run)
    nb = write_notebook(tmp_path / "runs.ipynb", [
        "%load_ext nbflow",
        "%flow runs",
        "from nbflow.widgets.runs import RunsList\n"
        "rl = RunsList()\n"
        f"view = rl.open_run({run!r})\n"
        "print('rows', len(rl.rows), 'opened', view.run)",
    ])
    out = run_all(nb, nats_server.url)
    assert not outputs(out, "error"), text(out)
    assert widget_views(out) >= 1
    assert f"opened {run}" in text(out)
