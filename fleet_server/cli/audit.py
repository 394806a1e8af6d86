"""``fleet audit verify|export``: the hash-chained audit log.

With ``--db`` a command reads the database directly (an auditor with a copy of the
file, or read access to the PostgreSQL database, needs no running server); without it, it
asks the REST API (``--server``, ``--token``).
``verify`` exits 1 when the chain is broken, naming each edited, inserted or deleted entry.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from fleet_server.cli.client import FleetClient
from fleet_server.cli.util import API_OPTIONS, exits_on_error, fail, parse_time, print_json, table

__all__ = ["audit"]

# a string, not click.Path: a postgresql:// URL is not a path (the file is checked below)
DB = click.option("--db", default=None,
                  help="Read this database directly instead of asking the server: a SQLite "
                       "file (a path, or sqlite:///path) or postgresql://user@host/dbname.")


def _with_api(fn):
    for option in reversed(API_OPTIONS):
        fn = option(fn)
    return fn


def _call(db: str | None, server: str, token: str | None, local, remote) -> Any:
    if db is not None:
        from fleet_server.models import Database
        from fleet_server.registry.audit import AuditLog
        from fleet_server.store import Store
        from fleet_server.store.migrations import AUDIT_CHAIN

        path = Database.parse(db).path
        if path is not None and not path.is_file():
            raise click.BadParameter(f"no database file at {db}", param_hint="'--db'")
        with Store(db, migrate=False) as store:
            if store.version < AUDIT_CHAIN:
                fail(f"{db}: schema version {store.version} has no audit chain (the server "
                     "migrates it on its next start)")
            return local(AuditLog(store))
    with FleetClient(server, token) as api:
        return remote(api)


@click.group(help="The tamper-evident audit log: verify its hash chain, export it.")
def audit() -> None:
    pass


@audit.command("verify", help="Check the hash chain; name every edited, inserted or deleted "
                              "entry. Exit 1 if the chain is broken.")
@DB
@_with_api
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@exits_on_error
def audit_verify(db: str | None, server: str, token: str | None, as_json: bool) -> None:
    report = _call(db, server, token, lambda log: log.verify().to_dict(),
                   lambda api: api.get("/api/v1/audit/verify"))
    if as_json:
        print_json(report)
    else:
        if report["findings"]:
            click.echo(table(["entry", "kind", "what"],
                             [[f["entry"], f["kind"], f["message"]]
                              for f in report["findings"]]))
        click.echo(f"{report['entries']} entries ({report['legacy']} from before the chain), "
                   f"head {report['head'] or '-'} at entry {report['head_id'] or '-'}: "
                   + ("intact" if report["intact"] else
                      f"BROKEN ({len(report['findings'])} findings)"))
    if not report["intact"]:
        raise SystemExit(1)


@audit.command("export", help="Print entries since a time, oldest first, with their hashes.")
@click.option("--since", default=None, metavar="WHEN",
              help="30d, 12h, ISO 8601 or unix seconds (default: everything).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "json"]), default="jsonl",
              show_default=True, help="One JSON object a line, or one JSON list.")
@click.option("--json", "as_json", is_flag=True, help="The same as --format json.")
@DB
@_with_api
@exits_on_error
def audit_export(since: str | None, fmt: str, as_json: bool, db: str | None, server: str,
                 token: str | None) -> None:
    from fleet_server.registry.audit import MAX_EXPORT, link_dict

    start = parse_time(since, time.time())
    entries = _call(db, server, token,
                    lambda log: [link_dict(x) for x in log.export(start)],
                    lambda api: api.get("/api/v1/audit", since=start, limit=MAX_EXPORT))
    if fmt == "json" or as_json:
        print_json(entries)
        return
    for entry in entries:
        click.echo(json.dumps(entry, sort_keys=True, separators=(",", ":")))
