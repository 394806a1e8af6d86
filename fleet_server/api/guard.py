"""Every request body bounded before the application reads it: an ASGI middleware.

FastAPI reads and parses a request's body *before* it resolves the route's dependencies,
the credential check included, so without this a stranger's ``POST /api/v1/groups``
declaring a 1 GiB body was read whole into memory before being answered 401. The
:class:`BodyGuard` sits in front of the application and, for a request with a body:

1. on the API (``/api/``), checks the bearer credential and answers 401 at once when
   it is missing or unknown, so a stranger's body is never read at all (the role is the
   route's to check: a known principal may send at most the route's limit);
2. finds the route's limit (:func:`body_limit` over a table of :class:`BodyLimit`: the
   bundle upload its configured maximum, JSON API calls a small one, the sign-in form
   less still) and answers 413 at once when ``Content-Length`` declares more;
3. counts the bytes as the application receives them (a chunked body declares nothing)
   and stops at the limit with 413 (:class:`BodyTooLargeError`);
4. turns a client that disconnects mid-body into one warning line naming the request
   and how far it got (:class:`ClientDisconnectedError` unwinds the application
   quietly; nobody is left to answer).

Refusals are the API's JSON error body (``{"error": {"type", "message"}}``) with
``Connection: close``: the unread body is never read, the connection goes.

This module does not decide who may do what beyond "a known credential" (the routes
do), and never logs a credential.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from fleet_server.api.errors import error_response
from fleet_server.errors import AuthenticationError

__all__ = [
    "DEFAULT_BODY_LIMIT",
    "BodyGuard",
    "BodyLimit",
    "BodyTooLargeError",
    "ClientDisconnectedError",
    "body_limit",
]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_BODY_LIMIT = 64 * 1024  # a route the table does not name (dashboard forms, ...)


@dataclass(frozen=True)
class BodyLimit:
    """The largest body of the requests it matches: ``path`` exactly, or every path
    under it when it ends in ``/``; ``methods`` empty matches every method."""

    path: str
    limit: int
    methods: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"body limit of {self.path!r} must be >= 0")

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        return path == self.path or (self.path.endswith("/") and path.startswith(self.path))


def body_limit(method: str, path: str, limits: Sequence[BodyLimit],
               default: int = DEFAULT_BODY_LIMIT) -> int:
    """The first matching rule's limit (so put exact paths before prefixes), else
    ``default``."""
    for rule in limits:
        if rule.matches(method, path):
            return rule.limit
    return default


class BodyTooLargeError(HTTPException):
    """The body passed the route's limit while streaming (a Starlette ``HTTPException``,
    so FastAPI's body parsing re-raises it instead of calling it a parse error)."""

    kind = "PayloadTooLargeError"

    def __init__(self, method: str, path: str, limit: int) -> None:
        super().__init__(413, f"{method} {path}: the request body exceeds this route's "
                              f"limit of {limit} bytes")


class ClientDisconnectedError(HTTPException):
    """The client went away before sending its whole body; nobody reads the answer."""

    kind = "ClientDisconnected"

    def __init__(self) -> None:
        super().__init__(400, "the client disconnected before sending the whole body")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class BodyGuard:
    """The middleware (see the module docstring).

    Args:
        app: the application behind it.
        limits: the per-route table, first match wins; or a function that returns it,
            called at the first request (the services it reads may not exist before).
        authenticate: called (in a worker thread) with the ``Authorization`` header of an
            API request that has a body; raises
            :class:`~fleet_server.errors.AuthenticationError` to refuse it. None: no
            early check.
        default_limit: the limit of a route the table does not name.
        api_prefix: the paths whose credentials are checked before their body.
    """

    def __init__(self, app: ASGIApp, *,
                 limits: Sequence[BodyLimit] | Callable[[], Sequence[BodyLimit]],
                 authenticate: Callable[[str | None], object] | None = None,
                 default_limit: int = DEFAULT_BODY_LIMIT, api_prefix: str = "/api/") -> None:
        self.app = app
        self._limits = limits
        self._table: tuple[BodyLimit, ...] | None = None
        self.authenticate = authenticate
        self.default_limit = default_limit
        self.api_prefix = api_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        raw_length = _header(scope, b"content-length")
        chunked = b"chunked" in (_header(scope, b"transfer-encoding") or b"").lower()
        declared = int(raw_length) if raw_length is not None and raw_length.isdigit() else None
        if not chunked and not declared:
            await self.app(scope, receive, send)  # no body: nothing to bound
            return
        if self.authenticate is not None and path.startswith(self.api_prefix):
            # a stranger learns nothing, not even the limit, and is never read
            header = _header(scope, b"authorization")
            try:
                await run_in_threadpool(self.authenticate,
                                        None if header is None else header.decode("latin-1"))
            except AuthenticationError as exc:
                await self._refuse(scope, send, 401, type(exc).__name__, str(exc),
                                   {"WWW-Authenticate": "Bearer"})
                return
        limit = body_limit(method, path, self.limits, self.default_limit)
        if declared is not None and declared > limit:
            await self._refuse(scope, send, 413, "PayloadTooLargeError",
                               f"{method} {path}: a body of {declared} bytes exceeds this "
                               f"route's limit of {limit} bytes")
            return
        received = 0
        finished = False

        async def bounded() -> Message:
            nonlocal received, finished
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    finished = True
                    raise BodyTooLargeError(method, path, limit)
                finished = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not finished:
                finished = True  # said once, however often the application asks again
                log.warning("%s %s: the client disconnected after %d of %s body bytes",
                            method, path, received,
                            declared if declared is not None else "(chunked) ?")
                raise ClientDisconnectedError()
            return message

        await self.app(scope, bounded, send)

    @property
    def limits(self) -> tuple[BodyLimit, ...]:
        if self._table is None:
            self._table = tuple(self._limits() if callable(self._limits) else self._limits)
        return self._table

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, kind: str, message: str,
                      headers: dict[str, str] | None = None) -> None:
        response = error_response(status, kind, message,
                                  {**(headers or {}), "Connection": "close"})

        async def nothing() -> Message:  # the body is never read
            return {"type": "http.disconnect"}

        await response(scope, nothing, send)  # type: ignore[arg-type]
