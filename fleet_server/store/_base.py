"""Connections, transactions, migrations and row helpers shared by the store's parts.

One SQLite file in WAL mode; every thread gets its own connection (SQLite connections
must not be shared across threads mid-statement), all of them closed by
:meth:`StoreBase.close`. Writes happen in ``BEGIN IMMEDIATE`` transactions: the write
lock is taken up front, so two writers queue on ``busy_timeout`` instead of one failing
with "database is locked" when it tries to upgrade a read lock. ``synchronous=FULL``: a
commit the ingest worker has acknowledged to the broker must survive a power cut.

Every ``sqlite3`` error leaving the store is a :class:`~fleet_server.errors.StoreError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from fleet_server.errors import SchemaVersionError, StoreError
from fleet_server.store.migrations import LATEST, MIGRATIONS

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 10.0


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def loads(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)


def _statements(script: str) -> Iterator[str]:
    """The complete SQL statements of ``script``, in order."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        yield pending.strip()


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class StoreBase:
    """The connection and transaction machinery; the tables live in the mixins."""

    def __init__(self, path: Path | str, *, migrate: bool = True,
                 target_version: int = LATEST) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        db = self._db()
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the database ({exc})") from exc
        version = self.version
        if version > LATEST:
            self.close()
            raise SchemaVersionError(
                f"{self.path}: schema version {version} is newer than this server's "
                f"({LATEST}); upgrade edgefleet")
        if migrate:
            self.migrate(target_version)

    # -- connections ---------------------------------------------------------------------

    def _db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is not None:
            return db
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")
        try:
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT)
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the database ({exc})") from exc
        db = sqlite_utils.Database(conn, execute_plugins=False)
        with self._lock:
            self._conns.append(conn)
        self._local.db = db
        self._local.depth = 0
        return db

    @property
    def conn(self) -> sqlite3.Connection:
        return self._db().conn

    def close(self) -> None:
        """Close every thread's connection. Idempotent."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transactions --------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction on this thread's connection; nested calls join it.

        Raises:
            StoreError: the database failed (the transaction was rolled back).
        """
        db = self._db()
        if self._local.depth:
            self._local.depth += 1
            try:
                yield db
            finally:
                self._local.depth -= 1
            return
        try:
            db.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot start a transaction ({exc})") from exc
        self._local.depth = 1
        try:
            yield db
            db.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(db.conn)
            raise StoreError(f"{self.path}: {exc}") from exc
        except BaseException:
            _rollback(db.conn)
            raise
        finally:
            self._local.depth = 0

    def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict]:
        try:
            return list(self._db().query(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> dict | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _exec(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            try:
                self.conn.executemany(sql, rows)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    # -- schema --------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, target: int = LATEST) -> int:
        """Apply the migrations up to ``target``; return the version reached.

        Raises:
            SchemaVersionError: the file is newer than ``target`` allows.
            StoreError: a migration failed (that migration was rolled back).
        """
        for version, what, sql in MIGRATIONS:
            if version > target:
                break
            with self.transaction() as db:
                current = self.version  # re-read under the write lock
                if current >= version:
                    continue
                if current != version - 1:
                    raise SchemaVersionError(f"{self.path}: at version {current}, cannot "
                                             f"apply migration {version}")
                log.info("migrating %s to version %d: %s", self.path, version, what)
                # statement by statement: executescript() would COMMIT first, and a second
                # process would then apply the same migration before the version moves
                for statement in _statements(sql):
                    db.conn.execute(statement)
                db.conn.execute(f"PRAGMA user_version = {version}")
        return self.version

    def table_names(self) -> list[str]:
        return self._db().table_names()


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback failed")
