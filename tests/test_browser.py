"""A person in JupyterLab: open approvals.ipynb, run all, click Approve in the RunView, see the
run succeed. Headless Chromium via Playwright (see /work/shared/BROWSER.md).

Needs: `apt-get install -y chromium` and `pip install jupyterlab playwright` (no
`playwright install`). Screenshot: NBFLOW_UPDATE_SCREENSHOT=1 also copies it to docs/runview.png.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest

from browserhelpers import launch, needs_browser, sync_playwright
from support import REPO, stop_process

pytestmark = pytest.mark.browser


def _clicking_copy(dest):
    """approvals.ipynb without the cells that approve and wait from code: a person clicks."""
    nb = nbformat.read(REPO / "notebooks" / "approvals.ipynb", as_version=4)
    nb.cells = [c for c in nb.cells
                if not {"auto-approve", "wait"} & set(c.get("metadata", {}).get("tags", []))]
    nbformat.write(nb, dest / "approvals.ipynb")


UNSAVED_LOG = "unsaved-edit.log"


def _edit_copy(dest, log):
    """A pipeline of one task that logs which version of its cell ran."""
    cells = ["%load_ext nbflow",
             f"%%task count\nopen({str(log)!r}, 'a').write('saved' + chr(10))",
             "%flow run"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, dest / "edit.ipynb")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, nats_server, stack):
    """One JupyterLab server for the module's tests (each opens its own notebook in it)."""
    from nbflow.stack import free_port

    tmp_path = tmp_path_factory.mktemp("lab")
    root, conf = tmp_path / "root", tmp_path / "jconf"
    root.mkdir()
    _clicking_copy(root)
    _edit_copy(root, tmp_path / UNSAVED_LOG)
    settings = conf / "lab" / "user-settings" / "@jupyterlab"
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "docmanager-extension").mkdir(parents=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (settings / "docmanager-extension" / "plugin.jupyterlab-settings").write_text(
        json.dumps({"autosave": False}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(conf),
           "JUPYTER_DATA_DIR": str(tmp_path / "jdata"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrun"), "IPYTHONDIR": str(tmp_path / "ipy"),
           # the kernel talks to the test suite's stack, as the person "browser-user"
           "NBFLOW_NATS_URL": nats_server.url, "NBFLOW_NAMESPACE": "itest",
           "NBFLOW_USER": "browser-user"}
    port, token = free_port(), secrets.token_hex(16)
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser",
         "--ip", "127.0.0.1", "--port", str(port), f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--expose-app-in-browser"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=1)
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                raise AssertionError("jupyter lab did not start:\n" +
                                     (tmp_path / "lab.log").read_text()[-3000:])
            time.sleep(0.2)
    yield {"base": base, "token": token, "root": root, "log": tmp_path / UNSAVED_LOG}
    stop_process(proc)
    log.close()


def _open(page, lab, name: str) -> None:
    """Open notebook ``name`` in a clean workspace and wait for its kernel to be idle."""
    page.goto(f"{lab['base']}/lab/tree/{name}?reset&token={lab['token']}")
    page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell", timeout=60_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]"
        ".some(e => e.textContent.includes('| Idle'))", timeout=60_000)


@needs_browser
def test_click_approve_in_jupyterlab(lab, tmp_path, client):
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        try:
            _open(page, lab, "approvals.ipynb")
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            view = page.locator(".nbflow-runview")
            approve = view.locator("button.jupyter-button", has_text="Approve")
            approve.wait_for(state="visible", timeout=120_000)
            assert "Publish the daily report?" in view.locator(".nbflow-approval").inner_text()
            approve.click()
            page.wait_for_selector(".nbflow-header[data-state='succeeded']", timeout=120_000)
            decision = view.locator(".nbflow-decision").inner_text()
            assert "approved by browser-user" in decision
            run = view.locator(".nbflow-header code").inner_text().strip()
            shot = tmp_path / "runview.png"
            view.screenshot(path=str(shot))
        finally:
            browser.close()
    # the click went through the engine: the history records exactly one decision, by us
    st = client.status(run)
    assert st.state == "succeeded"
    decided = [e for e in client.history(run) if e.type == "ApprovalDecided"]
    assert [(e["by"], e["approved"]) for e in decided] == [("browser-user", True)]
    assert shot.stat().st_size > 10_000
    if os.environ.get("NBFLOW_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "runview.png")


@needs_browser
def test_flow_run_uses_the_unsaved_edit_on_screen(lab, client):
    """Edit a %%task cell without saving, run it, then `%flow run`: the run executes the cell as
    on screen (counted by the file it appends to) and says it used the unsaved change."""
    log = lab["log"]
    saved = (lab["root"] / "edit.ipynb").read_text()
    edited = f"%%task count\nopen({str(log)!r}, 'a').write('edited' + chr(10))"
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        try:
            _open(page, lab, "edit.ipynb")
            cells = page.locator(".jp-NotebookPanel .jp-CodeCell")
            cells.nth(0).locator(".cm-content").click()
            page.keyboard.press("Shift+Enter")              # %load_ext nbflow
            page.wait_for_function(
                "() => document.querySelectorAll('.jp-NotebookPanel .jp-InputPrompt')[0]"
                ".textContent.includes('[1]')", timeout=60_000)
            # the person replaces cell 2's text by typing (no save: autosave is off)
            cells.nth(1).locator(".cm-content").click()
            page.keyboard.press("Control+a")
            page.keyboard.insert_text(edited)
            assert cells.nth(1).locator(".cm-content").inner_text() == edited
            page.keyboard.press("Shift+Enter")              # runs the body here: 1 'edited'
            page.wait_for_function(
                "() => document.querySelectorAll('.jp-NotebookPanel .jp-InputPrompt')[1]"
                ".textContent.includes('[2]')", timeout=60_000)
            assert log.read_text().split() == ["edited"]
            page.keyboard.press("Shift+Enter")              # cell 3: %flow run
            view = page.locator(".nbflow-runview")
            page.wait_for_selector(".nbflow-header[data-state='succeeded']", timeout=120_000)
            out = cells.nth(2).locator(".jp-Cell-outputArea").inner_text()
            run = view.locator(".nbflow-header code").inner_text().strip()
        finally:
            browser.close()
    assert "using unsaved changes of cell 2" in out, out
    assert f"run {run} is using unsaved changes of cell 2" in out
    # the run executed the on-screen version (a 2nd 'edited'), never the saved 'saved' one
    assert log.read_text().split() == ["edited", "edited"]
    assert (lab["root"] / "edit.ipynb").read_text() == saved      # and nothing was saved
    assert client.status(run).state == "succeeded"
