"""Credentials: operator tokens with roles, device secrets, and who a bearer token is.

Two kinds of bearer token, told apart by their prefix:

- ``efo_…`` an operator token with a role, ``viewer`` < ``operator`` < ``approver`` (each
  may do everything the roles before it may), created by ``fleet token create``;
- ``efd_…`` a device secret, created by ``fleet device add``: the device's MQTT password
  and its HTTP token for bundle downloads (and its own desired state), nothing else.

Both are 32 random bytes (256 bits) from :mod:`secrets`, stored only as their sha256. A
slow password hash (bcrypt, scrypt, argon2) exists to make guessing a *low-entropy*
password from its hash expensive; nobody can enumerate 2^256 candidates, so a fast hash
loses nothing here, and it lets every request be checked with one indexed lookup.
Looking a token up by its hash also means no comparison of secret bytes happens in
Python at all, so there is no timing side channel to close.

For the broker, a device also gets a Mosquitto 2.0 password-file hash
(:func:`mosquitto_hash`): ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>``,
12 salt bytes, a 64-byte key, 101 iterations by default as ``mosquitto_passwd`` writes it
(checked against the real ``mosquitto_passwd`` and a real broker login in the tests).

This module never logs or stores a plaintext secret; :class:`~fleet_server.models.Issued`
carries it exactly once, back to whoever created it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import dataclass

from fleet_server.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from fleet_server.models import ROLES, Issued, Token
from fleet_server.store import Store

__all__ = [
    "DEVICE_PREFIX",
    "TOKEN_PREFIX",
    "Auth",
    "Principal",
    "mosquitto_hash",
    "new_secret",
    "secret_hash",
    "verify_mosquitto_hash",
]

TOKEN_PREFIX = "efo_"
DEVICE_PREFIX = "efd_"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")
_MAX_TOKEN = 128
_TOUCH_EVERY_S = 60.0  # last_used is a hint: one write a minute per token, not per request
MOSQUITTO_ITERATIONS = 101
MOSQUITTO_SALT_BYTES = 12


def new_secret(prefix: str) -> str:
    """A fresh 256-bit secret with a recognisable prefix (``efo_`` or ``efd_``)."""
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def mosquitto_hash(password: str, *, salt: bytes | None = None,
                   iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """The Mosquitto 2.0 ``$7$`` password-file hash of ``password``."""
    salt = secrets.token_bytes(MOSQUITTO_SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return (f"$7${iterations}${base64.b64encode(salt).decode('ascii')}$"
            f"{base64.b64encode(key).decode('ascii')}")


def verify_mosquitto_hash(password: str, stored: str) -> bool:
    """Check ``password`` against a ``$7$`` hash (as Mosquitto does at login)."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, key = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]))
    return hmac.compare_digest(got, key)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: an operator token (with a role) or a device."""

    kind: str  # "operator" | "device"
    name: str  # the token's name, or the device id
    role: str = ""  # operators only

    @property
    def actor(self) -> str:
        """How the audit log names this principal."""
        return f"{self.kind}:{self.name}"

    def has_role(self, role: str) -> bool:
        return self.kind == "operator" and ROLES.index(self.role) >= ROLES.index(role)


class Auth:
    """Operator tokens and the bearer-token check every API request goes through."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._touched: dict[int, float] = {}
        self._lock = threading.Lock()

    def create_token(self, name: str, role: str, actor: str, now: float) -> Issued:
        """Create an operator token; the plaintext is in the result and nowhere else.

        Raises:
            InvalidRequestError: a bad name or an unknown role.
            ConflictError: a token of that name exists.
        """
        if not NAME_RE.match(name):
            raise InvalidRequestError(f"token name {name!r}: letters, digits, '_', '.', '@' "
                                      "or '-', at most 64", field="name")
        if role not in ROLES:
            raise InvalidRequestError(f"role {role!r} must be one of {', '.join(ROLES)}",
                                      field="role")
        secret = new_secret(TOKEN_PREFIX)
        with self.store.transaction():
            self.store.add_token(name, role, secret_hash(secret), actor, now)
            self.store.audit(actor, "token.create", f"token:{name}", {"role": role}, now)
        return Issued(name, secret, role)

    def list_tokens(self) -> list[Token]:
        return self.store.list_tokens()

    def revoke_token(self, name: str, actor: str, now: float) -> Token:
        """Raises: NotFoundError: no token of that name."""
        with self.store.transaction():
            token = self.store.revoke_token(name, now)
            self.store.audit(actor, "token.revoke", f"token:{name}", {}, now)
        return token

    def authenticate(self, authorization: str | None, now: float) -> Principal:
        """The principal behind an ``Authorization: Bearer …`` header.

        Raises:
            AuthenticationError: no header, not a bearer token, or a token the server
                does not know (or has revoked).
        """
        if not authorization:
            raise AuthenticationError("no credentials: send Authorization: Bearer <token>")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN:
            raise AuthenticationError("expected Authorization: Bearer <token>")
        digest = secret_hash(token)
        if token.startswith(DEVICE_PREFIX):
            device = self.store.device_by_secret(digest)
            if device is None:
                raise AuthenticationError("unknown device credential")
            return Principal("device", device)
        found = self.store.token_by_hash(digest) if token.startswith(TOKEN_PREFIX) else None
        if found is None:
            raise AuthenticationError("unknown token")
        return self.principal_of(found, now)

    def principal_of(self, found: Token, now: float) -> Principal:
        """The principal of a stored operator token (found by its hash, or through a
        dashboard session that signs it in).

        Raises:
            AuthenticationError: the token was revoked.
        """
        if found.revoked is not None:
            raise AuthenticationError(f"token {found.name!r} was revoked")
        self._touch(found, now)
        return Principal("operator", found.name, found.role)

    def _touch(self, token: Token, now: float) -> None:
        with self._lock:
            last = self._touched.get(token.id, token.last_used or 0.0)
            if now - last < _TOUCH_EVERY_S:
                return
            self._touched[token.id] = now
        self.store.touch_token(token.id, now)

    @staticmethod
    def require(principal: Principal, role: str) -> None:
        """Raises: PermissionDeniedError: the principal lacks ``role``."""
        if principal.kind != "operator":
            raise PermissionDeniedError(f"{principal.actor} may only download bundles and "
                                        "read its own desired state")
        if not principal.has_role(role):
            raise PermissionDeniedError(f"token {principal.name!r} has role "
                                        f"{principal.role!r}; this needs {role!r}")
