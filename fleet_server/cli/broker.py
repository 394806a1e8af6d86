"""``fleet broker-config``: a Mosquitto configuration for the fleet, from the database.

It reads the device accounts (their ``$7$`` hashes; the database holds no plaintext) and
writes ``mosquitto.conf``, ``passwd`` (0600) and ``acl`` through
:func:`fleet_server.telemetry.broker.write_broker_config`, then says how to start the broker and
the server. It prints paths, never a password. Run it again after ``fleet device add``
(and send Mosquitto SIGHUP to reload the password file).

Sites: on the central broker's host, ``--bridge-site NAME`` (repeatable) adds an account for
each site broker's bridge, allowed only the topics of the devices labelled ``site=NAME``;
on a site's host, ``--bridge-to HOST:PORT --site NAME --bridge-password-file FILE``
writes a broker for that site's devices only, bridged to the central one
(:mod:`fleet_server.telemetry.bridge`).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fleet_server.cli.util import DB_OPTION, exits_on_error, print_json

if TYPE_CHECKING:
    from fleet_server.telemetry.bridge import SiteBridge
    from fleet_server.telemetry.broker import BrokerSetup

__all__ = ["broker_config"]

_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)


@click.command("broker-config", help="Write a Mosquitto configuration (mosquitto.conf, "
                                     "passwd, acl) for every device in the database.")
@DB_OPTION
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Directory to write the files to (created if missing).")
@click.option("--port", type=int, default=1883, show_default=True,
              help="Plain MQTT listener port.")
@click.option("--bind", default="0.0.0.0", show_default=True,
              help="Address the listeners bind to.")
@click.option("--server-user", default="server", show_default=True,
              help="The fleet server's MQTT account (fleet serve --broker-user).")
@click.option("--server-password-file", type=_FILE, default=None,
              help="File holding the server account's password; without it one is made "
                   "and kept in OUT/server-password (0600).")
@click.option("--tls-cert", type=_FILE, default=None, help="Server certificate (PEM): adds "
              "a TLS listener.")
@click.option("--tls-key", type=_FILE, default=None, help="Its private key (PEM).")
@click.option("--tls-ca", type=_FILE, default=None,
              help="CA certificate(s) to verify client certificates with.")
@click.option("--tls-port", type=int, default=None, help="TLS listener port [default: 8883].")
@click.option("--require-certificate", is_flag=True,
              help="TLS clients must present a certificate signed by --tls-ca.")
@click.option("--ingest-workers", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Accounts for that many `fleet ingest` workers (SERVER_USER-ingest-N), "
                   "each with a password kept in OUT/<account>-password: the broker binds "
                   "client ids to accounts, so each process needs its own.")
@click.option("--bridge-site", "bridge_sites", multiple=True, metavar="NAME",
              help="(central broker) An account for site NAME's bridge "
                   "(SERVER_USER-bridge-NAME, password kept in OUT/<account>-password), "
                   "allowed only the topics of the devices labelled SITE_LABEL=NAME. "
                   "Repeatable.")
@click.option("--site-label", default="site", show_default=True,
              help="The device label naming each device's site.")
@click.option("--bridge-to", default=None, metavar="HOST[:PORT]",
              help="(site broker) Bridge this broker to the central one at HOST:PORT; "
                   "it gets accounts for the devices of --site only.")
@click.option("--site", default=None, help="(site broker) This site's name (with --bridge-to).")
@click.option("--bridge-password-file", type=_FILE, default=None,
              help="(site broker) The bridge account's password (the central "
                   "broker-config's OUT/SERVER_USER-bridge-SITE-password).")
@click.option("--bridge-ca", type=_FILE, default=None,
              help="(site broker) CA certificate of the central broker: the bridge uses "
                   "TLS.")
@click.option("--no-persistence", is_flag=True,
              help="Keep sessions in memory only (a broker restart forgets them).")
@click.option("--json", "as_json", is_flag=True, help="Print the paths written as JSON.")
@exits_on_error
def broker_config(db: str, out: Path, port: int, bind: str, server_user: str,
                  server_password_file: Path | None, tls_cert: Path | None,
                  tls_key: Path | None, tls_ca: Path | None, tls_port: int | None,
                  require_certificate: bool, ingest_workers: int,
                  bridge_sites: tuple[str, ...], site_label: str, bridge_to: str | None,
                  site: str | None, bridge_password_file: Path | None,
                  bridge_ca: Path | None, no_persistence: bool, as_json: bool) -> None:
    from fleet_server.models import Database
    from fleet_server.store import Store
    from fleet_server.telemetry.broker import BrokerSetup, write_broker_config

    path = Database.parse(db).path
    if path is not None and not path.exists():
        raise click.UsageError(f"no database at {db}: run `fleet device add --db {db}` first")
    setup = BrokerSetup(out=out, port=port, bind=bind, server_user=server_user,
                        server_password=_read_password(server_password_file),
                        persistence=not no_persistence,
                        cafile=tls_ca, certfile=tls_cert, keyfile=tls_key,
                        require_certificate=require_certificate, tls_port=tls_port,
                        ingest_workers=ingest_workers, bridge_sites=bridge_sites,
                        site_label=site_label,
                        bridge_to=_site_bridge(bridge_to, site, bridge_password_file,
                                               bridge_ca))
    with Store(db) as store:
        written = write_broker_config(setup, store)
    steps = _Steps.of(setup, written, db, server_password_file)
    if as_json:
        print_json({"files": {k: str(v) for k, v in written.items()},
                    "accounts": steps.accounts, "start": steps.start, "serve": steps.serve,
                    "ingest": list(steps.ingest)})
        return
    _print_steps(setup, written, steps, bridge_to)


def _read_password(path: Path | None) -> str | None:
    """The server account's password from ``--server-password-file`` (None: make one)."""
    if path is None:
        return None
    password = path.read_text(encoding="utf-8").strip()
    if not password:
        raise click.UsageError(f"{path} is empty")
    return password


