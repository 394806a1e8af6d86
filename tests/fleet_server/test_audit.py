"""The hash-chained audit log: every kind of tampering with the real database (a SQLite
file, a PostgreSQL database) is found and named, through the library, the CLI (on the
database) and the REST API."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.api import create_app
from fleet_server.cli import main
from fleet_server.models import AUDIT_GENESIS, AuditLink, audit_digest
from fleet_server.registry.audit import AuditLog, verify_chain
from fleet_server.store import Store
from fleet_server.store.migrations import AUDIT_CHAIN, MIGRATIONS

T0 = 1_767_225_600.0


def _fill(path, n: int = 6) -> None:
    with Store(path) as store:
        for i in range(1, n + 1):
            store.audit(f"op{i}", "group.create", f"group:g{i}", {"i": i, "x": 0.1 * i},
                        T0 + i)


def _sql(path, *statements) -> None:
    """Tamper with the database behind the server's back: raw SQL in one transaction
    (through the store's connection only to speak either engine's dialect)."""
    with Store(path) as store, store.transaction():
        for sql, params in statements:
            store._exec(sql, params)


def _row(path, entry: int) -> dict:
    with Store(path) as store:
        row = store._one("SELECT * FROM audit WHERE id = ?", [entry])
    assert row is not None
    return row


def _report(path):
    with Store(path) as store:
        return AuditLog(store).verify()


def _forge(path, entry: int, prev: str) -> tuple:
    """An INSERT of a well-formed entry (hash computed as the server would) at ``entry``."""
    details = '{"forged":true}'
    digest = audit_digest(prev, T0 + 3.5, "mallory", "token.create", "token:x", details)
    return ("INSERT INTO audit (id, time, actor, action, target, details, prev, hash) "
            "VALUES (?, ?, 'mallory', 'token.create', 'token:x', ?, ?, ?)",
            [entry, T0 + 3.5, details, prev, digest])


def test_an_untouched_chain_is_intact(db):
    _fill(db)
    report = _report(db)
    assert report.intact and report.entries == 6 and report.legacy == 0
    assert _row(db, 1)["prev"] == AUDIT_GENESIS
    for i in range(2, 7):
        assert _row(db, i)["prev"] == _row(db, i - 1)["hash"]
    assert (report.head, report.head_id) == (_row(db, 6)["hash"], 6)


def _shift_up(entry: int) -> tuple:
    # make room for a row at ``entry`` (ids are locators; the chain is in the hashes)
    return ("UPDATE audit SET id = id + 1000 WHERE id >= ?", [entry])


TAMPERING = {
    "edit-details": (lambda db: [("UPDATE audit SET details = '{\"i\":33}' WHERE id = 3", [])],
                     [("edited", 3)]),
    "edit-actor": (lambda db: [("UPDATE audit SET actor = 'someone-else' WHERE id = 5", [])],
                   [("edited", 5)]),
    "edit-time": (lambda db: [("UPDATE audit SET time = time + 1 WHERE id = 1", [])],
                  [("edited", 1)]),
    "edit-and-rehash": (lambda db: [(
        "UPDATE audit SET details = '{}', hash = ? WHERE id = 3",
        [audit_digest(_row(db, 3)["prev"], T0 + 3, "op3", "group.create", "group:g3", "{}")])],
        [("deleted", 4)]),
    "delete-middle": (lambda db: [("DELETE FROM audit WHERE id = 3", [])], [("deleted", 4)]),
    "delete-first": (lambda db: [("DELETE FROM audit WHERE id = 1", [])], [("deleted", 2)]),
    "insert-chained": (lambda db: [_shift_up(4), _forge(db, 4, _row(db, 3)["hash"])],
                       [("inserted", 4)]),
    "insert-unchained": (lambda db: [_shift_up(4), _forge(db, 4, "ab" * 32)],
                         [("inserted", 4)]),
    "strip-hash": (lambda db: [("UPDATE audit SET hash = NULL, prev = NULL WHERE id = 4", [])],
                   [("unchained", 4), ("deleted", 5)]),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_each_kind_of_tampering_is_found_and_named(db, case):
    _fill(db)
    statements, want = TAMPERING[case]
    _sql(db, *statements(db))
    report = _report(db)
    assert not report.intact
    assert [(f.kind, f.entry) for f in report.findings] == want, report.findings
    for f in report.findings:
        assert f"entry {f.entry}" in f.message


def test_entries_from_before_the_chain_are_counted_not_judged(db):
    with Store(db, target_version=AUDIT_CHAIN - 1) as store:
        for i in range(3):
            store._exec("INSERT INTO audit (time, actor, action, target, details) "
                        "VALUES (?, 'old', 'token.create', 't', '{}')", [T0 + i])
    with Store(db) as store:  # the chain's migration, then new entries chain from genesis
        assert store.version == MIGRATIONS[-1][0]
        store.audit("new", "group.create", "group:g", {}, T0 + 10)
        store.audit("new", "group.delete", "group:g", {}, T0 + 11)
        report = AuditLog(store).verify()
    assert report.intact and (report.entries, report.legacy) == (5, 3)
    assert _row(db, 4)["prev"] == AUDIT_GENESIS


def test_verify_chain_is_pure_over_links(db):
    _fill(db, 3)
    with Store(db) as store:
        links = store.audit_links()
    assert verify_chain(links).intact
    assert verify_chain([]).intact and verify_chain([]).head is None
    # reordered entries break the chain where they were swapped
    assert not verify_chain([links[0], links[2], links[1]]).intact


def test_cli_verifies_and_exports_the_database_file(db):
    _fill(db)
    with Store(db) as store:  # one old entry, outside --since
        store.audit("op0", "token.create", "token:old", {}, time.time() - 40 * 86400)
        store.audit("op7", "token.create", "token:new", {}, time.time())
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", "--db", str(db)])
    assert ok.exit_code == 0 and "intact" in ok.output, ok.output
    result = runner.invoke(main, ["audit", "export", "--db", str(db), "--since", "30d",
                                  "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.output.splitlines()]
    assert [x["target"] for x in lines] == ["token:new"]
    x = lines[0]
    assert x["hash"] == audit_digest(x["prev"], x["time"], x["actor"], x["action"],
                                     x["target"], x["details_text"])
    everything = runner.invoke(main, ["audit", "export", "--db", str(db)])
    assert len(everything.output.splitlines()) == 8

    _sql(db, ("DELETE FROM audit WHERE id = 3", []))
    broken = runner.invoke(main, ["audit", "verify", "--db", str(db)])
    assert broken.exit_code == 1
    assert "deleted" in broken.output and "entry 4" in broken.output
    assert "BROKEN (1 findings)" in broken.output


def test_api_verifies_and_exports(services):
    viewer = services.auth.create_token("auditor", "viewer", "test", time.time()).secret
    services.store.audit("test", "group.create", "group:line1", {"site": "a"}, T0)
    with TestClient(create_app(services)) as client:
        auth = {"Authorization": f"Bearer {viewer}"}
        report = client.get("/api/v1/audit/verify", headers=auth).json()
        assert report["intact"] is True and report["entries"] >= 2  # token.create + group
        entries = client.get("/api/v1/audit", params={"since": 0}, headers=auth).json()
        assert [e["action"] for e in entries] == ["token.create", "group.create"]
        assert entries[1]["prev"] == entries[0]["hash"]
        assert client.get("/api/v1/audit/verify").status_code == 401
        _sql(services.config.db, ("UPDATE audit SET actor = 'x' WHERE id = 1", []))
        report = client.get("/api/v1/audit/verify", headers=auth).json()
        assert report["intact"] is False
        assert report["findings"][0]["kind"] == "edited" and report["findings"][0]["entry"] == 1


def _chain(n: int) -> list[AuditLink]:
    out, prev = [], AUDIT_GENESIS
    for i in range(1, n + 1):
        digest = audit_digest(prev, T0 + i, f"op{i}", "group.create", f"g{i}", "{}")
        out.append(AuditLink(i, T0 + i, f"op{i}", "group.create", f"g{i}", "{}", prev, digest))
        prev = digest
    return out


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 12), st.data())
def test_any_single_tampering_is_one_finding_of_its_kind(n, data):
    links = _chain(n)
    kind = data.draw(st.sampled_from(["edited", "deleted", "inserted"]))
    k = data.draw(st.integers(0, n - 2))  # the last entry's deletion needs an outside head
    if kind == "edited":
        links[k] = replace(links[k], actor="mallory")
        want = links[k].id
    elif kind == "deleted":
        del links[k]
        want = links[k].id  # the entry after the gap
    else:
        prev = links[k - 1].hash if k else AUDIT_GENESIS
        chained = data.draw(st.booleans())
        forged = AuditLink(100, T0, "mallory", "token.create", "t", "{}",
                           prev if chained else "ab" * 32, "")
        forged = replace(forged, hash=forged.digest())
        links.insert(k, forged)
        want = 100
    report = verify_chain(links)
    assert [(f.kind, f.entry) for f in report.findings] == [(kind, want)], report.findings
    assert verify_chain(_chain(n)).intact
