"""The device daemon's error tree: everything ``edge-agent`` refuses on its own account.

Contract refusals (a bad bundle, a bad input row, a malformed message) are the contracts'
own types in :mod:`edgefleet.contract.errors`; these are the agent's. Each class is
imported by the module that raises it, so ``edge_agent.download.DownloadError`` and
``edge_agent.errors.DownloadError`` are one class.

    EdgefleetError                       (edgefleet.errors)
    └── AgentError
        ├── ConfigError                  the configuration cannot be used (names the key)
        ├── SlotError                    the data directory cannot be used
        ├── LoadError                    a verified bundle could not be loaded
        ├── NoModelError                 nothing installed yet: nothing to serve
        ├── PredictError                 the runtime failed on input that passed the checks
        ├── InstallError                 an install step failed (the reason is reported)
        ├── DownloadError                a bundle download failed (names the URL, never the token)
        │   ├── TransferError            the connection failed (``retryable`` says whether to retry)
        │   ├── DownloadTooLargeError    more bytes than the limit or than announced
        │   └── DownloadDigestError      not the sha256 or length the desired state names
        ├── OutboxError                  the outbox refused a message or its file failed
        │   └── OutboxFullError          the disk or the page limit is full
        ├── MqttError                    the MQTT link refused a request
        ├── PredictionIdError            caller prediction ids: a wrong count, a bad or repeated id
        ├── OutcomeError                 an outcome the caller sent directly was refused
        │   └── OutcomeLabelError        a label outside the bundle's classes (names the id)
        ├── PredictionStoreError         the prediction store's file failed
        └── CaptureError                 data capture: its queue file, or an upload that failed
"""

from __future__ import annotations

from pathlib import Path

from edgefleet.errors import EdgefleetError

__all__ = [
    "AgentError",
    "CaptureError",
    "ConfigError",
    "DownloadDigestError",
    "DownloadError",
    "DownloadTooLargeError",
    "InstallError",
    "LoadError",
    "MqttError",
    "NoModelError",
    "OutboxError",
    "OutboxFullError",
    "OutcomeError",
    "OutcomeLabelError",
    "PredictError",
    "PredictionIdError",
    "PredictionStoreError",
    "SlotError",
    "TransferError",
]


class AgentError(EdgefleetError):
    """Base of the device daemon's own errors."""


class ConfigError(AgentError):
    """The configuration cannot be used; ``key`` names the setting at fault."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class SlotError(AgentError):
    """The data directory cannot be used (permissions, a full disk, a corrupt state file)."""


class LoadError(AgentError):
    """A verified bundle could not be loaded (its model, reference or samples)."""


class NoModelError(AgentError):
    """No bundle is installed yet: there is nothing to serve."""


class PredictError(AgentError):
    """The model failed on input that passed the schema checks (a runtime error)."""


class InstallError(AgentError):
    """An install step failed; the message is the reason reported to the server."""


class DownloadError(AgentError):
    """A bundle download failed; the message names the URL (never the token)."""

    retryable = False


class TransferError(DownloadError):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class DownloadTooLargeError(DownloadError):
    """More bytes than the limit, or than the desired state announced."""


class DownloadDigestError(DownloadError):
    """The downloaded bytes do not have the sha256 (or length) the desired state names."""


class OutboxError(AgentError):
    """The outbox refused a message or its file failed; ``path`` names the file."""

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class OutboxFullError(OutboxError):
    """The disk (or the configured page limit) is full; the operation stored nothing."""


class MqttError(AgentError):
    """The MQTT link refused a request (an invalid topic, a link that is not started)."""


class PredictionIdError(AgentError):
    """Caller-given prediction ids cannot be used: not one per row, not a valid id
    (:data:`~edgefleet.contract.messages.ID_RE`), or one repeated in the call. ``field`` is
    ``ids``; ``row`` the index of the id at fault (None for a wrong count)."""

    field = "ids"

    def __init__(self, message: str, *, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


class OutcomeError(AgentError):
    """An outcome a caller sent directly (Python API, local HTTP) was refused; ``id`` names
    the prediction id when one is at fault."""

    def __init__(self, message: str, *, id: str | None = None) -> None:
        super().__init__(message)
        self.id = id


class OutcomeLabelError(OutcomeError):
    """A label outside the predicting bundle's classes (or, for a regressor, not a finite
    number). Counted as ``bad_label`` instead when it came in a batch from the server."""


class PredictionStoreError(AgentError):
    """The prediction store's SQLite file failed (or is closed)."""


class CaptureError(AgentError):
    """Data capture: the queue file cannot be used, a bad setting, or an upload failed
    (the batch stays queued and goes again)."""
