"""``/docs``: Swagger UI served from the package, so that it works offline (nothing from a CDN).

The assets are ``swagger-ui-dist`` as ``tests/js/package-lock.json`` pins it, copied byte for byte
into ``static/`` (``swagger-ui-bundle.js``, ``swagger-ui.css``, ``swagger-ui-favicon.png``, and the
licence, ``swagger-ui.LICENSE``); ``tests/test_docs.py`` checks the copy against the locked package
and opens the page in headless Chromium with every request outside loopback refused. FastAPI's
``/redoc`` (which needs a CDN) is off. Refresh after changing the pin: ``cd tests/js && npm ci``, then copy
``node_modules/swagger-ui-dist/{swagger-ui-bundle.js,swagger-ui.css}`` into ``farm/api/static/``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html, swagger_ui_default_parameters
from fastapi.responses import HTMLResponse, Response

from farm.api.playground import read_static

router = APIRouter(include_in_schema=False)
ASSETS = {  # served name → (file in static/, media type)
    "swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
    "favicon.png": ("swagger-ui-favicon.png", "image/png"),
}
# validatorUrl null: Swagger UI would otherwise ask validator.swagger.io to check the schema
PARAMETERS = {**swagger_ui_default_parameters, "validatorUrl": None}


@router.get("/docs", response_class=HTMLResponse)
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API docs",
        swagger_js_url=f"{root}/docs/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/favicon.png",
        swagger_ui_parameters=PARAMETERS,
    )


@router.get("/docs/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        return Response(status_code=404)
    file, media_type = ASSETS[name]
    return Response(read_static(file), media_type=media_type,
                    headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})  # fmt: skip
