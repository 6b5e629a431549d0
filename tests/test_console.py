"""The runs console over HTTP (no browser): two Jupyter users, one an approver, one not; the
standalone `nbflow ui` and its token; metrics and `nbflow stats`. Real nats-server, engine,
workers, Jupyter server and CLI as subprocesses."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from consolehelpers import Session, running_ui, stack_env, start_jupyter, stop
from support import DATA, REPO

pytest.importorskip("jupyter_server")


def _wait_node(client, run, node, state, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.status(run)
        if st.nodes.get(node) and st.nodes[node].state == state:
            return st
        time.sleep(0.2)
    st = client.status(run)
    raise AssertionError(f"{node} of {run} never reached {state}: run {st.state}, nodes "
                         f"{ {k: v.state for k, v in st.nodes.items()} }, tasks "
                         f"{ {k: (t.state, t.attempt, t.error) for k, t in st.tasks.items()} }")


def _cards(html: str) -> list[str]:
    return re.findall(r'<article class="card pending" data-run="([^"]+)"', html)


@pytest.fixture
def two_users(tmp_path, nats_server, stack):
    from nbflow.stack import free_port

    port = free_port()
    proc = start_jupyter(tmp_path, nats_server.url, port,
                         args=["--ServerApp.identity_provider_class=console_users.TwoUsers"],
                         NBFLOW_APPROVERS="alice")
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def test_two_jupyter_users_only_the_approver_decides(two_users, client):
    run = client.submit(str(REPO / "notebooks" / "approvals.ipynb"))
    _wait_node(client, run, "publish", "awaiting_approval")
    alice, bob = Session(two_users, "alice-token"), Session(two_users, "bob-token")
    anon = Session(two_users)

    code, _, headers = anon.get("/nbflow/inbox")            # Jupyter's own login guards it
    assert code in (302, 403) and "/nbflow/inbox" not in headers.get("Location", "x")[:1]

    code, page, _ = bob.get("/nbflow/inbox")
    assert code == 200 and "Signed in as <strong class=\"user\">bob</strong>" in page
    assert run in _cards(page)
    assert "may view this approval but not decide it" in page and 'value="approve"' not in page
    code, _, _ = bob.post(f"/nbflow/runs/{run}/approve", task="publish", decision="approve")
    assert code == 403
    assert client.status(run).nodes["publish"].state == "awaiting_approval"

    code, page, _ = alice.get("/nbflow/inbox")
    assert code == 200 and run in _cards(page) and 'value="approve"' in page
    code, _, headers = alice.post(f"/nbflow/runs/{run}/approve", task="publish",
                                  decision="approve", comment="numbers checked")
    assert code == 303 and "flash=Approved" in headers["Location"]
    st = client.wait(run, timeout=120)
    assert st.state == "succeeded"
    decided = [e for e in client.history(run) if e.type == "ApprovalDecided"]
    assert [(e["by"], e["approved"], e.get("comment")) for e in decided] == \
        [("alice", True, "numbers checked")]

    # a second decision is refused with who decided first; the inbox shows it decided
    code, _, headers = alice.post(f"/nbflow/runs/{run}/approve", task="publish",
                                  decision="reject")
    assert code == 303 and "already+approved+by+alice" in headers["Location"]
    code, page, _ = bob.get("/nbflow/inbox")
    assert run not in _cards(page)
    assert re.search(rf'class="card decided" data-run="{run}".*?by <strong>alice</strong>', page,
                     re.S)


@pytest.fixture
def ui(tmp_path, nats_server, stack):
    with running_ui(tmp_path, nats_server.url, "t0ken", "ui-user") as url:
        yield url


def test_standalone_ui_pages_token_metrics_and_stats(ui, client, nats_server, tmp_path):
    run = client.submit(str(DATA / "chain.ipynb"))
    # a task that fails once, then succeeds on its retry: the console shows both attempts' logs
    from nbhelpers import write_notebook
    tries = tmp_path / "tries.log"
    flaky = client.submit(str(write_notebook(tmp_path / "flaky.ipynb", [
        f"%%task flaky --retries 1\nopen({str(tries)!r}, 'a').write('x')\n"
        f"n = len(open({str(tries)!r}).read())\nprint('try', n)\n"
        "assert n > 1, 'first try fails'"])))
    assert client.wait(run, timeout=120).state == "succeeded"
    assert client.wait(flaky, timeout=120).state == "succeeded"

    code, _, headers = Session(ui).get("/nbflow/runs")          # no token: sent to sign in
    assert code == 302 and headers["Location"].startswith("/nbflow/login")
    s = Session(ui, "t0ken")
    code, page, _ = s.get("/nbflow/runs")
    assert code == 200 and f'data-run="{run}" data-state="succeeded"' in page
    s.token = None                                                # the cookie signs us in now
    code, page, _ = s.get(f"/nbflow/runs/{run}")
    assert code == 200 and "<svg" in page and 'class="state s-succeeded"' in page
    key = client.status(run).tasks
    first = sorted(key)[0]
    code, nb, headers = s.get(f"/nbflow/runs/{run}/tasks/{first}/notebook")
    assert code == 200 and "sandbox" in headers["Content-Security-Policy"] and "jp-Notebook" in nb
    code, raw, _ = s.get(f"/nbflow/runs/{run}/tasks/{first}/notebook.ipynb")
    assert code == 200 and json.loads(raw)["nbformat"] == 4
    code, page, _ = s.get(f"/nbflow/runs/{flaky}")
    assert code == 200 and "logs (every attempt)" in page
    code, logs, _ = s.get(f"/nbflow/runs/{flaky}/tasks/flaky/logs")
    assert code == 200 and tries.read_text() == "xx"
    one, two = logs.index("attempt 1 of 2, failed"), logs.index("attempt 2 of 2, succeeded")
    assert one < logs.index("try 1") < logs.index("first try fails") < two < logs.index("try 2")
    for page_name in ("inbox", "schedules", "workers"):
        assert s.get(f"/nbflow/{page_name}")[0] == 200

    from prometheus_client.parser import text_string_to_metric_families

    code, text, _ = s.get("/nbflow/metrics")
    assert code == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    runs = {(x.labels["state"], x.labels["notebook"]): x.value for x in fams["nbflow_runs"].samples}
    assert runs[("succeeded", "chain")] >= 1
    assert any(x.name.endswith("_count") for x in fams["nbflow_task_duration_seconds"].samples)
    assert "nbflow_pending_approvals" in fams and "nbflow_worker_kernels" in fams

    out = subprocess.run([sys.executable, "-m", "nbflow", "stats", "--json", "--window", "1h"],
                         env=stack_env(nats_server.url), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["notebooks"]["chain"]["succeeded"] >= 1 and st["notebooks"]["chain"]["p50_s"] > 0
    assert {t["task"] for t in st["tasks"] if t["notebook"] == "chain"} >= \
        {t.node for t in client.status(run).tasks.values()}
    out = subprocess.run([sys.executable, "-m", "nbflow", "stats", "--window", "1h"],
                         env=stack_env(nats_server.url), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and re.search(r"^chain\s+\d+\s+\d+%", out.stdout, re.M), out.stdout
    out = subprocess.run([sys.executable, "-m", "nbflow", "stats", "--window", "soon"],
                         env=stack_env(nats_server.url), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "is not a duration" in out.stderr
