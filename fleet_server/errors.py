"""The fleet server's error tree, and the HTTP status each kind of refusal maps to.

Services raise these; the API's one exception handler (:mod:`fleet_server.api.errors`)
turns them into ``{"error": {"type": ..., "message": ...}}`` with the status below; the
CLI prints the message on one line and exits non-zero. Every message names the device,
bundle, group, token or field at fault.

    EdgefleetError                     (edgefleet.errors)
    └── FleetError                     500 unless a subclass says otherwise
        ├── NotFoundError              404 a device, bundle, group, alert ... does not exist
        ├── ConflictError              409 it exists already, or differs from what exists
        │   └── GovernanceError        409 the bundle's governance does not allow it
        │       ├── ReviewOverdueError 409 the bundle is past its review date
        │       └── RequirementsMissingError  409 the group requires what the bundle lacks
        ├── AuthenticationError        401 no token, an unknown or a revoked one
        ├── PermissionDeniedError      403 a valid token whose role does not allow this
        ├── InvalidRequestError        422 a request value refused (names the field)
        │   ├── BundleReferenceError   422 a verified bundle whose reference.json is unusable
        │   ├── UnknownRequirementError 422 a group requirement that does not exist
        │   └── ReservedNameError      422 a device id in the service accounts' namespace
        ├── PayloadTooLargeError       413 an upload past the configured limit
        ├── UnavailableError           503 a dependency (the broker) is not reachable now
        │   └── BrokerStartError       503 Mosquitto missing, exited at start, or not listening
        ├── StoreError                 500 the database failed
        │   ├── SchemaVersionError     500 the database is newer than this code
        │   ├── TargetNotEmptyError    500 a copy's target holds rows (``fleet db migrate``)
        │   └── CopyCountError         500 a copied table's counts differ (names the table)
        ├── ConfigError                a setting refused at start-up (names the setting)
        ├── ClientError                the CLI's view of a refusal: the server's status and type
        ├── RolloutError               (fleet_server.rollouts.errors; each refusal is also the
        │                               error of its kind above: a plan InvalidRequestError,
        │                               a transition ConflictError, an approval
        │                               PermissionDeniedError)
        └── OutcomeQueueFullError      409 an outcomes upload past a device's cap
                                       (fleet_server.telemetry.outcomes, beside the
                                       OutcomeError family of InvalidRequestError, 422)

Bundle refusals keep their own classes from :mod:`edgefleet.contract.errors` (``SignatureError``,
``DigestMismatchError``, ...): the handler maps them to 400 (not a bundle at all), 413
(a size limit) or 422 (everything else), with the class name as the error type.

This module deliberately holds no HTTP machinery: ``status`` is plain data.
"""

from __future__ import annotations

from typing import ClassVar

from edgefleet.errors import EdgefleetError

__all__ = [
    "AuthenticationError",
    "BrokerStartError",
    "BundleReferenceError",
    "ClientError",
    "ConfigError",
    "ConflictError",
    "CopyCountError",
    "FleetError",
    "GovernanceError",
    "InvalidRequestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RequirementsMissingError",
    "ReservedNameError",
    "ReviewOverdueError",
    "SchemaVersionError",
    "StoreError",
    "TargetNotEmptyError",
    "UnavailableError",
    "UnknownRequirementError",
]


class FleetError(EdgefleetError):
    """Base of every error the fleet server raises on purpose."""

    status: ClassVar[int] = 500


class NotFoundError(FleetError):
    """A named thing does not exist; ``kind`` and ``key`` say which."""

    status = 404

    def __init__(self, kind: str, key: str, message: str | None = None) -> None:
        super().__init__(message or f"{kind} {key!r} not found")
        self.kind = kind
        self.key = key


class ConflictError(FleetError):
    """The thing exists already, or the request contradicts what is stored."""

    status = 409


class GovernanceError(ConflictError):
    """A rollout or desired-state assignment the bundle's governance does not allow;
    ``bundle`` names the bundle (``name@version``)."""

    def __init__(self, message: str, *, bundle: str) -> None:
        super().__init__(message)
        self.bundle = bundle


class ReviewOverdueError(GovernanceError):
    """The bundle is past its review date (the card's, or the latest approver's renewal)
    and no approver has re-approved it with a new date."""

    def __init__(self, message: str, *, bundle: str, review_by: str) -> None:
        super().__init__(message, bundle=bundle)
        self.review_by = review_by


class RequirementsMissingError(GovernanceError):
    """The group requires what the bundle lacks; ``missing`` names each requirement."""

    def __init__(self, message: str, *, bundle: str, group: str,
                 missing: tuple[str, ...]) -> None:
        super().__init__(message, bundle=bundle)
        self.group = group
        self.missing = missing


class AuthenticationError(FleetError):
    """No credentials, or credentials the server does not know (or revoked)."""

    status = 401


class PermissionDeniedError(FleetError):
    """Valid credentials whose role does not allow the request."""

    status = 403


class InvalidRequestError(FleetError):
    """A request value is refused; ``field`` names it."""

    status = 422

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BundleReferenceError(InvalidRequestError):
    """A correctly signed bundle whose ``reference.json`` cannot be used for drift."""


class ReservedNameError(InvalidRequestError):
    """A device id (or service account) on the wrong side of the service accounts'
    namespace (:mod:`fleet_server.registry.accounts`): a device named like the server's account
    would get its broker rights, or lock ``fleet broker-config`` out."""


class UnknownRequirementError(InvalidRequestError):
    """A group requirement that is none of the known ones (the message names it)."""


class PayloadTooLargeError(FleetError):
    """An upload larger than the configured limit; nothing was stored."""

    status = 413


class UnavailableError(FleetError):
    """A dependency the request needs (the MQTT broker) is not reachable right now."""

    status = 503


class StoreError(FleetError):
    """The database failed (locked past the timeout, disk full, corrupt)."""


class SchemaVersionError(StoreError):
    """The database was migrated by a newer fleet server than this one."""


class TargetNotEmptyError(StoreError):
    """``fleet db migrate`` refuses a target database that holds rows, unless forced."""


class CopyCountError(StoreError):
    """A table copied between databases does not hold as many rows as its source."""


class BrokerStartError(UnavailableError):
    """Mosquitto is not installed, exited at start, or did not listen in time."""


class ClientError(FleetError):
    """The server refused a request (``status``, ``kind`` from its answer) or is unreachable
    (``status`` 0). Raised by the CLI's HTTP client, never by the server."""

    def __init__(self, message: str, *, status: int = 0, kind: str = "") -> None:
        super().__init__(message)
        self.status = status  # type: ignore[misc]
        self.kind = kind


class ConfigError(FleetError):
    """A server setting is refused when the configuration is built; the message names it.

    Raised at start-up, before any thread runs, so a bad setting never fails later in a
    worker."""
