"""The store on real SQLite files: migrations, WAL, transactions, and round trips."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract.messages import BundleRef
from fleet_server.errors import ConflictError, NotFoundError, SchemaVersionError, StoreError
from fleet_server.models import DesiredRecord, Group, ReportRecord
from fleet_server.store import LATEST, PENDING, Store, SummaryRow
from fleet_server.store.migrations import MIGRATIONS


def v1_summary(conn: sqlite3.Connection, device: str, seq: int) -> None:
    """A summary row as a version-1 server wrote it (no ``folded`` column yet)."""
    conn.execute(
        "INSERT INTO summaries (device, seq, bundle_name, bundle_version, reference_hash, "
        "window_start, window_end, rows, received, latency, errors, shadow, dropped, profile) "
        "VALUES (?, ?, 'sensor', '1.0.0', ?, 0, 60, 10, 61, '[]', '{}', NULL, 0, x'00')",
        [device, seq, "ab" * 32])


def test_migrations_are_numbered_in_order():
    assert [m[0] for m in MIGRATIONS] == list(range(1, LATEST + 1))


def test_an_old_database_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    with Store(path, target_version=1) as old:
        assert old.version == 1
        assert "rollups" not in old.table_names()
        v1_summary(old.conn, "dev1", 7)
        old.add_token("alice", "viewer", "h" * 64, "test", 1.0)
    with Store(path) as new:
        assert new.version == LATEST
        assert {"rollups", "desired", "alerts", "drift_windows"} <= set(new.table_names())
        rows = new.conn.execute("SELECT device, seq, folded FROM summaries").fetchall()
        assert rows == [("dev1", 7, PENDING)]  # to be folded into rollups at start-up
        assert new.pending_bundles() == [("sensor", "1.0.0")]
        assert new.token_by_hash("h" * 64).name == "alice"


def test_a_database_newer_than_the_code_is_refused(tmp_path):
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    with pytest.raises(SchemaVersionError, match="newer than this server"):
        Store(path)


def test_two_processes_migrating_at_once_migrate_once(tmp_path):
    path = tmp_path / "race.db"
    errors, stores = [], []

    def open_it() -> None:
        try:
            stores.append(Store(path))
        except Exception as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {s.version for s in stores} == {LATEST}
    for s in stores:
        s.close()


def test_wal_lets_a_reader_see_the_last_commit_while_a_write_is_open(tmp_path):
    store = Store(tmp_path / "wal.db")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.add_token("before", "viewer", "a" * 64, "test", 1.0)
    seen: list[list[str]] = []
    with store.transaction():
        store.add_token("during", "viewer", "b" * 64, "test", 2.0)
        reader = threading.Thread(target=lambda: seen.append(
            [t.name for t in store.list_tokens()]))
        reader.start()
        reader.join(5)
    assert seen == [["before"]]  # not blocked, and no uncommitted row
    assert [t.name for t in store.list_tokens()] == ["before", "during"]
    store.close()


def test_a_failed_transaction_leaves_nothing(tmp_path):
    store = Store(tmp_path / "tx.db")
    with pytest.raises(RuntimeError), store.transaction():
        store.add_token("ghost", "viewer", "c" * 64, "test", 1.0)
        raise RuntimeError("boom")
    assert store.list_tokens() == []
    with pytest.raises(StoreError), store.transaction():
        store.conn.execute("INSERT INTO nowhere VALUES (1)")
    store.close()


def test_a_closed_store_refuses_work(tmp_path):
    store = Store(tmp_path / "closed.db")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_tokens()


# -- round trips ----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "fleet.db")
    yield s
    s.close()


def test_tokens_round_trip_and_revoke(store):
    token = store.add_token("ci", "operator", "d" * 64, "admin", 10.0)
    assert (token.name, token.role, token.created_by, token.revoked) == \
        ("ci", "operator", "admin", None)
    with pytest.raises(ConflictError, match="exists already"):
        store.add_token("ci", "viewer", "e" * 64, "admin", 11.0)
    assert store.revoke_token("ci", 12.0).revoked == 12.0
    assert store.token_by_hash("d" * 64).revoked == 12.0
    with pytest.raises(NotFoundError):
        store.revoke_token("nobody", 13.0)


def test_labels_the_operator_sets_override_what_a_device_reports(store):
    store.add_device("dev1", {"site": "b"}, "s" * 64, "$7$x", "admin", 1.0)
    with store.transaction():
        store.apply_status("dev1", online=True, time=2.0, agent_version="0.1", bundle=None,
                           shadow=None, labels={"site": "a", "line": "3"})
    dev = store.get_device("dev1")
    assert dev.labels == {"site": "b", "line": "3"}
    assert dev.reported_labels == {"site": "a", "line": "3"}
    assert store.device_ids({"site": "b", "line": "3"}) == ["dev1"]
    assert store.device_ids({"site": "a"}) == []
    store.set_labels("dev1", {})
    assert store.device_ids({"site": "a"}) == ["dev1"]


def test_an_older_status_never_overwrites_a_newer_one(store):
    store.ensure_devices(["dev1"], 1.0)
    with store.transaction():
        assert store.apply_status("dev1", online=False, time=20.0, agent_version="", bundle=None,
                                  shadow=None, labels=None)
        assert not store.apply_status("dev1", online=True, time=10.0, agent_version="",
                                      bundle=None, shadow=None, labels=None)
    assert store.get_device("dev1").online is False


def test_desired_state_and_reports_round_trip(store):
    ref = BundleRef("sensor", "1.0.0", "f" * 64, "/api/v1/bundles/sensor/1.0.0/download", 99)
    store.ensure_devices(["dev1"], 1.0)
    record = DesiredRecord("dev1", 3, ref, None, True, 5.0, "operator:ana")
    store.put_desired([record])
    assert store.get_desired("dev1") == record
    rep = ReportRecord("dev1", 4, 3, "failed", ref, "smoke test", 6.0, 7.0)
    with store.transaction():
        assert store.insert_report(rep)
        assert not store.insert_report(rep)  # (device, seq) once
    assert store.list_reports("dev1") == [rep]


def test_summaries_are_stored_once_per_device_and_sequence(store):
    row = SummaryRow("dev1", 1, "sensor", "1.0.0", "ab" * 32, 0.0, 60.0, 10, 61.0, (1, 2),
                     {"refused": 1}, None, 0, b"payload", PENDING)
    with store.transaction():
        assert store.insert_summary(row)
        assert not store.insert_summary(row)
        assert store.insert_summary(SummaryRow(**{**row.__dict__, "device": "dev2"}))
    assert store.count_summaries() == 2
    (got,) = store.list_summaries(device="dev1")
    assert (got.seq, got.errors, got.latency_counts, got.folded) == (1, {"refused": 1}, (1, 2),
                                                                      False)


def test_dead_letters_are_pruned_to_the_newest(store):
    with store.transaction():
        store.add_dead_letters([(float(i), "t", "d", "SchemaError", f"r{i}", 3, b"abc")
                                for i in range(10)])
    assert store.prune_dead_letters(keep=4) == 6
    assert [d.reason for d in store.list_dead_letters()] == ["r9", "r8", "r7", "r6"]


def test_an_open_alert_is_not_opened_twice(store):
    bundle = store.add_bundle(name="sensor", version="1.0.0", sha256="a" * 64, size=1,
                              reference_hash="b" * 64, manifest={}, reference=b"{}",
                              signers=[], uploaded=1.0, uploaded_by="t")
    kw = {"kind": "drift", "bundle_id": bundle.id, "group": "g", "device": "",
          "message": "m", "details": {}, "now": 1.0, "webhook": "none"}
    first = store.open_alert(**kw)
    assert first is not None and store.open_alert(**kw) is None
    assert store.resolve_alerts(kind="drift", bundle_id=bundle.id, group="g", now=2.0) == 1
    again = store.open_alert(**{**kw, "now": 3.0})
    assert again is not None and again.id != first.id
    assert store.count_alerts() == {("drift", "open"): 1, ("drift", "resolved"): 1}


def test_groups_round_trip(store):
    g = Group("plant-a", {"site": "a"}, True, ("temperature",), 1.0, "operator:ana")
    store.add_group(g)
    assert store.get_group("plant-a") == g
    with pytest.raises(ConflictError):
        store.add_group(g)
    store.delete_group("plant-a")
    with pytest.raises(NotFoundError):
        store.delete_group("plant-a")


# -- property: the selector SQL is the selector rule ---------------------------------------

_keys = st.sampled_from(["site", "line", "hw"])
_vals = st.sampled_from(["a", "b", "c"])
_labels = st.dictionaries(_keys, _vals, max_size=3)


@settings(max_examples=25, deadline=None)
@given(fleet=st.lists(_labels, min_size=0, max_size=8), selector=_labels)
def test_group_membership_in_sql_is_group_matches(fleet, selector):
    store = Store(":memory:")  # one thread, so one connection: the same in-memory database
    try:
        for i, labels in enumerate(fleet):
            store.add_device(f"dev{i}", labels, f"{i:064x}", "$7$", "t", 1.0)
        want = sorted(f"dev{i}" for i, labels in enumerate(fleet)
                      if Group("g", selector).matches(labels))
        assert store.device_ids(selector) == want
        assert [d.id for d in store.list_devices(selector)] == want
    finally:
        store.close()
