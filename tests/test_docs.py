"""``/docs`` works offline: Swagger UI's assets come from the package (``swagger-ui-dist`` as tests/js locks
it), and headless Chromium renders every operation with every request outside loopback refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.api_stack import ApiStack
from tests.chromium import wait_for
from tests.node import node_project

STATIC = Path(__file__).parents[1] / "farm" / "api" / "static"
LOCK = Path(__file__).parent / "js" / "package-lock.json"
COPIES = {"swagger-ui-bundle.js": "swagger-ui-bundle.js", "swagger-ui.css": "swagger-ui.css",
          "swagger-ui-favicon.png": "favicon-32x32.png"}  # fmt: skip
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def test_served_assets_are_the_locked_swagger_ui_dist() -> None:
    locked = json.loads(LOCK.read_text())["packages"]["node_modules/swagger-ui-dist"]["version"]
    package = node_project() / "node_modules" / "swagger-ui-dist"
    assert json.loads((package / "package.json").read_text())["version"] == locked
    for ours, theirs in COPIES.items():
        assert (STATIC / ours).read_bytes() == (package / theirs).read_bytes(), (
            f"farm/api/static/{ours} is not swagger-ui-dist {locked}'s {theirs}: see farm/api/docs.py")
    assert (package / "LICENSE").read_text() in (STATIC / "swagger-ui.LICENSE").read_text()


def test_docs_render_every_operation_offline(api_stack: ApiStack, browser: Any) -> None:
    with api_stack.client() as c:
        paths = sorted(c.get("/openapi.json").json()["paths"])
        assert c.get("/redoc").status_code == 404  # off: it would need a CDN
    context = browser.new_context(ignore_https_errors=True)  # the test CA is not in Chromium's store
    seen: list[str] = []
    refused: list[str] = []

    def only_loopback(route: Any) -> None:
        url = route.request.url
        seen.append(url)
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname in LOOPBACK:
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    try:
        page.goto(f"{api_stack.base_url}/docs", timeout=60000)
        wait_for(page, f"() => document.querySelectorAll('.opblock').length >= {len(paths)}", console=console)
        shown = page.evaluate("() => [...document.querySelectorAll('.opblock-summary-path')]"
                              ".map(e => e.getAttribute('data-path'))")
        title = page.evaluate("() => document.querySelector('.info .title')?.textContent || ''")
    finally:
        context.close()
    assert refused == [], refused
    assert set(paths) <= set(shown), (sorted(set(paths) - set(shown)), console)
    assert "lcm-farm" in title, title
    assert any(u.endswith("/docs/swagger-ui-bundle.js") for u in seen), seen
    assert any(u.endswith("/openapi.json") for u in seen), seen
