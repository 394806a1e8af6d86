"""The API's documentation pages, served from this server: ``/docs`` (Swagger UI) and
``/redoc`` (ReDoc), both over ``/openapi.json``.

FastAPI's own pages load Swagger UI and ReDoc from a CDN and start them with an inline
script, so they are blank on a machine without internet access and need a CSP that allows
inline scripts. Here the JavaScript and CSS come from the ``fastapi-offline`` package's
static files (Swagger UI and ReDoc bundles, served under ``/docs/static/``), Swagger UI is
started by a small file of ours (``static/swagger-init.js``), and the pages carry a CSP that
allows scripts from this server only.

This module does not generate the OpenAPI document (FastAPI does) and needs no token: the
document describes the API, it holds no data.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from fleet_server.errors import NotFoundError

__all__ = ["ASSETS", "CSP", "router"]

router = APIRouter(include_in_schema=False)

_VENDORED = Path(str(resources.files("fastapi_offline") / "static"))
_OURS = Path(__file__).parent / "static"
ASSETS = {
    "swagger-ui-bundle.js": (_VENDORED, "text/javascript"),
    "swagger-ui.css": (_VENDORED, "text/css"),
    "redoc.standalone.js": (_VENDORED, "text/javascript"),
    "favicon.png": (_VENDORED, "image/png"),
    "swagger-init.js": (_OURS, "text/javascript"),
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
       "worker-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}
_TITLE = "edgefleet fleet server API"

_SWAGGER = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_TITLE} · Swagger UI</title>
<link rel="icon" href="/docs/static/favicon.png">
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/static/swagger-init.js"></script>
</body></html>"""

_REDOC = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_TITLE} · ReDoc</title>
<link rel="icon" href="/docs/static/favicon.png"></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="/docs/static/redoc.standalone.js"></script>
</body></html>"""


@router.get("/docs")
def swagger() -> HTMLResponse:
    return HTMLResponse(_SWAGGER, headers=_HEADERS)


@router.get("/redoc")
def redoc() -> HTMLResponse:
    return HTMLResponse(_REDOC, headers=_HEADERS)


@router.get("/docs/static/{asset}")
def static(asset: str) -> Response:
    """One of :data:`ASSETS` (no other file: the name is looked up, never joined)."""
    found = ASSETS.get(asset)
    if found is None:
        raise NotFoundError("documentation asset", asset[:64])
    folder, media = found
    return Response((folder / asset).read_bytes(), media_type=media,
                    headers={**_HEADERS, "Cache-Control": "public, max-age=86400"})
