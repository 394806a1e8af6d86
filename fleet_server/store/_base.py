"""Connections, transactions, migrations and row helpers shared by the store's parts.

Two engines behind the same methods: a SQLite file (the embedded default) and a
PostgreSQL server (:mod:`fleet_server.store._postgres`), chosen by what ``Store(db)`` is
given (:class:`~fleet_server.models.Database`). The statements are written once and
rewritten for each by :mod:`fleet_server.store._dialect`.

SQLite: one file in WAL mode; every thread gets its own connection (SQLite connections
must not be shared across threads mid-statement), all of them closed by
:meth:`StoreBase.close`. Writes happen in ``BEGIN IMMEDIATE`` transactions: the write
lock is taken up front, so two writers queue on ``busy_timeout`` instead of one failing
with "database is locked" when it tries to upgrade a read lock. ``synchronous=FULL``: a
commit the ingest worker has acknowledged to the broker must survive a power cut.
PostgreSQL keeps the same shape: a connection per thread, one writer at a time.

Every engine error leaving the store is a :class:`~fleet_server.errors.StoreError` (a
unique violation the caller names becomes a :class:`~fleet_server.errors.ConflictError`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from fleet_server.errors import ConflictError, SchemaVersionError, StoreError
from fleet_server.models import POSTGRESQL, SQLITE, Database
from fleet_server.store._dialect import SQLITE as SQLITE_DIALECT
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


class SqliteEngine:
    """The embedded engine: a SQLite file through sqlite-utils."""

    dialect = SQLITE_DIALECT
    Error = sqlite3.Error
    IntegrityError = sqlite3.IntegrityError

    def __init__(self, path: Path, busy_timeout_s: float) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s

    def connect(self) -> sqlite_utils.Database:
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT)
        conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s,
                               isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        return sqlite_utils.Database(conn, execute_plugins=False)

    def setup(self, db: sqlite_utils.Database) -> None:
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                # switching a fresh file to WAL needs its lock upgraded; while another
                # connection is taking the same step SQLite answers "locked" at once, past
                # the busy handler (its deadlock avoidance): retry within busy_timeout
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def begin(self, db: sqlite_utils.Database) -> None:
        db.conn.execute("BEGIN IMMEDIATE")

    def commit(self, db: sqlite_utils.Database) -> None:
        db.conn.execute("COMMIT")

    def rollback(self, db: sqlite_utils.Database) -> None:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")

    def close(self, db: sqlite_utils.Database) -> None:
        with contextlib.suppress(sqlite3.Error):
            db.conn.close()

    def rows(self, db: sqlite_utils.Database, sql: str, params: Any) -> list[dict]:
        return list(db.query(self.dialect.sql(sql), params))

    def execute(self, db: sqlite_utils.Database, sql: str, params: Any) -> sqlite3.Cursor:
        return db.conn.execute(self.dialect.sql(sql), params)

    def executemany(self, db: sqlite_utils.Database, sql: str,
                    rows: Sequence[Sequence[Any]]) -> None:
        db.conn.executemany(self.dialect.sql(sql), rows)

    def copy_in(self, db: sqlite_utils.Database, table: str, columns: Sequence[str],
                rows: Sequence[Sequence[Any]]) -> None:
        marks = ", ".join("?" * len(columns))
        db.conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                            rows)

    def existing_keys(self, db: sqlite_utils.Database, table: str, columns: tuple[str, str],
                      types: tuple[str, str], keys: Sequence[tuple[Any, Any]]
                      ) -> set[tuple[Any, Any]]:
        a, b = columns
        found: set[tuple[Any, Any]] = set()
        for part in chunks(keys, 400):  # 2 parameters a key, under SQLite's 999
            clause = " OR ".join([f"({a} = ? AND {b} = ?)"] * len(part))
            found.update((r[0], r[1]) for r in db.conn.execute(
                f"SELECT {a}, {b} FROM {table} WHERE {clause}", [v for k in part for v in k]))
        return found

    def script(self, db: sqlite_utils.Database, sql: str) -> None:
        # statement by statement: executescript() would COMMIT first, and a second
        # process would then apply the same migration before the version moves
        for statement in _statements(self.dialect.ddl(sql)):
            db.conn.execute(statement)

    def version(self, db: sqlite_utils.Database) -> int:
        return int(db.conn.execute("PRAGMA user_version").fetchone()[0])

    def set_version(self, db: sqlite_utils.Database, version: int) -> None:
        db.conn.execute(f"PRAGMA user_version = {int(version)}")

    def table_names(self, db: sqlite_utils.Database) -> list[str]:
        return db.table_names()

    def reset_identity(self, db: sqlite_utils.Database, table: str) -> None:
        pass  # an INTEGER PRIMARY KEY continues from the largest rowid by itself

    def summary_days(self, db: sqlite_utils.Database, ends: Sequence[float]) -> None:
        pass  # one table

    def drop_summaries_before(self, db: sqlite_utils.Database, before: float) -> int:
        return 0  # rows are deleted one by one

    def lease(self, name: str) -> SoleLease:
        return SoleLease()


class SoleLease:
    """The engine's leadership over a SQLite file: one server process per file, so it
    always leads (two ``fleet serve`` on one file are not a supported setup)."""

    def acquire(self) -> bool:
        return True

    def held(self) -> bool:
        return True

    def release(self) -> None:
        pass


def _engine(db: Database) -> Any:
    if db.kind == SQLITE:
        return SqliteEngine(Path(db.target), BUSY_TIMEOUT_S)
    if db.kind == POSTGRESQL:
        from fleet_server.store._postgres import PostgresEngine  # psycopg only when asked

        return PostgresEngine(db.target, BUSY_TIMEOUT_S)
    raise StoreError(f"{db.label}: not a database this server opens (a file path, "
                     "sqlite:///path or postgresql://user@host/dbname)")


class StoreBase:
    """The connection and transaction machinery; the tables live in the mixins."""

    def __init__(self, db: Database | Path | str, *, migrate: bool = True,
                 target_version: int = LATEST) -> None:
        self.database = Database.parse(db)
        # what messages name: the file, or the server URL without its password
        self.path = self.database.label
        self.engine = _engine(self.database)
        self.dialect = self.engine.dialect
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[Any] = []
        self._closed = False
        db_ = self._db()
        try:
            self.engine.setup(db_)
        except self.engine.Error as exc:
            self.close()
            raise StoreError(f"{self.path}: cannot open the database ({exc})") from exc
        version = self.version
        if version > LATEST:
            self.close()
            raise SchemaVersionError(
                f"{self.path}: schema version {version} is newer than this server's "
                f"({LATEST}); upgrade edgefleet")
        if migrate:
            try:
                self.migrate(target_version)
            except BaseException:
                self.close()
                raise

    @property
    def kind(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.database.kind

    # -- connections ---------------------------------------------------------------------

    def _db(self) -> Any:
        db = getattr(self._local, "db", None)
        if db is not None:
            return db
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")
        try:
            db = self.engine.connect()
        except self.engine.Error as exc:
            raise StoreError(f"{self.path}: cannot open the database ({exc})") from exc
        with self._lock:
            self._conns.append(db)
        self._local.db = db
        self._local.depth = 0
        return db

    @property
    def conn(self) -> Any:
        """This thread's connection: a ``sqlite3.Connection`` or a ``psycopg.Connection``."""
        db = self._db()
        return db.conn if isinstance(db, sqlite_utils.Database) else db

    def close(self) -> None:
        """Close every thread's connection. Idempotent."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            self.engine.close(conn)
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transactions --------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
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
            self.engine.begin(db)
        except self.engine.Error as exc:
            self._rollback(db)
            raise StoreError(f"{self.path}: cannot start a transaction ({exc})") from exc
        self._local.depth = 1
        self._local.after = []
        try:
            yield db
            self.engine.commit(db)
        except self.engine.Error as exc:
            self._rollback(db)
            raise StoreError(f"{self.path}: {exc}") from exc
        except BaseException:
            self._rollback(db)
            raise
        finally:
            self._local.depth = 0
            after, self._local.after = self._local.after, []
        for fn in after:  # reached only when the commit returned
            fn()

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once this thread's transaction has committed (at once outside one;
        never if it rolls back): what other processes may act on at once (a desired state
        published, which a device then downloads) must not go out before it is visible."""
        if getattr(self._local, "depth", 0):
            self._local.after.append(fn)
        else:
            fn()

    def _rollback(self, db: Any) -> None:
        try:
            self.engine.rollback(db)
        except self.engine.Error:
            log.exception("rollback failed")

    def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict]:
        try:
            return self.engine.rows(self._db(), sql, params)
        except self.engine.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> dict | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _exec(self, sql: str, params: Sequence[Any] | dict[str, Any] = (), *,
              conflict: str | None = None) -> Any:
        """Run one statement; its cursor (``rowcount``, ``fetchone``, ``fetchall``).

        Raises:
            ConflictError: ``conflict`` is given and a constraint refused the row; the
                message is ``conflict``.
            StoreError: the database failed.
        """
        try:
            return self.engine.execute(self._db(), sql, params)
        except self.engine.IntegrityError as exc:
            if conflict is not None:
                raise ConflictError(conflict) from exc
            raise StoreError(f"{self.path}: {exc}") from exc
        except self.engine.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _copy_in(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
                 ) -> None:
        """Insert many rows the fastest way the engine has (``COPY`` on PostgreSQL); no
        conflict handling, so inside a transaction that checked for them."""
        if rows:
            try:
                self.engine.copy_in(self._db(), table, columns, rows)
            except self.engine.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    def _summary_days(self, ends: Sequence[float]) -> None:
        """Make room for summaries ending at ``ends`` (PostgreSQL's day partitions)."""
        try:
            self.engine.summary_days(self._db(), ends)
        except self.engine.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _existing(self, table: str, columns: tuple[str, str], types: tuple[str, str],
                  keys: Sequence[tuple[Any, Any]]) -> set[tuple[Any, Any]]:
        """Which of ``keys`` (values of two ``columns``, of SQL ``types``) are stored."""
        if not keys:
            return set()
        try:
            return self.engine.existing_keys(self._db(), table, columns, types, keys)
        except self.engine.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            try:
                self.engine.executemany(self._db(), sql, rows)
            except self.engine.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    # -- schema --------------------------------------------------------------------------

    @property
    def version(self) -> int:
        try:
            return self.engine.version(self._db())
        except self.engine.Error as exc:
            raise StoreError(f"{self.path}: cannot read the schema version ({exc})") from exc

    def migrate(self, target: int = LATEST) -> int:
        """Apply the migrations up to ``target``; return the version reached.

        Raises:
            SchemaVersionError: the database is newer than ``target`` allows.
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
                self.engine.script(db, sql)
                self.engine.set_version(db, version)
        return self.version

    def table_names(self) -> list[str]:
        return self.engine.table_names(self._db())

    def engine_lease(self, name: str) -> Any:
        """The engine's leadership, to :meth:`acquire`, check (:meth:`held`) and
        :meth:`release`: a PostgreSQL advisory lock on a session of its own
        (``name`` is that session's application_name), or always held on SQLite."""
        return self.engine.lease(name)


