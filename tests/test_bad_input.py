"""Bad input, over every entry point (CLI, client, magics, BPMN import, messages published by
hand on nbflow subjects): each gets a specific error, the engine keeps running (a normal run
still completes afterwards), and nothing already recorded changes (history and snapshot of an
existing run are identical before and after)."""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from IPython.core.error import UsageError

from support import DATA, check_replay, finish, wait_for, ipython_shell
from nbhelpers import write_notebook

from nbflow.cli.main import main as cli
from nbflow.core.events import TASK_VERSIONS
from nbflow.errors import AlreadyDecided, NbflowError, WorkflowError

NS = "itest"



def record(client, run):
    """What must not change: the decoded history and the snapshot."""
    return [e.to_dict() for e in client.history(run)], client.status(run).to_dict()


@pytest.fixture(scope="module")
def done_run(client, tmp_path_factory):
    """A finished run whose record every test checks is left alone."""
    d = tmp_path_factory.mktemp("badinput")
    nb = write_notebook(d / "ok.ipynb", ["%%task a\nx = 1", "%%task b\ny = x + 1",
                                         "%%task c\nprint(y)"])
    run = client.submit(str(nb), {})
    assert finish(client, run).state == "succeeded"
    before = record(client, run)
    yield run, nb
    assert record(client, run) == before, f"the record of run {run} changed"


@pytest.fixture(scope="module")
def waiting_run(client, tmp_path_factory):
    """A run parked on an approval."""
    d = tmp_path_factory.mktemp("badinput-wait")
    nb = write_notebook(d / "wait.ipynb", ["%%task a\nx = 1",
                                           '%%task gate --approval "Go?"\ny = x',
                                           "%%task after --wait-signal go\nprint(y, go)"])
    run = client.submit(str(nb), {})
    wait_for(lambda: client.status(run).nodes["gate"].state == "awaiting_approval", 90,
             "the gate to await approval")
    return run


def a_normal_run_still_completes(client, nb):
    run = client.submit(str(nb), {})
    assert finish(client, run).state == "succeeded"


# --- bad files: CLI compile / run, client.submit, BPMN import ----------------------------------

def _bad_files(d: Path) -> list[tuple[str, Path, str]]:
    (d / "notjson.ipynb").write_text("{not json")
    (d / "notutf8.ipynb").write_bytes(b'{"cells": "\xff\xfe\xfd"}')
    (d / "notnb.ipynb").write_text('{"just": "json"}')
    (d / "bad.bpmn").write_text("<definitions><oops>")
    (d / "empty.bpmn").write_text("")
    (d / "notes.txt").write_text("hello")
    return [
        ("malformed notebook (not JSON)", d / "notjson.ipynb", "is not a notebook: not JSON"),
        ("non-UTF-8 file", d / "notutf8.ipynb", "not UTF-8"),
        ("JSON that is not a notebook", d / "notnb.ipynb", "not a notebook"),
        ("cycle", DATA / "bad_cycle.ipynb", "the tasks form a cycle: a (cell 1) -> b"),
        ("syntax error in a task", DATA / "bad_syntax.ipynb", "syntax error at line 2"),
        ("no %%task cells", DATA / "empty.ipynb", "no %%task cells found"),
        ("missing file", d / "missing.ipynb", "not found"),
        ("malformed BPMN", d / "bad.bpmn", "is not well-formed XML"),
        ("empty BPMN", d / "empty.bpmn", "Document is empty"),
        ("unknown file type", d / "notes.txt", "expected a .ipynb notebook"),
    ]


BAD_FILE_IDS = ["notjson", "notutf8", "notnb", "cycle", "syntax", "notasks", "missing",
                "bpmn-malformed", "bpmn-empty", "txt"]


