"""``fleet token ...`` and ``fleet device add|passwd-file``: on the database directly.

These are the commands that need no running server: they create the credentials a server
and its devices start from. Every other command talks to the REST API.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from fleet_server.cli.client import FleetClient
from fleet_server.cli.util import (
    DB_OPTION,
    JSON_OPTION,
    exits_on_error,
    pairs,
    print_json,
    stamp,
    table,
)

__all__ = ["device", "token"]


@click.group(help="Operator tokens (on the database directly).")
def token() -> None:
    pass


@token.command("create", help="Create a token and print it (shown only once).")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator", "approver"]), required=True,
              help="viewer: read; operator: read and write; approver: operator and approve.")
@DB_OPTION
@JSON_OPTION
@exits_on_error
def token_create(name: str, role: str, db: str, as_json: bool) -> None:
    from fleet_server.registry.auth import Auth
    from fleet_server.store import Store

    with Store(db) as store:
        issued = Auth(store).create_token(name, role, f"cli:{os.getenv('USER', 'local')}",
                                          time.time())
    if as_json:
        print_json({"name": name, "role": role, "token": issued.secret})
    else:
        click.echo(issued.secret)
    click.echo(f"token {name!r} ({role}) created; it is shown only now", err=True)


@token.command("list", help="List tokens (names and roles; never the tokens).")
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@exits_on_error
def token_list(db: str, as_json: bool) -> None:
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
@JSON_OPTION
@exits_on_error
def token_revoke(name: str, db: str, as_json: bool) -> None:
    from fleet_server.registry.auth import Auth
    from fleet_server.store import Store

    with Store(db) as store:
        Auth(store).revoke_token(name, f"cli:{os.getenv('USER', 'local')}", time.time())
    if as_json:
        print_json({"name": name, "revoked": True})
    else:
        click.echo(f"token {name!r} revoked")


# --------------------------------------------------------------------------- devices


@click.group(help="Devices: credentials, labels, state.")
def device() -> None:
    pass


@device.command("add", help="Register a device and print its secret (shown only once). "
                            "With --db on the database, else through the API.")
@click.argument("device_id")
@click.option("--label", multiple=True, metavar="KEY=VALUE", help="A label (repeat).")
@click.option("--rotate", is_flag=True, help="Issue a new secret for an existing device.")
@click.option("--db", default=None,
              help="Write to this database directly instead of calling the API: a SQLite "
                   "file or postgresql://user@host/dbname.")
@click.option("--server", envvar="FLEET_SERVER", default="http://127.0.0.1:8000",
              help="The fleet server's URL (env FLEET_SERVER).")
@click.option("--token", envvar="FLEET_TOKEN", default=None, help="An operator token.")
@JSON_OPTION
@exits_on_error
def device_add(device_id: str, label: tuple[str, ...], rotate: bool, db: str | None,
               server: str, token: str | None, as_json: bool) -> None:
    labels = pairs(label, "label")
    if db is not None:
        from fleet_server.registry.devices import Registry
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
    if as_json:  # what provisioning scripts need, in one document
        print_json({"device": device_id, "labels": labels, "secret": secret,
                    "rotated": rotate})
    else:
        click.echo(secret)
    click.echo(f"device {device_id!r}: this secret is its MQTT password and HTTP token; "
               "it is shown only now", err=True)


@device.command("passwd-file", help="Write the Mosquitto password file of every device "
                                    "with a credential (mode 0600).")
@DB_OPTION
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The file.")
@JSON_OPTION
@exits_on_error
def device_passwd_file(db: str, out: Path, as_json: bool) -> None:
    from fleet_server.registry.devices import Registry
    from fleet_server.store import Store

    with Store(db) as store:
        text = Registry(store).mosquitto_password_file()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(out, 0o600)
    if as_json:
        print_json({"file": str(out), "devices": text.count("\n")})
    else:
        click.echo(f"{out}: {text.count(chr(10))} device(s)")


