"""What the browser tests share: Debian's Chromium driven by Playwright (see
/work/shared/BROWSER.md), and the skip with its reason when either is missing."""
from __future__ import annotations

import os

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

try:
    import jupyterlab  # noqa: F401
    from playwright.sync_api import sync_playwright
    MISSING = ""
except ImportError as e:
    sync_playwright = None
    MISSING = f"{e.name} is not installed (pip install jupyterlab playwright)"
if not MISSING and not os.path.exists(CHROMIUM):
    MISSING = f"{CHROMIUM} is missing (apt-get install -y chromium)"
needs_browser = pytest.mark.skipif(bool(MISSING), reason=MISSING or "browser available")


def launch(p):
    """Chromium, headless, from a ``sync_playwright()`` context."""
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
