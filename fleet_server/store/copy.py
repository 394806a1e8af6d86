"""Copy a whole fleet database to another one: SQLite to PostgreSQL (``fleet db migrate``),
or back, or between two servers.

Both stores are opened (so migrated) to the same schema version first. Every table is
copied in key order, a page of :data:`PAGE_ROWS` rows at a time (a summaries table of
millions of rows never sits in memory), into the target inside **one** transaction, with
its ids kept (identity sequences then continue after the largest). Before that
transaction commits, each table's row count in the target must equal the source's: a
mismatch (a server still writing to the source, say) rolls everything back, so the target
is either a full copy or untouched. A PostgreSQL target is then analysed (``ANALYZE``), so
its first queries are planned with statistics.

A target holding any row is refused unless ``force`` (then its rows are deleted first, in
the same transaction). This module does not copy bundle files (they live outside the
database: copy the bundle directory alongside), and does not stop a running server: stop
the servers writing to the source first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fleet_server.errors import CopyCountError, StoreError, TargetNotEmptyError
from fleet_server.store._base import StoreBase

__all__ = ["PAGE_ROWS", "TABLES", "TableCopy", "copy_database"]

PAGE_ROWS = 1000

# every table of the schema, parents before the tables that reference them, each with the
# key it is paged by (a table a new migration adds must be named here: copy_database
# refuses a database holding a table it does not know, rather than leave it behind)
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tokens", ("id",)),
    ("devices", ("id",)),
    ("device_labels", ("device", "key")),
    ("groups", ("name",)),
    ("bundles", ("id",)),
    ("summaries", ("id",)),
    ("reports", ("id",)),
    ("dead_letters", ("id",)),
    ("counters", ("name",)),
    ("audit", ("id",)),
    ("rollups", ("bundle_id", "width", "bucket", "scope")),
    ("desired", ("device",)),
    ("drift_windows", ("id",)),
    ("alerts", ("id",)),
    ("webhook_attempts", ("id",)),
    ("rollouts", ("id",)),
    ("removed_devices", ("device",)),
    ("acks", ("device", "stream")),
    ("settled", ("device", "stream", "seq")),
    ("retrains", ("id",)),
    ("outcome_queues", ("device",)),
    ("outcome_batches", ("device", "batch")),
    ("bundle_approvals", ("id",)),
    ("sessions", ("id",)),
    ("performance", ("id",)),
    ("captured", ("id",)),
    ("capture_batches", ("device", "batch")),
    ("capture_labels", ("device", "pid")),
    ("group_rollup_starts", ("group_name",)),
    ("performance_rollups", ("bundle_id", "width", "bucket", "scope")),
)
# tables whose integer id the database assigns (an identity on PostgreSQL)
_IDENTITY = {"tokens", "bundles", "summaries", "reports", "dead_letters", "audit",
             "drift_windows", "alerts", "webhook_attempts", "bundle_approvals", "retrains",
             "performance"}


@dataclass(frozen=True)
class TableCopy:
    table: str
    source_rows: int
    target_rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "source_rows": self.source_rows,
                "target_rows": self.target_rows}


def _count(store: StoreBase, table: str) -> int:
    row = store._one(f"SELECT COUNT(*) AS n FROM {table}")
    return int(row["n"]) if row else 0


def _pages(store: StoreBase, table: str, key: Sequence[str]
           ) -> Any:
    """The rows of ``table`` in key order, a page at a time: (columns, rows) per page."""
    cols = ", ".join(key)
    after: tuple | None = None
    while True:
        if after is None:
            sql, params = f"SELECT * FROM {table} ORDER BY {cols} LIMIT ?", [PAGE_ROWS]
        else:
            marks = ", ".join("?" * len(key))
            sql = (f"SELECT * FROM {table} WHERE ({cols}) > ({marks}) ORDER BY {cols} "
                   "LIMIT ?")
            params = [*after, PAGE_ROWS]
        cur = store._exec(sql, params)
        names = [d[0] for d in cur.description]
        rows = [tuple(r) for r in cur.fetchall()]
        if not rows:
            return
        yield names, rows
        if len(rows) < PAGE_ROWS:
            return
        at = [names.index(k) for k in key]
        after = tuple(rows[-1][i] for i in at)


def copy_database(source: StoreBase, target: StoreBase, *, force: bool = False,
                  on_table: Callable[[TableCopy], None] | None = None) -> list[TableCopy]:
    """Copy every table of ``source`` into ``target``; the per-table counts.

    Raises:
        StoreError: the two are at different schema versions, or either holds a table
            this copier does not know.
        TargetNotEmptyError: ``target`` holds rows and ``force`` is false (names a table).
        CopyCountError: a table's count in the target differs from the source's after the
            copy (nothing was written).
    """
    if source.version != target.version:
        raise StoreError(f"{source.path} is at schema version {source.version}, "
                         f"{target.path} at {target.version}")
    known = {t for t, _ in TABLES}
    for store in (source, target):
        unknown = sorted(set(store.table_names()) - known)
        if unknown:
            raise StoreError(f"{store.path}: table(s) {', '.join(unknown)} unknown to the "
                             "copier (fleet_server.store.copy.TABLES)")
    if not force:
        for table, _ in TABLES:
            n = _count(target, table)
            if n:
                raise TargetNotEmptyError(
                    f"{target.path}: table {table} holds {n} row(s); copy into an empty "
                    "database, or pass --force to replace what is there")
    done: list[TableCopy] = []
    with target.transaction():
        for table, _ in reversed(TABLES):
            target._exec(f"DELETE FROM {table}")
        for table, key in TABLES:
            for names, rows in _pages(source, table, key):
                target._copy_in(table, names, rows)
            if table in _IDENTITY:
                target.engine.reset_identity(target._db(), table)
            copied = TableCopy(table, _count(source, table), _count(target, table))
            if copied.source_rows != copied.target_rows:
                raise CopyCountError(
                    f"table {table}: {copied.source_rows} row(s) in {source.path}, "
                    f"{copied.target_rows} copied to {target.path}; nothing was written "
                    "(is a server still writing to the source?)")
            done.append(copied)
            if on_table is not None:
                on_table(copied)
    if target.kind == "postgresql":
        # statistics for the planner now, not when autovacuum gets round to the fresh
        # tables: until then a group's drift report over 1,000 devices took 28 s instead
        # of 0.3 s (measured, benchmarks/drift_reports.py)
        target._exec("ANALYZE")
    return done
