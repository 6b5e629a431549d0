"""The runs console in Debian's Chromium (Playwright; see /work/shared/BROWSER.md): standalone
`nbflow ui` with the inbox, runs list, run page and schedules updating live, and the console
opened from JupyterLab's launcher as the Jupyter user.

NBFLOW_UPDATE_SCREENSHOT=1 copies the screenshots to docs/console-*.png.
"""
from __future__ import annotations

import os
import shutil

import pytest

from consolehelpers import running_ui, start_jupyter, stop
from browserhelpers import launch, needs_browser, sync_playwright
from support import REPO, wait_for

pytestmark = pytest.mark.browser

APPROVALS = str(REPO / "notebooks" / "approvals.ipynb")
SUCCEEDED_FILL = "#009e73"
AWAITING_FILL = "#f0e442"


def _shots(tmp_path, names):
    if os.environ.get("NBFLOW_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        for n in names:
            shutil.copy(tmp_path / f"console-{n}.png", REPO / "docs" / f"console-{n}.png")


def _wait_node(client, run, node, state, timeout=120):
    wait_for(lambda: getattr(client.status(run).nodes.get(node), "state", None) == state,
             timeout, f"{node} of {run} to reach {state}", every=0.2)


def _publish_fill(page) -> str:
    """The fill colour of the 'publish' node in the run page's DAG."""
    return page.evaluate("""() => {
        const g = [...document.querySelectorAll('#live svg g.node')]
            .find(n => (n.querySelector('title') || {}).textContent === 'publish');
        const shape = g && g.querySelector('path, polygon, ellipse');
        return shape ? (shape.getAttribute('fill') || '').toLowerCase() : '';
    }""")


@pytest.fixture
def ui(tmp_path, nats_server, stack):
    with running_ui(tmp_path, nats_server.url, "br0wser", "console-user") as url:
        yield url


@needs_browser
def test_console_live_standalone(ui, client, tmp_path):
    from nbflow.client import Client  # noqa: F401 - the schedules API below runs on it
    from nbflow.schedules.api import Schedules

    with sync_playwright() as p:
        browser = launch(p)
        try:
            ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            inbox = ctx.new_page()
            inbox.goto(f"{ui}/nbflow/inbox?token=br0wser")
            inbox.wait_for_function("() => document.body.dataset.live_connected === '1'")
            inbox.evaluate("window.__notReloaded = true")

            # a run waits for approval: it appears in the open inbox, no reload
            run = client.submit(APPROVALS, by="analyst")
            card = inbox.locator(f"article.pending[data-run='{run}']")
            card.wait_for(timeout=120_000)
            assert inbox.evaluate("window.__notReloaded") is True
            assert "Publish the daily report?" in card.inner_text()
            assert "report" in card.locator(".inputs").inner_text()
            assert card.locator(".upstream a").count() == 1            # prepare's notebook
            inbox.screenshot(path=str(tmp_path / "console-inbox.png"), full_page=True)

            # a second run, watched on the runs list and on its own page
            run2 = client.submit(APPROVALS, by="analyst")
            _wait_node(client, run2, "publish", "awaiting_approval")
            runs = ctx.new_page()
            runs.goto(f"{ui}/nbflow/runs")
            runs.wait_for_function("() => document.body.dataset.live_connected === '1'")
            runs.evaluate("window.__notReloaded = true")
            row = runs.locator(f"tr[data-run='{run2}']")
            assert row.get_attribute("data-state") == "running"
            runpage = ctx.new_page()
            runpage.goto(f"{ui}/nbflow/runs/{run2}")
            runpage.wait_for_function("() => document.body.dataset.live_connected === '1'")
            runpage.evaluate("window.__notReloaded = true")
            assert _publish_fill(runpage) == AWAITING_FILL
            runpage.screenshot(path=str(tmp_path / "console-run-waiting.png"), full_page=True)

            # approve run 1 in the inbox, with the keyboard, as the signed-in user
            card.locator("textarea").fill("looks right")
            card.locator("button.approve").focus()
            inbox.keyboard.press("Enter")
            inbox.wait_for_selector(".flash", timeout=60_000)
            assert f"Approved publish of run {run} as console-user" in \
                inbox.locator(".flash").inner_text()
            assert client.wait(run, timeout=120).state == "succeeded"       # the run continued
            decided = [e for e in client.history(run) if e.type == "ApprovalDecided"]
            assert [(e["by"], e.get("comment")) for e in decided] == [("console-user",
                                                                       "looks right")]

            # run 2 is approved elsewhere (the shell): list and DAG follow, no reload
            client.approve(run2, "publish", by="someone-else")
            assert client.wait(run2, timeout=120).state == "succeeded"
            runs.wait_for_selector(f"tr[data-run='{run2}'][data-state='succeeded']",
                                   timeout=60_000)
            assert runs.evaluate("window.__notReloaded") is True
            runpage.wait_for_selector(".run-head[data-state='succeeded']", timeout=60_000)
            runpage.wait_for_function(
                "() => { const g = [...document.querySelectorAll('#live svg g.node')].find("
                "n => (n.querySelector('title')||{}).textContent === 'publish');"
                f"return g && g.querySelector('path, polygon').getAttribute('fill').toLowerCase()"
                f" === '{SUCCEEDED_FILL}'; }}", timeout=60_000)
            assert runpage.evaluate("window.__notReloaded") is True
            assert "someone-else" in runpage.locator(".decisions").inner_text()
            runs.screenshot(path=str(tmp_path / "console-runs.png"), full_page=False)
            runpage.screenshot(path=str(tmp_path / "console-run.png"), full_page=True)

            # schedules: pause one by clicking
            s = Schedules(client.aclient)
            name = f"console-{run2}"
            client._call(s.add(APPROVALS, cron="0 6 * * *", tz="Europe/London", name=name))
            try:
                sched = ctx.new_page()
                sched.goto(f"{ui}/nbflow/schedules")
                sched.get_by_role("button", name=f"Pause schedule {name}").click()
                sched.wait_for_selector(f"tr[data-schedule='{name}'][data-state='paused']",
                                        timeout=60_000)
                d = client._call(s.get(name))
                assert d["paused"] is True and d["by"] == "console-user"
                sched.screenshot(path=str(tmp_path / "console-schedules.png"))
            finally:
                client._call(s.rm(name))

            workers = ctx.new_page()
            workers.goto(f"{ui}/nbflow/workers")
            assert workers.locator("tr[data-worker] .s-alive").count() >= 2
            workers.screenshot(path=str(tmp_path / "console-workers.png"))

            # phone width: the inbox still reads, nothing overflows sideways
            phone = browser.new_context(viewport={"width": 390, "height": 844},
                                        device_scale_factor=2)
            ph = phone.new_page()
            ph.goto(f"{ui}/nbflow/runs?token=br0wser")
            assert ph.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
            ph.screenshot(path=str(tmp_path / "console-phone.png"))
        finally:
            browser.close()
    _shots(tmp_path, ["inbox", "runs", "run", "run-waiting", "schedules", "workers", "phone"])


@pytest.fixture
def lab(tmp_path, nats_server, stack):
    from nbflow.stack import free_port

    built = REPO / "nbflow" / "console" / "labextension"
    if not (built / "package.json").exists():
        pytest.skip("the JupyterLab extension is not built (cd labextension && jlpm build)")
    # what installing the package does: the prebuilt extension in share/jupyter/labextensions
    dest = tmp_path / "jdata" / "labextensions" / "nbflow-console"
    dest.parent.mkdir(parents=True)
    shutil.copytree(built, dest)
    port = free_port()
    proc = start_jupyter(tmp_path, nats_server.url, port, app="lab",
                         args=["--IdentityProvider.token=labtok", "--expose-app-in-browser"],
                         JUPYTERHUB_USER="", NBFLOW_USER="")
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@needs_browser
def test_console_opens_from_the_jupyterlab_launcher(lab, client, tmp_path):
    run = client.submit(APPROVALS, by="analyst")
    _wait_node(client, run, "publish", "awaiting_approval")
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{lab}/lab?reset&token=labtok")
            item = page.locator(".jp-LauncherCard", has_text="nbflow console")
            item.wait_for(timeout=90_000)
            item.click()
            frame = page.frame_locator("#nbflow-console iframe")
            card = frame.locator(f"article.pending[data-run='{run}']")
            card.wait_for(timeout=60_000)
            # Jupyter's signed-in user (the token user of a plain server) decides
            user = frame.locator("strong.user").inner_text()
            assert user
            card.locator("button.approve").click()
            frame.locator(".flash").wait_for(timeout=60_000)
            # the page after the decision shows it decided, not waiting
            frame.locator(f"article.decided[data-run='{run}']").wait_for(timeout=60_000)
            assert frame.locator(f"article.pending[data-run='{run}']").count() == 0
            page.screenshot(path=str(tmp_path / "console-jupyterlab.png"))
        finally:
            browser.close()
    assert client.wait(run, timeout=120).state == "succeeded"
    decided = [e for e in client.history(run) if e.type == "ApprovalDecided"]
    assert [e["by"] for e in decided] == [user]
    _shots(tmp_path, ["jupyterlab"])
