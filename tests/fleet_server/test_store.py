"""The store on both engines: real SQLite files and a real PostgreSQL server (the session's
own, a fresh database per test): migrations, transactions, concurrency, and round trips.

Every test taking the ``db`` fixture runs once per engine.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.contract.messages import BundleRef
from fleet_server.errors import ConflictError, NotFoundError, SchemaVersionError, StoreError
from fleet_server.models import Database, DesiredRecord, Group, ReportRecord
from fleet_server.store import LATEST, PENDING, Store, SummaryRow
from fleet_server.store.migrations import MIGRATIONS


def v1_summary(store: Store, device: str, seq: int) -> None:
    """A summary row as a version-1 server wrote it (no ``folded`` column yet)."""
    store.conn.execute(store.dialect.sql(
        "INSERT INTO summaries (device, seq, bundle_name, bundle_version, reference_hash, "
        "window_start, window_end, rows, received, latency, errors, shadow, dropped, profile) "
        "VALUES (?, ?, 'sensor', '1.0.0', ?, 0, 60, 10, 61, '[]', '{}', NULL, 0, ?)"),
        [device, seq, "ab" * 32, b"\x00"])


def test_migrations_are_numbered_in_order():
    assert [m[0] for m in MIGRATIONS] == list(range(1, LATEST + 1))


@pytest.mark.parametrize(("text", "kind", "target", "label"), [
    ("fleet.db", "sqlite", "fleet.db", "fleet.db"),
    ("sqlite:///fleet.db", "sqlite", "fleet.db", "fleet.db"),
    ("sqlite:////var/lib/fleet.db", "sqlite", "/var/lib/fleet.db", "/var/lib/fleet.db"),
    ("postgresql://fleet@db:5432/fleet", "postgresql", "postgresql://fleet@db:5432/fleet",
     "postgresql://fleet@db:5432/fleet"),
    ("postgres://fleet:s3cret@db/fleet", "postgresql", "postgres://fleet:s3cret@db/fleet",
     "postgres://fleet@db/fleet"),
    ("postgresql://fleet@db/fleet?password=s3cret&sslmode=require", "postgresql",
     "postgresql://fleet@db/fleet?password=s3cret&sslmode=require",
     "postgresql://fleet@db/fleet?password=***&sslmode=require"),
    ("mysql://fleet@db/fleet", "unknown", "mysql://fleet@db/fleet", "mysql://fleet@db/fleet"),
], ids=["path", "sqlite-relative", "sqlite-absolute", "postgresql", "password-hidden",
        "query-password-hidden", "unknown-scheme"])
def test_a_database_is_named_by_a_path_or_a_url(text, kind, target, label):
    where = Database.parse(text)
    assert (where.kind, where.target, where.label) == (kind, target, label)


def test_an_unknown_scheme_is_refused_by_name():
    with pytest.raises(StoreError, match="mysql://fleet@db/fleet: not a database"):
        Store("mysql://fleet@db/fleet")


def test_an_old_database_is_migrated_and_keeps_its_rows(db):
    with Store(db, target_version=1) as old:
        assert old.version == 1
        assert "rollups" not in old.table_names()
        v1_summary(old, "dev1", 7)
        old.add_token("alice", "viewer", "h" * 64, "test", 1.0)
    with Store(db) as new:
        assert new.version == LATEST
        assert {"rollups", "desired", "alerts", "drift_windows"} <= set(new.table_names())
        rows = new.conn.execute("SELECT device, seq, folded FROM summaries").fetchall()
        assert [tuple(r) for r in rows] == [("dev1", 7, PENDING)]  # folded at start-up
        assert new.pending_bundles() == [("sensor", "1.0.0")]
        assert new.token_by_hash("h" * 64).name == "alice"


def test_a_database_newer_than_the_code_is_refused(db):
    if Database.parse(db).kind == "sqlite":
        with sqlite3.connect(db) as conn:
            conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    else:
        with Store(db) as store, store.transaction() as conn:
            store.engine.set_version(conn, LATEST + 1)
    with pytest.raises(SchemaVersionError, match="newer than this server"):
        Store(db)


def test_two_processes_migrating_at_once_migrate_once(db):
    errors, stores = [], []

    def open_it() -> None:
        try:
            stores.append(Store(db))
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


def test_a_reader_sees_the_last_commit_while_a_write_is_open(db):
    store = Store(db)
    if store.kind == "sqlite":
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


def test_a_failed_transaction_leaves_nothing(db):
    store = Store(db)
    with pytest.raises(RuntimeError), store.transaction():
        store.add_token("ghost", "viewer", "c" * 64, "test", 1.0)
        raise RuntimeError("boom")
    assert store.list_tokens() == []
    with pytest.raises(StoreError), store.transaction():
        store.conn.execute("INSERT INTO nowhere VALUES (1)")
    store.add_token("after", "viewer", "c" * 64, "test", 1.0)  # the connection still works
    assert [t.name for t in store.list_tokens()] == ["after"]
    store.close()


def test_a_closed_store_refuses_work(db):
    store = Store(db)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_tokens()


def test_read_modify_write_transactions_of_two_processes_lose_no_update(db):
    """Rollups are merged in Python (read, add, write back): with two stores (two ingest
    workers) the store's one-writer-at-a-time transactions must not lose an increment."""
    stores = [Store(db), Store(db)]
    key = (1, 60, 100, "dev1")
    errors: list[BaseException] = []

    def bump(store: Store, times: int) -> None:
        try:
            for _ in range(times):
                with store.transaction():
                    old = store.load_rollups([key]).get(key, b"0")
                    store.save_rollups([(key, 1, 1, str(int(old) + 1).encode())])
        except BaseException as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(s, 40)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert stores[0].load_rollups([key]) == {key: b"80"}
    for s in stores:
        s.close()


