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

from support import REPO

CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.browser

try:
    import jupyterlab  # noqa: F401
    from playwright.sync_api import sync_playwright
    _MISSING = ""
except ImportError as e:
    _MISSING = f"{e.name} is not installed (pip install jupyterlab playwright)"
if not _MISSING and not os.path.exists(CHROMIUM):
    _MISSING = f"{CHROMIUM} is missing (apt-get install -y chromium)"

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _clicking_copy(dest):
    """approvals.ipynb without the cells that approve and wait from code: a person clicks."""
    nb = nbformat.read(REPO / "notebooks" / "approvals.ipynb", as_version=4)
    nb.cells = [c for c in nb.cells
                if not {"auto-approve", "wait"} & set(c.get("metadata", {}).get("tags", []))]
    nbformat.write(nb, dest / "approvals.ipynb")


@pytest.fixture
def lab(tmp_path, nats_server, stack):
    from nbflow.stack import free_port

    root, conf = tmp_path / "root", tmp_path / "jconf"
    root.mkdir()
    _clicking_copy(root)
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
    yield {"base": base, "token": token, "root": root}
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "browser available")
def test_click_approve_in_jupyterlab(lab, tmp_path, client):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        try:
            page.goto(f"{lab['base']}/lab/tree/approvals.ipynb?reset&token={lab['token']}")
            page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell", timeout=60_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]"
                ".some(e => e.textContent.includes('| Idle'))", timeout=60_000)
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
