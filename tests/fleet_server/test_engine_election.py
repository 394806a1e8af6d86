"""One engine at a time over PostgreSQL: the rollout engine, the drift evaluator and the
webhook run only in the process holding the engine lease (a session advisory lock); a
standby takes over when the leader dies, and a leader whose session is gone stops.

In process, two ``FleetServer(role="engine")`` over one database (a session ended from
the database side, as when a leader's host vanishes); and as processes, two
``fleet serve --role engine`` with the leader killed by SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from fleet_server.server import FleetServer
from tests.edge_agent.agent_helpers import wait_until
from tests.fleet_server.conftest import make_config

REPO = Path(__file__).resolve().parents[2]
TAKEOVER_S = 15.0


def leader(url: str) -> str | None:
    """The application_name of the session holding the engine lease, if any."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON "
            "a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND "
            "a.application_name LIKE 'fleet-engine:%'").fetchone()
    return None if row is None else row[0]


def takeovers(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(
            "SELECT actor FROM audit WHERE action = 'engine.lead' ORDER BY id").fetchall()]


def test_one_engine_leads_and_a_standby_takes_over_a_lost_lease(tmp_path, signing_keys,
                                                                 postgres):
    url = postgres.new_database()
    config = replace(make_config(tmp_path, signing_keys, db=url, evaluate=True),
                     role="engine", election_s=0.2)
    a, b = FleetServer(config), FleetServer(config)
    deposed: list[str] = []
    a.on_deposed = lambda: deposed.append("a")
    try:
        a.start()
        assert a.leading and a.rollout_engine._thread is not None  # the engine runs in a
        b.start()
        assert not b.leading and b.rollout_engine._thread is None  # and b stands by
        assert leader(url) == a.lease_name
        # a's database session ends (its host vanished): a must stop, b must lead
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                         "application_name = %s", [a.lease_name])
        wait_until(lambda: b.leading, TAKEOVER_S, "the standby to lead")
        wait_until(lambda: deposed == ["a"], 10, "the old leader to step down")
        assert a.rollout_engine._thread is None and a.evaluator._thread is None
        assert b.rollout_engine._thread is not None and b.evaluator._thread is not None
        assert leader(url) == b.lease_name
        assert len(takeovers(url)) == 2  # a, then b: recorded in the audit log
    finally:
        b.stop()
        a.stop()
    assert leader(url) is None  # a clean stop releases the lease


def _engine(url: str, tmp: Path, keys, log: Path) -> subprocess.Popen:
    trust = [x for spec in keys.trust_specs() for x in ("--trust", spec)]
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "fleet_server.cli", "serve", "--db", url, "--role",
             "engine", "--bundle-dir", str(tmp / "bundles"), *trust],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_killing_the_leading_fleet_serve_hands_the_engine_to_the_standby(tmp_path,
                                                                        signing_keys,
                                                                        postgres):
    url = postgres.new_database()
    procs = {}
    try:
        first = _engine(url, tmp_path, signing_keys, tmp_path / "first.log")
        procs[first.pid] = first
        wait_until(lambda: leader(url) is not None, 60, "an engine to lead")
        second = _engine(url, tmp_path, signing_keys, tmp_path / "second.log")
        procs[second.pid] = second
        wait_until(lambda: "engine: standing by" in (tmp_path / "second.log").read_text(), 60,
                   "the second engine to stand by")
        name = leader(url)
        pid = int(name.split(":")[2])
        assert pid == first.pid  # the first to start leads; the second stands by
        killed = time.monotonic()
        procs[pid].send_signal(signal.SIGKILL)
        procs.pop(pid).wait(10)
        wait_until(lambda: f":{second.pid}:" in (leader(url) or ""), TAKEOVER_S,
                   "the standby to take the engine over")
        took = time.monotonic() - killed
        assert took < TAKEOVER_S
        wait_until(lambda: len(takeovers(url)) == 2, 10, "the takeover in the audit log")
        print(f"engine failover: {took:.2f} s from SIGKILL to the standby's lease")
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
        procs.pop(second.pid)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)
