"""The REST API: :func:`create_app` builds the FastAPI application over a set of services.

Routes do HTTP only (parse, authorise, call a service, shape the answer); the rules are in
the services; every domain error becomes JSON in one handler (:mod:`.errors`). Every
request body is bounded per route, and an API body's credential checked, before the
application reads it (:mod:`.guard`, the outermost middleware). Each
resource has its own small router module under :mod:`.routes`; the dashboard (served under
``/`` by the same app) adds its router through ``extra_routers``. ``/docs`` and ``/redoc``
are served with their JavaScript from this server (:mod:`.docs`), never from a CDN.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Depends, FastAPI

from edgefleet import __version__
from fleet_server.api import docs
from fleet_server.api.deps import strict_query
from fleet_server.api.errors import install_handlers
from fleet_server.api.guard import BodyGuard, BodyLimit
from fleet_server.api.routes import (
    alerts,
    audit,
    bundles,
    capture,
    devices,
    drift,
    groups,
    outcomes,
    performance,
    retrains,
    rollouts,
    system,
    telemetry,
)
from fleet_server.api.schemas import ErrorBody
from fleet_server.services import Services

__all__ = ["ROUTERS", "body_limits", "create_app"]

ROUTERS = (system.router, devices.router, groups.router, bundles.router, telemetry.router,
           drift.router, performance.router, alerts.router, rollouts.router, audit.router,
           retrains.router, outcomes.router, capture.router)
_ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "Not a bundle"), (401, "No or unknown credentials"),
    (403, "The credentials' role does not allow this"), (404, "Not found"),
    (409, "Conflicts with what is stored"), (413, "Upload too large"),
    (422, "A request value was refused"))}


def body_limits(services: Services) -> tuple[BodyLimit, ...]:
    """The per-route body limits, exact paths first: a bundle upload its configured
    maximum, an outcomes upload and a capture batch their own, every other API call
    ``max_request_bytes``, the sign-in form its own."""
    from fleet_server.dashboard import MAX_FORM_BYTES

    config = services.config
    return (BodyLimit("/api/v1/bundles", config.max_upload_bytes, frozenset({"POST"})),
            BodyLimit("/api/v1/outcomes", config.outcomes.max_upload_bytes,
                      frozenset({"POST"})),
            BodyLimit("/api/v1/capture", config.capture.max_batch_bytes, frozenset({"POST"})),
            BodyLimit("/api/", config.max_request_bytes),
            BodyLimit("/login", MAX_FORM_BYTES))


def create_app(services: Services, *, extra_routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The fleet server's ASGI application over ``services``."""
    app = FastAPI(
        title="edgefleet fleet server", version=__version__,
        description="Devices, groups, bundles, drift and alerts of an edgefleet fleet. "
                    "Authenticate with `Authorization: Bearer <token>`: operator tokens "
                    "(efo_…, roles viewer < operator < approver) or, for bundle downloads "
                    "and a device's own desired state, the device secret (efd_…).",
        responses=_ERRORS,  # type: ignore[arg-type]
        docs_url=None, redoc_url=None)  # served by .docs, without a CDN
    app.state.services = services
    install_handlers(app)
    app.include_router(docs.router)
    for router in ROUTERS:
        app.include_router(router, dependencies=[Depends(strict_query)])
    for router in extra_routers:
        app.include_router(router)
    from fleet_server.dashboard import router as dashboard  # HTML pages under /

    app.include_router(dashboard)
    app.add_middleware(BodyGuard, limits=lambda: body_limits(services),  # type: ignore[arg-type]
                       authenticate=lambda header: services.auth.authenticate(
                           header, services.clock()))
    return app
