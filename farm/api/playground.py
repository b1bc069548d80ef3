"""``/playground``: a small realtime page (key, prompt, seed; the image follows the typing).

It runs fal's own JavaScript client (``@fal-ai/client``, bundled for the browser into
``static/fal-client.js`` by ``npm run build:playground`` in ``tests/js``; nothing comes from a
CDN), which reaches the farm through ``/fal/proxy`` and opens the realtime socket on this host.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

STATIC = Path(__file__).parent / "static"
router = APIRouter(tags=["playground"], include_in_schema=False)
# the page's own scripts and styles only, no other origin; sockets and fetches to this host
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'")  # fmt: skip


@cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/playground", response_class=HTMLResponse)
async def page() -> Response:
    return Response(_read("playground.html"), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})  # fmt: skip


@router.get("/playground/fal-client.js")
async def client_bundle() -> Response:
    return Response(_read("fal-client.js"), media_type="text/javascript; charset=utf-8",
                    headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})  # fmt: skip
