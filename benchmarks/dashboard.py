"""Dashboard benchmark: every page rendered server-side over a large fleet.

Run from the repository root::

    .venv/bin/python benchmarks/dashboard.py [--devices 10000] [--repeats 7]
        [--out benchmarks/out/dashboard.json]

The fleet is seeded straight through the store's and services' methods (no broker, no
ingest): ``--devices`` devices (10,000) in 10 groups (``site=s0..s9``), three quarters
online, a tenth offline, the rest stale, each with labels, a running bundle and a
heartbeat; ``--bundles`` bundles (50: one built by the packager and uploaded, the others
stored with its reference as further versions); ``--rollouts`` rollouts (200) in every
status, each with its decisions and 100 touched devices, aborted ones with a reason;
30 days of rollups for the uploaded bundle (hourly for the fleet and ``--rollup-devices``
devices, by minute for the last two hours) from real profiles of sensor rows, the second
half of the range shifted so it drifts; evaluated drift windows every 5 minutes over the
last day for 5 bundles × (fleet + 10 groups); alerts and an audit log.

Each page is requested ``--repeats`` times after one warm-up through the real FastAPI
application (FastAPI's ``TestClient``, signed in with a viewer's session cookie), so a time
is routing, the session check, the store's queries, the page function and the template:
everything but the network. The table shows p50 and max per page against the 300 ms target.

Not measured: a browser's rendering, concurrent requests, PostgreSQL. Numbers are for this
machine; the JSON describes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, table  # noqa: E402

TARGET_MS = 300.0


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def seed(work: Path, args: argparse.Namespace) -> tuple[Any, str, dict[str, str]]:
    """Build the fleet; returns (services, viewer token, names of things to ask for)."""
    import numpy as np

    from edgefleet.contract.messages import BundleRef
    from edgefleet.contract.profile import Profile
    from fleet_server.config import DriftConfig, ServerConfig
    from fleet_server.models import FLEET_SCOPE, DriftWindow
    from fleet_server.rollouts.values import (
        AuditEntry,
        RolloutPlan,
        RolloutState,
        Stage,
        TouchedDevice,
    )
    from fleet_server.services import build_services
    from tests.bundles import BundleFactory, make_keys, sensor_data

    keys = make_keys(work / "keys")
    log("building a bundle with the packager")
    bundle_path = BundleFactory(work / "bundles", keys).build("1.0.0")
    config = ServerConfig(db=work / "fleet.db", trust=tuple(keys.trust_specs()),
                          drift=DriftConfig(window_s=300, lateness_s=0), evaluate=False)
    s = build_services(config)
    store = s.store
    now = time.time()
    token = s.auth.create_token("bench", "viewer", "bench", now).secret
    main, _ = s.bundles.upload(bundle_path.read_bytes(), "bench", now - 40 * 86400)
    reference = store.bundle_reference(main.id)
    log(f"storing {args.bundles - 1} more bundle versions")
    for k in range(1, args.bundles):
        store.add_bundle(name="sensor" if k < 25 else f"model{k % 5}", version=f"1.{k}.0",
                         sha256=f"{k:064x}", size=main.size,
                         reference_hash=main.reference_hash, manifest=main.manifest,
                         reference=reference, signers=main.signers,
                         uploaded=now - (50 - k) * 86400, uploaded_by="bench")
    bundles = store.list_bundles()
    groups = [f"s{i}" for i in range(10)]
    for g in groups:
        s.registry.create_group(g, {"site": g}, "bench", now)
    log(f"seeding {args.devices} devices")
    ids = [f"dev-{i:05d}" for i in range(args.devices)]
    store.ensure_devices(ids, now - 30 * 86400)
    beats = {}
    with store.transaction():
        for i, d in enumerate(ids):
            store.set_labels(d, {"site": groups[i % 10], "line": str(i % 7),
                                 "hw": "pi4" if i % 3 else "pi5"})
            b = bundles[i % 5]
            kind = i % 20
            heard = now - (20 if kind < 15 else 900 if kind < 18 else 7200)
            store.apply_status(d, online=kind < 18, time=heard, agent_version="0.1.0",
                               bundle=BundleRef(b.name, b.version), shadow=None, labels=None)
            beats[d] = (heard, {"time": heard, "uptime_s": 3600.0 * (i % 200),
                                "rss_bytes": 40_000_000 + i, "predictions": 1000 + i,
                                "errors": i % 4, "outbox_depth": i % 9, "dropped": 0,
                                "latency_p50_ms": 0.4, "latency_p95_ms": 1.2})
        store.apply_heartbeats(beats)
        store.touch_devices({d: beats[d][0] for d in ids})
    log(f"seeding {args.rollouts} rollouts")
    statuses = ("completed", "aborted", "running", "paused", "shadow", "ready",
                "pending_approval")
    stages = (Stage(0.01, 1, 3600.0), Stage(0.1, 3, 3600.0), Stage(0.5, 10, 3600.0),
              Stage(1.0, 1, 3600.0))
    with store.transaction():
        for k in range(args.rollouts):
            status = statuses[k % len(statuses)] if k < 20 else statuses[k % 2]
            created = now - (args.rollouts - k) * 3 * 3600
            g = groups[k % 10]
            b = bundles[k % len(bundles)]
            plan = RolloutPlan(id=f"r-{k:04d}", bundle=BundleRef(b.name, b.version), group=g,
                               stages=stages, created_at=created)
            members = ids[k % 10::10][:100]
            touched = {d: TouchedDevice(None, created + 60, 0) for d in members}
            finished = created + 7200 if status in ("completed", "aborted") else None
            history = (AuditEntry(created, "operator:ana", "create", None, "ready", 0),
                       AuditEntry(created + 1, "operator:ana", "start", "ready", "running", 0))
            if status == "aborted":
                history += (AuditEntry(created + 7200, "system", "abort", "running", "aborted",
                                       1, {"error_rate": 0.07},
                                       "gate error_rate: 0.07 > 0.05"),)
            state = RolloutState(rollout_id=plan.id, status=status,
                                 stage=3 if status == "completed" else 1,
                                 stage_started_at=created + 3600, finished_at=finished,
                                 touched=touched, history=history)
            store.add_rollout(plan.id, g, b.label, status, plan.to_dict(), state.to_dict(),
                              created)
    ref = s.bundles.reference(main.id)
    log(f"seeding 30 days of rollups ({args.rollup_devices} devices)")
    layout = ref.layout
    rng = np.random.default_rng(0)
    packs = []
    for shift in (0.0, 12.0):
        frame = sensor_data(400, seed=int(shift) + 3, shift={"temperature": shift})
        prof = Profile(ref.spec)
        classes = np.array(ref.spec.outputs[0].vocabulary)  # type: ignore[union-attr]
        prof.update({f: frame[f].to_numpy() for f in ("temperature", "humidity",
                                                       "vibration", "current")},
                    {"class": rng.choice(classes, 400), "confidence": rng.uniform(0.5, 1, 400)},
                    rows=400)
        packs.append(layout.pack_profile(prof).to_bytes())
    fine, coarse = s.drift.levels[0], s.drift.levels[-1]
    hour0 = int(now // coarse) * coarse - 30 * 86400
    scoped = [FLEET_SCOPE, *ids[: args.rollup_devices]]
    rows = []
    for h in range(30 * 24):
        data = packs[h >= 15 * 24]
        for scope in scoped:
            rows.append(((main.id, coarse, hour0 + h * coarse, scope), 400, 1, data))
    minute0 = int(now // fine) * fine - 2 * 3600
    for m in range(2 * 3600 // fine):
        for scope in scoped:
            rows.append(((main.id, fine, minute0 + m * fine, scope), 400, 1, packs[1]))
    with store.transaction():
        store.save_rollups(rows)
    log("seeding drift windows, alerts and audit entries")
    verdicts = ("ok", "ok", "ok", "warn", "drift", "insufficient")
    with store.transaction():
        for b in bundles[:5]:
            for scope in (FLEET_SCOPE, *groups):
                for w in range(288):
                    start = int(now // 300) * 300 - (288 - w) * 300
                    v = verdicts[(w // 20 + len(scope) + b.id) % len(verdicts)]
                    store.save_window(b.id, DriftWindow(b.label, scope, start, start + 300, v,
                                                        0.5, 4000, 100, {}, start + 300))
        for k in range(60):
            b = bundles[k % 5]
            alert = store.open_alert(kind="drift", bundle_id=b.id, group=groups[k % 10],
                                     device="" if k < 30 else ids[k], message="drifts",
                                     details={}, now=now - k * 600, webhook="none")
            if alert is not None and k % 3 == 0:
                store.resolve_alert(alert.id, now - k * 300)
        for k in range(500):
            store.audit("operator:ana", "device.labels", f"device:{ids[k]}", {}, now - k)
    names = {"device": ids[12345 % len(ids)], "bundle": main.label,
             "rollout": "r-0002", "aborted": "r-0001"}
    return s, token, names


def pages(names: dict[str, str]) -> dict[str, str]:
    b, d, r = names["bundle"], names["device"], names["rollout"]
    return {
        "overview": "/",
        "devices": "/devices",
        "devices, status sort, page 100": "/devices?sort=status&order=desc&page=100",
        "devices, search": "/devices?q=dev-012",
        "devices, group + offline": "/devices?group=s3&status=offline",
        "device": f"/devices/{d}",
        "drift index (24 h)": "/drift",
        "drift index (30 d)": "/drift?hours=720",
        "drift, fleet, 1 h": f"/drift?bundle={b}",
        "drift, fleet, 24 h": f"/drift?bundle={b}&hours=24",
        "drift, fleet, 30 d": f"/drift?bundle={b}&hours=720",
        "drift, group, 24 h": f"/drift?bundle={b}&group=s3&hours=24",
        "alerts": "/alerts",
        "rollouts": "/rollouts",
        "rollout (running, 1,000 in group)": f"/rollouts/{r}",
        "rollout (aborted)": f"/rollouts/{names['aborted']}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--bundles", type=int, default=50)
    parser.add_argument("--rollouts", type=int, default=200)
    parser.add_argument("--rollup-devices", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/dashboard.json")
    args = parser.parse_args(argv)

    from fastapi.testclient import TestClient

    from fleet_server.api import create_app

    with tempfile.TemporaryDirectory(prefix="edgefleet-dash-") as tmp:
        services, token, names = seed(Path(tmp), args)
        app = create_app(services)
        results = {}
        with TestClient(app, base_url="http://127.0.0.1") as client:
            assert client.post("/login", data={"token": token},
                               follow_redirects=False).status_code == 303
            for name, path in pages(names).items():
                r = client.get(path)  # warm-up
                assert r.status_code == 200, (path, r.status_code, r.text[:300])
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    r = client.get(path)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200
                results[name] = {"path": path, "p50_ms": statistics.median(times),
                                 "max_ms": max(times), "n": len(times),
                                 "bytes": len(r.content)}
                log(f"{name}: {results[name]['p50_ms']:.1f} ms")
        services.store.close() if hasattr(services.store, "close") else None
    rows = [[name, path_of["path"], f"{path_of['p50_ms']:.1f}", f"{path_of['max_ms']:.1f}",
             f"{path_of['bytes'] / 1024:.0f}",
             "yes" if path_of["max_ms"] < TARGET_MS else "NO"]
            for name, path_of in results.items()]
    print(table(["page", "path", "p50 ms", "max ms", "KiB", f"< {TARGET_MS:.0f} ms"], rows))
    doc = {"benchmark": "dashboard", "sizes": vars(args) | {"out": str(args.out)},
           "target_ms": TARGET_MS, "pages": results,
           "machine": machine(["fastapi", "jinja2", "numpy"]),
           "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
