"""The one place domain errors become HTTP responses: ``{"error": {"type", "message"}}``.

- :class:`~fleet_server.errors.FleetError` subclasses carry their status (rollout refusals
  included: an action the status does not allow 409, a missing approval 403, a bad plan 422);
- bundle refusals (:class:`~edgefleet.contract.errors.BundleError`): 400 when the upload is
  not a well-formed bundle (not one at all, or hiding bytes: ``MultipleStreamError``,
  ``TrailingDataError``, ...), 413 for a size limit, 422 for everything else (bad
  signature, digest, members, ...), the type being the contract's class name
  (``UntrustedSignerError``);
- other contract errors (``SchemaError``, ``ReferenceMismatchError``): 422;
- request validation (FastAPI/pydantic): 422 with the fields at fault;
- Starlette's own (unknown path 404, wrong method 405): their status;
- anything else: 500 with a generic message, the exception logged, never shown.

This module decides no status beyond that table and formats nothing else.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from edgefleet.contract.errors import BundleError, BundleFormatError, SizeLimitError
from edgefleet.errors import EdgefleetError
from fleet_server.errors import FleetError

__all__ = ["error_response", "install_handlers", "status_of"]

log = logging.getLogger(__name__)


def status_of(exc: Exception) -> int:
    if isinstance(exc, FleetError):
        return exc.status
    if isinstance(exc, BundleFormatError):
        return 400
    if isinstance(exc, SizeLimitError):
        return 413
    if isinstance(exc, (BundleError, EdgefleetError)):
        return 422
    return 500


def error_response(status: int, kind: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status,
                        headers=headers)


def _headers(status: int) -> dict[str, str] | None:
    return {"WWW-Authenticate": "Bearer"} if status == 401 else None


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc)
    if status >= 500:
        log.error("%s %s failed: %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc)
    return error_response(status, type(exc).__name__, str(exc), _headers(status))


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return error_response(422, "RequestValidationError", "; ".join(parts) or "invalid request")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first
    matching route's, so a path with GET and POST routes would answer ``Allow: GET``)."""
    try:  # FastAPI >= 0.16x keeps included routers lazily; this flattens them
        from fastapi.routing import iter_route_contexts
        routes = list(iter_route_contexts(request.app.routes))
    except ImportError:  # pragma: no cover - older FastAPI: routes are flat already
        routes = request.app.routes
    methods: set[str] = set()
    for route in routes:
        try:
            match, _ = route.matches({**request.scope, "method": "\0"})
        except (AttributeError, TypeError):
            continue
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = getattr(exc, "kind", None) or {404: "NotFound", 405: "MethodNotAllowed"}.get(
        exc.status_code, "HTTPError")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request)) or headers.get("Allow", "")
    return error_response(exc.status_code, kind, str(exc.detail), headers or None)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "InternalError", "internal server error (see the server log)")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(EdgefleetError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal)
