"""Drift and performance alerts of a bundle no device runs any more resolve by themselves:
nothing would judge them again (the evaluator judges bundles that send data)."""

from __future__ import annotations

from edgefleet.contract.messages import BundleRef
from fleet_server.config import DriftConfig
from fleet_server.monitoring.alerts import WHILE_IN_SERVICE
from fleet_server.monitoring.evaluator import Evaluator

T0 = 1_800_000_000.0


def test_alerts_of_a_bundle_out_of_service_resolve_in_housekeeping(services_on, bundles):
    s = services_on
    for version in ("1.0.0", "1.1.0"):
        s.bundles.upload(bundles.build(version).read_bytes(), "test", T0)
    old, new = s.bundles.get("sensor", "1.0.0"), s.bundles.get("sensor", "1.1.0")
    for d in ("dev1", "dev2"):
        s.registry.add_device(d, {"site": "a"}, "test", T0)
    kinds = (*WHILE_IN_SERVICE, "review_due")
    for kind in kinds:
        for record in (old, new):
            s.alerts.raise_alert(kind, record, group="line", now=T0, message=kind, details={})
    ev = Evaluator(s.store, s.bundles, s.registry, s.alerts, DriftConfig(window_s=60),
                   s.config.ingest_config, clock=lambda: T0)

    def open_alerts() -> set[tuple[str, str]]:
        return {(a.kind, a.bundle) for a in s.alerts.list(state="open", limit=100)}

    # dev1 reports running 1.0.0, dev2 is told to shadow 1.1.0: both in service
    s.store.apply_status("dev1", online=True, time=T0, agent_version="t",
                         bundle=BundleRef("sensor", "1.0.0"), shadow=None, labels=None)
    s.desired.assign("dev2", None, "sensor@1.1.0", actor="test", now=T0)
    assert s.store.bundles_in_service() == {"sensor@1.0.0", "sensor@1.1.0"}
    assert ev.housekeeping(T0 + 60)["alerts_retired"] == 0
    assert len(open_alerts()) == 2 * len(kinds)

    # 1.1.0 leaves dev2's desired state: its drift and performance alerts resolve, not its
    # review alert (that rule asks what runs on its own), and 1.0.0's stay open
    s.desired.assign("dev2", None, None, actor="test", now=T0 + 120)
    assert s.store.bundles_in_service() == {"sensor@1.0.0"}
    assert ev.housekeeping(T0 + 180)["alerts_retired"] == len(WHILE_IN_SERVICE)
    assert open_alerts() == {*((k, "sensor@1.0.0") for k in kinds),
                             ("review_due", "sensor@1.1.0")}
    resolved = [a for a in s.alerts.list(state="resolved", limit=100)]
    assert {a.resolved for a in resolved} == {T0 + 180}
    assert ev.housekeeping(T0 + 240)["alerts_retired"] == 0  # nothing left to do
