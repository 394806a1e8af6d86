"""The prediction store: recent predictions by id, joined with outcomes that come back later.

One SQLite file (``predictions.db`` under the agent's data directory, WAL), owned by one
process. It keeps, per served row: the prediction id, the time it was served, the bundle
that answered, the predicted class index (or a regressor's value) and the class
probabilities (float32, packed). An outcome (the true label, hours or weeks later) is
joined with its prediction here, and the joined row is kept, apart from the prediction,
until a summary has carried it to the server.

Writes come from the agent's background profiling worker, a chunk at a time (see
:mod:`edge_agent.window`): never from the request path, one transaction per chunk. A crash
(SIGKILL, power cut) may therefore lose the last chunk not yet written (at most
``CHUNK_ROWS``, 1,024 single rows, or the rows served since the daemon's last checkpoint,
which hands the buffer over: 5 s by default); an outcome for one of those predictions is
counted as ``unknown`` when it comes. Prediction chunks are committed with
``synchronous=NORMAL`` (a power cut may lose the last ones: the same loss); everything an
outcome changes (the join, its counters, the number of the last applied outcome batch) is
committed with ``synchronous=FULL``, so nothing the device has receipted can be undone.

Bounds (config ``[predictions]``): a horizon (default 30 days), a number of rows and a
number of bytes (the id, the probabilities and a fixed per-row overhead). The oldest rows
go first (insertion order, which is serving order). An evicted id leaves a tombstone (its
id only, at most ``max_rows`` of them, oldest dropped first), so a late outcome for it is
counted ``expired`` rather than ``unknown``. Bundles are kept in a small table of their own
(one row per installed bundle), so a prediction stays attributed to the bundle that made
it after the device has switched.

Outcomes, by reason (:data:`REASONS`): ``joined``; ``unknown`` (no such prediction);
``expired`` (past the horizon); ``duplicate`` (already labelled: the first label stands);
``bad_label`` (a label outside the predicting bundle's classes, or a non-finite or
non-numeric value for a regressor). A direct call (:meth:`PredictionStore.record` with
``strict=True``) refuses a bad label with
:class:`~edge_agent.errors.OutcomeLabelError` naming the id and applies nothing; a batch
from the server counts it. Nothing else is ever an error.

Exactly once into the summaries: joined rows and the refusal counters wait here marked
``report_seq = 0`` (unreported). :meth:`PredictionStore.claim` is called with the sequence
number ``S`` the outbox is about to give a summary, inside the outbox's transaction (see
:meth:`edge_agent.outbox.Outbox.put_sequenced`): it marks every unreported row, and every
row marked ``S`` or above by a claim whose summary was never stored, as ``S``, and
deletes the rows marked below ``S`` (the outbox hands out ``S`` only once ``S - 1`` is
committed, so those summaries are stored). A crash between the claim and the outbox
commit leaves the rows marked ``S``, and the next summary takes ``S`` again and claims
them again; a crash after it leaves them marked with a stored summary's number. Either
way each joined row is in exactly one stored summary.

Outcome batches from the server (:meth:`PredictionStore.apply_batch`): batch ``n`` is
applied only when ``n - 1`` was, and the batch number is stored in the same transaction as
its joins (see :mod:`edgefleet.contract.messages`).

This module does not serve, profile, compute metrics or talk to the network.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.claims import REASONS, BundleRows, Claim, OutcomeCounts
from edge_agent.errors import OutcomeLabelError, PredictionStoreError
from edge_agent.labels import class_indices, class_keys, label_key
from edgefleet.contract.messages import BundleRef
from edgefleet.contract.performance import MAX_ENTRIES

__all__ = ["REASONS", "BundleRows", "Claim", "OutcomeCounts", "PredictionStore",
           "class_indices", "class_keys"]

log = logging.getLogger(__name__)

ROW_OVERHEAD = 48  # bytes a row costs beyond its id and probabilities (an estimate)
# one summary carries at most this many bundles' labelled rows, and the live bundle's
# estimate beside them: MAX_ENTRIES performance entries in all
MAX_BUNDLES_PER_CLAIM = MAX_ENTRIES - 1
_EVICT_BATCH = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    id       INTEGER PRIMARY KEY,
    name     TEXT NOT NULL,
    version  TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    task     TEXT NOT NULL,
    classes  TEXT NOT NULL,
    UNIQUE (name, version, sha256)
);
CREATE TABLE IF NOT EXISTS predictions (
    id        TEXT NOT NULL UNIQUE,
    t         REAL NOT NULL,
    bundle    INTEGER NOT NULL,
    pred      REAL NOT NULL,
    proba     BLOB,
    labelled  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS evicted (
    id  TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS joined (
    bundle      INTEGER NOT NULL,
    pred        REAL NOT NULL,
    truth       REAL NOT NULL,
    proba       BLOB,
    delay       REAL NOT NULL,
    report_seq  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS joined_seq ON joined (report_seq);
CREATE TABLE IF NOT EXISTS counts (
    reason      TEXT NOT NULL,
    report_seq  INTEGER NOT NULL,
    n           INTEGER NOT NULL,
    PRIMARY KEY (reason, report_seq)
);
CREATE TABLE IF NOT EXISTS meta (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class _Bundle:
    ref: BundleRef
    task: str
    classes: tuple[Any, ...]
    index: dict[str, int]  # label key -> class index


class PredictionStore:
    """Recent predictions and their outcomes in one SQLite file (see the module docstring).

    Args:
        path: the SQLite file (``":memory:"`` for a store that lives with the process).
        horizon_s: predictions older than this are evicted (and their outcomes ``expired``).
        max_rows: most predictions kept.
        max_bytes: most bytes of predictions kept (ids, probabilities, per-row overhead).
        clock: wall-clock seconds (prediction times, label delays, the horizon).

    Raises:
        PredictionStoreError: the file cannot be opened as a prediction store.
    """

    def __init__(self, path: Path | str, *, horizon_s: float = 30 * 86400.0,
                 max_rows: int = 1_000_000, max_bytes: int = 256 * 1024 * 1024,
                 clock: Callable[[], float] = time.time) -> None:
        if horizon_s <= 0 or max_rows < 1 or max_bytes < 1:
            raise ValueError("prediction store bounds must be positive")
        self.path = path
        self.horizon_s = float(horizon_s)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._bundles: dict[int, _Bundle] = {}
        self._ids: dict[tuple[str, str, str], int] = {}
        self.totals = OutcomeCounts()  # since this process started (health)
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
        except sqlite3.Error as exc:
            raise PredictionStoreError(f"cannot open prediction store {path}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('batch', 0)")
            for bid, name, version, sha, task, classes in conn.execute(
                    "SELECT id, name, version, sha256, task, classes FROM bundles"):
                self._remember(bid, BundleRef(name, version, sha), task,
                               tuple(json.loads(classes)))
            rows, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(id) + COALESCE(LENGTH(proba), 0)), 0) "
                "FROM predictions").fetchone()
            # anything left from before (perhaps claimed by a summary that was stored)
            (waiting,) = conn.execute("SELECT EXISTS (SELECT 1 FROM joined) OR "
                                      "EXISTS (SELECT 1 FROM counts)").fetchone()
        except (sqlite3.Error, ValueError) as exc:
            conn.close()
            raise PredictionStoreError(f"{path}: not a usable prediction store: {exc}") \
                from exc
        self._conn: sqlite3.Connection | None = conn
        self._rows = int(rows)
        self._bytes = int(size) + ROW_OVERHEAD * self._rows
        self._waiting = bool(waiting)

    # -- bundles -------------------------------------------------------------------------

    def _remember(self, bid: int, ref: BundleRef, task: str, classes: tuple[Any, ...]) -> None:
        self._bundles[bid] = _Bundle(ref, task, classes, class_keys(classes))
        self._ids[(ref.name, ref.version, ref.sha256)] = bid

    def register(self, ref: BundleRef, task: str, classes: Sequence[Any]) -> int:
        """The store's number for a bundle (added on first sight); predictions name it.

        Raises:
            PredictionStoreError: the file failed.
        """
        key = (ref.name, ref.version, ref.sha256)
        with self._lock:
            bid = self._ids.get(key)
            if bid is not None:
                return bid
            conn = self._open()
            try:
                cur = conn.execute(
                    "INSERT INTO bundles (name, version, sha256, task, classes) "
                    "VALUES (?, ?, ?, ?, ?)", (*key, task, json.dumps(list(classes))))
            except sqlite3.Error as exc:
                raise PredictionStoreError(f"{self.path}: cannot record bundle "
                                           f"{ref.label}: {exc}") from exc
            bid = int(cur.lastrowid)
            self._remember(bid, BundleRef(*key), task, tuple(classes))
            return bid

    # -- predictions (the profiling worker) -----------------------------------------------

    def add(self, bundle: int, ids: Sequence[str], times: np.ndarray | float,
            predicted: np.ndarray, probabilities: np.ndarray | None) -> int:
        """Store one chunk of served rows; return how many ids were already stored (those
        rows are not stored again: the first prediction with an id keeps it).

        Raises:
            PredictionStoreError: the file failed; nothing of the chunk was stored.
        """
        n = len(ids)
        if n == 0:
            return 0
        t = (np.full(n, float(times)) if np.isscalar(times)
             else np.asarray(times, dtype=np.float64)).tolist()
        pred = np.asarray(predicted).reshape(-1).tolist()
        if probabilities is None:
            blobs: list[bytes | None] = [None] * n
            width = 0
        else:
            packed = np.ascontiguousarray(probabilities, dtype=np.float32)
            width = packed.shape[1] * 4
            raw = packed.tobytes()
            blobs = [raw[i * width:(i + 1) * width] for i in range(n)]
        with self._lock:
            conn = self._open()
            try:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.executemany(
                    "INSERT OR IGNORE INTO predictions (id, t, bundle, pred, proba) "
                    "VALUES (?, ?, ?, ?, ?)", zip(ids, t, [bundle] * n, pred, blobs,
                                                  strict=True))
                stored = max(0, cur.rowcount)
                if stored == n:
                    self._rows += n
                    self._bytes += n * (ROW_OVERHEAD + width) + sum(map(len, ids))
                else:  # some ids were stored already (rare): count what is there
                    self._recount(conn)
                self._evict(conn, self.clock())
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                self._recount(conn)
                raise PredictionStoreError(f"{self.path}: cannot store predictions: "
                                           f"{exc}") from exc
        return n - stored

    def _recount(self, conn: sqlite3.Connection) -> None:
        try:
            rows, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(id) + COALESCE(LENGTH(proba), 0)), 0) "
                "FROM predictions").fetchone()
        except sqlite3.Error:
            return
        self._rows, self._bytes = int(rows), int(size) + ROW_OVERHEAD * int(rows)

    def evict(self, now: float | None = None) -> int:
        """Drop predictions past the horizon or beyond the bounds; how many went.

        Raises:
            PredictionStoreError: the file failed.
        """
        with self._lock:
            conn = self._open()
            try:
                conn.execute("BEGIN IMMEDIATE")
                gone = self._evict(conn, self.clock() if now is None else now)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                self._recount(conn)
                raise PredictionStoreError(f"{self.path}: eviction failed: {exc}") from exc
        return gone

    def _evict(self, conn: sqlite3.Connection, now: float) -> int:
        cutoff = now - self.horizon_s
        if self._rows <= self.max_rows and self._bytes <= self.max_bytes:
            oldest = conn.execute("SELECT t FROM predictions ORDER BY rowid LIMIT 1").fetchone()
            if oldest is None or oldest[0] >= cutoff:
                return 0  # the common case: within every bound
        gone = 0
        while self._rows > 0:
            batch = conn.execute(
                "SELECT rowid, id, t, LENGTH(id) + COALESCE(LENGTH(proba), 0) "
                "FROM predictions ORDER BY rowid LIMIT ?", (_EVICT_BATCH,)).fetchall()
            last, ids = None, []
            for rowid, pid, t, size in batch:
                if t >= cutoff and self._rows <= self.max_rows \
                        and self._bytes <= self.max_bytes:
                    break
                last = rowid
                ids.append((pid,))
                self._rows -= 1
                self._bytes -= size + ROW_OVERHEAD
            if last is None:
                break
            conn.execute("DELETE FROM predictions WHERE rowid <= ?", (last,))
            conn.executemany("INSERT OR IGNORE INTO evicted (id) VALUES (?)", ids)
            gone += len(ids)
            if len(ids) < len(batch):
                break
        if gone:
            (top,) = conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM evicted").fetchone()
            conn.execute("DELETE FROM evicted WHERE rowid <= ?", (top - self.max_rows,))
        return gone

    # -- outcomes -------------------------------------------------------------------------

    def record(self, outcomes: Iterable[tuple[str, Any]], *, strict: bool = True,
               now: float | None = None) -> OutcomeCounts:
        """Join outcomes ``(id, label)`` with their predictions, in one transaction.

        Raises:
            OutcomeLabelError: ``strict`` and a label outside its bundle's classes (or not
                a finite number for a regressor); nothing was applied.
            PredictionStoreError: the file failed; nothing was applied.
        """
        with self._lock:
            with self._durably("record outcomes") as conn:
                counts = self._join(conn, outcomes, strict, self.clock() if now is None
                                    else now)
            self._counted(counts)
        return counts

    def apply_batch(self, batch: int, outcomes: Iterable[tuple[str, Any]], *,
                    now: float | None = None) -> tuple[OutcomeCounts | None, int]:
        """Apply numbered outcome batch ``batch`` if it is the next one (its bad labels
        counted, never raised); ``(counts, highest applied batch)``, counts None when the
        batch was from the past (already applied) or the future (ignored).

        Raises:
            PredictionStoreError: the file failed; nothing was applied.
        """
        with self._lock:
            with self._durably(f"apply outcome batch {batch}") as conn:
                (applied,) = conn.execute(
                    "SELECT value FROM meta WHERE name = 'batch'").fetchone()
                if batch != applied + 1:  # read only: nothing to commit
                    return None, int(applied)
                counts = self._join(conn, outcomes, False, self.clock() if now is None
                                    else now)
                conn.execute("UPDATE meta SET value = ? WHERE name = 'batch'", (batch,))
            self._counted(counts)
        return counts, batch

    @contextmanager
    def _durably(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, on the disk (``synchronous=FULL``) when it commits: a
        joined outcome is never counted twice nor lost. Any error rolls it back; a file
        error is a :class:`PredictionStoreError` saying what could not be done. The caller
        holds the lock."""
        conn = self._open()
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            if conn.in_transaction:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise PredictionStoreError(f"{self.path}: cannot {what}: {exc}") from exc
        except BaseException:
            _rollback(conn)
            raise
        finally:
            _normal(conn)

    def _counted(self, counts: OutcomeCounts) -> None:
        self.totals += counts
        self._waiting = self._waiting or counts != OutcomeCounts()

    @property
    def applied_batch(self) -> int:
        """The highest outcome batch applied (0: none)."""
        with self._lock:
            (value,) = self._open().execute(
                "SELECT value FROM meta WHERE name = 'batch'").fetchone()
        return int(value)

    # One function: the lookups, checks and writes of one transaction.
    def _join(self, conn: sqlite3.Connection, outcomes: Iterable[tuple[str, Any]],
              strict: bool, now: float) -> OutcomeCounts:
        tally = dict.fromkeys(("joined", *REASONS), 0)
        cutoff = now - self.horizon_s
        outcomes = list(outcomes)
        found = _lookup(conn, "SELECT id, rowid, t, bundle, pred, proba, labelled "
                        "FROM predictions WHERE id IN ({})", {pid for pid, _ in outcomes})
        gone = _lookup(conn, "SELECT id FROM evicted WHERE id IN ({})",
                       {pid for pid, _ in outcomes if pid not in found})
        joins, labelled_now = [], []
        for pid, label in outcomes:
            row = found.get(pid)
            if row is None:
                tally["expired" if pid in gone else "unknown"] += 1
                continue
            rowid, t, bundle, pred, proba, labelled = row
            if labelled:
                tally["duplicate"] += 1
                continue
            if t < cutoff:
                tally["expired"] += 1
                continue
            truth = self._truth(bundle, label)
            if truth is None:
                if strict:
                    info = self._bundles.get(bundle)
                    raise OutcomeLabelError(
                        f"outcome {pid}: label {label!r} is not "
                        + ("a finite number (the bundle is a regressor)"
                           if info is not None and info.task == "regression" else
                           f"one of the classes of {info.ref.label if info else 'its bundle'}"
                           f" ({', '.join(map(str, info.classes if info else ()))})"),
                        id=pid)
                tally["bad_label"] += 1
                continue
            found[pid] = (rowid, t, bundle, pred, proba, 1)  # a repeat in this call
            labelled_now.append((rowid,))
            joins.append((bundle, pred, truth, proba, max(0.0, now - t)))
            tally["joined"] += 1
        if joins:
            conn.executemany("UPDATE predictions SET labelled = 1 WHERE rowid = ?",
                             labelled_now)
            conn.executemany("INSERT INTO joined (bundle, pred, truth, proba, delay) "
                             "VALUES (?, ?, ?, ?, ?)", joins)
        for reason in REASONS:
            if tally[reason]:
                conn.execute("INSERT INTO counts (reason, report_seq, n) VALUES (?, 0, ?) "
                             "ON CONFLICT (reason, report_seq) DO UPDATE SET n = n + "
                             "excluded.n", (reason, tally[reason]))
        return OutcomeCounts(**tally)

    def _truth(self, bundle: int, label: Any) -> float | None:
        info = self._bundles.get(bundle)
        if info is None:
            return None
        if info.task == "regression":
            if isinstance(label, bool) or not isinstance(label, (int, float)) \
                    or not math.isfinite(label):
                return None
            return float(label)
        index = info.index.get(label_key(label) or "")
        return None if index is None else float(index)

    # -- reporting ------------------------------------------------------------------------

    def claim(self, seq: int) -> Claim:
        """Mark the unreported joined rows and counters for the summary numbered ``seq``
        and return them (see the module docstring: call it inside the outbox's
        transaction that stores that summary; calling it again for ``seq`` is harmless).

        Raises:
            PredictionStoreError: the file failed; nothing was marked.
        """
        with self._lock:
            conn = self._open()
            try:
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("DELETE FROM joined WHERE report_seq BETWEEN 1 AND ?", (seq - 1,))
                conn.execute("DELETE FROM counts WHERE report_seq BETWEEN 1 AND ?", (seq - 1,))
                open_rows = "(report_seq = 0 OR report_seq >= ?)"
                # the bundles an earlier claim of this seq took come first, so a retry
                # never leaves rows marked with a seq whose summary does not carry them
                chosen = [b for (b,) in conn.execute(
                    f"SELECT bundle FROM joined WHERE {open_rows} GROUP BY bundle "
                    "ORDER BY MAX(report_seq = ?) DESC, MIN(rowid) LIMIT ?",
                    (seq, seq, MAX_BUNDLES_PER_CLAIM))]
                marks = ",".join("?" * len(chosen))
                conn.execute(f"UPDATE joined SET report_seq = 0 WHERE report_seq >= ? "
                             f"AND bundle NOT IN ({marks})", (seq, *chosen))
                if chosen:
                    conn.execute(f"UPDATE joined SET report_seq = ? WHERE {open_rows} "
                                 f"AND bundle IN ({marks})", (seq, seq, *chosen))
                sums = conn.execute(f"SELECT reason, SUM(n) FROM counts WHERE {open_rows} "
                                    "GROUP BY reason", (seq,)).fetchall()
                conn.execute(f"DELETE FROM counts WHERE {open_rows}", (seq,))
                conn.executemany("INSERT INTO counts (reason, report_seq, n) VALUES (?, ?, ?)",
                                 [(r, seq, int(n)) for r, n in sums])
                rows = conn.execute("SELECT bundle, pred, truth, proba, delay FROM joined "
                                    "WHERE report_seq = ? ORDER BY rowid", (seq,)).fetchall()
                (more,) = conn.execute("SELECT EXISTS (SELECT 1 FROM joined WHERE "
                                       "report_seq = 0)").fetchone()
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise PredictionStoreError(f"{self.path}: cannot claim outcomes for "
                                           f"summary {seq}: {exc}") from exc
            finally:
                _normal(conn)
            self._waiting = bool(more)
        return Claim(seq, self._arrays(rows), {r: int(n) for r, n in sorted(sums)} or None)

    def _arrays(self, rows: list[tuple]) -> tuple[BundleRows, ...]:
        by_bundle: dict[int, list[tuple]] = {}
        for row in rows:
            by_bundle.setdefault(row[0], []).append(row)
        out = []
        for bid, items in by_bundle.items():
            info = self._bundles[bid]
            _, pred, truth, proba, delay = zip(*items, strict=True)
            regression = info.task == "regression"
            kind = np.float64 if regression else np.int64
            scores = None
            if not regression and proba[0] is not None:
                width = len(proba[0]) // 4
                scores = np.frombuffer(b"".join(proba), dtype=np.float32) \
                    .reshape(-1, width).astype(np.float64)
            out.append(BundleRows(info.ref, info.task, info.classes,
                                  np.asarray(pred, dtype=np.float64).astype(kind),
                                  np.asarray(truth, dtype=np.float64).astype(kind), scores,
                                  np.asarray(delay, dtype=np.float64)))
        return tuple(out)

    # -- state ----------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Predictions stored."""
        return self._rows

    @property
    def bytes(self) -> int:
        """Bytes the stored predictions count for against ``max_bytes``."""
        return self._bytes

    @property
    def waiting(self) -> bool:
        """Whether outcomes (joined rows or counters) wait for a summary: a window with
        no rows is then still reported, to carry them."""
        return self._waiting

    def unreported(self) -> int:
        """Joined rows no summary has claimed yet."""
        with self._lock:
            (n,) = self._open().execute(
                "SELECT COUNT(*) FROM joined WHERE report_seq = 0").fetchone()
        return int(n)

    def close(self) -> None:
        """Close the file. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise PredictionStoreError(f"prediction store {self.path} is closed")
        return self._conn

    def __repr__(self) -> str:
        return f"PredictionStore({self.path}, rows={self._rows})"


def _lookup(conn: sqlite3.Connection, sql: str, ids: set[str]) -> dict[str, tuple]:
    """Rows by id (the first column), for many ids, a few hundred per query."""
    out: dict[str, tuple] = {}
    ordered = sorted(ids)
    for i in range(0, len(ordered), 500):
        part = ordered[i:i + 500]
        for row in conn.execute(sql.format(",".join("?" * len(part))), part):
            out[row[0]] = row[1:]
    return out


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        log.exception("rollback of the prediction store failed")


def _normal(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error:
        log.exception("could not set the prediction store back to synchronous=NORMAL")