@pytest.mark.parametrize("i", range(len(BAD_FILE_IDS)), ids=BAD_FILE_IDS)
def test_bad_files_are_refused_everywhere_with_the_reason(i, client, nats_server, tmp_path,
                                                          done_run):
    what, path, msg = _bad_files(tmp_path)[i]
    n_runs = len(client.runs(limit=10_000))
    # client
    with pytest.raises(WorkflowError) as e:
        client.submit(str(path), {})
    assert msg in str(e.value), what
    # CLI: compile and run, one red line, exit code 2, no traceback
    for args in (["compile", str(path)],
                 ["run", str(path), "--no-wait", "--nats", nats_server.url, "--namespace", NS]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2, (what, args, r.output)
        assert msg in r.output and "Traceback" not in r.output, (what, r.output)
    assert len(client.runs(limit=10_000)) == n_runs        # nothing was submitted


def test_enormous_cell_is_refused_with_its_size(client, tmp_path, done_run):
    """A task cell bigger than a NATS message: the definition cannot be stored."""
    big = "x = 1\n" + "# " + "y" * (9 * 1024 * 1024) + "\n"
    nb = write_notebook(tmp_path / "huge.ipynb", ["%%task small\na = 1", "%%task huge\n" + big])
    n_runs = len(client.runs(limit=10_000))
    with pytest.raises(NbflowError, match=r"(?i)too large|payload|MB"):
        client.submit(str(nb), {})
    assert len(client.runs(limit=10_000)) == n_runs
    a_normal_run_still_completes(client, done_run[1])


# --- magics in a live shell ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ip():
    shell = ipython_shell()
    shell.run_cell("%load_ext nbflow")
    return shell


@pytest.mark.parametrize("cell,text", [
    ("%%task bad name\nx = 1", "unrecognized arguments: name"),
    ("%%task x --map nothing\ny = 1", "--map"),
    ("%%task x --timeout soon\ny = 1", "bad duration 'soon'"),
    ("%%task x --retries -1\ny = 1", "retries"),
])
def test_magics_refuse_bad_task_lines(ip, cell, text, capsys):
    res = ip.run_cell(cell)
    assert isinstance(res.error_in_exec, UsageError), res.error_in_exec
    assert text in str(res.error_in_exec)
    assert "Traceback" not in capsys.readouterr().err


def test_flow_run_of_unknown_command_is_a_usage_error(ip, capsys):
    res = ip.run_cell("%flow approve")
    assert res.error_in_exec is not None
    assert "Traceback" not in capsys.readouterr().err


# --- steering calls with bad ids / wrong states: client and CLI -------------------------------

def test_unknown_run_ids_everywhere(client, nats_server, done_run):
    ghost = "zz" + secrets.token_hex(3)
    calls = {
        "status": lambda: client.status(ghost), "history": lambda: client.history(ghost),
        "approve": lambda: client.approve(ghost, "a", True), "cancel": lambda: client.cancel(ghost),
        "signal": lambda: client.signal(ghost, "go", 1), "retry": lambda: client.retry(ghost),
        "logs": lambda: client.logs(ghost), "load_output": lambda: client.load_output(ghost, "a", "x"),
    }
    for name, call in calls.items():
        with pytest.raises(NbflowError, match=f"no run '{ghost}'"):
            call()
    for args in (["status", ghost], ["history", ghost], ["approve", ghost, "a"],
                 ["cancel", ghost], ["signal", ghost, "go", "1"], ["logs", ghost],
                 ["retry", ghost, "--no-wait"], ["output", ghost, "a", "-o", "/dev/null"]):
        r = CliRunner().invoke(cli, args + ["--nats", nats_server.url, "--namespace", NS])
        assert r.exit_code == 2 and f"no run '{ghost}'" in r.output, (args, r.output)
        assert "Traceback" not in r.output


def test_unknown_task_ids(client, done_run):
    run, _ = done_run
    with pytest.raises(NbflowError, match="has no task 'nope'"):
        client.approve(run, "nope", True)
    with pytest.raises(NbflowError, match="has no executed task 'nope'"):
        client.logs(run, "nope")
    with pytest.raises(NbflowError, match="has no output 'nope'"):
        client.load_output(run, "a", "nope")


def test_approval_of_a_task_not_awaiting_approval(client, done_run, waiting_run):
    with pytest.raises(NbflowError, match="'a' of run .* is not awaiting approval"):
        client.approve(done_run[0], "a", True, by="ann")
    before = record(client, waiting_run)
    with pytest.raises(NbflowError, match="not awaiting approval"):
        client.approve(waiting_run, "after", True, by="ann")     # waits for a signal, later
    assert record(client, waiting_run) == before


def test_signal_or_cancel_to_a_finished_run(client, nats_server, done_run):
    run, _ = done_run
    with pytest.raises(NbflowError, match=f"run {run} is already succeeded; a signal only"):
        client.signal(run, "go", 1)
    with pytest.raises(NbflowError, match="already succeeded; cancel only"):
        client.cancel(run)
    r = CliRunner().invoke(cli, ["signal", run, "go", "1", "--nats", nats_server.url,
                                 "--namespace", NS])
    assert r.exit_code == 2 and "already succeeded" in r.output


def test_duplicate_approval_names_the_first_decider(client, waiting_run):
    client.approve(waiting_run, "gate", True, by="first-fay", comment="ok")
    with pytest.raises(AlreadyDecided, match="already approved by first-fay") as e:
        client.approve(waiting_run, "gate", False, by="second-sam")
    assert e.value.decision["by"] == "first-fay"
    wait_for(lambda: client.status(waiting_run).nodes["after"].state == "waiting_signal", 90,
             "the signal wait")
    decided = [ev for ev in client.history(waiting_run) if ev.type == "ApprovalDecided"]
    assert len(decided) == 1 and decided[0]["by"] == "first-fay"
    client.signal(waiting_run, "go", "yes")
    assert finish(client, waiting_run).state == "succeeded"


def test_unknown_or_unserialisable_parameters(client, done_run):
    with pytest.raises(NbflowError, match="unknown parameter 'nope'"):
        client.submit(str(done_run[1]), {"nope": 1})


# --- task outputs -------------------------------------------------------------------------------

def test_unpicklable_output_fails_the_task_naming_variable_and_task(client, tmp_path):
    nb = write_notebook(tmp_path / "unpick.ipynb", [
        "%%task make\nimport threading\nlock = threading.Lock()",
        "%%task use\nprint(lock)",
    ])
    st = finish(client, client.submit(str(nb), {}))
    assert st.state == "failed" and st.tasks["make"].reason == "unpicklable"
    assert "'lock'" in st.error["error"] and "'make'" in st.error["error"]
    assert st.tasks["make"].attempt == 1                  # not retried: it would fail again


@pytest.fixture
def limited_stack(nats_server, tmp_path):
    """A worker started with an output size limit of 1 MB (its own namespace)."""
    from nbflow.client import SyncClient
    from nbflow.stack import Supervisor

    sup = Supervisor(nats_server.url, workers=1, namespace="limit",
                     env={"NBFLOW_MAX_OUTPUT_MB": "1"}, log_file=tmp_path / "stack.log").start()
    c = SyncClient(nats_server.url, namespace="limit")
    yield c
    c.close()
    sup.stop()


def test_output_over_the_size_limit_fails_with_its_size(limited_stack, tmp_path):
    c = limited_stack
    nb = write_notebook(tmp_path / "big.ipynb", [
        "%%task produce\nblob = b'x' * (3 * 1024 * 1024)",
        "%%task consume\nprint(len(blob))",
    ])
    st = c.wait(c.submit(str(nb), {}), timeout=120)
    assert st.state == "failed"
    assert st.tasks["produce"].attempt == 1
    assert "NBFLOW_MAX_OUTPUT_MB" in st.error["error"] and "'blob'" in st.error["error"]


# --- messages published by hand on nbflow subjects ----------------------------------------------

def _publish_raw(client, subject: str, data: bytes) -> int:
    async def go():
        return (await client.aclient.js.publish(subject, data)).seq
    return client._call(go())


def _dead_letters(client, marker: str) -> list[dict]:
    async def go():
        js, L = client.aclient.js, client.aclient.L
        try:
            info = await js.stream_info(L.deadletter_stream)
        except Exception:  # noqa: BLE001 - nothing dead-lettered yet
            return []
        out = []
        for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
            try:
                m = await js.get_msg(L.deadletter_stream, seq)
            except Exception:  # noqa: BLE001
                continue
            d = json.loads(m.data)
            if marker in d.get("data", ""):
                out.append(d)
        return out
    return client._call(go())


HISTORY_GARBAGE = [
    ("malformed JSON", '{"v": 1, "type": "TaskSucceeded", "MARK', "not JSON"),
    ("JSON that is not an object", '["MARK"]', "an event must be a JSON object"),
    ("wrong schema version", '{"v": 99, "type": "TaskStarted", "run": "RUN", "m": "MARK"}',
     "unsupported event schema version 99"),
    ("unknown event type", '{"v": 1, "type": "Bogus", "run": "RUN", "m": "MARK"}',
     "unknown event type 'Bogus'"),
    ("wrong-typed field", '{"v": 1, "type": "TaskSucceeded", "run": "RUN", "key": "a", '
     '"attempt": "1", "m": "MARK"}', "field 'attempt' must be int, got str"),
    ("missing field", '{"v": 1, "type": "TaskFailed", "run": "RUN", "key": "a", "attempt": 1, '
     '"m": "MARK"}', "missing field 'error'"),
    ("bool for a number", '{"v": 1, "type": "TaskStarted", "run": "RUN", "key": "a", '
     '"attempt": true, "m": "MARK"}', "must be a number, not a bool"),
    ("wrong-typed ts", '{"v": 1, "type": "TaskStarted", "run": "RUN", "key": "a", '
     '"attempt": 1, "ts": "now", "m": "MARK"}', "field 'ts' must be a number"),
]


def test_garbage_on_a_runs_history_subject_is_dead_lettered(client, done_run):
    """Every row is published on the history subject of a finished run; each is dead-lettered
    with its reason, and the run's decoded history and snapshot stay as they were. (One
    before/after comparison for all rows: reading a history whose last message is garbage
    currently waits 10 s, see the report.)"""
    run, nb = done_run
    before = record(client, run)
    subj = client.aclient.L.history_subject(run, "TaskStarted")   # a subject workers may use
    for what, body, why in HISTORY_GARBAGE:
        marker = "m" + secrets.token_hex(6)
        _publish_raw(client, subj, body.replace("MARK", marker).replace("RUN", run).encode())
        dl = wait_for(lambda: _dead_letters(client, marker), 60, f"the dead letter for {what}")
        assert len(dl) == 1 and dl[0]["where"] == subj and why in dl[0]["why"], (what, dl)
    assert record(client, run) == before          # history (decoded) and snapshot as they were
    check_replay(client, run)
    a_normal_run_still_completes(client, nb)


def _event_for_unknown_run(client) -> tuple[str, str]:
    ghost = "zz" + secrets.token_hex(4)
    marker = "m" + secrets.token_hex(6)
    body = {"v": 1, "type": "TaskSucceeded", "run": ghost, "key": "a", "attempt": 1,
            "ts": time.time(), "worker": marker}
    _publish_raw(client, client.aclient.L.history_subject(ghost, "TaskSucceeded"),
                 json.dumps(body).encode())
    return ghost, marker


def test_events_for_an_unknown_run_are_dead_lettered(client, done_run):
    ghost, marker = _event_for_unknown_run(client)
    dl = wait_for(lambda: _dead_letters(client, marker), 60, "the dead letter")
    assert "before RunStarted" in dl[0]["why"]
    assert ghost not in [s.run for s in client.runs(limit=10_000)]
    a_normal_run_still_completes(client, done_run[1])


def test_a_run_id_with_only_garbage_history_is_no_run(client, done_run):
    ghost, marker = _event_for_unknown_run(client)
    wait_for(lambda: _dead_letters(client, marker), 60, "the dead letter")
    with pytest.raises(NbflowError, match=f"no run '{ghost}'"):
        client.status(ghost)


TASK_GARBAGE = [
    ("malformed JSON", b'{"run": "MARK'),
    ("missing fields", b'{"v": 1, "run": "MARK"}'),
    ("wrong types", b'{"v": 1, "run": "MARK", "key": "a", "node": "a", "attempt": "one"}'),
    ("a list", b'["MARK"]'),
    ("another version", b'{"v": NEXT, "run": "MARK", "key": "a", "node": "a", "attempt": 1, '
                        b'"wf": "w"}'.replace(b"NEXT", str(max(TASK_VERSIONS) + 1).encode())),
]


@pytest.mark.parametrize("what,body", TASK_GARBAGE, ids=[t[0] for t in TASK_GARBAGE])
def test_garbage_on_the_tasks_subject_is_dead_lettered(what, body, client, done_run):
    marker = "m" + secrets.token_hex(6)
    subj = client.aclient.L.task_subject("default")
    _publish_raw(client, subj, body.replace(b"MARK", marker.encode()))
    dl = wait_for(lambda: _dead_letters(client, marker), 60, f"the dead letter for {what}")
    assert dl[0]["where"] == subj and "malformed task message" in dl[0]["why"], dl


def test_the_engine_still_serves_after_all_that(client, done_run):
    a_normal_run_still_completes(client, done_run[1])
