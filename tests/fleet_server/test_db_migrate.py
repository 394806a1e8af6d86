"""``fleet db migrate``: a fleet moved from its SQLite file to PostgreSQL, table by table,
counts checked, every row equal after the move; a non-empty target refused; a count that
does not match leaves the target untouched.

The source is a real fleet: devices with labels, a group, tokens, a bundle uploaded,
summaries of two devices through the real ingestor (so rollups and delivery
acknowledgements too), desired state, an alert with a webhook attempt, an evaluated drift
window, a rollout, dead letters, counters, a removed device, a settled sequence, the
hash-chained audit log; and a dashboard session.
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from edgefleet.contract.approval import sign_approval
from edgefleet.contract.bundle import sign_bundle
from edgefleet.contract.messages import BundleRef, Report, encode, topic
from edgefleet.contract.signing import load_private_key
from fleet_server.cli.main import main
from fleet_server.dashboard.session import Sessions
from fleet_server.errors import CopyCountError
from fleet_server.models import DriftWindow
from fleet_server.registry.audit import AuditLog
from fleet_server.services import build_services
from fleet_server.store import PerformanceRollup, PerformanceRow, Store
from fleet_server.store import copy as copier
from fleet_server.telemetry.link import Incoming
from fleet_server.telemetry.outcomes import parse_json_body
from tests.fleet_server.conftest import make_config, profile_of, summary_of

NOW = 1_800_000_000.25


@pytest.fixture
def source(tmp_path, signing_keys, sensor_bundle, sensor_ref):
    """A SQLite fleet with a row in every table; its path."""
    config = make_config(tmp_path, signing_keys)
    s = build_services(config)
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    approver = load_private_key(signing_keys.approver.private)  # an approval statement
    s.bundles.upload(sign_bundle(sensor_bundle.read_bytes(), approver, approve=lambda m:
                                 sign_approval(approver, m, role="approver", comment="ok",
                                               signed_at="2027-01-01T00:00:00Z")),
                     "test", time.time())
    for device in ("dev1", "dev2"):
        s.registry.add_device(device, {"site": "a", "line": device}, "test", NOW)
    s.registry.create_group("site-a", {"site": "a"}, "test", NOW)
    ops = s.auth.create_token("ops", "operator", "test", NOW)
    Sessions(s.store).login(s.auth, ops.secret, NOW)  # a dashboard session
    s.desired.assign("dev1", "sensor@1.0.0", actor="test", now=NOW)
    spec, _ = sensor_ref
    batch = [Incoming(topic(d, "summary"), encode(summary_of(
        d, n, profile_of(spec, 40, seed=n), NOW - 120 * n - 60, NOW - 120 * n)), 1, k, 1, NOW)
        for k, (d, n) in enumerate((d, n) for d in ("dev1", "dev2") for n in (1, 2, 3))]
    batch.append(Incoming(topic("dev1", "summary"), b"{not json", 1, 99, 1, NOW))
    report = Report("dev1", 1, 1, "installed", BundleRef("sensor", "1.0.0"), "", NOW)
    batch.append(Incoming(report.topic, encode(report), 1, 100, 1, NOW))
    result = s.ingestor.process(batch, now=NOW)
    assert result.stored["summary"] == 6 and result.stored["report"] == 1
    assert sum(result.dead.values()) == 1
    store = s.store
    bundle_id = store.bundle_id("sensor", "1.0.0")
    alert = store.open_alert(kind="drift", bundle_id=bundle_id, group="site-a", device="",
                             message="drift", details={"psi": 0.3}, now=NOW, webhook="pending")
    store.record_attempt(alert.id, 1, NOW + 1, 500, "server error", "pending")
    store.save_window(bundle_id, DriftWindow("sensor@1.0.0", "site-a", 1_799_999_700,
                                             1_800_000_000, "drift", 0.5, 240, 2,
                                             {"temperature": {"psi": 0.3}}, NOW))
    store.add_rollout("r-1", "site-a", "sensor@1.0.0", "running", {"stages": []},
                      {"stage": 0}, NOW)
    s.registry.add_device("dev3", {}, "test", NOW)
    s.registry.remove_device("dev3", "test", NOW + 2)  # a removal record
    run = s.retrains.start(recipe="sensor", recipe_hash="ab", revision="", trigger=f"alert:"
                           f"{alert.id}", group="site-a", bundle="sensor", actor="t", now=NOW)
    s.retrains.update(run.id, {"data": {"rows": 10}}, "t", NOW)
    with store.transaction():  # a sequence refused for good, past the acknowledgement
        store.add_settled([("dev2", "summary", 9)])
        store.insert_performance([PerformanceRow(  # a summary's performance entry
            "dev1", 1, bundle_id, NOW - 180, NOW - 120, 0, 3, None,
            {"calibrated": True, "n": [1, 2], "q": [0.75, 1.5], "v": [0.1875, 0.375]})])
        store.save_performance_rollups([(  # and its hour's rollup
            (bundle_id, 3600, 1_799_996_400, "dev1"), PerformanceRollup(
                "dev1", 1_799_996_400, 1, 0, 3, 1, None,
                {"calibrated": True, "n": [1, 2], "q": [0.75, 1.5], "v": [0.1875, 0.375]}))])
    assert store.acks()["dev1"] == {"summary": 3, "report": 1}
    s.outcomes.upload(parse_json_body(b'{"outcomes": [{"device": "dev2", "id": "p-1", '
                                      b'"label": 1}]}'), "test")  # an outcomes queue
    s.capture.ingest("dev2", b'{"schema": 1, "batch": "batch-0000000001", "rows": [{"id": '
                     b'"p-1", "time": 1, "bundle": "sensor@1.0.0", "features": {"t": 1}}]}')
    assert set(store.table_names()) == {t for t, _ in copier.TABLES}
    empty = [t for t, _ in copier.TABLES
             if not store.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]]
    assert empty == []  # the fixture fills every table
    s.close()
    return config.db


def dump(store: Store) -> dict[str, list[tuple]]:
    """Every row of every table, in key order."""
    return {table: [tuple(r) for r in store.conn.execute(
        f"SELECT * FROM {table} ORDER BY {', '.join(key)}").fetchall()]
        for table, key in copier.TABLES}


def test_the_copier_knows_every_table_of_the_schema(tmp_path):
    with Store(tmp_path / "empty.db") as store:
        assert set(store.table_names()) == {t for t, _ in copier.TABLES}


def test_a_sqlite_fleet_moves_to_postgresql_row_for_row(source, postgres, monkeypatch):
    monkeypatch.setattr(copier, "PAGE_ROWS", 2)  # several pages a table
    url = postgres.new_database()
    result = CliRunner().invoke(main, ["db", "migrate", "--from", f"sqlite:///{source}",
                                       "--to", url])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == [t for t, _ in copier.TABLES]
    with Store(source) as src, Store(url) as dst:
        want, got = dump(src), dump(dst)
        assert got == want
        for line in lines:
            table, n = line.split()[0], int(line.split()[1])
            assert n == len(want[table]) > 0
        # analysed: the planner has statistics (reltuples is -1 for a table never analysed)
        never = dst.conn.execute(
            "SELECT relname FROM pg_class WHERE relname IN ('devices', 'rollups', "
            "'device_labels') AND reltuples < 0").fetchall()
        assert never == []
        # the ids go on after the largest copied
        last = max(r[0] for r in want["audit"])
        dst.audit("test", "after", "x", {}, NOW)
        assert dst.list_audit(limit=1)[0].id == last + 1
        # and the server's reads work on the copy
        assert dst.count_summaries() == 6
        assert [d.id for d in dst.list_devices({"site": "a"})] == ["dev1", "dev2"]
        # the audit chain holds across the move, the entry written after it included
        assert AuditLog(dst).verify().intact
        assert dst.acks("dev1") == {"dev1": {"summary": 3, "report": 1}}
        assert dst.retained_to_clear() == ["dev3"]


def test_a_target_with_rows_is_refused_unless_forced(source, postgres):
    url = postgres.new_database()
    with Store(url) as dst:
        dst.add_token("someone", "viewer", "f" * 64, "test", 1.0)
    refused = CliRunner().invoke(main, ["db", "migrate", "--from", str(source), "--to", url])
    assert refused.exit_code == 1
    assert "table tokens holds 1 row(s)" in refused.output and "--force" in refused.output
    forced = CliRunner().invoke(main, ["db", "migrate", "--from", str(source), "--to", url,
                                       "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    counts = {t["table"]: t["target_rows"] for t in json.loads(forced.stdout)["tables"]}
    with Store(source) as src, Store(url) as dst:
        assert dump(dst) == dump(src)
        assert counts["tokens"] == 1 and "someone" not in {t.name for t in dst.list_tokens()}


def test_a_count_that_differs_leaves_the_target_untouched(source, postgres, monkeypatch):
    """As when a server still writes to the source during the copy."""
    url = postgres.new_database()
    real = copier._count

    def racing(store, table):
        n = real(store, table)
        return n + 1 if table == "summaries" and store.kind == "sqlite" else n

    monkeypatch.setattr(copier, "_count", racing)
    with Store(source) as src, Store(url) as dst:
        with pytest.raises(CopyCountError, match=r"table summaries: 7 row.*6 copied"):
            copier.copy_database(src, dst)
        assert {t: rows for t, rows in dump(dst).items() if rows} == {}


def test_a_missing_source_is_named():
    result = CliRunner().invoke(main, ["db", "migrate", "--from", "sqlite:///nowhere.db",
                                       "--to", "postgresql://x@127.0.0.1:1/none"])
    assert result.exit_code == 2 and "no database at nowhere.db" in result.output