def _site_bridge(bridge_to: str | None, site: str | None, password_file: Path | None,
                 ca: Path | None) -> SiteBridge | None:
    """A site broker's bridge from ``--bridge-to HOST[:PORT]`` and its companions, or None
    for the central broker (which must not be given them)."""
    from fleet_server.telemetry.bridge import SiteBridge

    if bridge_to is None:
        if site is not None or password_file is not None or ca is not None:
            raise click.UsageError("--site, --bridge-password-file and --bridge-ca go with "
                                   "--bridge-to")
        return None
    if site is None or password_file is None:
        raise click.UsageError("--bridge-to needs --site and --bridge-password-file")
    host, _, port = bridge_to.rpartition(":") if ":" in bridge_to else (bridge_to, "", "1883")
    if not port.isdigit():
        raise click.UsageError(f"--bridge-to {bridge_to!r}: HOST or HOST:PORT")
    return SiteBridge(site, host, int(port), password_file.read_text(encoding="utf-8").strip(),
                      ca)


@dataclass(frozen=True)
class _Steps:
    """What to run next with the files written: the broker, the server, each ingest worker."""

    accounts: int  # lines of the passwd file: every account the broker knows
    host: str  # where the server and the workers reach the plain listener
    start: str
    serve: str | None  # None on a site broker: no fleet server runs there
    ingest: tuple[str, ...]

    @classmethod
    def of(cls, setup: BrokerSetup, written: dict[str, Path], db: str,
           server_password_file: Path | None) -> _Steps:
        from fleet_server.telemetry.broker import (
            CONF_NAME,
            PASSWD_NAME,
            SERVER_PASSWORD_NAME,
            password_file_name,
        )

        password_path = written.get(SERVER_PASSWORD_NAME, server_password_file)
        host = "127.0.0.1" if setup.bind in ("0.0.0.0", "::") else setup.bind
        broker = f"--broker {host}:{setup.port}"
        return cls(
            accounts=written[PASSWD_NAME].read_text(encoding="utf-8").count("\n"), host=host,
            start=f"mosquitto -c {written[CONF_NAME].resolve()}",
            serve=None if setup.bridge_to is not None else (
                f"fleet serve --db {db} {broker} --broker-user {setup.server_user} "
                f"--broker-password-file {password_path}"),
            ingest=tuple(
                f"fleet ingest --db {db} {broker} --broker-user {user} --broker-password-file "
                f"{written[password_file_name(user, setup.server_user)]}"
                for user in setup.ingest_users))


def _print_steps(setup: BrokerSetup, written: dict[str, Path], steps: _Steps,
                 bridge_to: str | None) -> None:
    for path in written.values():
        mode = stat.S_IMODE(path.stat().st_mode)
        click.echo(f"wrote {path} ({mode:04o})")
    if setup.bridge_to is not None:
        click.echo(f"{steps.accounts} device account(s) of site {setup.bridge_to.site!r}, "
                   f"bridged to {bridge_to}")
        click.echo(f"start the broker:  {steps.start}")
        return
    devices = steps.accounts - 1 - len(setup.ingest_users) - len(setup.bridge_users)
    click.echo(f"{devices} device account(s) and the server account {setup.server_user!r}"
               + (f", {len(steps.ingest)} ingest worker account(s)" if steps.ingest else "")
               + (f", {len(setup.bridge_sites)} site bridge account(s)"
                  if setup.bridge_sites else ""))
    if setup.tls and steps.host not in ("127.0.0.1", "::1", "localhost"):
        click.echo(f"fleet: warning: the plain listener on {setup.bind}:{setup.port} carries "
                   "passwords in the clear; bind it to 127.0.0.1 or firewall it", err=True)
    click.echo(f"start the broker:  {steps.start}")
    click.echo(f"then the server:   {steps.serve}")
    for command in steps.ingest:
        click.echo(f"an ingest worker:  {command}")
    click.echo("after adding or removing devices: run this again and send mosquitto "
               "SIGHUP to reload")
