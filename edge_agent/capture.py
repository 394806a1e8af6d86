"""Data capture: a bounded, uniform sample of served rows, uploaded to the server for retraining.

Off unless the config's ``[capture]`` section enables it: the device owner's "no" wins,
whatever its groups say. A device that enables it may be narrowed by its group, through the
desired state (:class:`~edgefleet.contract.messages.CapturePolicy`, :meth:`Capture.apply`):
the device's config is an upper bound, so the group's policy gets the stricter rate, the
smaller cap and the intersection of the allowlists (:func:`effective`); a group's "off"
stops sampling at once (the open window's sample is dropped, never written); a desired
state without a policy (a group that sets none, or a server older than capture per group)
leaves the device's own config. A change closes the open window (its sample, taken under the
old settings, is queued) and the next window samples under the new ones, without a restart.
The policy applied is kept in ``capture.db``, so a restarted agent samples under it before
the broker hands it the retained desired state again. Then, per window of
``window_seconds``:

1. every served row is a candidate with probability ``rate``, and the candidates go
   through a reservoir of ``max_rows`` (Algorithm R), so the window's sample is uniform
   over the window and never larger than ``max_rows`` (:class:`Reservoir`, pure);
2. a sampled row keeps only the features of the allowlist (``features``): the others are
   never read, so they are never written to disk nor sent; with the row go its prediction
   id, serving time, the bundle that answered and the model's outputs;
3. when the window ends (or the agent stops), its sample is appended to a durable queue
   (``capture.db``, :class:`CaptureQueue`), bounded in rows and bytes: past a bound the
   oldest rows go, counted as ``dropped``;
4. the uploader (:class:`Uploader`, a thread) cuts the oldest queued rows into a batch of
   at most ``batch_rows`` rows and ``batch_bytes`` bytes **with a random id, stored in the
   same transaction that takes the rows off the queue**, and POSTs it to
   ``/api/v1/capture`` with the device's secret (as bundle downloads do). Only a 2xx answer
   (stored, or a duplicate of a stored batch) deletes the batch; a network error or a 5xx
   keeps it and the same bytes with the same id go again later. The server stores a batch
   id once per device, so each row is stored once across agent restarts and server
   outages. A 401 is retried too (a credential being rotated); another 4xx but 408/429
   (the server refuses the batch itself) drops it, counted as ``refused``: sending it
   again cannot help.

Labels that join on the device (the local API's ``/outcomes``, ``Agent.record_outcomes``)
for a row this device captured go to the server too (:meth:`Capture.label`): the queue
remembers the ids of the last ``queue_max_rows`` rows it captured, keeps each such label
once (the first stands, as on the server) and sends it in the ``outcomes`` of the next
batch, with the row when the row is still queued, after it otherwise. A label for a row
that was not captured never leaves the device. Labels routed by the server are not sent
back: the server joined them already.

The sampling is done by the agent's profiling worker (never on the request path).
This module does not choose features or train; the server joins the labels it gets with
the rows.
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.download import _NoRedirect
from edge_agent.errors import CaptureError
from edgefleet.contract.capture import MAX_BATCH_BYTES, encode_rows
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import CapturePolicy
from edgefleet.contract.wire import parse_json

__all__ = ["Capture", "CaptureConfig", "CaptureQueue", "Reservoir", "Uploader", "effective"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureConfig:
    """The ``[capture]`` section (see :mod:`edge_agent.config` for the defaults)."""

    features: tuple[str, ...]
    rate: float = 0.01
    max_rows: int = 1000
    window_s: float = 3600.0
    upload_s: float = 60.0
    batch_rows: int = 500
    batch_bytes: int = 512 * 1024
    queue_max_rows: int = 100_000
    queue_max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.features:
            raise CaptureError("capture.features: the allowlist is empty")
        if not 0 < self.rate <= 1:
            raise CaptureError("capture.rate must be > 0 and <= 1")
        if min(self.max_rows, self.batch_rows, self.queue_max_rows) < 1:
            raise CaptureError("capture row bounds must be >= 1")
        if not 0 < self.batch_bytes <= MAX_BATCH_BYTES:
            raise CaptureError(f"capture.batch_bytes must be in 1..{MAX_BATCH_BYTES}")


def effective(local: CaptureConfig, policy: CapturePolicy | None) -> CaptureConfig | None:
    """The settings to sample under: the device's own, narrowed by its group's ``policy``
    (None: the group sets none). None: capture is off (the group said off, its rate is 0,
    or its allowlist and the device's have no feature in common)."""
    if policy is None:
        return local
    if not policy.enabled or policy.rate <= 0:
        return None
    features = local.features if policy.features is None else \
        tuple(f for f in local.features if f in set(policy.features))
    if not features:
        return None
    return replace(local, features=features, rate=min(local.rate, policy.rate),
                   max_rows=min(local.max_rows, policy.max_rows))


class Reservoir:
    """A uniform sample of at most ``max_rows`` of the rows offered, each first kept with
    probability ``rate``. Pure but for its random generator (seed it to test)."""

    def __init__(self, rate: float, max_rows: int, rng: random.Random | None = None) -> None:
        self.rate = rate
        self.max_rows = max_rows
        self.rng = rng or random.Random()
        self._np = np.random.default_rng(self.rng.getrandbits(64))
        self.sample: list[Any] = []
        self.seen = 0  # rows offered this window
        self.candidates = 0  # rows that passed the rate this window

    def offer(self, n: int, make: Callable[[int], Any]) -> None:
        """Offer ``n`` rows; ``make(i)`` builds row ``i`` only if it is kept."""
        self.seen += n
        if self.rate >= 1:
            picked: Sequence[int] = range(n)
        else:
            picked = np.flatnonzero(self._np.random(n) < self.rate).tolist()
        for i in picked:
            self.candidates += 1
            if len(self.sample) < self.max_rows:
                self.sample.append(make(i))
            else:
                j = self.rng.randrange(self.candidates)
                if j < self.max_rows:
                    self.sample[j] = make(i)

    def take(self) -> list[Any]:
        """The window's sample; the reservoir starts a new window."""
        out, self.sample = self.sample, []
        self.seen = self.candidates = 0
        return out


def _py(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def encode_row(pid: str, at: float, bundle: str, columns: dict[str, Any], i: int,
               allow: Sequence[str], labels: Any, proba: Any, values: Any) -> bytes:
    """One sampled row, JSON, with only the allowlisted features read."""
    features = {name: _py(columns[name][i]) for name in allow if name in columns}
    row = {"id": pid, "time": float(at), "bundle": bundle, "features": features,
           "label": None if labels is None else _py(labels[i]),
           "probabilities": None if proba is None
           else [float(p) for p in np.asarray(proba[i], dtype=np.float64).tolist()],
           "value": None if values is None else _py(np.asarray(values).reshape(-1)[i])}
    return json.dumps(row, separators=(",", ":"), allow_nan=False).encode()


class CaptureQueue:
    """The durable queue of sampled rows and the batch being uploaded (``capture.db``)."""

    def __init__(self, path: Path | str, *, max_rows: int, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False,
                                         isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(
                "CREATE TABLE IF NOT EXISTS rows (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "body BLOB NOT NULL, size INTEGER NOT NULL);"
                "CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, "
                "body BLOB NOT NULL, rows INTEGER NOT NULL, made INTEGER NOT NULL);"
                "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, "
                "value INTEGER NOT NULL);"
                # the ids of rows captured (the newest max_rows), and the labels that
                # joined on the device for them, waiting for the next batch
                "CREATE TABLE IF NOT EXISTS captured_ids (seq INTEGER PRIMARY KEY "
                "AUTOINCREMENT, pid TEXT NOT NULL UNIQUE);"
                "CREATE TABLE IF NOT EXISTS labels (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "pid TEXT NOT NULL UNIQUE, body BLOB NOT NULL);"
                # the group's policy last applied (Capture.apply), JSON; none: no row
                "CREATE TABLE IF NOT EXISTS policy (one INTEGER PRIMARY KEY CHECK (one = 1), "
                "body TEXT NOT NULL);")
        except sqlite3.Error as exc:
            raise CaptureError(f"{self.path}: cannot open the capture queue ({exc})") from exc

    def _count(self, name: str, n: int) -> None:
        self._conn.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                           "SET value = value + excluded.value", (name, n))

    def policy(self) -> CapturePolicy | None:
        """The group's policy last applied (None: none, or one this agent cannot read)."""
        with self._lock:
            row = self._conn.execute("SELECT body FROM policy").fetchone()
        if row is None:
            return None
        try:
            return CapturePolicy.from_dict(parse_json(row[0].encode(), what="capture policy",
                                                      max_bytes=1 << 20), "policy")
        except SchemaError as exc:
            log.warning("%s: ignored the stored capture policy (%s)", self.path, exc)
            return None

    def set_policy(self, policy: CapturePolicy | None) -> None:
        with self._lock:
            if policy is None:
                self._conn.execute("DELETE FROM policy")
            else:
                self._conn.execute("INSERT INTO policy VALUES (1, ?) ON CONFLICT (one) DO "
                                   "UPDATE SET body = excluded.body",
                                   (json.dumps(policy.to_dict()),))

    def counter(self, name: str) -> int:
        with self._lock:
            row = self._conn.execute("SELECT value FROM counters WHERE name = ?",
                                     (name,)).fetchone()
        return row[0] if row else 0

    def put(self, rows: Sequence[bytes], batch_bytes: int) -> int:
        """Append rows; past the bounds the oldest go (counted ``dropped``), a row larger
        than a batch may be is dropped at once. Returns the rows dropped."""
        keep = [r for r in rows if len(r) + 64 <= batch_bytes]
        dropped = len(rows) - len(keep)
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany("INSERT INTO rows (body, size) VALUES (?, ?)",
                              [(r, len(r)) for r in keep])
                self._remember(c, keep)
                n, size = c.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM rows"
                                    ).fetchone()
                b, bsize = c.execute("SELECT COALESCE(SUM(rows), 0), "
                                     "COALESCE(SUM(LENGTH(body)), 0) FROM batches").fetchone()
                over_rows, over_bytes = n + b - self.max_rows, size + bsize - self.max_bytes
                if over_rows > 0 or over_bytes > 0:
                    cut, freed, gone = 0, 0, 0
                    for seq, s in c.execute("SELECT seq, size FROM rows ORDER BY seq"):
                        if gone >= over_rows and freed >= over_bytes:
                            break
                        cut, freed, gone = seq, freed + s, gone + 1
                    if gone:
                        c.execute("DELETE FROM rows WHERE seq <= ?", (cut,))
                    dropped += gone
                if dropped:
                    self._count("dropped", dropped)
                self._count("sampled", len(rows))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return dropped

    def _remember(self, c: sqlite3.Connection, rows: Sequence[bytes]) -> None:
        """Keep the ids of captured rows (the newest ``max_rows``): a label that joins on
        the device later is sent only for them."""
        pids = [(json.loads(r)["id"],) for r in rows]
        c.executemany("INSERT INTO captured_ids (pid) VALUES (?) ON CONFLICT DO NOTHING",
                      pids)
        c.execute("DELETE FROM captured_ids WHERE seq <= (SELECT MAX(seq) FROM captured_ids)"
                  " - ?", (self.max_rows,))

    def label(self, outcomes: Sequence[tuple[str, Any]]) -> int:
        """Queue the labels of captured rows among ``(prediction id, label)`` (the first
        label of a row stands); others are ignored. Returns the labels queued."""
        if not outcomes:
            return 0
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                known: set[str] = set()
                pids = list({pid for pid, _ in outcomes})
                for lo in range(0, len(pids), 500):
                    part = pids[lo:lo + 500]
                    known.update(r[0] for r in c.execute(
                        f"SELECT pid FROM captured_ids WHERE pid IN "
                        f"({', '.join('?' * len(part))})", part))
                fresh = [(pid, json.dumps({"id": pid, "label": _py(label)},
                                          separators=(",", ":"), allow_nan=False).encode())
                         for pid, label in outcomes if pid in known]
                before = c.total_changes
                c.executemany("INSERT INTO labels (pid, body) VALUES (?, ?) "
                              "ON CONFLICT DO NOTHING", fresh)
                queued = c.total_changes - before
                if queued:
                    self._count("labels", queued)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return queued

    def next_batch(self, max_rows: int, max_bytes: int) -> tuple[str, bytes, int] | None:
        """The batch to send: the one already cut (same id, same bytes), else a new one cut
        from the oldest rows and labels (id stored as they leave the queue); None when
        there is nothing to send."""
        with self._lock:
            c = self._conn
            row = c.execute("SELECT id, body, rows FROM batches ORDER BY made LIMIT 1"
                            ).fetchone()
            if row is not None:
                return row[0], bytes(row[1]), row[2]
            bodies, seqs, size = [], [], 96
            for seq, body in c.execute("SELECT seq, body FROM rows ORDER BY seq LIMIT ?",
                                       (max_rows,)):
                if size + len(body) + 1 > max_bytes and bodies:
                    break
                bodies.append(bytes(body))
                seqs.append(seq)
                size += len(body) + 1
            labels, label_seqs = [], []
            for seq, body in c.execute("SELECT seq, body FROM labels ORDER BY seq LIMIT ?",
                                       (max(0, max_rows - len(bodies)),)):
                if size + len(body) + 1 > max_bytes:
                    break
                labels.append(bytes(body))
                label_seqs.append(seq)
                size += len(body) + 1
            if not bodies and not labels:
                return None
            batch_id = secrets.token_hex(16)
            body = encode_rows(batch_id, bodies, labels)
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute("INSERT INTO batches VALUES (?, ?, ?, ?)",
                          (batch_id, body, len(bodies), time.time_ns()))
                if seqs:
                    c.execute("DELETE FROM rows WHERE seq <= ?", (seqs[-1],))
                if label_seqs:
                    c.execute("DELETE FROM labels WHERE seq <= ?", (label_seqs[-1],))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            return batch_id, body, len(bodies)

    def done(self, batch_id: str, counter: str = "uploaded") -> None:
        """The batch is settled (stored by the server, or refused for good)."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            row = c.execute("SELECT rows FROM batches WHERE id = ?", (batch_id,)).fetchone()
            c.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
            if row:
                self._count(counter, row[0])
            c.execute("COMMIT")

    def depth(self) -> int:
        """Rows waiting: queued and in the batch being sent."""
        with self._lock:
            n = self._conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
            b = self._conn.execute("SELECT COALESCE(SUM(rows), 0) FROM batches").fetchone()[0]
        return n + b

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Capture:
    """The sampler over windows, fed by the agent's profiling worker.

    ``local`` is the device's own config (the upper bound); ``config`` the settings sampled
    under now, narrowed by the group's policy (None: off by the group).
    """

    def __init__(self, config: CaptureConfig, queue: CaptureQueue, *,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.local = config
        self.queue = queue
        self.clock = clock
        self.rng = rng or random.Random()
        self.policy = queue.policy()  # the group's, as last applied (kept across restarts)
        self.config: CaptureConfig | None = effective(config, self.policy)
        self.reservoir = self._reservoir(self.config)
        self._lock = threading.Lock()
        self._window_start = clock()
        self._waiting: dict[str, Any] = {}  # labels of rows in the open window's sample

    def _reservoir(self, config: CaptureConfig | None) -> Reservoir:
        config = config or self.local  # off: an empty reservoir nothing is offered to
        return Reservoir(config.rate, config.max_rows, self.rng)

    def apply(self, policy: CapturePolicy | None) -> bool:
        """Sample under the group's ``policy`` from now on (see the module docstring): off
        drops the open window's sample; another change queues it and opens a new window.
        Returns whether anything changed."""
        if policy == self.policy:
            return False
        new = effective(self.local, policy)
        self.queue.set_policy(policy)
        with self._lock:
            self.policy = policy
            if new == self.config:
                return False
            old, self.config = self.config, new
            sample = self.reservoir.take()
            waiting, self._waiting = self._waiting, {}
            self.reservoir = self._reservoir(new)
            self._window_start = self.clock()
        if new is None:
            log.info("data capture off by the group's policy: %d sampled row(s) of the open "
                     "window dropped", len(sample))
            return True
        if old is not None and sample:
            self.queue.put(sample, self.local.batch_bytes)
            if waiting:
                self.queue.label(list(waiting.items()))
        log.info("data capture under the group's policy: rate %g, at most %d rows a window, "
                 "features %s", new.rate, new.max_rows, ",".join(new.features))
        return True

    def observe(self, bundle: str, columns: dict[str, Any], n: int, ids: Sequence[str],
                times: Any, labels: Any, proba: Any, values: Any) -> None:
        """Offer a profiled chunk's rows (the profiling worker's call)."""
        times_of = (lambda i: times) if isinstance(times, float) else (lambda i: times[i])
        with self._lock:
            if self.config is None:
                return  # off by the group: not a row is read
            allow = self.config.features

            def make(i: int) -> bytes:
                return encode_row(ids[i], times_of(i), bundle, columns, i, allow, labels,
                                  proba, values)

            self.reservoir.offer(min(n, len(ids)), make)
        self.roll()

    def roll(self, force: bool = False) -> int:
        """End the window when it is due (or ``force``): its sample goes to the queue.
        Returns the rows queued."""
        with self._lock:
            now = self.clock()
            if not force and now - self._window_start < self.local.window_s:
                return 0
            self._window_start = now
            sample = self.reservoir.take()
            waiting, self._waiting = self._waiting, {}
        if sample:
            self.queue.put(sample, self.local.batch_bytes)
            if waiting:
                self.queue.label(list(waiting.items()))
        return len(sample)

    def label(self, outcomes: Sequence[tuple[str, Any]]) -> int:
        """Labels that joined on the device: those of rows this device captured go to the
        server with the next batch (see the module docstring). A label for a row still in
        the open window's sample waits with it: queued if the row is, dropped if the
        reservoir lets the row go. Returns the labels queued now."""
        with self._lock:
            sampled = {json.loads(r)["id"] for r in self.reservoir.sample}
            for pid, label in outcomes:
                if pid in sampled:
                    self._waiting.setdefault(pid, label)
        return self.queue.label(outcomes)


class Uploader:
    """Sends the queue's batches to ``{server}/api/v1/capture`` (see the module docstring)."""

    def __init__(self, queue: CaptureQueue, server_url: str, token: str, *,
                 batch_rows: int, batch_bytes: int, timeout_s: float = 30.0,
                 ca_file: Path | None = None) -> None:
        self.queue = queue
        self.url = server_url.rstrip("/") + "/api/v1/capture"
        self._token = token
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        self.timeout_s = timeout_s
        self.ca_file = ca_file
        self.failures = 0  # consecutive failed attempts (the backoff)

    def upload_once(self) -> int:
        """Send one batch; returns the rows settled (0: nothing queued).

        Raises:
            CaptureError: the server could not be reached or answered 5xx/408/429 (the
                batch stays queued, with its id).
        """
        got = self.queue.next_batch(self.batch_rows, self.batch_bytes)
        if got is None:
            return 0
        batch_id, body, rows = got
        handlers: list = [_NoRedirect()]  # the device secret goes to the server only
        if self.url.startswith("https://"):
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Authorization": f"Bearer {self._token}", "Content-Type": "application/json",
            "User-Agent": "edge-agent"})
        try:
            with urllib.request.build_opener(*handlers).open(request,
                                                             timeout=self.timeout_s) as r:
                r.read(4096)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code in (401, 408, 429):
                self.failures += 1
                raise CaptureError(f"capture upload: HTTP {exc.code}") from exc
            log.error("capture batch %s (%d rows) refused by the server: HTTP %d; dropped",
                      batch_id, rows, exc.code)
            self.queue.done(batch_id, counter="refused")
            self.failures = 0
            return rows
        except (urllib.error.URLError, OSError) as exc:
            self.failures += 1
            raise CaptureError(f"capture upload: {exc}") from exc
        self.queue.done(batch_id)
        self.failures = 0
        return rows

    def run(self, stop: threading.Event, every_s: float,
            before: Callable[[], Any] = lambda: None) -> None:
        """Upload until ``stop``: everything queued each ``every_s``, backing off (doubling,
        at most 10 minutes) while the server is unreachable."""
        while not stop.is_set():
            before()
            try:
                while not stop.is_set() and self.upload_once():
                    pass
                delay = every_s
            except CaptureError as exc:
                delay = min(every_s * 2 ** min(self.failures, 10), 600.0)
                log.warning("%s; again in %.0f s", exc, delay)
            stop.wait(delay)
