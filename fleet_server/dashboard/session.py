"""Dashboard sign-in: a token typed once into a form, then a server-side session cookie.

The operator pastes an operator token into ``/login``; it is checked with the same
:meth:`~fleet_server.registry.auth.Auth.authenticate` the REST API uses and, if it is a viewer (or
better), kept in memory under a fresh random session id. The browser only ever holds that
id, in an ``HttpOnly; SameSite=Strict; Path=/`` cookie (``Secure`` when the request came
over HTTPS), so the token is in no URL, no page, no log and no cookie jar. Every page
request re-authenticates the stored token, so revoking the token ends its sessions at once.

Sessions are bounded (count and age) and die with the process: signing in again after a
restart is the price of never writing a token anywhere.

This module does not render pages and does not know any route but the cookie's name.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from fleet_server.errors import AuthenticationError, PermissionDeniedError
from fleet_server.registry.auth import Auth, Principal

__all__ = ["COOKIE", "MAX_AGE_S", "MAX_SESSIONS", "Sessions"]

COOKIE = "edgefleet_session"
MAX_AGE_S = 12 * 3600
MAX_SESSIONS = 1000
_MAX_TOKEN = 128


@dataclass
class _Session:
    token: str
    created: float


class Sessions:
    """Session id → operator token, bounded; the oldest session goes first when full."""

    def __init__(self, *, max_sessions: int = MAX_SESSIONS, max_age_s: float = MAX_AGE_S,
                 clock=time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.max_age_s = max_age_s
        self.clock = clock
        self._items: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def login(self, auth: Auth, token: str, now: float) -> tuple[str, Principal]:
        """Check ``token`` and open a session for it; returns (session id, principal).

        Raises:
            AuthenticationError: an empty, oversized or unknown (or revoked) token.
            PermissionDeniedError: a device secret, or a token without the viewer role.
        """
        token = token.strip()
        if not token or len(token) > _MAX_TOKEN:
            raise AuthenticationError("enter an operator token (efo_…)")
        principal = auth.authenticate(f"Bearer {token}", now)
        if principal.kind != "operator":
            raise PermissionDeniedError("a device secret cannot sign in to the dashboard")
        Auth.require(principal, "viewer")
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._items[sid] = _Session(token, self.clock())
            while len(self._items) > self.max_sessions:
                self._items.popitem(last=False)
        return sid, principal

    def principal(self, auth: Auth, sid: str | None, now: float) -> Principal | None:
        """Who a session cookie stands for, or None (no, unknown, expired or revoked)."""
        if not sid or len(sid) > 64:
            return None
        with self._lock:
            found = self._items.get(sid)
            if found is not None and self.clock() - found.created > self.max_age_s:
                del self._items[sid]
                found = None
        if found is None:
            return None
        try:
            principal = auth.authenticate(f"Bearer {found.token}", now)
            Auth.require(principal, "viewer")
        except (AuthenticationError, PermissionDeniedError):
            self.logout(sid)
            return None
        return principal

    def logout(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._items.pop(sid, None)
