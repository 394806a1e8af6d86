"""The server's typed configuration: every bound and interval, with its documented default.

``fleet serve`` and ``fleet ingest`` build a :class:`ServerConfig` from their options;
tests build one directly. Every value is checked in ``__post_init__`` so a bad setting
fails at start-up with the setting's name, not later in a worker thread.

This module reads no files and no environment (the CLI does), and holds no secrets
beyond the broker password, which never appears in ``repr``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from edgefleet.contract.bundle import Limits
from edgefleet.contract.errors import SchemaError
from fleet_server.errors import ConfigError
from fleet_server.models import POSTGRESQL, SQLITE, Database
from fleet_server.profiles.drift import Thresholds
from fleet_server.profiles.performance import Tolerances

__all__ = [
    "DEFAULT_CAPTURE",
    "DEFAULT_DRIFT",
    "DEFAULT_INGEST",
    "DEFAULT_OUTCOMES",
    "DEFAULT_PERFORMANCE",
    "DRIFT_KEYS",
    "PERFORMANCE_KEYS",
    "SERVER_ROLES",
    "BrokerConfig", "CaptureConfig", "DriftConfig", "IngestConfig", "OutcomeConfig",
    "PerformanceConfig",
    "ServerConfig",
    "WebhookConfig",
    "drift_overrides",
    "performance_overrides",
]


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class BrokerConfig:
    """The server's MQTT connection (account ``server`` in the broker's ACL).

    ``share``: the shared-subscription group (``$share/<share>/...``) ingest joins, so
    several workers split the load; None subscribes plainly (one worker gets everything,
    and retained status messages too, which shared subscriptions never receive).
    ``receive_maximum``: most un-acknowledged QoS 1 messages the broker may send us; the
    ingest queue can never hold more, which bounds memory without blocking paho's thread.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    username: str = "server"
    password: str = field(default="", repr=False)
    # the session the broker keeps while the server is away (restart, crash, upgrade):
    # its subscriptions' messages are queued for it, so nothing a device sent is lost.
    # The client id must then be stable across restarts: "" = fleet-serve, or for
    # `fleet ingest` fleet-ingest-<host>-<share> (set it when one host runs several)
    client_id: str = ""
    session_expiry_s: int = 86_400  # 0: clean sessions (messages sent while away are lost)
    tls_ca: Path | None = None
    share: str | None = None
    keepalive: int = 30
    receive_maximum: int = 2000
    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"broker port must be 1..65535, got {self.port}")
        if not 1 <= self.receive_maximum <= 65535:
            raise ConfigError("receive_maximum must be 1..65535 (MQTT 5)")
        if self.share is not None and (not self.share or any(c in self.share for c in "/+#")):
            raise ConfigError(f"share group {self.share!r}: no '/', '+' or '#'")
        _positive("reconnect_min_delay", self.reconnect_min_delay)
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise ConfigError("reconnect_max_delay must be >= reconnect_min_delay")


@dataclass(frozen=True)
class IngestConfig:
    """Batching, bounds and time rules of the ingest worker.

    A batch is written in one transaction and acknowledged to the broker after its commit:
    at most ``batch_max`` messages, and the first of them waits at most ``batch_wait_s``.
    ``levels``: rollup bucket widths in seconds, finest first, each a multiple of the one
    before; a report reads the coarsest buckets that fit its range.
    """

    batch_max: int = 500
    batch_wait_s: float = 0.05
    levels: tuple[int, ...] = (60, 3600)
    max_clock_skew_s: float = 24 * 3600.0  # windows ending further in the future: refused
    dead_letter_payload_bytes: int = 4096  # prefix of a refused payload kept for diagnosis
    dead_letter_keep: int = 100_000  # rows; older ones are pruned
    # about 10.8 MiB per device-day at 60-s windows, mostly the finest rollups (fleet_sim):
    # these bounds hold a device at about 100 MiB (README, "Beyond one machine")
    retention_s: float = 7 * 24 * 3600.0  # summaries and the finest rollups
    coarse_retention_s: float = 180 * 24 * 3600.0  # coarser rollups

    def __post_init__(self) -> None:
        if self.batch_max < 1:
            raise ConfigError("batch_max must be >= 1")
        _positive("batch_wait_s", self.batch_wait_s)
        if not self.levels or any(w < 1 for w in self.levels):
            raise ConfigError("levels must be positive widths in seconds")
        for fine, coarse in pairwise(self.levels):
            if coarse <= fine or coarse % fine:
                raise ConfigError(f"level {coarse} s is not a multiple of {fine} s")
        if 86400 % self.levels[0] and self.levels[0] % 86400:
            raise ConfigError("the finest level must divide a day (or be whole days)")
        for name in ("max_clock_skew_s", "retention_s", "coarse_retention_s"):
            _positive(name, getattr(self, name))
        if self.dead_letter_payload_bytes < 0 or self.dead_letter_keep < 1:
            raise ConfigError("dead-letter bounds must be positive")


