"""``fleet``: run the fleet server, and operate a fleet through its REST API.

Server side, on the database directly: ``fleet serve``, ``fleet ingest``, ``fleet token
create|list|revoke``, ``fleet device add --db`` (and ``device passwd-file``). Everything
else talks HTTP to a running server: ``--server URL`` and ``--token`` (or the environment
variables ``FLEET_SERVER`` and ``FLEET_TOKEN``).

Commands only parse, call the library or the API, and print: readable tables for people,
``--json`` for scripts. A refusal prints one line, ``fleet: error: <message>``, and exits 1
(the server's message for HTTP errors).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fleet_server.cli_api import register
from fleet_server.cli_util import DB_OPTION, exits_on_error, pairs, print_json, stamp, table
from fleet_server.client import FleetClient

__all__ = ["main", "tune_gc"]


@click.group(help="The edgefleet fleet server and its operator CLI.")
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
              help="Logging level for server commands.")
def main(log_level: str) -> None:
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------- server


def _broker(value: str | None, user: str, password_file: Path | None, tls_ca: Path | None,
            share: str | None, receive_maximum: int):
    from fleet_server.config import BrokerConfig

    if value is None:
        return None
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "1883")
    password = os.environ.get("FLEET_BROKER_PASSWORD", "")
    if password_file is not None:
        password = password_file.read_text().strip()
    return BrokerConfig(host=host or "127.0.0.1", port=int(port), username=user,
                        password=password, tls_ca=tls_ca, share=share,
                        receive_maximum=receive_maximum)


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
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


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


def _run_until_signal(server: Any, http: bool) -> None:
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    server.start()
    tune_gc()
    try:
        if http:
            server.serve_http()
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@main.command(help="Run the fleet server: REST API, ingest worker, drift evaluator.")
@_server_options
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
@click.option("--ingest/--no-ingest", default=True, show_default=True,
              help="Run an ingest worker in this process.")
@click.option("--share", default=None, help="Join this shared-subscription group for ingest.")
@click.option("--bundle-dir", type=click.Path(path_type=Path), default=None,
              help="Where bundle files go (default: <db>.bundles).")
@click.option("--max-upload-mb", type=int, default=256, show_default=True,
              help="Largest bundle upload, MiB.")
@exits_on_error
def serve(db: Path, broker: str | None, broker_user: str, broker_password_file: Path | None,
          tls_ca: Path | None, receive_maximum: int, batch_max: int, host: str, port: int,
          trust: tuple[str, ...], threshold: int, require_role: tuple[str, ...],
          webhook: str | None, webhook_secret_file: Path | None, window: int, ingest: bool,
          share: str | None, bundle_dir: Path | None, max_upload_mb: int) -> None:
    from fleet_server.config import DriftConfig, ServerConfig, WebhookConfig
    from fleet_server.server import FleetServer

    if not trust:
        click.echo("fleet: warning: no --trust key: every bundle upload will be refused",
                   err=True)
    secret = webhook_secret_file.read_text().strip() if webhook_secret_file else ""
    config = ServerConfig(
        db=db, bundle_dir=bundle_dir,
        broker=_broker(broker, broker_user, broker_password_file, tls_ca, share,
                       receive_maximum),
        ingest=ingest, ingest_config=_ingest_config(batch_max), drift=DriftConfig(window_s=window),
        webhook=WebhookConfig(url=webhook, secret=secret), trust=trust, threshold=threshold,
        required_roles=frozenset(require_role), max_upload_bytes=max_upload_mb * 1024 * 1024,
        host=host, port=port)
    click.echo(f"fleet: serving http://{host}:{port} (database {db})", err=True)
    _run_until_signal(FleetServer(config), http=True)


@main.command(help="Run an ingest worker alone, joining a shared subscription (scale-out).")
@_server_options
@click.option("--share", default="ingest", show_default=True,
              help="The shared-subscription group the workers split.")
@exits_on_error
def ingest(db: Path, broker: str | None, broker_user: str, broker_password_file: Path | None,
           tls_ca: Path | None, receive_maximum: int, batch_max: int, share: str) -> None:
    from fleet_server.config import ServerConfig
    from fleet_server.server import FleetServer

    if broker is None:
        raise click.UsageError("fleet ingest needs --broker")
    config = ServerConfig(db=db, broker=_broker(broker, broker_user, broker_password_file,
                                                tls_ca, share, receive_maximum),
                          ingest_config=_ingest_config(batch_max), evaluate=False)
    click.echo(f"fleet: ingest worker on {broker} (group {share}, database {db})", err=True)
    _run_until_signal(FleetServer(config, publish_desired=False), http=False)


# --------------------------------------------------------------------------- tokens


@main.group(help="Operator tokens (on the database directly).")
def token() -> None:
    pass


@token.command("create", help="Create a token and print it (shown only once).")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator", "approver"]), required=True,
              help="viewer: read; operator: read and write; approver: operator and approve.")
@DB_OPTION
@exits_on_error
def token_create(name: str, role: str, db: Path) -> None:
    from fleet_server.auth import Auth
    from fleet_server.store import Store

    with Store(db) as store:
        issued = Auth(store).create_token(name, role, f"cli:{os.getenv('USER', 'local')}",
                                          time.time())
    click.echo(issued.secret)
    click.echo(f"token {name!r} ({role}) created; it is shown only now", err=True)


@token.command("list", help="List tokens (names and roles; never the tokens).")
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@exits_on_error
def token_list(db: Path, as_json: bool) -> None:
    from fleet_server.store import Store

    with Store(db) as store:
        tokens = store.list_tokens()
    if as_json:
        print_json([t.to_dict() for t in tokens])
        return
    click.echo(table(["name", "role", "created", "last used", "revoked"],
                     [[t.name, t.role, stamp(t.created), stamp(t.last_used),
                       stamp(t.revoked)] for t in tokens]))


@token.command("revoke", help="Revoke a token; requests with it are refused at once.")
@click.argument("name")
@DB_OPTION
@exits_on_error
def token_revoke(name: str, db: Path) -> None:
    from fleet_server.auth import Auth
    from fleet_server.store import Store

    with Store(db) as store:
        Auth(store).revoke_token(name, f"cli:{os.getenv('USER', 'local')}", time.time())
    click.echo(f"token {name!r} revoked")


# --------------------------------------------------------------------------- devices


@main.group(help="Devices: credentials, labels, state.")
def device() -> None:
    pass


@device.command("add", help="Register a device and print its secret (shown only once). "
                            "With --db on the database, else through the API.")
@click.argument("device_id")
@click.option("--label", multiple=True, metavar="KEY=VALUE", help="A label (repeat).")
@click.option("--rotate", is_flag=True, help="Issue a new secret for an existing device.")
@click.option("--db", type=click.Path(path_type=Path), default=None,
              help="Write to this database directly instead of calling the API.")
@click.option("--server", envvar="FLEET_SERVER", default="http://127.0.0.1:8000",
              help="The fleet server's URL (env FLEET_SERVER).")
@click.option("--token", envvar="FLEET_TOKEN", default=None, help="An operator token.")
@exits_on_error
def device_add(device_id: str, label: tuple[str, ...], rotate: bool, db: Path | None,
               server: str, token: str | None) -> None:
    labels = pairs(label, "label")
    if db is not None:
        from fleet_server.registry import Registry
        from fleet_server.store import Store

        with Store(db) as store:
            _, issued = Registry(store).add_device(
                device_id, labels, f"cli:{os.getenv('USER', 'local')}", time.time(),
                rotate=rotate)
        secret = issued.secret
    else:
        with FleetClient(server, token) as api:
            secret = api.post("/api/v1/devices", {"id": device_id, "labels": labels,
                                                  "rotate": rotate})["secret"]
    click.echo(secret)
    click.echo(f"device {device_id!r}: this secret is its MQTT password and HTTP token; "
               "it is shown only now", err=True)


@device.command("passwd-file", help="Write the Mosquitto password file of every device "
                                    "with a credential (mode 0600).")
@DB_OPTION
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The file.")
@exits_on_error
def device_passwd_file(db: Path, out: Path) -> None:
    from fleet_server.registry import Registry
    from fleet_server.store import Store

    with Store(db) as store:
        text = Registry(store).mosquitto_password_file()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(out, 0o600)
    click.echo(f"{out}: {text.count(chr(10))} device(s)")


register(main, device)
# the rollout and broker command groups live in modules of their own
from fleet_server.cli_broker import broker_config  # noqa: E402
from fleet_server.cli_rollout import rollout  # noqa: E402

main.add_command(rollout)
main.add_command(broker_config)

if __name__ == "__main__":
    main()
