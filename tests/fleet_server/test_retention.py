"""Retention: :meth:`Evaluator.housekeeping` deletes summaries and rollups past their
windows and keeps the rest, level by level.

Summaries and the finest rollups live ``retention_s``, coarser rollups
``coarse_retention_s`` (IngestConfig). Real summaries of a real bundle go through the
ingestor into a real SQLite file and a real PostgreSQL database; what is left is read
back with plain SQL.
"""

from __future__ import annotations

import time

import pytest

from edgefleet.contract.messages import encode, topic
from fleet_server.config import DriftConfig, IngestConfig
from fleet_server.dashboard.session import Sessions
from fleet_server.errors import ConfigError
from fleet_server.monitoring.evaluator import Evaluator
from fleet_server.services import build_services
from fleet_server.telemetry.link import Incoming
from tests.fleet_server.conftest import make_config, profile_of, summary_of

DAY = 86400
NOW = 1_800_000_000 - 1_800_000_000 % 3600  # on an hour boundary
RETENTION_D, COARSE_D = 2, 10
# windows ending this many days before NOW (minus 10 minutes, so each sits in one hour)
AGES_D = (12, 5, 1, 0)


@pytest.fixture
def fleet(tmp_path, db, signing_keys, sensor_bundle, sensor_ref):
    config = make_config(tmp_path, signing_keys, db=db, ingest_config=IngestConfig(
        levels=(60, 3600), retention_s=RETENTION_D * DAY, coarse_retention_s=COARSE_D * DAY,
        max_clock_skew_s=DAY))
    s = build_services(config)
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    spec, _ = sensor_ref
    batch = []
    for n, age in enumerate(AGES_D):
        end = NOW - age * DAY - 600
        for device in ("dev1", "dev2"):
            msg = summary_of(device, n + 1, profile_of(spec, 50, seed=n), end - 60, end)
            batch.append(Incoming(topic(device, "summary"), encode(msg), 1, len(batch) + 1, 1,
                                  float(end)))
    result = s.ingestor.process(batch, now=float(NOW))
    assert result.stored["summary"] == len(batch)
    yield s, config
    s.close()


def _ages(store, sql: str) -> list[int]:
    rows = store.conn.execute(sql).fetchall()
    return sorted({round((NOW - row[0]) / DAY) for row in rows}, reverse=True)


def test_housekeeping_deletes_old_summaries_and_rollups_and_keeps_the_rest(fleet):
    s, config = fleet
    db = s.store
    assert _ages(db, "SELECT window_end FROM summaries") == [12, 5, 1, 0]
    assert _ages(db, "SELECT bucket FROM rollups WHERE width = 60") == [12, 5, 1, 0]
    assert _ages(db, "SELECT bucket FROM rollups WHERE width = 3600") == [12, 5, 1, 0]

    ev = Evaluator(s.store, s.bundles, s.registry, s.alerts, DriftConfig(window_s=60),
                   config.ingest_config, clock=lambda: float(NOW))
    token = s.auth.create_token("ana", "viewer", "test", NOW - 86400).secret
    Sessions(s.store).login(s.auth, token, NOW - 60)  # still open
    Sessions(s.store, max_age_s=3600).login(s.auth, token, NOW - 86400)  # expired by now
    removed = ev.housekeeping(float(NOW))

    # two devices; rollups: each device's row and the fleet's (scope "*") per bucket
    assert removed == {"summaries": 4, "performance": 0, "dead_letters": 0, "sessions": 1,
                       "alerts_retired": 0, "rollups_60": 6, "rollups_3600": 3,
                       "performance_rollups_3600": 0, "performance_rollups_86400": 0}
    assert Sessions(s.store).count(float(NOW)) == 1
    assert _ages(db, "SELECT window_end FROM summaries") == [1, 0]
    assert _ages(db, "SELECT bucket FROM rollups WHERE width = 60") == [1, 0]
    assert _ages(db, "SELECT bucket FROM rollups WHERE width = 3600") == [5, 1, 0]
    # what is kept still reads: the last day's data is there, devices and fleet
    kept = s.store.list_summaries(limit=100)
    assert sorted((r.device, r.seq) for r in kept) == [("dev1", 3), ("dev1", 4),
                                                       ("dev2", 3), ("dev2", 4)]
    # and a second pass has nothing left to do
    assert ev.housekeeping(float(NOW)) == {"summaries": 0, "performance": 0, "dead_letters": 0,
                                           "sessions": 0, "alerts_retired": 0,
                                           "rollups_60": 0, "rollups_3600": 0,
                                           "performance_rollups_3600": 0,
                                           "performance_rollups_86400": 0}


def test_the_retention_boundary_is_kept(fleet):
    s, _ = fleet
    oldest_kept = NOW - 1 * DAY - 600
    # exactly at the cutoff: kept (strictly older is deleted): the 12- and 5-day-old go
    assert s.store.prune_summaries(before=oldest_kept) == 4
    assert s.store.prune_summaries(before=oldest_kept + 1) == 2  # then the 1-day-old
    bucket = oldest_kept - 60  # the minute bucket of that window
    assert s.store.prune_rollups(60, before=bucket) == 6
    assert s.store.prune_rollups(60, before=bucket + 1) == 3
    assert s.store.prune_rollups(3600, before=bucket + 1) == 9  # levels are separate


def test_retention_is_configured_with_positive_windows():
    for name in ("retention_s", "coarse_retention_s"):
        with pytest.raises(ConfigError, match=name):
            IngestConfig(**{name: 0})
