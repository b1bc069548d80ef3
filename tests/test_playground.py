"""The /playground page in headless Chromium (the Debian package, driven by Playwright):
typing a key and a prompt brings images over the realtime socket, drawn on the canvas."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api_stack import ApiStack
from tests.node import node_project
from tests.services import missing

BUNDLE = Path(__file__).parents[1] / "farm" / "api" / "static" / "fal-client.js"
LOCK = Path(__file__).parent / "js" / "package-lock.json"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "chromium-headless-shell"):
        found = shutil.which(name)
        if found:
            return found
    missing("chromium (Debian package `chromium`)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
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


def _wait_for(page: Any, predicate: str, timeout: float = 60, console: list[str] | None = None) -> None:
    """Poll ``predicate`` (a JS function) until true. Not wait_for_function: its string eval breaks the
    page's Content-Security-Policy, which stays on here."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(predicate):
            return
        time.sleep(0.1)
    shown = page.text_content("#status")
    raise AssertionError(f"not true within {timeout:.0f} s: {predicate}; status {shown!r}; console {console}")


def test_bundle_is_the_locked_client(tmp_path: Path) -> None:
    """The served bundle is @fal-ai/client as tests/js locks it: its banner names the locked version, and
    the build script (npm run build:playground), run again on the locked packages (npm ci), writes the
    same bytes (esbuild's output is deterministic: a stale or edited bundle differs)."""
    locked = json.loads(LOCK.read_text())["packages"]["node_modules/@fal-ai/client"]["version"]
    banner = BUNDLE.read_text().splitlines()[0]
    assert re.search(rf"@fal-ai/client {re.escape(locked)}\b", banner), (locked, banner)

    js = node_project()
    script = json.loads((js / "package.json").read_text())["scripts"]["build:playground"]
    tool, *args = shlex.split(script)
    assert tool == "esbuild" and sum(a.startswith("--outfile=") for a in args) == 1, script
    rebuilt = tmp_path / "fal-client.js"
    args = [f"--outfile={rebuilt}" if a.startswith("--outfile=") else a for a in args]
    done = subprocess.run([str(js / "node_modules" / ".bin" / tool), *args], cwd=js, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert rebuilt.read_bytes() == BUNDLE.read_bytes(), "farm/api/static/fal-client.js is not the build of the " \
        "locked packages: cd tests/js && npm ci && npm run build:playground"


def test_playground_draws_images_as_you_type(api_stack: ApiStack, browser: Any) -> None:
    key = api_stack.make_key("playground")
    context = browser.new_context(ignore_https_errors=True)  # the test CA is not in Chromium's store
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    try:
        page.goto(f"{api_stack.base_url}/playground?model=farm/tiny-lcm&size=64&steps=2&seed=7", timeout=30000)
        assert page.eval_on_selector("#image", "c => c.dataset.frames") == "0"
        page.fill("#key", key)  # the first input connects (token through /fal/proxy) and sends a frame
        _wait_for(page, "() => Number(document.querySelector('#image').dataset.frames) >= 1", console=console)
        page.fill("#prompt", "a red fox in snow")  # typing sends again: the image follows
        newer = ("() => { const c = document.querySelector('#image');"
                 " return Number(c.dataset.frames) >= 2 && c.dataset.requestId !== 'playground-1'; }")
        _wait_for(page, newer, console=console)
        drawn = page.evaluate(
            """() => {
                const c = document.querySelector('#image');
                const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let opaque = 0, distinct = new Set();
                for (let i = 0; i < px.length; i += 4) {
                    if (px[i + 3] > 0) opaque++;
                    distinct.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
                }
                return {w: c.width, h: c.height, opaque, colours: distinct.size,
                        status: document.querySelector('#status').textContent,
                        error: document.querySelector('#status').className};
            }"""
        )
    finally:
        context.close()
    assert (drawn["w"], drawn["h"]) == (64, 64), (drawn, console)
    assert drawn["opaque"] == 64 * 64 and drawn["colours"] > 16, (drawn, console)  # an image, not a blank
    assert drawn["error"] == "" and "seed 7" in drawn["status"], (drawn, console)
