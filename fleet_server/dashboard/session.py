"""Dashboard sign-in: a token typed once into a form, then a session cookie kept in the
fleet database.

The operator pastes an operator token into ``/login``; it is checked with the same
:meth:`~fleet_server.registry.auth.Auth.authenticate` the REST API uses and, if it is a viewer (or
better), a session is opened for it under a fresh random id (256 bits). The browser only
ever holds that id, in an ``HttpOnly; SameSite=Strict; Path=/`` cookie (``Secure`` when the
request came over HTTPS), so the token is in no URL, no page, no log and no cookie jar.

The database keeps the session (``sessions``: the sha256 of the id, never the id, and the
*id of the token row* it signs in, never the token), so every API replica over one
database serves the same operator, a restart signs nobody out, and a copy of the database
opens no session. Every page request re-reads the token's row, so revoking the token ends
its sessions at once. Sessions are bounded: each expires ``max_age_s`` after it was opened
(wall-clock time, the same on every replica), signing out deletes it, and past
``max_sessions`` the oldest go first.

This module does not render pages and does not know any route but the cookie's name.
"""

from __future__ import annotations

import secrets

from fleet_server.errors import AuthenticationError, PermissionDeniedError
from fleet_server.registry.auth import Auth, Principal, secret_hash
from fleet_server.store import Store

__all__ = ["COOKIE", "MAX_AGE_S", "MAX_SESSIONS", "Sessions"]

COOKIE = "edgefleet_session"
MAX_AGE_S = 12 * 3600
MAX_SESSIONS = 1000
_MAX_TOKEN = 128
_MAX_SID = 64  # token_urlsafe(32) is 43 characters


class Sessions:
    """Session id → the operator token it signs in, in the database; bounded in count and age.

    Holds no state of its own: two instances over one database (two API replicas) are one
    set of sessions.
    """

    def __init__(self, store: Store, *, max_sessions: int = MAX_SESSIONS,
                 max_age_s: float = MAX_AGE_S) -> None:
        self.store = store
        self.max_sessions = max_sessions
        self.max_age_s = max_age_s

    def count(self, now: float) -> int:
        """How many sessions are open and not expired at ``now``."""
        return self.store.count_sessions(now)

    def login(self, auth: Auth, token: str, now: float) -> tuple[str, Principal]:
        """Check ``token`` and open a session for it; returns (session id, principal).

        Raises:
            AuthenticationError: an empty, oversized or unknown (or revoked) token.
            PermissionDeniedError: a device secret, or a token without the viewer role.
            StoreError: the database failed.
        """
        token = token.strip()
        if not token or len(token) > _MAX_TOKEN:
            raise AuthenticationError("enter an operator token (efo_…)")
        principal = auth.authenticate(f"Bearer {token}", now)
        if principal.kind != "operator":
            raise PermissionDeniedError("a device secret cannot sign in to the dashboard")
        Auth.require(principal, "viewer")
        found = self.store.token_by_hash(secret_hash(token))
        if found is None:  # revoked and deleted between the two reads
            raise AuthenticationError("unknown token")
        sid = secrets.token_urlsafe(32)
        self.store.add_session(secret_hash(sid), found.id, now, now + self.max_age_s,
                               self.max_sessions)
        return sid, principal

    def principal(self, auth: Auth, sid: str | None, now: float) -> Principal | None:
        """Who a session cookie stands for, or None (no, unknown, expired or revoked)."""
        if not sid or len(sid) > _MAX_SID:
            return None
        digest = secret_hash(sid)
        token = self.store.session_token(digest, now)
        if token is None:
            return None
        try:
            principal = auth.principal_of(token, now)
            Auth.require(principal, "viewer")
        except (AuthenticationError, PermissionDeniedError):
            self.store.delete_session(digest)
            return None
        return principal

    def logout(self, sid: str | None) -> None:
        """End the session (on every replica: it is deleted from the database)."""
        if sid and len(sid) <= _MAX_SID:
            self.store.delete_session(secret_hash(sid))
