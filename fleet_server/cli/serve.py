"""``fleet serve`` and ``fleet ingest``: run the server, or an ingest worker alone."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any

import click

from edgefleet.cli import JsonLogFormatter
from fleet_server.cli.util import DB_OPTION, exits_on_error, pairs
from fleet_server.config import SERVER_ROLES

__all__ = ["drift_config", "ingest", "serve", "tune_gc"]


def _broker(value: str | None, user: str, password_file: Path | None, tls_ca: Path | None,
            share: str | None, receive_maximum: int, client_id: str = ""):
    from fleet_server.config import BrokerConfig

    if value is None:
        return None
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "1883")
    password = os.environ.get("FLEET_BROKER_PASSWORD", "")
    if password_file is not None:
        password = password_file.read_text().strip()
    return BrokerConfig(host=host or "127.0.0.1", port=int(port), username=user,
                        password=password, tls_ca=tls_ca, share=share,
                        receive_maximum=receive_maximum, client_id=client_id)


def _server_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        DB_OPTION,
        click.option("--broker", default=None, metavar="HOST[:PORT]",
                     help="The MQTT broker; without it, no ingest and no desired-state "
                          "publishing."),
        click.option("--broker-user", default="server", show_default=True,
                     help="The server's MQTT account."),
        click.option("--broker-password-file", type=click.Path(path_type=Path,
                     exists=True, dir_okay=False), default=None,
                     help="File holding the MQTT password (else env FLEET_BROKER_PASSWORD)."),
        click.option("--tls-ca", type=click.Path(path_type=Path, exists=True), default=None,
                     help="CA certificate: connect to the broker with TLS."),
        click.option("--receive-maximum", type=int, default=2000, show_default=True,
                     help="Most unacknowledged messages the broker may send at once."),
        click.option("--batch-max", type=int, default=500, show_default=True,
                     help="Most messages per ingest transaction."),
        click.option("--bundle-dir", type=click.Path(path_type=Path), default=None,
                     help="Where bundle files go (default: <db>.bundles beside a SQLite "
                          "file; required with a postgresql:// database)."),
    ]
    fn = json_logs(fn)
    for option in reversed(options):
        fn = option(fn)
    return fn


def json_logs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` for a long-running command: its log lines as JSON objects on stderr."""
    @wraps(fn)
    def run(*args: Any, as_json: bool, **kwargs: Any) -> Any:
        if as_json:
            for handler in logging.getLogger().handlers:
                handler.setFormatter(JsonLogFormatter())  # edgefleet.cli's
        return fn(*args, **kwargs)
    return click.option("--json", "as_json", is_flag=True,
                        help="Log one JSON object a line on stderr (for log shippers).")(run)


def drift_config(window: int, settings: Sequence[str]):
    """The drift configuration of ``--window`` and the ``--drift KEY=VALUE`` settings.

    Raises:
        click.BadParameter: a setting that is not KEY=VALUE. ConfigError: an unknown key
            or a bad value (named).
    """
    from fleet_server.config import DriftConfig

    return DriftConfig(window_s=window).with_overrides(pairs(settings, "--drift"), "--drift")


def _ingest_config(batch_max: int):
    from fleet_server.config import IngestConfig

    return IngestConfig(batch_max=batch_max)