# the drift settings a group may set for itself, and `fleet serve --drift` for the server:
# every threshold of the statistics and of the group rule, persistence, and lateness
DRIFT_KEYS = (*(f.name for f in fields(Thresholds)), "lateness_s")
_DRIFT_INTS = ("min_rows", "group_min", "persistence", "persistence_of")
MAX_LATENESS_S = 7 * 86400.0
MAX_PERSISTENCE_OF = 100  # windows the evaluator reads back (and catches up) per scope


def _setting(where: str, key: str, raw: Any, known: tuple[str, ...]) -> float:
    """One ``key: raw`` of a group's partial setting, as a number (text too, as
    ``KEY=VALUE`` options give them; not a bool).

    Raises:
        ConfigError: ``key`` is not in ``known`` (listed), or ``raw`` is not a number.
    """
    if key not in known:
        raise ConfigError(f"{where}: unknown setting {key!r} (one of {', '.join(known)})")
    try:
        if isinstance(raw, bool):
            raise ValueError
        return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{key}: {raw!r} is not a number") from None


def drift_overrides(values: Mapping[str, Any], where: str = "drift") -> dict[str, float | int]:
    """Check a partial drift setting (``{"importance_share": 0.2, "persistence": 3}``):
    known keys, numbers (text too, as ``KEY=VALUE`` options give them), whole numbers where
    a count is meant. Ranges are checked when applied (:meth:`DriftConfig.with_overrides`).

    Raises:
        ConfigError: an unknown key (the known ones listed) or a value that is not a
            finite number, naming ``where.key``.
    """
    out: dict[str, float | int] = {}
    for key, raw in values.items():
        value = _setting(where, key, raw, DRIFT_KEYS)
        if not math.isfinite(value):
            raise ConfigError(f"{where}.{key}: must be finite")
        if key in _DRIFT_INTS:
            if value != int(value):
                raise ConfigError(f"{where}.{key}: must be a whole number, got {raw!r}")
            out[key] = int(value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class DriftConfig:
    """The periodic evaluation: every ``window_s`` (a multiple of the finest rollup level)
    each bundle with data is judged per group and for the whole fleet, once the window is
    ``lateness_s`` old (late summaries still count in on-demand reports). A group may set
    its own thresholds and lateness (:meth:`with_overrides`)."""

    thresholds: Thresholds = Thresholds()
    window_s: int = 300
    lateness_s: float = 120.0
    suspect_sensors: bool = True
    max_series_points: int = 500
    max_device_reports: int = 20_000  # devices judged one by one per window and group

    def __post_init__(self) -> None:
        if self.window_s < 1:
            raise ConfigError("window_s must be >= 1")
        if not 0 <= self.lateness_s <= MAX_LATENESS_S:
            raise ConfigError(f"lateness_s must be >= 0 and <= {MAX_LATENESS_S:.0f}")
        if self.thresholds.persistence_of > MAX_PERSISTENCE_OF:
            raise ConfigError(f"persistence_of must be <= {MAX_PERSISTENCE_OF}")
        if self.max_series_points < 1 or self.max_device_reports < 0:
            raise ConfigError("series and device-report bounds must be positive")

    def settings(self) -> dict[str, Any]:
        """Every :data:`DRIFT_KEYS` setting in force (what ``fleet drift`` shows)."""
        return {**self.thresholds.to_dict(), "lateness_s": self.lateness_s}

    def with_overrides(self, overrides: Mapping[str, Any], where: str = "drift"
                       ) -> DriftConfig:
        """This configuration with some :data:`DRIFT_KEYS` settings replaced (a group's).

        Raises:
            ConfigError: an unknown key or a bad value, named (also a combination this
                configuration's other values make invalid, e.g. psi_warn above psi_drift).
        """
        checked = drift_overrides(overrides, where)
        if not checked:
            return self
        lateness = checked.pop("lateness_s", self.lateness_s)
        try:
            thresholds = Thresholds.from_dict({**self.thresholds.to_dict(), **checked}, where)
        except SchemaError as exc:
            raise ConfigError(str(exc)) from exc
        if not 0 <= lateness <= MAX_LATENESS_S:
            raise ConfigError(f"{where}.lateness_s: must be >= 0 and <= {MAX_LATENESS_S:.0f}")
        if thresholds.persistence_of > MAX_PERSISTENCE_OF:
            raise ConfigError(f"{where}.persistence_of: must be <= {MAX_PERSISTENCE_OF}")
        return replace(self, thresholds=thresholds, lateness_s=float(lateness))


@dataclass(frozen=True)
class OutcomeConfig:
    """Outcomes uploaded centrally and routed to their devices
    (:mod:`fleet_server.telemetry.routing`).

    ``max_undelivered``: outcomes a device may have queued and not receipted; an upload
    that would pass it is refused whole. ``window``: batches published to a device ahead of
    its receipt (each at most 1,000 outcomes and 127 kB). ``resend_s``: a batch sent this
    long ago without a receipt is sent again. ``tick_s``: how often the router looks for
    what is due (an upload, a receipt or a device coming online in the same process wakes
    it at once). ``max_upload_bytes``: the body of one ``POST /api/v1/outcomes``.
    """

    max_undelivered: int = 1_000_000
    window: int = 16
    resend_s: float = 30.0
    tick_s: float = 1.0
    max_per_tick: int = 2000  # batches published per pass, then the next pass goes on
    max_upload_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_undelivered < 1 or self.window < 1 or self.max_per_tick < 1:
            raise ConfigError("outcome bounds (max_undelivered, window, max_per_tick) must "
                              "be >= 1")
        _positive("resend_s", self.resend_s)
        _positive("tick_s", self.tick_s)
        if self.max_upload_bytes < 1:
            raise ConfigError("outcomes max_upload_bytes must be >= 1")


@dataclass(frozen=True)
class PerformanceConfig:
    """Realized and estimated performance: reports, and the alerts the evaluator raises.

    On each of the drift evaluator's runs, every bundle with performance entries in the
    last ``window_s`` is judged over that range (sliding: labels arrive late and sparse),
    for the fleet and every group, against its packaged metrics with ``tolerances``
    (:class:`~fleet_server.profiles.performance.Tolerances`). ``max_entries`` bounds the
    entries one report or judgement merges.
    """

    tolerances: Tolerances = Tolerances()
    window_s: float = 86400.0
    alerts: bool = True
    max_entries: int = 100_000

    def __post_init__(self) -> None:
        _positive("performance window_s", self.window_s)
        if self.max_entries < 1:
            raise ConfigError("performance max_entries must be >= 1")

    def tolerances_for(self, overrides: Mapping[str, Any], where: str = "performance",
                       ) -> Tolerances:
        """The server's tolerances with some :data:`PERFORMANCE_KEYS` replaced (a group's).

        Raises:
            ConfigError: an unknown key or a bad value, named.
        """
        checked = performance_overrides(overrides, where)
        return replace(self.tolerances, **checked) if checked else self.tolerances


# the performance settings a group may set for itself over the server's (`fleet serve
# --performance`): the alert tolerances
PERFORMANCE_KEYS = tuple(f.name for f in fields(Tolerances))


def performance_overrides(values: Mapping[str, Any], where: str = "performance",
                          ) -> dict[str, float | int]:
    """Check a partial performance setting (``{"rate": 0.02}``): known keys, finite numbers
    (text too), whole numbers for the row counts, each in its range.

    Raises:
        ConfigError: an unknown key (the known ones listed) or a bad value, naming
            ``where.key``.
    """
    out: dict[str, float | int] = {}
    for key, raw in values.items():
        value = _setting(where, key, raw, PERFORMANCE_KEYS)
        if key in ("min_labelled", "min_served"):
            if not math.isfinite(value) or value != int(value):
                raise ConfigError(f"{where}.{key}: must be a whole number, got {raw!r}")
            out[key] = int(value)
        else:
            out[key] = value
    try:
        replace(Tolerances(), **out)
    except SchemaError as exc:
        raise ConfigError(f"{where}.{str(exc).partition('performance.')[2]}") from exc
    return out


@dataclass(frozen=True)
class CaptureConfig:
    """Data capture: rows devices upload for retraining (``POST /api/v1/capture``).

    ``retention_s``: captured rows (and the batch ids and central labels kept to
    de-duplicate and join them) older than this are deleted by housekeeping.
    ``max_bytes``: the disk budget of captured rows (their JSON columns): past it
    housekeeping deletes the oldest rows first. ``max_batch_bytes``: the body of one upload.
    ``max_export_rows``: the most rows one ``/api/v1/capture/export`` returns.
    """

    retention_s: float = 30 * 86400.0
    max_bytes: int = 1024 * 1024 * 1024
    max_batch_bytes: int = 4 * 1024 * 1024
    max_export_rows: int = 1_000_000

    def __post_init__(self) -> None:
        _positive("capture retention_s", self.retention_s)
        if min(self.max_bytes, self.max_batch_bytes, self.max_export_rows) < 1:
            raise ConfigError("capture bounds (max_bytes, max_batch_bytes, max_export_rows) "
                              "must be >= 1")


DEFAULT_CAPTURE = CaptureConfig()
DEFAULT_INGEST = IngestConfig()
DEFAULT_DRIFT = DriftConfig()
DEFAULT_OUTCOMES = OutcomeConfig()
DEFAULT_PERFORMANCE = PerformanceConfig()


@dataclass(frozen=True)
class WebhookConfig:
    """Where alerts are POSTed (the retraining trigger), and how hard to try."""

    url: str | None = None
    secret: str = field(default="", repr=False)  # set: body signed with HMAC-SHA256
    timeout_s: float = 5.0
    max_attempts: int = 5
    backoff_s: float = 1.0  # first retry after this, doubling ...
    backoff_max_s: float = 60.0  # ... up to this
    queue_max: int = 1000

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"webhook URL {self.url!r} must be http:// or https://")
        if self.max_attempts < 1 or self.queue_max < 1:
            raise ConfigError("webhook attempts and queue must be >= 1")
        _positive("timeout_s", self.timeout_s)
        _positive("backoff_s", self.backoff_s)


