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


def test_run_all_of_a_gated_pipeline_acts_on_nothing_gated(nats_server, tmp_path):
    paid = tmp_path / "paid.txt"
    nb = write_notebook(tmp_path / "payout.ipynb", [
        "%load_ext nbflow",
        "%%task extract\nregions = ['north', 'south']\namounts = {'north': 3, 'south': 4}",
        "%%task by_region --map region in regions\ntotal = amounts[region] * 10",
        f'%%task payout --approval "Pay the totals?"\nopen({str(paid)!r}, "w").write(str(total))'
        "\npaid_ids = [1, 2]",
        "%%task confirm\nconfirmed = len(paid_ids)",
        "%%task bank_in --wait-signal bank\nrate = bank['rate']",
        "%%task bank_demo --wait-signal fx --example '{\"rate\": 1.5}'\nfx_total = fx['rate'] * 2",
        "print('totals', total, 'fx_total', fx_total)",
    ])
    out = run_all(nb, nats_server.url)
    said = text(out)
    assert not outputs(out, "error"), said
    assert not paid.exists()                                   # nobody approved: nobody paid
    assert "task 'payout' waits for approval in a run" in said and "--here" in said
    assert "task 'confirm' reads `paid_ids`, which task 'payout' produces" in said
    assert "task 'bank_in' waits for signal 'bank' in a run" in said and "--example" in said
    assert "totals [30, 40] fx_total 3.0" in said


def test_flow_run_uses_the_cells_as_the_kernel_ran_them_and_says_so(nats_server, stack,
                                                                     tmp_path):
    import nbformat

    from runall import execute, start_kernel

    log = tmp_path / "ran.log"
    path = write_notebook(tmp_path / "edit.ipynb", [
        "%load_ext nbflow",
        "%%task extract\nrows = [1, 2, 3]",
        f"%%task report\nopen({str(log)!r}, 'a').write('saved version\\n')\ntotal = sum(rows)",
    ])
    nb = nbformat.read(str(path), as_version=4)
    ids = [c.id for c in nb.cells]
    km, kc = start_kernel(tmp_path, nats_server.url, notebook=path)
    try:
        for c in nb.cells:                                  # Run All, as JupyterLab sends it
            assert execute(kc, c.source, c.id)["ok"]
        assert log.read_text() == "saved version\n"
        log.unlink()
        # the analyst edits the report cell and re-runs it, but does not save
        edited = (f"%%task report\nopen({str(log)!r}, 'a').write('edited version\\n')\n"
                  "total = sum(rows) * 10")
        assert execute(kc, edited, ids[2])["ok"]
        log.unlink()
        r = execute(kc, "%flow run", "new-cell-id")
        assert r["ok"], r
        assert "using unsaved changes of cell 3" in r["stdout"], r
        r = execute(kc, "from nbflow.widgets import last_view\n"
                        "st = last_view().wait(timeout=120)\nprint(st.state)")
        assert r["stdout"].strip() == "succeeded", r
        assert log.read_text() == "edited version\n"        # the run ran what is on screen
        log.unlink()
        # --saved runs the file as saved
        execute(kc, "%flow run --saved", "another-cell")
        r = execute(kc, "print(last_view().wait(timeout=120).state)")
        assert r["stdout"].strip() == "succeeded", r
        assert log.read_text() == "saved version\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_run_all_of_every_flow_command(nats_server, stack, tmp_path):
    """Each %flow subcommand, in a notebook run top to bottom by nbclient in a real kernel: no
    error, and the gated payout never runs in the kernel."""
    from nbflow.magics.core import FLOW_COMMANDS

    paid = tmp_path / "paid.txt"
    cells = [
        "%load_ext nbflow",
        "%%task prepare\nvalue = len(xs)",
        "%%task each --map x in xs\nsq = x * x",
        f'%%task pay --approval "Pay?"\nopen({str(paid)!r}, "w").write("paid")\npaid = value',
        "%%task bank_in --wait-signal bank --example 2\nrate = bank * 10",
        "%flow help",
        "%flow show",
        "%flow run",
        "from nbflow.widgets import last_view\nfrom nbflow.widgets.runview import shared_client\n"
        "import time\nrun, c = last_view().run, shared_client()\n"
        "for _ in range(1200):\n    st = c.status(run)\n"
        "    if st.nodes['pay'].state == 'awaiting_approval' or st.is_final:\n        break\n"
        "    time.sleep(0.1)\nprint('pay is', st.nodes['pay'].state)",
        "%flow watch {run}",
        "%flow runs",
        "%flow signal {run} bank 3",
        "%flow approve {run} pay --reject --comment 'not today'",
        "print('first run', c.wait(run, timeout=120).state)",
        "%flow retry {run}",
        "retried = last_view().run",
        "%flow cancel {retried}",
        "print('retry', c.wait(retried, timeout=120).state)",
        '%flow schedule --cron "0 6 1 1 *" --name runall_every_command',
        "%flow schedules",
    ]
    nb = write_notebook(tmp_path / "every.ipynb", cells, params="xs = [1, 2, 3]")
    skip_code_cells(nb)
    used = {c.split()[1] for c in cells if c.startswith("%flow ")}
    assert used == set(FLOW_COMMANDS), set(FLOW_COMMANDS) - used   # a new command: add it here
    out = run_all(nb, nats_server.url, timeout=180)
    said = text(out)
    assert not outputs(out, "error"), said
    assert "pay is awaiting_approval" in said, said
    assert "first run rejected" in said and "retry cancelled" in said
    assert not paid.exists()


def skip_code_cells(path):
    """Tag the notebook's plain Python cells 'skip': they drive the test in the kernel and are
    not setup code of the pipeline (a setup cell runs in every task)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for c in nb.cells:
        if c.cell_type == "code" and not c.source.startswith("%") and \
                "parameters" not in c.metadata.get("tags", []):
            c.metadata["tags"] = ["skip"]
    nbformat.write(nb, str(path))
