"""Run lifecycle details found by trying nbflow as a user: CLI as a subprocess, real stack."""
from __future__ import annotations

import json

from nbhelpers import write_notebook
from support import finish, wait_for
from test_loop import nbflow, on_stack, run_id  # noqa: F401 - the fixture


def test_signal_nobody_waits_for_is_refused_naming_the_ones_awaited(on_stack, client, tmp_path):
    nb = write_notebook(tmp_path / "sig.ipynb", ["%%task wait --wait-signal bank\nr = bank"])
    run = client.submit(str(nb))
    r = nbflow("signal", run, "bnak", "1", env=on_stack)
    assert r.returncode == 2
    assert f"nothing in run {run} waits for signal 'bnak'; it waits for bank" in r.stderr
    assert nbflow("signal", run, "bank", "1", env=on_stack).returncode == 0
    assert finish(client, run).state == "succeeded"


def test_logs_show_every_attempt_newest_last_with_tracebacks(on_stack, tmp_path):
    nb = write_notebook(tmp_path / "flaky.ipynb", [
        "%%task flaky --retries 1\nimport os\n"
        f"first = not os.path.exists({str(tmp_path / 'seen')!r})\n"
        f"open({str(tmp_path / 'seen')!r}, 'w').close()\n"
        "print('attempt', 'one' if first else 'two')\n"
        "raise ValueError('first try' if first else 'second try')"])
    r = nbflow("run", str(nb), env=on_stack)
    assert r.returncode == 1
    logs = nbflow("logs", run_id(r.stderr + r.stdout), "flaky", env=on_stack).stdout
    one, two = logs.index("attempt 1 of 2, failed"), logs.index("attempt 2 of 2, failed")
    assert one < logs.index("ValueError: first try") < two < logs.index("ValueError: second try")
    assert logs.count("Traceback") >= 2 or logs.count("----> ") >= 2, logs


def test_logs_of_a_task_waiting_to_retry_show_the_failed_attempt_and_the_one_to_come(
        on_stack, client, tmp_path):
    nb = write_notebook(tmp_path / "later.ipynb", [
        "%%task later --retries 1 --retry-delay 1h\nprint('trying')\nraise ValueError('not yet')"])
    run = client.submit(str(nb))
    wait_for(lambda: client.status(run).tasks.get("later") and
             client.status(run).tasks["later"].state == "retry_wait", what="the retry wait")
    logs = nbflow("logs", run, "later", env=on_stack).stdout
    one = logs.index("attempt 1 of 2, failed")
    assert one < logs.index("trying") < logs.index("ValueError: not yet") < \
        logs.index("attempt 2 of 2, waits to retry"), logs
    client.cancel(run)


def test_sys_exit_in_a_task_is_a_failure(on_stack, tmp_path):
    nb = write_notebook(tmp_path / "exit.ipynb", [
        "%%task quits\nimport sys\nsys.exit(0)\nx = 1", "%%task after\ny = x"])
    r = nbflow("run", str(nb), env=on_stack)
    assert r.returncode == 1, r.stdout
    assert "SystemExit" in r.stdout


def test_unknown_schedule_log_is_an_error(on_stack):
    r = nbflow("schedule", "log", "nosuchschedule", env=on_stack)
    assert r.returncode == 2 and "no schedule 'nosuchschedule'" in r.stderr


def test_runs_and_status_show_the_final_state_right_after_run_returns(on_stack, tmp_path):
    nb = write_notebook(tmp_path / "quick.ipynb", ["%%task q\nx = 1"])
    r = nbflow("run", str(nb), env=on_stack)
    assert r.returncode == 0
    run = run_id(r.stderr)
    rows = json.loads(nbflow("runs", "--json", env=on_stack).stdout)
    assert next(x for x in rows if x["id"] == run)["state"] == "succeeded"
    st = json.loads(nbflow("status", run, "--json", env=on_stack).stdout)
    assert st["state"] == "succeeded"
    hist = json.loads(nbflow("history", run, "--json", env=on_stack).stdout)
    assert hist[-1]["type"] == "RunFinished"
    assert nbflow("history", run, env=on_stack).stdout.rstrip().splitlines()[-1].split()[3] \
        == "RunFinished"


def test_a_run_ended_by_a_timer_lasts_its_real_time(on_stack, client, tmp_path):
    nb = write_notebook(tmp_path / "timeout.ipynb", [
        '%%task ok --approval "Go?" --approval-timeout 2s\nx = 1'])
    run = client.submit(str(nb))
    st = finish(client, run)
    assert st.state == "rejected"
    assert st.finished - st.started >= 2.0      # the timeout's own length, not ~0


