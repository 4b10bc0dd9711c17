"""A real browser for the console's tests: Playwright (from PyPI) driving Debian's `chromium`.

Playwright's own browser downloads are not reachable from the machines the suite runs on, so the browser is the
system's `chromium` (`apt-get install chromium`), launched headless through `executable_path`. Nothing here
skips: a missing browser or a missing `playwright` fails the test with the command that installs it.

Fixtures (a test module takes them with `pytest_plugins = ["tests.browser"]`): `browser` (one Chromium per test
session), `page` (a fresh context and page per test, closed after it) and `open_page` (more pages, in contexts of
their own — another viewer, other HTTP headers). `screenshot(page, name)` writes `docs/screenshots/NAME.png` when
`MESH_LLM_SCREENSHOTS=1` is set, so a normal run never dirties the tree.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

INSTALL_PLAYWRIGHT = "pip install -e '.[test]'"
try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError as exc:  # a collection error that says what to run, never a skip
    raise ImportError(f"the console's browser tests need playwright: install it with `{INSTALL_PLAYWRIGHT}`") from exc

__all__ = ["TIMEOUT_MS", "OpenPage", "Page", "browser", "expect", "open_page", "page", "screenshot"]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
INSTALL_CHROMIUM = "apt-get install -y chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu"]
# Playwright's waits (expect, locators): generous, the suite runs on 2 loaded cores next to llama-servers.
TIMEOUT_MS = 60_000

OpenPage = Callable[..., Page]


def chromium_path() -> str:
    """The system Chromium (PATH, else Debian's /usr/bin/chromium); a failure that says how to install it."""
    for candidate in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"the console's browser tests need Chromium: install it with `{INSTALL_CHROMIUM}`", pytrace=False)


@pytest.fixture(scope="module")  # Playwright's sync API runs an event loop on this thread: end it with the module
def browser() -> Iterator[Browser]:
    """One headless Chromium for the session, driven by Playwright."""
    executable = chromium_path()
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=executable, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[OpenPage]:
    """Open a page in a context of its own (`open_page(**context_options)`, e.g. `extra_http_headers`); every
    context is closed after the test. Page errors (an exception in the page's script) fail the test."""
    contexts: list[Any] = []
    errors: list[str] = []

    def open_(**options: Any) -> Page:
        context = browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, "the page threw:\n" + "\n".join(errors)


@pytest.fixture
def page(open_page: OpenPage) -> Page:
    """A fresh page in its own browser context."""
    return open_page()


def screenshot(page: Page, name: str) -> Path | None:
    """Write docs/screenshots/NAME.png (the README shows them) when MESH_LLM_SCREENSHOTS=1; else nothing."""
    if os.environ.get("MESH_LLM_SCREENSHOTS") != "1":
        return None
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
