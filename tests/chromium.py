"""Headless Chromium for the page tests (the Debian package, driven by Playwright for Python)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.services import missing


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "chromium-headless-shell"):
        found = shutil.which(name)
        if found:
            return found
    missing("chromium (Debian package `chromium`)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per test module (shared by conftest.py)."""
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright (the test extra)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def wait_for(page: Any, predicate: str, timeout: float = 60, console: list[str] | None = None) -> None:
    """Poll ``predicate`` (a JS function) until true. Not wait_for_function: its string eval breaks a
    page's Content-Security-Policy, which stays on here."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(predicate):
            return
        time.sleep(0.1)
    shown = page.text_content("#status") if page.query_selector("#status") else None
    raise AssertionError(f"not true within {timeout:.0f} s: {predicate}; status {shown!r}; console {console}")