def test_the_postgresql_schema_has_full_width_numbers_and_uncompressed_blobs(postgres):
    """REAL and INTEGER are 32-bit in PostgreSQL: the dialect must have mapped every one;
    blobs are stored EXTERNAL (not pglz-compressed at every ingest batch)."""
    with Store(postgres.new_database()) as store:
        types = store.conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema()").fetchall()
        assert {t for _, _, t in types} <= {"bigint", "double precision", "text", "bytea"}
        storage = dict(store.conn.execute(
            "SELECT c.relname || '.' || a.attname, a.attstorage FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE t.typname = 'bytea' AND c.relnamespace = current_schema()::regnamespace"
        ).fetchall())
        assert storage and set(storage.values()) == {"e"}, storage
        assert "rollups.data" in storage and "summaries.packed" in storage


def test_postgresql_keeps_summaries_by_day_and_retention_drops_whole_days(postgres):
    day = 86400
    base = 20_000 * day  # a day boundary
    with Store(postgres.new_database()) as store:
        rows = [SummaryRow(f"dev{i % 3}", i + 1, "sensor", "1.0.0", "ab" * 32, end - 60, end,
                           10, end, (1,), {}, None, 0, b"p", PENDING)
                for i, end in enumerate(base + d * day + 600.0 * k
                                        for d in range(3) for k in range(4))]
        with store.transaction():
            assert all(store.insert_summaries(rows))
            assert store.insert_summaries(rows[:2]) == [False, False]  # across the days

        def days() -> list[str]:
            return sorted(r[0] for r in store.conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'summaries'"))

        assert days() == ["summaries_default"] + [f"summaries_p{20_000 + d}" for d in range(3)]
        assert store.conn.execute("SELECT count(*) FROM summaries_default").fetchone()[0] == 0
        # the first day whole (a dropped partition) and two rows of the second (deleted)
        assert store.prune_summaries(before=base + day + 1200) == 4 + 2
        assert days() == ["summaries_default"] + [f"summaries_p{20_000 + d}" for d in (1, 2)]
        assert store.count_summaries() == 12 - 6
        assert store.table_names().count("summaries") == 1  # the partitions are not tables


# -- round trips ----------------------------------------------------------------------------


@pytest.fixture
def store(db):
    s = Store(db)
    yield s
    s.close()


def test_times_counts_and_payloads_keep_their_full_width(store):
    """64-bit floats and integers and raw bytes, as SQLite keeps them (PostgreSQL's REAL is
    32-bit and its INTEGER 32-bit: the schema must not use them there)."""
    end = 1_800_000_000.123456
    payload = bytes(range(256)) * 3
    row = SummaryRow("dev1", 2**40 + 3, "sensor", "1.0.0", "ab" * 32, end - 60, end, 2**33,
                     end + 0.5, (1, 2), {}, None, 0, payload, PENDING)
    with store.transaction():
        assert store.insert_summaries([row]) == [True]
    (got,) = store.list_summaries(device="dev1")
    assert (got.seq, got.window_end, got.rows, got.received) == \
        (2**40 + 3, end, 2**33, end + 0.5)
    (pending,) = store.pending_summaries("sensor", "1.0.0")
    assert pending.profile == payload and isinstance(pending.profile, bytes)


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


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # emptied each example
@given(fleet=st.lists(_labels, min_size=0, max_size=8), selector=_labels)
def test_group_membership_in_sql_is_group_matches(store, fleet, selector):
    with store.transaction():
        store.conn.execute("DELETE FROM device_labels")
        store.conn.execute("DELETE FROM devices")
    for i, labels in enumerate(fleet):
        store.add_device(f"dev{i}", labels, f"{i:064x}", "$7$", "t", 1.0)
    want = sorted(f"dev{i}" for i, labels in enumerate(fleet)
                  if Group("g", selector).matches(labels))
    assert store.device_ids(selector) == want
    assert [d.id for d in store.list_devices(selector)] == want


def test_packed_profiles_are_folded_and_read_back_by_id(store):
    rows = [SummaryRow("dev1", i, "sensor", "1.0.0", "ab" * 32, 60.0 * i, 60.0 * i + 60, 10,
                       60.0 * i + 61, (1,), {}, None, 0, b"raw%d" % i, PENDING)
            for i in range(1, 5)]
    with store.transaction():
        assert all(store.insert_summaries(rows))
    pending = {p.id: p for p in store.pending_summaries("sensor", "1.0.0")}
    assert len(pending) == 4
    folded = {i: b"packed\x00%d" % i for i in sorted(pending)[:3]}
    with store.transaction():
        store.fold_summaries(folded)
    assert store.summary_profiles(list(pending)) == folded  # the one still pending: left out
    assert store.count_summaries(folded=PENDING) == 1


def test_a_removed_device_waits_for_its_retained_state_to_be_cleared(store):
    store.ensure_devices(["dev1", "dev2"], 1.0)
    store.remove_device("dev1", "operator:ana", 2.0)
    with pytest.raises(NotFoundError):
        store.remove_device("dev1", "operator:ana", 3.0)
    assert store.retained_to_clear() == ["dev1"]
    store.mark_retained_cleared(["dev1"])
    assert store.retained_to_clear() == []
    store.remove_device("dev2", "operator:ana", 4.0)
    store.ensure_devices(["dev1"], 5.0)  # not re-registered: the record stays as it was
    assert store.retained_to_clear() == ["dev2"]


def test_desired_state_keeps_the_bundle_it_replaces_as_the_rollback_slot(store):
    def ref(version: str) -> BundleRef:
        return BundleRef("sensor", version, "f" * 64, f"/b/{version}", 9)

    store.ensure_devices(["dev1"], 1.0)
    for revision, version in enumerate(["1.0.0", "1.1.0", "1.1.0"], 1):
        store.put_desired([DesiredRecord("dev1", revision, ref(version), None, False, 1.0,
                                         "test")])
    # the same bundle again keeps the slot: 1.0.0 stays assignable for a rollback
    assert store.assigned_bundles("dev1") == {("sensor", "1.0.0"), ("sensor", "1.1.0")}


def test_acknowledgements_pass_stored_and_settled_sequences_only(store):
    with store.transaction():
        for seq in (1, 2, 5):
            store.insert_report(ReportRecord("dev1", seq, 1, "installed",
                                             BundleRef("sensor", "1.0.0"), "", 1.0, 1.0))
        assert store.advance_acks({("dev1", "report"): 0}) == {"dev1": {"report": 2}}
        store.add_settled([("dev1", "report", 3), ("dev1", "report", 3)])  # once
        store.add_settled([("dev1", "report", 4)])
        assert store.advance_acks({("dev1", "report"): 0}) == {"dev1": {"report": 5}}
        # a floor moves it past what the device dropped, never back
        assert store.advance_acks({("dev1", "report"): 9}) == {"dev1": {"report": 8}}
        assert store.advance_acks({("dev1", "report"): 1}) == {"dev1": {"report": 8}}
    assert store.acks() == {"dev1": {"report": 8}}
    assert store._one("SELECT COUNT(*) AS n FROM settled")["n"] == 0  # passed: forgotten


def test_the_audit_log_is_chained_on_insert(store):
    for i in range(3):
        store.audit("op", "group.create", f"group:g{i}", {"x": 0.1 * i}, 100.0 + i)
    links = store.audit_links()
    assert [link.prev for link in links[1:]] == [link.hash for link in links[:-1]]
    assert all(link.hash == link.digest() for link in links)
    assert [e.target for e in store.list_audit(since=101.0)] == ["group:g2", "group:g1"]


def test_after_commit_runs_once_the_outer_transaction_is_visible(store, db):
    seen: list[int] = []

    def count_from_elsewhere() -> None:  # another connection: sees committed rows only
        with Store(db) as other:
            seen.append(other.count_devices())

    store.after_commit(count_from_elsewhere)  # outside a transaction: at once
    with store.transaction():
        store.ensure_devices(["dev1"], 1.0)
        with store.transaction():
            store.after_commit(count_from_elsewhere)
        assert seen == [0]  # the inner block's end is not the commit
    assert seen == [0, 1]
    with pytest.raises(RuntimeError), store.transaction():
        store.ensure_devices(["dev2"], 1.0)
        store.after_commit(count_from_elsewhere)
        raise RuntimeError("rolled back")
    assert seen == [0, 1]  # never called for a rollback


def test_the_dashboards_counts_are_sql_on_either_engine(store):
    from fleet_server.models import DriftWindow
    from fleet_server.store import DeviceQuery

    store.ensure_devices(["a1", "a2", "b1"], 1.0)
    with store.transaction():
        store.set_labels("a1", {"site": "a"})
        store.set_labels("a2", {"site": "a"})
        for device, version in (("a1", "1.0.0"), ("a2", "1.1.0")):
            store.apply_status(device, online=True, time=100.0, agent_version="1",
                               bundle=BundleRef("sensor", version), shadow=None, labels=None)
    assert store.count_devices_by_bundle() == {"sensor@1.0.0": 1, "sensor@1.1.0": 1, "": 1}
    assert store.count_selected({"site": "a"}) == 2
    page = store.device_page(DeviceQuery(50.0, bundle="sensor@1.1.0"))
    assert [d.id for d in page.devices] == ["a2"] and page.total == 1
    page = store.device_page(DeviceQuery(50.0, sort="bundle", descending=True))
    assert [d.id for d in page.devices] == ["a2", "a1", "b1"]
    assert store.device_page(DeviceQuery(50.0, search="site=a")).total == 2
    assert store.count_device_statuses(150.0) == {"stale": 2, "offline": 1}
    store.add_rollout("r1", "g", "sensor@1.1.0", "running", {}, {}, 10.0)
    store.add_rollout("r2", "g", "sensor@1.1.0", "completed", {}, {}, 5.0)
    assert store.count_rollouts() == {"running": 1, "completed": 1}
    assert [r.id for r in store.rollouts_touched_since(6.0)] == ["r1"]
    for start, verdict in ((0, "ok"), (60, "drift")):
        store.save_window(1, DriftWindow("sensor@1.0.0", "*", start, start + 60, verdict, 0.0,
                                         1, 1, {}, 0.0))
    assert store.count_drift_windows() == {"ok": 1, "drift": 1}
    assert store.count_drift_windows(latest=True) == {"drift": 1}
