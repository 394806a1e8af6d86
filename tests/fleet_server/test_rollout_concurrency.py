"""Several processes on one database (API replicas, an engine deposed mid-tick and its
successor): a rollout transition applies only to the state it was decided on, so none is
applied twice or over another's. On both engines.

Two ``Services`` over one database stand for two processes; the pure machine's decision is
intercepted to let the other process act between the read and the write.
"""

from __future__ import annotations

import time

import pytest

from fleet_server.errors import ConflictError
from fleet_server.rollouts import engine as engine_module
from fleet_server.services import build_services
from tests.fleet_server.conftest import make_config
from tests.fleet_server.rollout_helpers import Recorder, Seeder, devices_named

OPERATOR = {"viewer", "operator"}
STAGES = [{"fraction": 0.34, "min_devices": 2, "soak_s": 10},
          {"fraction": 1.0, "min_devices": 1, "soak_s": 10}]


@pytest.fixture
def two(tmp_path, db, signing_keys, bundles):
    config = make_config(tmp_path, signing_keys, db=db)
    a = build_services(config, publisher=Recorder())
    b = build_services(config, publisher=Recorder())
    t0 = time.time()
    for version in ("1.0.0", "1.1.0"):
        a.bundles.upload(bundles.build(version).read_bytes(), "test", t0)
    seed = Seeder(a)
    for d in devices_named(4):
        a.registry.add_device(d, {"site": "a"}, "test", t0)
        seed.online(d, "1.0.0", t0)
    a.registry.create_group("plant-a", {"site": "a"}, "test", t0)
    a.rollouts.create({"bundle": "sensor@1.1.0", "group": "plant-a", "stages": STAGES,
                       "install_timeout_s": 60, "id": "r1", "start": True},
                      actor="operator:ana", roles=OPERATOR, now=t0)
    yield a, b, t0
    b.close()
    a.close()


def _actions(s) -> list[str]:
    return [e.action for e in s.store.list_audit(target="rollout:r1", limit=100)]


def test_a_tick_decided_before_another_process_acted_is_not_applied(two, monkeypatch):
    a, b, t0 = two
    real = engine_module.decide

    def meanwhile(*args, **kwargs):
        decided = real(*args, **kwargs)
        if not acted:  # the other process pauses it between this tick's read and write
            acted.append(b.rollouts.act("r1", "pause", actor="operator:bo", roles=OPERATOR,
                                        now=t0 + 1))
        return decided

    acted: list[dict] = []
    monkeypatch.setattr(engine_module, "decide", meanwhile)
    a.rollouts.tick(now=t0 + 2)
    assert acted and a.store.get_rollout("r1").status == "paused"  # not overwritten
    assert _actions(a).count("rollout.pause") == 1
    monkeypatch.setattr(engine_module, "decide", real)
    a.rollouts.tick(now=t0 + 3)  # the next tick decides on the paused state
    assert a.store.get_rollout("r1").status == "paused"


def test_an_action_decided_on_a_stale_state_is_refused(two, monkeypatch):
    a, b, t0 = two
    real = engine_module.act

    def meanwhile(*args, **kwargs):
        decided = real(*args, **kwargs)
        if not acted:  # the other replica aborts it between this action's read and write
            acted.append("abort")  # first: its own act passes through here too
            b.rollouts.act("r1", "abort", actor="operator:bo", roles=OPERATOR,
                           reason="other replica", now=t0 + 1)
        return decided

    acted: list[str] = []
    monkeypatch.setattr(engine_module, "act", meanwhile)
    with pytest.raises(ConflictError, match="changed while 'pause' was being decided"):
        a.rollouts.act("r1", "pause", actor="operator:ana", roles=OPERATOR, now=t0 + 2)
    assert a.store.get_rollout("r1").status == "aborted"
    assert "rollout.pause" not in _actions(a) and _actions(a).count("rollout.abort") == 1
