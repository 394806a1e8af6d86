"""The PostgreSQL engine of the store, through psycopg 3: connections, transactions, version.

Connections are in autocommit mode, so a read outside :meth:`Store.transaction` is one
statement on a fresh snapshot and never leaves a transaction open on an idle connection.
A write transaction is ``BEGIN`` (READ COMMITTED) followed by a transaction-scoped advisory
lock, :data:`WRITE_LOCK`: one writer at a time, as SQLite's ``BEGIN IMMEDIATE`` gives, so
every read-then-write the store and the services make (a rollup merged in Python, a
revision counted up, a status older than the stored one skipped) stays correct with
several ingest workers and API replicas over one database. Reads never wait for it (MVCC).
``lock_timeout`` bounds the wait as SQLite's ``busy_timeout`` does, and a commit is durable
when it returns (``synchronous_commit`` as the server has it; on by default).

The schema version lives in a one-row table, ``schema_version`` (PostgreSQL has no
``user_version``). Every ``psycopg`` error leaving here is a ``StoreError``; a unique
violation is the caller's to name (a :class:`~fleet_server.errors.ConflictError`).

The engine's leadership (:class:`AdvisoryLease`) is a session advisory lock on a
connection of its own, held while the leader lives.

This module does not pool connections across threads (each thread keeps its own, as with
SQLite), run replicas, or partition tables.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from fleet_server.store._dialect import POSTGRES

__all__ = ["ENGINE_LOCK", "WRITE_LOCK", "AdvisoryLease", "PostgresEngine"]

log = logging.getLogger(__name__)
DAY_S = 86400

# pg_advisory_xact_lock key of the store's single writer: any fixed signed 64-bit number;
# this one is the first 8 bytes of sha256("edgefleet.store.write") with the top bit cleared
WRITE_LOCK = 0x3DCB_7CDC_F957_C8B0
# pg_try_advisory_lock key of the engine's leadership (sha256("edgefleet.engine"), likewise)
ENGINE_LOCK = 0x6CF2_FC43_A7FE_B3F8
# how fast the database notices a lease holder's host gone without a FIN (a power cut, a
# partition): TCP keepalives of the lease's connection, both ends, idle + interval * count
_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 3, "keepalives_interval": 2,
              "keepalives_count": 3}


class AdvisoryLease:
    """The engine's leadership: a session advisory lock held on a connection of its own.

    The lock lives exactly as long as that session: a leader that dies (SIGKILL, a crash)
    loses it when the kernel closes its socket, and PostgreSQL's keepalives (set on the
    session below: about 9 s) end the session of a leader whose host vanished. A standby
    polling :meth:`acquire` then gets it. :meth:`held` is the leader's check that its
    session is still there; a leader that cannot confirm it must stop leading.
    """

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name  # application_name of the session: who holds it, in pg_stat_activity
        self._conn: psycopg.Connection | None = None

    def acquire(self) -> bool:
        """Try once; True if this process leads now (or led already), False if another
        does or the database cannot be reached (logged)."""
        if self._conn is not None:
            return self.held()
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5,
                                   application_name=self.name[:63], **_KEEPALIVE)
        except psycopg.Error as exc:
            log.warning("engine election: cannot reach the database (%s)", exc)
            return False
        try:
            conn.execute("SET tcp_keepalives_idle = 3")
            conn.execute("SET tcp_keepalives_interval = 2")
            conn.execute("SET tcp_keepalives_count = 3")
            conn.execute("SET statement_timeout = 5000")
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", [ENGINE_LOCK]).fetchone()
        except psycopg.Error as exc:
            conn.close()
            log.warning("engine election: %s", exc)
            return False
        if not (row and row[0]):
            conn.close()
            return False
        self._conn = conn
        return True

    def held(self) -> bool:
        """Whether the session holding the lock is still alive (a round trip to it)."""
        if self._conn is None:
            return False
        try:
            row = self._conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                "pid = pg_backend_pid() AND objid = %s AND classid = %s",
                [ENGINE_LOCK & 0xFFFF_FFFF, ENGINE_LOCK >> 32]).fetchone()
            return bool(row and row[0])
        except psycopg.Error:
            self.release()
            return False

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()  # the session ends, and the lock with it


class PostgresEngine:
    dialect = POSTGRES
    Error = psycopg.Error
    IntegrityError = psycopg.errors.IntegrityError

    def __init__(self, url: str, busy_timeout_s: float) -> None:
        self.url = url
        self.busy_timeout_s = busy_timeout_s
        self._days: set[int] = set()  # day partitions of summaries known to exist

    def connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        conn.execute(f"SET lock_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("SET statement_timeout = 0")
        return conn

    def setup(self, conn: psycopg.Connection) -> None:
        pass

    def begin(self, conn: psycopg.Connection) -> None:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK])

    def commit(self, conn: psycopg.Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: psycopg.Connection) -> None:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")

    def close(self, conn: psycopg.Connection) -> None:
        with contextlib.suppress(psycopg.Error):
            conn.close()

    def rows(self, conn: psycopg.Connection, sql: str, params: Any) -> list[dict]:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(self.dialect.sql(sql), params)
            return cur.fetchall() if cur.description is not None else []

    def execute(self, conn: psycopg.Connection, sql: str, params: Any) -> psycopg.Cursor:
        return conn.execute(self.dialect.sql(sql), params)

    def executemany(self, conn: psycopg.Connection, sql: str,
                    rows: Sequence[Sequence[Any]]) -> None:
        with conn.cursor() as cur:
            cur.executemany(self.dialect.sql(sql), rows)

    def copy_in(self, conn: psycopg.Connection, table: str, columns: Sequence[str],
                rows: Sequence[Sequence[Any]]) -> None:
        """Rows into a table by ``COPY ... FROM STDIN``: half the time of executemany of
        an INSERT at ingest's batch sizes (no conflict handling: check first)."""
        if table == "summaries":
            at = list(columns).index("window_end")
            self.summary_days(conn, [row[at] for row in rows])
        with conn.cursor() as cur, cur.copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    # -- summaries by day -------------------------------------------------------------------

    def _partitions(self, conn: psycopg.Connection) -> dict[int, str]:
        """The day partitions of ``summaries``: {day number: table name}."""
        rows = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'summaries' AND "
            "p.relnamespace = current_schema()::regnamespace AND c.relname LIKE "
            "'summaries\\_p%'").fetchall()
        return {int(r[0][len("summaries_p"):]): r[0] for r in rows}

    def summary_days(self, conn: psycopg.Connection, ends: Sequence[float]) -> None:
        """Make the day partitions these window ends fall in (inside the caller's write
        transaction). A day whose rows already sit in the default partition (stored
        before its partition existed) keeps them there: the partition is not made, and
        retention deletes those rows one by one."""
        days = {int(end // DAY_S) for end in ends} - self._days
        if not days:
            return
        self._days |= set(self._partitions(conn))
        for day in sorted(days - self._days):
            lo, hi = day * DAY_S, (day + 1) * DAY_S
            if conn.execute("SELECT 1 FROM summaries_default WHERE window_end >= %s AND "
                            "window_end < %s LIMIT 1", [lo, hi]).fetchone() is None:
                conn.execute(f"CREATE TABLE IF NOT EXISTS summaries_p{day} PARTITION OF "
                             f"summaries FOR VALUES FROM ({lo}) TO ({hi})")
                conn.execute(f"ALTER TABLE summaries_p{day} ALTER COLUMN profile "
                             "SET STORAGE EXTERNAL")
            self._days.add(day)

    def drop_summaries_before(self, conn: psycopg.Connection, before: float) -> int:
        """Drop the day partitions wholly before ``before``; how many rows they held."""
        gone = 0
        for day, name in sorted(self._partitions(conn).items()):
            if (day + 1) * DAY_S > before:
                break
            gone += int(conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0])
            conn.execute(f"DROP TABLE {name}")
            self._days.discard(day)
        return gone

    def existing_keys(self, conn: psycopg.Connection, table: str, columns: tuple[str, str],
                      types: tuple[str, str], keys: Sequence[tuple[Any, Any]]
                      ) -> set[tuple[Any, Any]]:
        """Which of ``keys`` (pairs of ``columns``) are in ``table``: one join against two
        arrays, rather than a chain of ORs the planner takes longer to read."""
        a, b = columns
        got = conn.execute(
            f"SELECT t.{a}, t.{b} FROM {table} t JOIN unnest(%s::{types[0]}[], "
            f"%s::{types[1]}[]) AS k(a, b) ON t.{a} = k.a AND t.{b} = k.b",
            [[k[0] for k in keys], [k[1] for k in keys]]).fetchall()
        return {(r[0], r[1]) for r in got}

    def lease(self, name: str) -> AdvisoryLease:
        return AdvisoryLease(self.url, name)

    def script(self, conn: psycopg.Connection, sql: str) -> None:
        conn.execute(self.dialect.ddl(sql))

    def version(self, conn: psycopg.Connection) -> int:
        # a scan of the catalog on this statement's snapshot, not to_regclass: a name lookup
        # may answer from this backend's cache, stale after another process's migration
        if conn.execute("SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = "
                        "current_schema() AND tablename = 'schema_version'").fetchone() is None:
            return 0
        got = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(got[0]) if got else 0

    def set_version(self, conn: psycopg.Connection, version: int) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", [version])

    def table_names(self, conn: psycopg.Connection) -> list[str]:
        # tables, partitioned ones included, never their partitions
        return [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
            "AND relkind IN ('r', 'p') AND NOT relispartition AND relname != "
            "'schema_version' ORDER BY relname").fetchall()]

    def reset_identity(self, conn: psycopg.Connection, table: str) -> None:
        """After rows were copied in with their ids: the next id follows the largest."""
        conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
            f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)")