def test_tracebacks_and_logs_name_the_users_cell_numbers(on_stack, tmp_path):
    nb = write_notebook(tmp_path / "cells.ipynb", [
        "#md # A report", "import math", "%%task fine\nx = 1", "#md boom below",
        "%%task boom\ny = x + 1\nraise ValueError('bad ' + str(y))"], params="n = 1")
    r = nbflow("run", str(nb), env=on_stack)
    assert r.returncode == 1
    assert "cell 6 (task boom), line 3" in r.stdout and "Cell In[" not in r.stdout, r.stdout
    # the listing under it numbers the lines as Jupyter shows the cell (the %%task line is 1)
    assert "      2 y = x + 1\n----> 3 raise ValueError" in r.stdout, r.stdout
    logs = nbflow("logs", run_id(r.stderr + r.stdout), "boom", env=on_stack).stdout
    assert "--- cell 6 [failed]: y = x + 1" in logs and "Cell In[" not in logs, logs
    assert "cell 6 (task boom), line 3\n      2 y = x + 1\n----> 3 raise" in logs, logs


def test_tracebacks_count_blank_lines_above_the_task_line(on_stack, tmp_path):
    nb = write_notebook(tmp_path / "blank.ipynb", [
        "%%task fine\nx = 1",
        "\n\n%%task boom\ny = x + 1\nraise ValueError('bad ' + str(y))"])
    r = nbflow("run", str(nb), env=on_stack)
    assert r.returncode == 1
    # Jupyter shows the raise on line 5 of cell 2 (two blank lines, %%task, y = ..., raise)
    assert "cell 2 (task boom), line 5" in r.stdout, r.stdout
    assert "      4 y = x + 1\n----> 5 raise ValueError" in r.stdout, r.stdout
    logs = nbflow("logs", run_id(r.stderr + r.stdout), "boom", env=on_stack).stdout
    assert "cell 2 (task boom), line 5\n      4 y = x + 1\n----> 5 raise" in logs, logs


def test_a_rejection_ends_the_run_and_closes_an_approval_only_the_rejected_branch_needed(
        on_stack, client, tmp_path):
    nb = write_notebook(tmp_path / "two.ipynb", [
        '%%task pay --approval "Pay?"\npaid = 1',
        '%%task ship --approval "Ship?"\nshipped = 1',
        f"%%task settle_up\nopen({str(tmp_path / 'settled')!r}, 'w').write(str((paid, shipped)))"])
    run = client.submit(str(nb))
    wait_for(lambda: all(client.status(run).nodes[n].state == "awaiting_approval"
                         for n in ("pay", "ship")), what="both approvals asked")

    def record(node):
        async def get():
            kv = await client.aclient.kv(client.aclient.L.approvals_bucket)
            entry = await kv.get_or_none(f"{run}.{node}")
            return json.loads(entry.value) if entry else {}
        return client._call(get())
    wait_for(lambda: record("ship").get("state") == "pending", what="ship's approval recorded")
    r = nbflow("approve", run, "pay", "--reject", env=on_stack)
    assert r.returncode == 0, r.stderr
    st = finish(client, run, timeout=60)
    assert st.state == "rejected"
    assert st.nodes["ship"].state == "skipped" and st.nodes["settle_up"].state == "skipped"
    assert not (tmp_path / "settled").exists()
    # ship's approval is no longer pending: its record is closed, deciding it now is refused
    wait_for(lambda: record("ship")["state"] == "cancelled", what="ship's approval closed")
    assert "token" not in record("ship")
    r = nbflow("approve", run, "ship", env=on_stack)
    assert r.returncode != 0
    assert "already cancelled (not needed: upstream rejected)" in r.stderr, r.stderr
    # the console's run page and the RunView say why, not "by ?"
    from nbflow.console import views
    from nbflow.widgets.model import approvals, decision_text
    wf = client.workflow(st.wf)
    page = views.run_page(views.Ctx("/", "ann", True, ""), st, wf, "")
    assert "not needed: upstream rejected" in page and "by <strong class=\"decider\">?" not in page
    texts = {a["node"]: decision_text(a) for a in approvals(st, wf)}
    assert texts["ship"].startswith("cancelled: not needed: upstream rejected"), texts
    assert texts["pay"].startswith("rejected by "), texts
