"""The operator dashboard: server-rendered HTML pages (Jinja2 templates, autoescaped) with
inline SVG charts, no script and no CDN.

Routes (all ``GET`` unless said, HTML, working without JavaScript):

- ``/login`` (form; ``POST`` checks the token and sets the session cookie), ``/logout``
  (``POST`` or ``GET``);
- ``/`` fleet overview (what needs attention first); ``/devices`` (``q`` search, ``status``,
  ``group``, ``label=key=value``, ``bundle``, ``sort``, ``order``, ``page``: all applied in
  SQL) and ``/devices/{id}``; ``/drift`` (the index heatmap; ``bundle=name@version``,
  ``group``, ``device``, ``hours``); ``/alerts`` (``state``, ``kind``, ``bundle``);
  ``/rollouts`` (``status``) and ``/rollouts/{id}``; ``/bundles/{name@version}`` (the card,
  approvals, where the bundle runs and how it does; linked from the overview's bundles);
  ``/performance`` (``bundle``, ``group``, ``device``, ``days``: realized and estimated
  performance); ``/retrains`` (``status``, ``recipe``, ``bundle``) and ``/retrains/{id}``
  (the retraining runs and one run's lineage, linked from the bundle page).

Routes do HTTP only: read the session cookie (:mod:`.session`), check the query string,
call a page function (:mod:`.pages`, :mod:`.drift_page`, :mod:`.rollout_pages`) and
turn its errors into HTML pages: a page request without a valid session is redirected to
``/login``; a bad query parameter is a 400 page naming it; a device, rollout, bundle or
group that does not exist is a 404 page. Every response forbids caching and framing and
allows no script at all (``Content-Security-Policy``).

This package does not change anything in the fleet: it has no action but signing in and
out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from urllib.parse import parse_qsl, quote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fleet_server.dashboard import (
    bundle_page,
    drift_page,
    pages,
    performance_page,
    retrain_pages,
    rollout_pages,
)
from fleet_server.dashboard.html import error_page, login_page, page
from fleet_server.dashboard.pages import BadParam, Query
from fleet_server.dashboard.session import COOKIE, MAX_AGE_S, Sessions
from fleet_server.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from fleet_server.registry.auth import Principal
from fleet_server.services import Services

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MAX_FORM_BYTES = 4096
REFRESH_S = 30
_lock = threading.Lock()

Page = Callable[[Services, Query, float], tuple[str, str]]


def _sessions(request: Request) -> Sessions:
    state = request.app.state
    with _lock:
        found = getattr(state, "dashboard_sessions", None)
        if found is None:
            found = state.dashboard_sessions = Sessions(request.app.state.services.store)
    return found


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def _safe_next(path: str | None) -> str:
    """Only a local path: never another site (``//host``, ``/\\host``) after signing in."""
    if not path or not path.startswith("/") or path.startswith(("//", "/\\")) or \
            any(c in path for c in "\r\n") or len(path) > 1024:
        return "/"
    return path


def _render(request: Request, allowed: tuple[str, ...],
            build: Page, *,
            refresh: int | None = REFRESH_S, active: str = "") -> Response:
    services: Services = request.app.state.services
    now = services.clock()
    who = _sessions(request).principal(services.auth, request.cookies.get(COOKIE), now)
    if who is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303,
                                headers=HEADERS)
    user = _who(who)
    try:
        query = Query(request.query_params.multi_items(), allowed)
        title, body = build(services, query, now)
    except BadParam as exc:
        return _html(error_page(400, str(exc), user=user), 400)
    except InvalidRequestError as exc:
        named = f"query parameter {exc.field!r}: " if exc.field else ""
        return _html(error_page(400, f"{named}{exc}", user=user), 400)
    except NotFoundError as exc:
        return _html(error_page(404, str(exc), user=user), 404)
    return _html(page(title, body, refresh=refresh, user=user, active=active))


def _who(principal: Principal) -> str:
    return f"{principal.name} ({principal.role})"


# --------------------------------------------------------------------------- sign in / out


@router.get("/login")
def login_form(request: Request) -> Response:
    return _html(login_page("", _safe_next(request.query_params.get("next"))))


@router.post("/login")
async def login(request: Request) -> Response:
    services: Services = request.app.state.services
    raw = await request.body()
    if len(raw) > MAX_FORM_BYTES:
        return _html(login_page("The form is too large."), 413)
    form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
    next_path = _safe_next(form.get("next"))
    try:
        sid, _ = await run_in_threadpool(
            _sessions(request).login, services.auth, form.get("token", ""), services.clock())
    except (AuthenticationError, PermissionDeniedError) as exc:
        # the message names the problem, never the token
        status = 403 if isinstance(exc, PermissionDeniedError) else 401
        return _html(login_page(f"Not signed in: {exc}", next_path), status)
    response = RedirectResponse(next_path, status_code=303, headers=HEADERS)
    response.set_cookie(COOKIE, sid, max_age=MAX_AGE_S, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return response


@router.api_route("/logout", methods=["GET", "POST"])
def logout(request: Request) -> Response:
    _sessions(request).logout(request.cookies.get(COOKIE))
    response = RedirectResponse("/login", status_code=303, headers=HEADERS)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


# --------------------------------------------------------------------------- pages


@router.get("/")
def fleet(request: Request) -> Response:
    return _render(request, (), pages.overview, active="/")


@router.get("/devices")
def devices(request: Request) -> Response:
    return _render(request, ("q", "status", "group", "label", "bundle", "sort", "order", "page"),
                   pages.device_list, active="/devices")


@router.get("/devices/{device_id}")
def device(request: Request, device_id: str) -> Response:
    return _render(request, (), lambda s, q, now: pages.device(s, device_id, q, now),
                   active="/devices")


@router.get("/drift")
def drift(request: Request) -> Response:
    return _render(request, ("bundle", "group", "device", "hours"), drift_page.drift,
                   refresh=60, active="/drift")


@router.get("/performance")
def performance(request: Request) -> Response:
    return _render(request, ("bundle", "group", "device", "days"), performance_page.performance,
                   refresh=60, active="/performance")


@router.get("/alerts")
def alerts(request: Request) -> Response:
    return _render(request, ("state", "kind", "bundle"), pages.alerts, active="/alerts")


@router.get("/rollouts")
def rollouts(request: Request) -> Response:
    return _render(request, ("status",), rollout_pages.rollout_list, active="/rollouts")


@router.get("/bundles/{label}")
def bundle(request: Request, label: str) -> Response:
    return _render(request, (), lambda s, q, now: bundle_page.bundle(s, label, q, now),
                   active="/")


@router.get("/rollouts/{rollout_id}")
def rollout(request: Request, rollout_id: str) -> Response:
    return _render(request, (), lambda s, q, now: rollout_pages.rollout(s, rollout_id, q, now),
                   active="/rollouts")


@router.get("/retrains")
def retrains(request: Request) -> Response:
    return _render(request, ("status", "recipe", "bundle"), retrain_pages.retrain_list,
                   active="/retrains")


@router.get("/retrains/{run_id}")
def retrain(request: Request, run_id: str) -> Response:
    return _render(request, (), lambda s, q, now: retrain_pages.retrain(s, run_id, q, now),
                   active="/retrains")
