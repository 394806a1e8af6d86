"""The outbox against real SQLite files: order, bounds, drops, reopen, full disk, threads.

The state machine keeps a plain list as the model of what must be pending and checks the
file against it after every step, including reopening the file from scratch.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from edge_agent.outbox import Outbox, OutboxError, OutboxFullError, OutboxItem
from edgefleet.errors import EdgefleetError

MAX_MESSAGES = 6
MAX_BYTES = 64
MAX_PAYLOAD = 24
# The state machine checks logic, not fsync: on tmpfs its thousands of commits take
# milliseconds instead of seconds. The other tests use real disk files.
_FAST_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else None


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


def test_put_pending_ack_in_order(outbox):
    ids = [outbox.put(f"t/{i}", bytes([i]) * i) for i in range(5)]
    assert ids == sorted(ids)
    items = outbox.pending()
    assert [i.id for i in items] == ids
    assert items[3] == OutboxItem(ids[3], "t/3", b"\x03\x03\x03", 1, items[3].created)
    outbox.ack(ids[1])
    outbox.ack(ids[1])  # idempotent
    outbox.ack(10_000)  # unknown: nothing happens
    assert [i.id for i in outbox.pending()] == [ids[0], *ids[2:]]
    assert outbox.depth == 4
    assert outbox.size == 0 + 2 + 3 + 4


def test_pending_limit_and_exclude(outbox):
    ids = [outbox.put("t", b"x") for _ in range(10)]
    assert [i.id for i in outbox.pending(limit=3)] == ids[:3]
    assert [i.id for i in outbox.pending(limit=3, exclude=ids[:2])] == ids[2:5]
    assert [i.id for i in outbox.pending(limit=3, exclude={ids[0], ids[4]})] == [
        ids[1],
        ids[2],
        ids[3],
    ]
    assert outbox.pending(limit=0) == []
    assert outbox.pending(exclude=ids) == []


def test_ids_are_never_reused(tmp_path):
    # a late ack for an acked id must not remove a newer message
    with Outbox(tmp_path / "o.db") as box:
        first = box.put("t", b"a")
        box.ack(first)
    with Outbox(tmp_path / "o.db") as box:
        assert box.put("t", b"b") > first


def test_drops_oldest_when_count_is_full(tmp_path):
    with Outbox(tmp_path / "o.db", max_messages=3) as box:
        ids = [box.put("t", bytes([i])) for i in range(5)]
        assert [i.payload for i in box.pending()] == [b"\x02", b"\x03", b"\x04"]
        assert [i.id for i in box.pending()] == ids[2:]
        assert (box.depth, box.dropped) == (3, 2)


def test_drops_oldest_until_bytes_fit(tmp_path):
    with Outbox(tmp_path / "o.db", max_bytes=10, max_payload=10) as box:
        box.put("t", b"1" * 4)
        box.put("t", b"2" * 4)
        box.put("t", b"3" * 1)
        box.put("t", b"4" * 6)  # 9 + 6 > 10: drop 4 (→ 11 still > 10), drop 4 more
        assert [i.payload for i in box.pending()] == [b"3", b"4" * 6]
        assert (box.dropped, box.size) == (2, 7)


@pytest.mark.parametrize(
    ("topic", "payload", "qos"),
    [
        pytest.param("t", b"x" * 101, 1, id="payload-over-limit"),
        pytest.param("", b"x", 1, id="empty-topic"),
        pytest.param("a/+/b", b"x", 1, id="plus-wildcard"),
        pytest.param("a/#", b"x", 1, id="hash-wildcard"),
        pytest.param("a" * 65_536, b"x", 1, id="topic-too-long"),
        pytest.param("t", b"x", 3, id="bad-qos"),
    ],
)
def test_refused_puts_store_nothing(tmp_path, topic, payload, qos):
    with Outbox(tmp_path / "o.db", max_payload=100) as box:
        box.put("keep", b"k")
        with pytest.raises(OutboxError) as info:
            box.put(topic, payload, qos)
        assert isinstance(info.value, EdgefleetError)
        assert not isinstance(info.value, OutboxFullError)
        assert [i.topic for i in box.pending()] == ["keep"]
        assert (box.depth, box.dropped) == (1, 0)


def test_bad_limits_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_payload"):
        Outbox(tmp_path / "o.db", max_bytes=10, max_payload=11)
    with pytest.raises(ValueError):
        Outbox(tmp_path / "o.db", max_messages=0)


def test_reopen_keeps_messages_and_drop_counter(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path, max_messages=2) as box:
        for i in range(4):
            box.put(f"t/{i}", b"p")
    with Outbox(path, max_messages=2) as box:
        assert [i.topic for i in box.pending()] == ["t/2", "t/3"]
        assert (box.depth, box.dropped, box.size) == (2, 2, 2)


def test_wal_and_full_sync(outbox):
    conn = outbox._conn  # the only way to ask SQLite what the connection runs with
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_disk_full_raises_and_caller_recovers(tmp_path):
    box = Outbox(tmp_path / "o.db", max_payload=4096)
    try:
        used = box._conn.execute("PRAGMA page_count").fetchone()[0]
        # SQLite reports SQLITE_FULL past max_page_count exactly as on a full disk
        box._conn.execute(f"PRAGMA max_page_count = {used + 2}")
        stored = []
        with pytest.raises(OutboxFullError, match="full"):
            for _ in range(100):
                stored.append(box.put("t", b"z" * 4000))
        assert 0 < len(stored) < 100
        assert [i.id for i in box.pending()] == stored  # the failed put left no trace
        assert box.depth == len(stored)
        box.ack(stored[0])  # deleting still works on a full file and makes room
        box._conn.execute("PRAGMA max_page_count = 1000000")
        new = box.put("t", b"after")
        assert [i.id for i in box.pending()][-1] == new
        assert box.depth == len(stored)
    finally:
        box.close()


def test_closed_outbox_raises(tmp_path):
    box = Outbox(tmp_path / "o.db")
    box.close()
    box.close()
    with pytest.raises(OutboxError, match="closed"):
        box.put("t", b"x")
    with pytest.raises(OutboxError, match="closed"):
        box.pending()


def test_not_a_database_is_an_outbox_error(tmp_path):
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match=str(path)):
        Outbox(path)


def test_listener_is_called_after_put_and_errors_are_contained(outbox):
    calls = []
    outbox.add_listener(lambda: calls.append(outbox.depth))
    outbox.add_listener(lambda: 1 / 0)
    outbox.put("t", b"x")
    assert calls == [1]


def test_two_threads_putting(tmp_path):
    path = tmp_path / "o.db"
    box = Outbox(path)
    per_thread = 100
    errors: list[BaseException] = []

    def producer(name: str) -> None:
        try:
            for i in range(per_thread):
                box.put(f"t/{name}", f"{name}-{i}".encode())
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    items = box.pending(limit=1000)
    assert box.depth == len(items) == 2 * per_thread
    for name in ("a", "b"):  # each producer's messages stay in its own order
        mine = [i.payload for i in items if i.topic == f"t/{name}"]
        assert mine == [f"{name}-{i}".encode() for i in range(per_thread)]
    box.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


class OutboxMachine(RuleBasedStateMachine):
    """Any sequence of put / ack / reopen keeps exactly the un-acked, un-dropped messages."""

    @initialize()
    def open(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-", dir=_FAST_DIR))
        self.box = self._open()
        self.model: list[tuple[int, str, bytes]] = []
        self.dropped = 0
        self.acked: list[int] = []

    def _open(self) -> Outbox:
        return Outbox(
            self.dir / "o.db",
            max_messages=MAX_MESSAGES,
            max_bytes=MAX_BYTES,
            max_payload=MAX_PAYLOAD,
        )

    @rule(topic=st.sampled_from(["a", "b/c", "é/ü"]), payload=st.binary(max_size=MAX_PAYLOAD))
    def put(self, topic: str, payload: bytes) -> None:
        row_id = self.box.put(topic, payload)
        assert all(row_id > i for i, _, _ in self.model)
        self.model.append((row_id, topic, payload))
        while len(self.model) > MAX_MESSAGES or sum(len(p) for _, _, p in self.model) > MAX_BYTES:
            self.model.pop(0)
            self.dropped += 1

    @rule(payload=st.binary(min_size=MAX_PAYLOAD + 1, max_size=MAX_PAYLOAD + 8))
    def put_too_large(self, payload: bytes) -> None:
        with pytest.raises(OutboxError):
            self.box.put("a", payload)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def ack_pending(self, data) -> None:
        index = data.draw(st.integers(0, len(self.model) - 1))
        row_id = self.model.pop(index)[0]
        self.box.ack(row_id)
        self.acked.append(row_id)

    @precondition(lambda self: self.acked)
    @rule(data=st.data())
    def ack_again(self, data) -> None:
        self.box.ack(data.draw(st.sampled_from(self.acked)))

    @rule()
    def reopen(self) -> None:
        self.box.close()
        self.box = self._open()

    @invariant()
    def matches_model(self) -> None:
        items = self.box.pending(limit=MAX_MESSAGES + 1)
        assert [(i.id, i.topic, i.payload) for i in items] == self.model
        assert self.box.depth == len(self.model)
        assert self.box.size == sum(len(p) for _, _, p in self.model)
        assert self.box.dropped == self.dropped

    def teardown(self) -> None:
        box = getattr(self, "box", None)
        if box is not None:
            box.close()
            shutil.rmtree(self.dir, ignore_errors=True)


TestOutboxMachine = OutboxMachine.TestCase
TestOutboxMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def test_numbered_puts_leave_no_gap_when_the_disk_fills(tmp_path):
    from edge_agent.outbox import OutboxFullError

    box = Outbox(tmp_path / "o.db", max_payload=4096)
    try:
        assert box.put_numbered("t", lambda seq: f"m{seq}".encode(), "summary") [1] == 1
        used = box._conn.execute("PRAGMA page_count").fetchone()[0]
        box._conn.execute(f"PRAGMA max_page_count = {used}")
        with pytest.raises(OutboxFullError):
            for _ in range(50):  # fills the last pages, then refuses
                box.put_numbered("t", lambda seq: bytes(3000), "summary")
        stuck = box.last_sequence("summary")
        with pytest.raises(OutboxFullError):
            box.put_numbered("t", lambda seq: bytes(3000), "summary")
        assert box.last_sequence("summary") == stuck  # a refused put used no number
        box._conn.execute("PRAGMA max_page_count = 1000000")
        _, seq = box.put_numbered("t", lambda seq: f"m{seq}".encode(), "summary")
        assert seq == stuck + 1
        numbers = [int(i.payload[1:]) for i in box.pending(1000) if i.payload[:1] == b"m"]
        assert numbers == [1, seq]
        assert box.put_numbered("t", lambda seq: b"r", "report")[1] == 1  # its own counter
    finally:
        box.close()


def test_a_numbered_payload_over_the_limit_uses_no_number(tmp_path):
    with Outbox(tmp_path / "o.db", max_payload=10) as box:
        with pytest.raises(OutboxError, match="exceeds"):
            box.put_numbered("t", lambda seq: bytes(11), "s")
        assert box.last_sequence("s") == 0 and box.depth == 0


# -- end-to-end delivery: numbered rows leave on the server's confirmation -----------------


def _numbered(box: Outbox, stream: str = "summary") -> tuple[int, int, int]:
    """Put one numbered row whose payload records (seq, floor); returns (id, seq, floor)."""
    got: dict[str, int] = {}

    def build(seq: int, floor: int) -> bytes:
        got.update(seq=seq, floor=floor)
        return f"{seq}:{floor}".encode()

    row_id, seq = box.put_sequenced(f"t/{stream}", build, stream)
    assert seq == got["seq"]
    return row_id, seq, got["floor"]


def test_confirm_removes_a_streams_rows_up_to_a_number_and_nothing_else(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        plain = box.put("t/plain", b"p")
        for _ in range(5):
            _numbered(box, "summary")
        _numbered(box, "report")
        assert box.confirm("summary", 3) != [] and box.depth == 4
        assert box.confirm("summary", 3) == []  # idempotent
        items = box.pending()
        assert [(i.stream, i.seq) for i in items] == [
            (None, 0), ("summary", 4), ("summary", 5), ("report", 1)]
        assert items[0].id == plain
        assert box.ack(plain)  # unnumbered rows still leave on ack
        assert len(box.confirm("summary", 10)) == 2 and box.depth == 1
        assert box.size == len(box.pending()[0].payload)
    with Outbox(tmp_path / "o.db") as again:  # the counters agree with the file
        assert again.depth == 1 and [i.seq for i in again.pending()] == [1]


def test_the_floor_is_the_oldest_waiting_number_and_passes_drops(tmp_path):
    with Outbox(tmp_path / "o.db", max_messages=3) as box:
        assert _numbered(box)[1:] == (1, 1)
        assert _numbered(box)[1:] == (2, 1)
        assert _numbered(box)[1:] == (3, 1)
        # full: 1 is dropped to make room, and the payload says the server may pass it
        assert _numbered(box)[1:] == (4, 2)
        assert box.dropped == 1
        assert [p.payload for p in box.pending()] == [b"2:1", b"3:1", b"4:2"]
        box.confirm("summary", 3)
        assert _numbered(box)[1:] == (5, 4)
        _numbered(box, "report")  # another stream has its own floor
        assert box.pending()[-1].payload == b"1:1"


def test_a_server_ahead_of_the_counter_moves_it_on(tmp_path):
    """A replaced data directory starts numbering at 1 again; the server already holds
    those numbers and would take new windows for duplicates."""
    with Outbox(tmp_path / "o.db") as box:
        _numbered(box)
        box.confirm("summary", 40)
        assert box.last_sequence("summary") == 40 and box.depth == 0
        assert box.dropped == 1  # its number 1 was the server's already: said, not hidden
        assert _numbered(box)[1] == 41
        box.confirm("summary", 7)  # a stale acknowledgement never moves it back
        assert box.last_sequence("summary") == 41


def test_state_is_cleared_by_the_put_that_stores_it(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        assert box.get_state("window") is None
        box.set_state("window", b"checkpoint")
        box.set_state("served", b"17")
        box.put_numbered("t", lambda seq: b"x", "summary")
        assert box.get_state("window") == b"checkpoint"  # not named: kept
        box.put_numbered("t", lambda seq: b"x", "summary", clear_state=("window", "served"))
        assert box.get_state("window") is None and box.get_state("served") is None
        box.set_state("window", b"again")
    with Outbox(tmp_path / "o.db") as again:
        assert again.get_state("window") == b"again"
        again.set_state("window", None)
        assert again.get_state("window") is None


def test_a_file_from_before_numbered_rows_opens_and_keeps_its_messages(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL, qos INTEGER NOT NULL, created REAL NOT NULL);"
            "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "INSERT INTO counters VALUES ('dropped', 2), ('seq:summary', 9);"
            "INSERT INTO outbox (topic, payload, qos, created) VALUES ('t', x'01', 1, 0);")
    with Outbox(path) as box:
        assert box.depth == 1 and box.dropped == 2
        old = box.pending()[0]
        assert old.stream is None  # an old row leaves on its PUBACK, as it would have
        assert _numbered(box)[1:] == (10, 10)
