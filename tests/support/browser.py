"""A headless Chromium for tests: Debian's ``chromium`` driven by Playwright for Python.

    with chromium_page() as page:
        page.goto(url)

``require_chromium()`` finds ``/usr/bin/chromium`` and, when it is missing and the
process may install packages (root), installs it with ``apt-get install -y chromium``;
where that cannot be done it skips the test and says why. Playwright's own browser
download (``playwright install``) is never used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.debian import apt_install

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_chromium() -> str:
    """The path of Chromium, installed when missing; skips the test when it cannot be."""
    if not Path(CHROMIUM).exists():
        problem = apt_install("chromium")
        if problem is not None or not Path(CHROMIUM).exists():
            pytest.skip(f"headless Chromium unavailable: {problem or 'not at ' + CHROMIUM}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    return CHROMIUM


@contextmanager
def chromium_page(*, width: int = 1400, height: int = 900) -> Iterator[Page]:
    """A fresh page in a fresh headless Chromium (its own profile: no cookies)."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            page.set_default_timeout(30_000)
            yield page
            context.close()
        finally:
            browser.close()
