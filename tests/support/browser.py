"""A headless Chromium for tests: Debian's ``chromium`` driven by Playwright for Python.

    with chromium_page() as page:
        page.goto(url)

``require_chromium()`` finds ``/usr/bin/chromium`` and, when it is missing and the
process may install packages (root), installs it with ``apt-get install -y chromium``;
where that cannot be done it skips the test and says why. Playwright's own browser
download (``playwright install``) is never used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

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


def _install_chromium() -> str | None:
    """Install Debian's chromium; the reason it could not be, or None."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, cannot apt-get install chromium"
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            return f"`{' '.join(command)}` failed: {last}"
    return None


def require_chromium() -> str:
    """The path of Chromium, installed when missing; skips the test when it cannot be."""
    if not Path(CHROMIUM).exists():
        problem = _install_chromium()
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