def tune_gc() -> None:
    """Collect less often: ingest makes thousands of short-lived objects per message (JSON
    parsing), and at CPython's default gen-0 threshold of 700 the collector ran every
    message or so, a fifth of ingest's CPU (measured, benchmarks/server.py). Objects alive
    after start-up are frozen out of collections altogether."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


# the exit status of a server whose engine lease was lost: its supervisor restarts it,
# and it comes back as a standby
DEPOSED_EXIT = 3


def _run_until_signal(server: Any, http: bool) -> None:
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    server.on_deposed = lambda: os.kill(os.getpid(), signal.SIGTERM)
    try:
        server.start()  # inside: a SIGTERM while starting stops what did start
        tune_gc()
        if http:
            server.serve_http()
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    if server.deposed:
        click.echo("fleet: the engine lease was lost; exiting for a restart as a standby",
                   err=True)
        sys.exit(DEPOSED_EXIT)


def _performance_config(items: tuple[str, ...]) -> Any:
    from dataclasses import replace

    from edgefleet.parsing import parse_bounds
    from fleet_server.config import PerformanceConfig
    from fleet_server.profiles.performance import Tolerances

    given = parse_bounds(items, "--performance",
                         ("rate", "error", "min_labelled", "min_served", "window_s"))
    window = given.pop("window_s", None)
    tolerances = Tolerances(**{k: int(v) if k.startswith("min_") else v
                               for k, v in given.items()})
    config = PerformanceConfig(tolerances=tolerances)
    return config if window is None else replace(config, window_s=window)


@click.command(help="Run the fleet server: REST API, ingest worker, drift evaluator.")
@_server_options
@click.option("--role", type=click.Choice(SERVER_ROLES), default="all",
              show_default=True,
              help="What this process runs: api (REST API and dashboard; any number), ingest "
                   "(an ingest worker; any number, with --share), engine (rollouts, drift "
                   "evaluation, housekeeping, webhook: one active at a time, elected through "
                   "a PostgreSQL database, the others standing by), or all of them.")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP address.")
@click.option("--port", type=int, default=8000, show_default=True, help="HTTP port.")
@click.option("--trust", multiple=True, metavar="ROLE=PATH",
              help="A public key whose bundle signatures count (repeat).")
@click.option("--threshold", type=int, default=1, show_default=True,
              help="Trusted signatures an upload needs.")
@click.option("--require-role", multiple=True, help="A signer role uploads need (repeat).")
@click.option("--webhook", default=None, help="URL to POST alerts to (the retraining trigger).")
@click.option("--webhook-secret-file", type=click.Path(path_type=Path, exists=True),
              default=None, help="File with a secret: webhook bodies get an HMAC signature.")
@click.option("--window", type=int, default=300, show_default=True,
              help="Drift evaluation window, seconds (a multiple of 60).")
@click.option("--drift", "drift_settings", multiple=True, metavar="KEY=VALUE",
              help="A drift setting (repeat): statistic thresholds psi_warn (0.1), psi_drift "
                   "(0.25), ks_drift (0.1), wasserstein_drift (0.1), js_drift (0.1), "
                   "unseen_drift (0.01), rate_drift (0.05), min_rows; alpha (0.001), the "
                   "chance a statistic passes its no-drift bound without drift; the group rule "
                   "importance_share (0.3), without importances group_share (0.15) and "
                   "group_min (2); persistence (2) of persistence_of (3) windows; "
                   "lateness_s (120). A group's own settings go over these.")
@click.option("--ingest/--no-ingest", default=True, show_default=True,
              help="Run an ingest worker in this process.")
@click.option("--share", default=None, help="Join this shared-subscription group for ingest.")
@click.option("--max-upload-mb", type=int, default=256, show_default=True,
              help="Largest bundle upload, MiB.")
@click.option("--outcome-resend", type=float, default=30.0, show_default=True,
              help="Seconds after which an outcome batch without a receipt is sent again.")
@click.option("--max-undelivered-outcomes", type=int, default=1_000_000, show_default=True,
              help="Outcomes a device may have waiting; an upload past it is refused.")
@click.option("--capture-retention", default="30d", show_default=True,
              help="How long captured rows (data capture) are kept (30d, 12h).")
@click.option("--capture-budget-mb", type=click.IntRange(1), default=1024, show_default=True,
              help="Disk budget of captured rows, MiB: past it the oldest go first.")
@click.option("--rollout-tick", type=click.FloatRange(0.05, 3600), default=5.0,
              show_default=True, help="Seconds between the rollout engine's judgements.")
@click.option("--performance", "performance", multiple=True, metavar="NAME=VALUE",
              help="A performance alert setting (repeat): rate (absolute accuracy drop "
                   "tolerated, 0.05), error (relative MAE rise, 0.25), min_labelled (200), "
                   "min_served (500), window_s (the range judged, 86400).")
@exits_on_error
def serve(db: str, broker: str | None, broker_user: str, broker_password_file: Path | None,
          tls_ca: Path | None, receive_maximum: int, batch_max: int, bundle_dir: Path | None,
          role: str, host: str, port: int,
          trust: tuple[str, ...], threshold: int, require_role: tuple[str, ...],
          webhook: str | None, webhook_secret_file: Path | None, window: int,
          drift_settings: tuple[str, ...], ingest: bool, share: str | None,
          max_upload_mb: int, outcome_resend: float, max_undelivered_outcomes: int,
          capture_retention: str, capture_budget_mb: int,
          rollout_tick: float, performance: tuple[str, ...]) -> None:
    from edgefleet.parsing import parse_duration
    from fleet_server.config import CaptureConfig, OutcomeConfig, ServerConfig, WebhookConfig
    from fleet_server.models import Database
    from fleet_server.server import FleetServer

    if not trust:
        click.echo("fleet: warning: no --trust key: every bundle upload will be refused",
                   err=True)
    secret = webhook_secret_file.read_text().strip() if webhook_secret_file else ""
    drift = drift_config(window, drift_settings)
    config = ServerConfig(
        db=db, bundle_dir=bundle_dir,
        broker=_broker(broker, broker_user, broker_password_file, tls_ca, share,
                       receive_maximum),
        ingest=ingest, ingest_config=_ingest_config(batch_max), drift=drift,
        webhook=WebhookConfig(url=webhook, secret=secret), trust=trust, threshold=threshold,
        required_roles=frozenset(require_role), max_upload_bytes=max_upload_mb * 1024 * 1024,
        host=host, port=port, role=role, rollout_tick_s=rollout_tick,
        outcomes=OutcomeConfig(resend_s=outcome_resend,
                               max_undelivered=max_undelivered_outcomes),
        capture=CaptureConfig(
            retention_s=parse_duration(capture_retention, "--capture-retention"),
            max_bytes=capture_budget_mb * 1024 * 1024),
        performance=_performance_config(performance))
    http = role in ("all", "api")
    where = f"http://{host}:{port}" if http else f"role {role}"
    click.echo(f"fleet: serving {where} (database {Database.parse(db)})", err=True)
    _run_until_signal(FleetServer(config, publish_desired=role != "ingest"), http=http)


@click.command(help="Run an ingest worker alone, joining a shared subscription (scale-out).")
@_server_options
@click.option("--share", default="ingest", show_default=True,
              help="The shared-subscription group the workers split.")
@click.option("--client-id", default="",
              help="The MQTT client id, stable across restarts (its kept session holds the "
                   "worker's share meanwhile) [default: fleet-ingest-<host>-<share>]: set "
                   "one per worker when a host runs several over one broker account.")
@exits_on_error
def ingest(db: str, broker: str | None, broker_user: str, broker_password_file: Path | None,
           tls_ca: Path | None, receive_maximum: int, batch_max: int, bundle_dir: Path | None,
           share: str, client_id: str) -> None:
    from fleet_server.config import ServerConfig
    from fleet_server.models import Database
    from fleet_server.server import FleetServer

    if broker is None:
        raise click.UsageError("fleet ingest needs --broker")
    config = ServerConfig(db=db, bundle_dir=bundle_dir,
                          broker=_broker(broker, broker_user, broker_password_file,
                                         tls_ca, share, receive_maximum, client_id),
                          ingest_config=_ingest_config(batch_max), evaluate=False,
                          role="ingest")
    click.echo(f"fleet: ingest worker on {broker} (group {share}, database "
               f"{Database.parse(db)})", err=True)
    _run_until_signal(FleetServer(config, publish_desired=False), http=False)


# --------------------------------------------------------------------------- tokens


