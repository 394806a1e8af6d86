"""``fleet db``: the fleet database itself (``fleet db migrate``: move a fleet from the
embedded SQLite file to PostgreSQL, counts checked)."""

from __future__ import annotations

import click

from fleet_server.cli.util import exits_on_error, print_json

__all__ = ["db"]


@click.group(help="The fleet database: copy it between SQLite and PostgreSQL.")
def db() -> None:
    pass


@db.command("migrate", help="Copy every table of one fleet database into another (e.g. "
                            "--from sqlite:///fleet.db --to postgresql://fleet@db/fleet), "
                            "ids kept, each table's row count checked before the copy "
                            "commits: the target ends a full copy or untouched. Stop the "
                            "servers writing to the source first; copy the bundle "
                            "directory alongside. Both databases are migrated to this "
                            "server's schema first.")
@click.option("--from", "source", required=True, metavar="DB",
              help="The database to copy: a SQLite file (path or sqlite:///path) or "
                   "postgresql://...")
@click.option("--to", "target", required=True, metavar="DB",
              help="The database to fill; it must hold no rows unless --force.")
@click.option("--force", is_flag=True,
              help="Delete what the target holds first (in the same transaction).")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@exits_on_error
def migrate(source: str, target: str, force: bool, as_json: bool) -> None:
    from fleet_server.models import Database
    from fleet_server.store import Store
    from fleet_server.store.copy import TableCopy, copy_database

    where = Database.parse(source)
    if where.path is not None and not where.path.exists():
        raise click.UsageError(f"no database at {where.label}")

    def say(t: TableCopy) -> None:
        if not as_json:
            click.echo(f"{t.table:<18} {t.source_rows:>10} row(s) copied, "
                       f"{t.target_rows} in the target")

    with Store(source) as src, Store(target) as dst:
        copied = copy_database(src, dst, force=force, on_table=say)
    if as_json:
        print_json({"from": Database.parse(source).label, "to": Database.parse(target).label,
                    "tables": [t.to_dict() for t in copied]})
    else:
        total = sum(t.target_rows for t in copied)
        click.echo(f"copied {len(copied)} tables, {total} rows: {Database.parse(source)} -> "
                   f"{Database.parse(target)}", err=True)