# what one `fleet serve` process runs: ``api`` the REST API and dashboard (any number of
# replicas), ``ingest`` an ingest worker (any number, a shared subscription each), ``engine``
# the rollout engine, the drift evaluator with housekeeping and the webhook sender, active in
# one process at a time (elected through the database; the others stand by), ``all`` of them
SERVER_ROLES = ("all", "api", "ingest", "engine")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``fleet serve`` runs with. ``db`` is a SQLite file or a database URL
    (:class:`~fleet_server.models.Database`); ``bundle_dir`` defaults to ``<db>.bundles``
    beside a SQLite file, and must be given with a server database."""

    db: Path | str
    bundle_dir: Path | None = None
    broker: BrokerConfig | None = None  # None: no MQTT (API only; no ingest, no publishing)
    ingest: bool = True  # run the ingest worker in this process
    ingest_config: IngestConfig = IngestConfig()
    drift: DriftConfig = DriftConfig()
    evaluate: bool = True  # run the periodic drift evaluator in this process
    performance: PerformanceConfig = PerformanceConfig()
    webhook: WebhookConfig = WebhookConfig()
    trust: tuple[str, ...] = ()  # ROLE=PATH public keys, as TrustStore.from_files takes
    threshold: int = 1  # trusted signatures an upload needs
    required_roles: frozenset[str] = frozenset()
    limits: Limits = Limits()
    max_upload_bytes: int = 256 * 1024 * 1024
    # any other API request body (JSON): refused past this while streaming, and before
    # reading when Content-Length says so (fleet_server.api.guard)
    max_request_bytes: int = 1024 * 1024
    host: str = "127.0.0.1"
    port: int = 8000
    rollout_tick_s: float = 5.0  # how often the rollout engine judges every rollout
    role: str = "all"  # SERVER_ROLES
    election_s: float = 1.0  # how often a standby engine tries to lead, a leader checks
    max_gate_summaries: int = 20_000  # summaries one gate window reads, per side at most
    outcomes: OutcomeConfig = OutcomeConfig()
    capture: CaptureConfig = CaptureConfig()

    def __post_init__(self) -> None:
        if self.role not in SERVER_ROLES:
            raise ConfigError(f"role {self.role!r}: one of {', '.join(SERVER_ROLES)}")
        if not 0 < self.election_s <= 5:
            raise ConfigError("election_s must be > 0 and <= 5 (a standby takes over within "
                              "a few of them)")
        where = Database.parse(self.db)
        if where.kind not in (SQLITE, POSTGRESQL):
            raise ConfigError(f"db {where.label!r}: not a file path, sqlite:///path or "
                              "postgresql://user@host/dbname")
        if where.kind != SQLITE and self.bundle_dir is None:
            raise ConfigError(f"db {where.label!r}: bundle files live outside the database; "
                              "name their directory (bundle_dir, --bundle-dir)")
        if not (isinstance(self.rollout_tick_s, (int, float)) and self.rollout_tick_s > 0
                and self.rollout_tick_s < float("inf")):
            raise ConfigError("rollout_tick_s must be a number > 0")
        if self.max_gate_summaries < 1:
            raise ConfigError("max_gate_summaries must be >= 1")
        if self.threshold < 1:
            raise ConfigError("threshold must be >= 1")
        if self.max_upload_bytes < 1:
            raise ConfigError("max_upload_bytes must be >= 1")
        if self.max_request_bytes < 1:
            raise ConfigError("max_request_bytes must be >= 1")
        if self.drift.window_s % self.ingest_config.levels[0]:
            raise ConfigError(f"the drift window ({self.drift.window_s} s) must be a multiple "
                             f"of the finest rollup level ({self.ingest_config.levels[0]} s)")

    @property
    def bundles_path(self) -> Path:
        if self.bundle_dir is not None:
            return self.bundle_dir
        path = Database.parse(self.db).path
        assert path is not None  # __post_init__ refused a server database without bundle_dir
        return path.with_name(path.name + ".bundles")
