"""A durable, bounded outbox: messages wait here, in one SQLite file, until they are delivered.

The agent puts every summary and report here first and the MQTT link
(:mod:`edge_agent.mqtt`) drains it. A *numbered* message (:meth:`Outbox.put_numbered`: a
stream name and a sequence number in it) leaves only when :meth:`Outbox.confirm` says the
server has committed its stream up to its number; a broker's PUBACK is not enough (the
broker holds it in memory, and loses it when it is killed before its next autosave). An
unnumbered message (:meth:`Outbox.put`) leaves on :meth:`Outbox.ack`, after the broker's
PUBACK. paho keeps QoS 1 messages only in memory, so this file is what makes delivery
survive a crash, a reboot or hours offline.

The same file keeps small named state blobs (:meth:`Outbox.set_state`) that must change in
the same transaction as a put: the agent's open-window checkpoint is cleared by the very
commit that stores the window's summary, so a crash can neither lose the window nor
report it twice.

Durability: WAL with ``synchronous=FULL``. The promise is "an acknowledged message may
leave; nothing else may be lost on power cut". In WAL mode ``synchronous=NORMAL`` fsyncs
the log only at checkpoints, so a commit that has returned can still be rolled back by a
power cut: a :meth:`Outbox.put` the caller already counted as stored would vanish. That
breaks the promise, so FULL it is: every commit fsyncs the WAL before it returns. The cost
is one fsync per put and per ack, which is nothing at the agent's rate (a summary per window,
a heartbeat a minute); a drained backlog acks at a few hundred messages a second on an SD
card, which is faster than the broker round trip anyway. (Acks alone could run at NORMAL —
an ack lost to a power cut only means a duplicate, which the server removes — but one
setting for one connection is simpler to reason about.)

Bounds: at most ``max_messages`` rows and ``max_bytes`` payload bytes. When a put does not
fit, the *oldest* pending rows are dropped to make room (the newest data is the most useful
after a long outage) and counted in a counter stored in the same file and the same
transaction, so drops survive a restart and can be reported. A single payload above
``max_payload`` is refused with :class:`OutboxError`; it could never fit the broker either.

Row ids come from ``AUTOINCREMENT``: they only grow and are never reused, even after the
newest row is acked, so a late ack for an old id can never remove a newer message.

Errors:

    EdgefleetError
    └── OutboxError                 the outbox refused or failed an operation
        └── OutboxFullError         the disk (or the page limit) is full: nothing was stored

Every ``sqlite3`` error is mapped to one of these, so a full disk never crashes the
caller's thread: the caller decides whether to drop, retry or report.

This module deliberately does not publish, retry, or know topics: it stores bytes under a
topic string, in order, and forgets them when told to. One process owns the file at a time.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import OutboxError, OutboxFullError

__all__ = ["Outbox", "OutboxError", "OutboxFullError", "OutboxItem"]

log = logging.getLogger(__name__)

_MAX_TOPIC_BYTES = 65_535  # MQTT's limit on a topic name
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    created REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('dropped', 0);
CREATE TABLE IF NOT EXISTS state (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""
# numbered rows (stream, seq); added to files written before end-to-end delivery
_NUMBERED_COLUMNS = (("stream", "TEXT"), ("seq", "INTEGER"))


@dataclass(frozen=True)
class OutboxItem:
    """One pending message. ``created`` is a Unix time in seconds."""

    id: int
    topic: str
    payload: bytes
    qos: int
    created: float
    stream: str | None = None  # set for numbered rows: they leave on confirm(), not ack()
    seq: int = 0


class Outbox:
    """A FIFO of messages in one SQLite file, bounded in count and bytes, safe across threads.

    Args:
        path: the SQLite file; created if absent, reopened (with its messages and drop
            counter) if present.
        max_messages: most rows kept; older rows are dropped past it.
        max_bytes: most payload bytes kept; older rows are dropped past it.
        max_payload: largest single payload accepted (default 128 KiB, the smallest
            ceiling among the brokers the design names).
        clock: the time source for ``created``.

    Raises:
        ValueError: a limit is not positive, or ``max_payload`` exceeds ``max_bytes``.
        OutboxError: the file cannot be opened as an outbox.
    """

    def __init__(
        self,
        path: Path,
        max_messages: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        *,
        max_payload: int = 128 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_messages < 1 or max_bytes < 1 or max_payload < 0:
            raise ValueError("outbox limits must be positive")
        if max_payload > max_bytes:
            raise ValueError(f"max_payload ({max_payload}) exceeds max_bytes ({max_bytes})")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_payload = max_payload
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._conn: sqlite3.Connection | None = None
        try:
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT)
            conn = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}", path=self.path) from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            have = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
            for name, kind in _NUMBERED_COLUMNS:
                if name not in have:
                    conn.execute(f"ALTER TABLE outbox ADD COLUMN {name} {kind}")
            conn.execute("CREATE INDEX IF NOT EXISTS outbox_stream ON outbox (stream, seq)")
            depth, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
            ).fetchone()
            (dropped,) = conn.execute(
                "SELECT value FROM counters WHERE name = 'dropped'"
            ).fetchone()
        except sqlite3.Error as exc:
            conn.close()
            raise self._mapped(exc, "open") from exc
        self._conn = conn
        self._depth = int(depth)
        self._bytes = int(size)
        self._dropped = int(dropped)

    # -- writing ---------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Store a message; return its row id. Drops the oldest rows if it does not fit.

        Raises:
            OutboxError: the payload is over ``max_payload``, the topic is empty, over
                65,535 bytes or holds a wildcard, ``qos`` is not 0-2, or the file failed.
            OutboxFullError: the disk is full; nothing was stored and nothing dropped.
        """
        return self._put(topic, bytes(payload), qos)[0]

    def put_numbered(self, topic: str, build: Callable[[int], bytes], sequence: str,
                     qos: int = 1, *, clear_state: Collection[str] = ()) -> tuple[int, int]:
        """Number a message with the next value of counter ``sequence`` and store it, in
        one transaction: a message that could not be stored (a full disk) uses no number,
        so the numbers the server sees have no gap that is not a real loss.

        ``build(seq)`` makes the payload; it runs under the outbox's lock, so keep it short
        (encoding a message). The row belongs to stream ``sequence`` and leaves on
        :meth:`confirm`. ``clear_state`` names state blobs deleted in the same commit.
        Returns ``(row id, seq)``.

        Raises:
            OutboxError, OutboxFullError: as :meth:`put`; the counter did not move.
        """
        return self._put(topic, lambda seq, floor: build(seq), qos, sequence, clear_state)

    def put_sequenced(self, topic: str, build: Callable[[int, int], bytes], stream: str,
                      qos: int = 1, *, clear_state: Collection[str] = ()) -> tuple[int, int]:
        """:meth:`put_numbered`, with ``build(seq, floor)``: ``floor`` is the lowest
        sequence of ``stream`` still in the outbox once this row is in (its own ``seq`` if
        none older is), so every number of the stream below it has been confirmed or
        dropped, and the server may acknowledge past the gaps drops leave. If making room
        drops rows of the same stream, the payload is built again with the new floor.

        Raises:
            OutboxError, OutboxFullError: as :meth:`put`; the counter did not move.
        """
        return self._put(topic, build, qos, stream, clear_state)

    # One function on purpose: one SQLite transaction (bound check, sequence, insert, state
    # clearing, counted drops) whose steps must see the same rows.
    def _put(self, topic: str, payload: bytes | Callable[[int, int], bytes], qos: int,
             sequence: str | None = None, clear_state: Collection[str] = ()
             ) -> tuple[int, int]:
        if isinstance(payload, bytes):
            self._check_size(topic, payload)
        self._check_topic(topic, qos)
        with self._lock:
            with self._transaction(f"put to {topic!r}") as conn:
                seq = 0 if sequence is None else self._bump(conn, sequence)
                payload, n_drop, freed = self._fit(conn, topic, payload, sequence, seq)
                row_id = conn.execute(
                    "INSERT INTO outbox (topic, payload, qos, created, stream, seq) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (topic, payload, qos, float(self._clock()), sequence,
                     seq if sequence is not None else None),
                ).lastrowid
                for name in clear_state:
                    conn.execute("DELETE FROM state WHERE name = ?", (name,))
            # counters move only after the commit, so a failed put leaves them true
            self._depth += 1 - n_drop
            self._bytes += len(payload) - freed
            self._dropped += n_drop
            listeners = list(self._listeners)
        if n_drop:
            log.warning("outbox full: dropped the %d oldest message(s)", n_drop)
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.exception("outbox listener failed")
        assert row_id is not None
        return row_id, seq

    def _check_topic(self, topic: str, qos: int) -> None:
        topic_bytes = topic.encode("utf-8", errors="replace")
        if not topic or len(topic_bytes) > _MAX_TOPIC_BYTES or "+" in topic or "#" in topic:
            # refused here: a message that can never be published would sit in the outbox
            raise OutboxError(f"topic {topic[:80]!r} cannot be published", path=self.path)
        if qos not in (0, 1, 2):
            raise OutboxError(f"qos must be 0, 1 or 2, not {qos!r}", path=self.path)

    def _fit(self, conn: sqlite3.Connection, topic: str,
             payload: bytes | Callable[[int, int], bytes], sequence: str | None,
             seq: int) -> tuple[bytes, int, int]:
        """The payload (built for ``seq`` and the stream's floor, when it is a builder),
        and room made for it by dropping the oldest rows: (payload, rows dropped, bytes
        freed). Inside the put's transaction."""
        build = None if isinstance(payload, bytes) else payload
        floor = 0
        if build is not None:
            floor = self._floor(conn, sequence, seq)
            payload = bytes(build(seq, floor))
            self._check_size(topic, payload)
        assert isinstance(payload, bytes)
        n_drop, freed = 0, 0
        for _ in range(4):  # a payload rebuilt with a new floor may grow a little
            over_count = max(0, self._depth - n_drop + 1 - self.max_messages)
            over_bytes = max(0, self._bytes - freed + len(payload) - self.max_bytes)
            if not (over_count or over_bytes):
                break
            more, more_freed = self._drop_oldest(conn, over_count, over_bytes)
            n_drop, freed = n_drop + more, freed + more_freed
            if build is not None and self._floor(conn, sequence, seq) != floor:
                floor = self._floor(conn, sequence, seq)
                payload = bytes(build(seq, floor))
                self._check_size(topic, payload)
        return payload, n_drop, freed

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) on the connection;
        the caller holds the lock. Any failure rolls it back; SQLite's are mapped.

        Raises:
            OutboxError, OutboxFullError: the file failed (``what`` says doing what).
        """
        conn = self._open_conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise self._mapped(exc, what) from exc
        except BaseException:
            _rollback(conn)
            raise

    def _check_size(self, topic: str, payload: bytes) -> None:
        if len(payload) > self.max_payload:
            raise OutboxError(
                f"payload of {len(payload)} bytes for {topic!r} exceeds the outbox limit "
                f"of {self.max_payload} bytes",
                path=self.path,
            )

    @staticmethod
    def _floor(conn: sqlite3.Connection, stream: str | None, seq: int) -> int:
        if stream is None:
            return 0
        (low,) = conn.execute("SELECT MIN(seq) FROM outbox WHERE stream = ?",
                              (stream,)).fetchone()
        return seq if low is None else min(int(low), seq)

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str) -> int:
        key = f"seq:{name}"
        conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", (key,))
        conn.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (key,))
        (value,) = conn.execute("SELECT value FROM counters WHERE name = ?", (key,)).fetchone()
        return int(value)

    def last_sequence(self, name: str) -> int:
        """The last number :meth:`put_numbered` or :meth:`next_sequence` gave out (0: none)."""
        with self._lock:
            row = self._open_conn().execute(
                "SELECT value FROM counters WHERE name = ?", (f"seq:{name}",)).fetchone()
        return 0 if row is None else int(row[0])

    def _drop_oldest(self, conn: sqlite3.Connection, count: int, nbytes: int) -> tuple[int, int]:
        """Delete the oldest rows until ``count`` rows and ``nbytes`` bytes are freed."""
        n_drop, freed, last_id = 0, 0, None
        rows = conn.execute("SELECT id, LENGTH(payload) FROM outbox ORDER BY id")
        for row_id, size in rows:
            if n_drop >= count and freed >= nbytes:
                break
            n_drop += 1
            freed += size
            last_id = row_id
        if last_id is not None:
            conn.execute("DELETE FROM outbox WHERE id <= ?", (last_id,))
            conn.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (n_drop,))
        return n_drop, freed

    def ack(self, item_id: int) -> bool:
        """Remove a delivered message. Acking an unknown or already-acked id does nothing.

        Returns:
            True if this call removed the message, False if it was not there.

        Raises:
            OutboxError: the file failed (the message stays and will be sent again).
        """
        with self._lock:
            with self._transaction(f"ack of {item_id}") as conn:
                # no DELETE ... RETURNING: it needs SQLite 3.35, Debian 11 ships 3.34
                row = conn.execute(
                    "SELECT LENGTH(payload) FROM outbox WHERE id = ?", (item_id,)
                ).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM outbox WHERE id = ?", (item_id,))
            if row is None:
                return False
            self._depth -= 1
            self._bytes -= row[0]
            return True

    def confirm(self, stream: str, upto: int) -> list[int]:
        """Remove the rows of ``stream`` numbered ``upto`` or lower: the server has
        committed (or settled) them. Returns the row ids removed.

        If ``upto`` is above the stream's counter, the counter moves up to it: the server
        holds numbers this file never gave out (the device's data directory was replaced),
        and a number the server already has would be taken for a duplicate and lost. The
        rows that had reused such numbers are counted in :attr:`dropped`.

        Raises:
            OutboxError: the file failed (the rows stay and will be sent again).
        """
        with self._lock:
            with self._transaction(f"confirm of {stream} up to {upto}") as conn:
                rows = conn.execute(
                    "SELECT id, LENGTH(payload) FROM outbox WHERE stream = ? AND seq <= ?",
                    (stream, upto)).fetchall()
                if rows:
                    conn.execute("DELETE FROM outbox WHERE stream = ? AND seq <= ?",
                                 (stream, upto))
                key = f"seq:{stream}"
                conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)",
                             (key,))
                moved = conn.execute("UPDATE counters SET value = ? WHERE name = ? AND value < ?",
                                     (upto, key, upto)).rowcount
                lost = len(rows) if moved else 0
                if lost:
                    # numbers the server had from an earlier file: it took these rows for
                    # duplicates, so they are lost, and counted as drops are
                    conn.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'",
                                 (lost,))
            self._depth -= len(rows)
            self._bytes -= sum(size for _, size in rows)
            self._dropped += lost
        if moved:
            log.warning("the server acknowledges %s up to %d, past this outbox's counter: "
                        "numbering continues after it (%d message(s) reused old numbers and "
                        "are counted as dropped)", stream, upto, lost)
        return [row_id for row_id, _ in rows]

    def set_state(self, name: str, value: bytes | None) -> None:
        """Keep (or with None, delete) a small named blob in the file, durably.

        Raises:
            OutboxError, OutboxFullError: the file failed; the old value stays.
        """
        with self._lock:
            conn = self._open_conn()
            try:
                if value is None:
                    conn.execute("DELETE FROM state WHERE name = ?", (name,))
                else:
                    conn.execute("INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)",
                                 (name, bytes(value)))
            except sqlite3.Error as exc:
                _rollback(conn)
                raise self._mapped(exc, f"state {name!r}") from exc

    def get_state(self, name: str) -> bytes | None:
        """The blob kept under ``name``, or None.

        Raises:
            OutboxError: the file failed.
        """
        with self._lock:
            try:
                row = self._open_conn().execute(
                    "SELECT value FROM state WHERE name = ?", (name,)).fetchone()
            except sqlite3.Error as exc:
                raise self._mapped(exc, f"state {name!r}") from exc
        return None if row is None else bytes(row[0])

    def next_sequence(self, name: str) -> int:
        """The next value (1, 2, ...) of a named counter kept in the same file, durably.

        The agent numbers its summaries and reports with these; the server de-duplicates on
        (device, sequence). The counter moves before the message is put, so a crash in
        between leaves a gap, never a number used twice.

        Raises:
            OutboxError: the file failed (the counter did not move).
        """
        with self._lock, self._transaction(f"sequence {name!r}") as conn:
            value = self._bump(conn, name)
        return int(value)

    # -- reading ---------------------------------------------------------------------------

    def pending(self, limit: int = 100, exclude: Collection[int] = ()) -> list[OutboxItem]:
        """Up to ``limit`` messages, oldest first, leaving out the ids in ``exclude``.

        Raises:
            OutboxError: the file failed.
        """
        if limit <= 0:
            return []
        skip = set(exclude)
        with self._lock:
            conn = self._open_conn()
            try:
                # excluded ids are the link's few in-flight messages: over-fetch and filter,
                # rather than build an IN (...) list of unbounded length
                rows = conn.execute(
                    "SELECT id, topic, payload, qos, created, stream, seq FROM outbox "
                    "ORDER BY id LIMIT ?",
                    (limit + len(skip),),
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._mapped(exc, "read") from exc
        items = [OutboxItem(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], r[6] or 0)
                 for r in rows if r[0] not in skip]
        return items[:limit]

    @property
    def depth(self) -> int:
        """The number of messages waiting."""
        return self._depth

    @property
    def size(self) -> int:
        """The payload bytes waiting."""
        return self._bytes

    @property
    def dropped(self) -> int:
        """Messages dropped because the outbox was full, over the file's whole life."""
        return self._dropped

    # -- wiring ----------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every successful put (outside the lock; errors logged)."""
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def close(self) -> None:
        """Close the file. Idempotent; any later operation raises :class:`OutboxError`."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r}, depth={self._depth}, dropped={self._dropped})"

    # -- internals -------------------------------------------------------------------------

    def _open_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"outbox {self.path} is closed", path=self.path)
        return self._conn

    def _mapped(self, exc: sqlite3.Error, what: str) -> OutboxError:
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and "full" in text:
            # "database or disk is full" (SQLITE_FULL), also raised at max_page_count
            return OutboxFullError(
                f"outbox {self.path} is full ({text}); {what} stored nothing", path=self.path
            )
        return OutboxError(f"outbox {self.path}: {what} failed: {text}", path=self.path)


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back (SQLITE_FULL does, for one); that is fine
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("outbox rollback failed")
