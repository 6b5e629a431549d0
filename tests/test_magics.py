"""The magics in a live IPython shell: %%task runs and registers, %flow dispatches."""
from __future__ import annotations

import re
import os

import pytest
from IPython.core.error import UsageError

from support import ipython_shell

from nbflow.magics import core as magics
from nbflow.magics.core import FLOW_COMMANDS, flow_command, registered_tasks

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def ip():
    shell = ipython_shell()
    shell.run_cell("%load_ext nbflow")
    return shell


def test_task_runs_in_user_namespace_and_registers(ip):
    res = ip.run_cell("%%task extract --retries 2 --timeout 1m\nsales_m = [1, 2, 3]\n")
    assert res.success
    assert ip.user_ns["sales_m"] == [1, 2, 3]
    spec = registered_tasks(ip)["extract"]
    assert (spec.retries, spec.timeout, spec.defines) == (2, 60.0, {"sales_m"})


def test_no_run_only_registers(ip):
    res = ip.run_cell("%%task later --no-run\nnever_set = 1\n")
    assert res.success and "never_set" not in ip.user_ns
    assert registered_tasks(ip)["later"].no_run


def test_map_runs_per_element_and_leaves_lists(ip):
    ip.user_ns["regions_m"] = ["north", "south"]
    res = ip.run_cell("%%task by_region --map region in regions_m\nlabel = region.upper()\n")
    assert res.success and ip.user_ns["label"] == ["NORTH", "SOUTH"]


def test_false_when_skips(ip, capsys):
    res = ip.run_cell('%%task cond --when "1 > 2"\nskipped_var = 1\n')
    assert res.success and "skipped_var" not in ip.user_ns
    assert "is false" in capsys.readouterr().out


@pytest.mark.parametrize("line, text", [
    ("%%task x --retries many", "invalid int value: 'many'"),
    ("%%task x --bogus", "unrecognized arguments: --bogus"),
    ("%%task x --sleep forever", "bad duration 'forever'"),
    ("%%task", "needs a name"),
    ("%%task x -h", "bad options"),
])
def test_bad_options_are_one_line_usage_errors(ip, line, text, capsys):
    res = ip.run_cell(line + "\nbad_opt_ran = 1\n")
    assert isinstance(res.error_in_exec, UsageError)
    assert text in str(res.error_in_exec)
    assert "bad_opt_ran" not in ip.user_ns
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_flow_help_lists_commands_including_added_ones(ip, capsys):
    @flow_command("hello", "say hello")
    def _hello(shell, args):
        print("hello", args)

    try:
        ip.run_cell("%flow help")
        out = capsys.readouterr().out
        assert "show" in out and "help" in out and re.search(r"hello\s+say hello", out)
        ip.run_cell("%flow hello world")
        assert "hello world" in capsys.readouterr().out
        ip.run_cell("%flow")
        assert "%flow commands" in capsys.readouterr().out
    finally:
        FLOW_COMMANDS.pop("hello")
    res = ip.run_cell("%flow shwo")
    assert isinstance(res.error_in_exec, UsageError) and "did you mean 'show'" in str(res.error_in_exec)


def test_current_notebook_path(ip, monkeypatch):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    ip.user_ns.pop("__session__", None)
    res = ip.run_cell("%flow show")
    assert "can't tell which notebook this kernel runs" in str(res.error_in_exec)
    path = os.path.join(DATA, "diamond.ipynb")
    monkeypatch.setenv("JPY_SESSION_NAME", path)
    assert magics.current_notebook_path(ip) == path
    assert [t.id for t in magics.compile_current(ip).tasks] == ["a", "b", "c", "d"]
    monkeypatch.delenv("JPY_SESSION_NAME")
    ip.user_ns["__session__"] = path
    try:
        assert magics.current_notebook_path(ip) == path
    finally:
        ip.user_ns.pop("__session__")


def test_flow_show_displays_something(ip, capsys):
    res = ip.run_cell(f"%flow show {os.path.join(DATA, 'diamond.ipynb')}")
    assert res.success, res.error_in_exec
    res = ip.run_cell(f"%flow show {os.path.join(DATA, 'bad_cycle.ipynb')}")
    assert isinstance(res.error_in_exec, UsageError) and "cycle" in str(res.error_in_exec)


def test_approval_cell_runs_only_with_here(ip, capsys):
    res = ip.run_cell('%%task pay_m --approval "Pay?"\npaid_m = True\n')
    assert res.success and "paid_m" not in ip.user_ns
    assert "waits for approval in a run" in capsys.readouterr().out
    res = ip.run_cell('%%task pay_m --approval "Pay?" --here\npaid_m = True\n')
    assert res.success and ip.user_ns["paid_m"] is True


def test_example_must_be_json_and_needs_wait_signal(ip):
    res = ip.run_cell("%%task s_m --wait-signal sig_m --example '{bad'\nx_m = sig_m\n")
    assert isinstance(res.error_in_exec, UsageError) and "is not JSON" in str(res.error_in_exec)
    res = ip.run_cell("%%task s_m --example 1\nx_m = 1\n")
    assert isinstance(res.error_in_exec, UsageError) and "--wait-signal" in str(res.error_in_exec)


def test_load_ext_in_a_real_kernel_registers_every_flow_command(nats_server, monkeypatch):
    """`%load_ext nbflow` in a real ipykernel (nbclient): `%flow help` lists every subcommand of
    the one table, and `%flow schedules` runs (it was once never registered)."""
    import nbformat
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    monkeypatch.setenv("NBFLOW_NATS_URL", nats_server.url)
    monkeypatch.setenv("NBFLOW_NAMESPACE", "magics-kernel")
    nb = new_notebook(cells=[new_code_cell("%load_ext nbflow"), new_code_cell("%flow help"),
                             new_code_cell("%flow schedules")])
    NotebookClient(nb, kernel_name="python3", timeout=120).execute()

    def text(cell):
        return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                       + str(o.get("data", {}).get("text/html", "")) for o in cell.outputs)
    shown = text(nb.cells[1])
    listed = set(re.findall(r"^  (\S+)\s", shown, re.M))
    assert listed == set(FLOW_COMMANDS) >= {"help", "show", "run", "watch", "runs", "approve",
                                            "signal", "cancel", "schedule", "schedules"}, shown
    assert not any(o.output_type == "error" for c in nb.cells for o in c.outputs)
    assert "no schedules yet" in text(nb.cells[2]), nbformat.writes(nb)
