"""Drift and performance reports over 30 days for a 10,000-device fleet, SQLite and PostgreSQL.

Run from the repository root::

    .venv/bin/python benchmarks/drift_reports.py [--devices 10000] [--days 30]
        [--device-hours 6] [--repeats 7] [--analyze] [--db postgresql://... | --postgres]
        [--out benchmarks/out/drift_reports.json]

The same fleet is seeded into each engine (a SQLite file, and a private PostgreSQL 15 from
``tests/pg.py`` with fsync on for ``--postgres``, or the empty database ``--db`` names):
``--devices`` devices in 10 groups (``site=s0..s9``), one bundle built by the packager,
and the rollups the server keeps:

- drift: the fleet's and every group's hourly rollups for ``--days`` days (the second
  half drifted) and minute rollups for the last 2 hours (the groups' own rollups start at
  the first day seeded), and every device's hourly rollups for the last
  ``--device-hours`` hours; the members of group ``s3`` also have hourly rows for every
  earlier hour of the ``--days``, as placeholders (an empty blob: no report here merges
  them, the device counts probe them), so that counting a group's devices over 30 days
  meets 720 rows per member;
- performance: the fleet's and every group's rollups for every day (and every hour of the
  last 2 days) with real realized and estimated blocks of a classifier; every device's
  day rows (and the last 24 hours' hour rows) as placeholders without blocks (what the
  device counts read), but ``dev-00003``'s with real blocks.

Each drift report is :meth:`fleet_server.monitoring.drift.DriftService.report` (read the
rollups, merge them, compare with the reference), each performance report
:meth:`fleet_server.monitoring.performance.PerformanceService.report` (read the rollups,
add the blocks, metrics, verdicts); one warm-up then ``--repeats`` runs; medians.

Not seeded: every device's hourly drift rollups for all 30 days (7.2 million rows of
several KB for 10,000 devices, tens of GB): no report reads them any more (a group reads
its own); the fleet's device count reads the rows there are.
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

from benchmarks.common import machine, performance_blocks, table  # noqa: E402

TARGET_MS = 1000.0


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def seed(work: Path, db: str | Path, bundle_path: Path, keys, args: argparse.Namespace,
         now: float) -> tuple[Any, dict[str, int]]:
    """The fleet in ``db``; returns (services, what was seeded)."""
    import numpy as np

    from edgefleet.contract.profile import Profile
    from fleet_server.config import DriftConfig, ServerConfig
    from fleet_server.models import FLEET_SCOPE
    from fleet_server.services import build_services
    from fleet_server.store import group_scope
    from tests.bundles import sensor_data

    config = ServerConfig(db=db, bundle_dir=work / "bundles", trust=tuple(keys.trust_specs()),
                          drift=DriftConfig(window_s=300, lateness_s=0), evaluate=False)
    s = build_services(config)
    store = s.store
    main, _ = s.bundles.upload(bundle_path.read_bytes(), "bench", now - 40 * 86400)
    groups = [f"s{i}" for i in range(10)]
    for g in groups:
        s.registry.create_group(g, {"site": g}, "bench", now)
    ids = [f"dev-{i:05d}" for i in range(args.devices)]
    t0 = time.perf_counter()
    with store.transaction():
        store.ensure_devices(ids, now - 30 * 86400)
        # the labels as set_labels writes them, in two batches (a set_labels call per
        # device is six statements: minutes for 10,000 devices on PostgreSQL)
        store._many("UPDATE devices SET labels = ?, set_labels = ? WHERE id = ?",
                    [(f'{{"site":"{groups[i % 10]}"}}',) * 2 + (d,)
                     for i, d in enumerate(ids)])
        store._many("INSERT INTO device_labels (device, key, value) VALUES (?, 'site', ?)",
                    [(d, groups[i % 10]) for i, d in enumerate(ids)])
    log(f"  {len(ids):,} devices in {time.perf_counter() - t0:.0f} s")
    ref = s.bundles.reference(main.id)
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
    top = int(now // coarse) * coarse
    hours = args.days * 24
    rows = [((main.id, coarse, top - (hours - h) * coarse, FLEET_SCOPE), 400 * args.devices,
             args.devices, packs[h >= hours // 2]) for h in range(hours)]
    rows += [((main.id, fine, top - 2 * 3600 + m * fine, FLEET_SCOPE), 400, 1, packs[1])
             for m in range(2 * 3600 // fine)]
    rows += [((main.id, coarse, top - (args.device_hours - h) * coarse, d), 400, 1, packs[1])
             for h in range(args.device_hours) for d in ids]
    t0 = time.perf_counter()
    for i in range(0, len(rows), 5000):
        with store.transaction():
            store.save_rollups(rows[i:i + 5000])
    log(f"  {len(rows):,} rollups ({len(packs[1]):,} bytes each) in "
        f"{time.perf_counter() - t0:.0f} s")
    # the groups' own rollups, complete from the first day seeded
    first_day = (top - hours * coarse) // 86400 * 86400
    store.set_group_rollup_starts([(g, now, first_day) for g in groups])
    per_group = args.devices // 10
    grows = [((main.id, coarse, top - (hours - h) * coarse, group_scope(g)), 400 * per_group,
              per_group, packs[h >= hours // 2]) for g in groups for h in range(hours)]
    grows += [((main.id, fine, top - 2 * 3600 + m * fine, group_scope(g)), 400, 1, packs[1])
              for g in groups for m in range(2 * 3600 // fine)]
    # group s3's members: placeholder rows for the hours before the last device hours
    members = [d for i, d in enumerate(ids) if i % 10 == 3]
    placeholders = [((main.id, coarse, top - (hours - h) * coarse, d), 400, 1, b"")
                    for h in range(hours - args.device_hours) for d in members]
    t0 = time.perf_counter()
    for part in (grows, placeholders):
        for i in range(0, len(part), 5000):
            with store.transaction():
                store.save_rollups(part[i:i + 5000])
    log(f"  {len(grows):,} group rollups and {len(placeholders):,} placeholder device rows "
        f"in {time.perf_counter() - t0:.0f} s")
    n_perf = seed_performance(s, main.id, ids, groups, top, first_day, args)
    if args.analyze:  # what autovacuum does some time after a bulk load
        store._exec("ANALYZE")
    return s, {"devices": len(ids), "rollups": len(rows), "rollup_bytes": len(packs[1]),
               "group_rollups": len(grows), "placeholder_device_rows": len(placeholders),
               "performance_rollups": n_perf, "top": top}


def seed_performance(s: Any, bundle_id: int, ids: list[str], groups: list[str], top: int,
                     first_day: int, args: argparse.Namespace) -> int:
    """Performance rollups by day and hour (see the top); how many rows."""
    import numpy as np

    from fleet_server.models import FLEET_SCOPE
    from fleet_server.store import PerformanceRollup, group_scope

    spec = s.bundles.performance(bundle_id).spec
    rng = np.random.default_rng(1)

    def rollup(width: int, scope: str, bucket: int, devices: int, real: bool) -> tuple:
        r, e = performance_blocks(spec, rng, 200) if real else (None, None)
        return ((bundle_id, width, bucket, scope),
                PerformanceRollup(scope, bucket, width // 60 * devices,
                                  200 if real else 0, 200, devices, r, e))

    days = range(first_day, -(-top // 86400) * 86400, 86400)
    rows = []
    for width, buckets in ((86400, days), (3600, range(top - 48 * 3600, top, 3600))):
        rows += [rollup(width, FLEET_SCOPE, b, len(ids), True) for b in buckets]
        rows += [rollup(width, group_scope(g), b, len(ids) // 10, True) for b in buckets
                 for g in groups]
    rows += [rollup(86400, d, b, 1, d == "dev-00003") for b in days for d in ids]
    rows += [rollup(3600, d, b, 1, d == "dev-00003")
             for b in range(top - 24 * 3600, top, 3600) for d in ids]
    t0 = time.perf_counter()
    for i in range(0, len(rows), 5000):
        with s.store.transaction():
            s.store.save_performance_rollups(rows[i:i + 5000])
    log(f"  {len(rows):,} performance rollups in {time.perf_counter() - t0:.0f} s")
    return len(rows)


def cases(top: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    d = args.device_hours * 3600
    month = top - args.days * 86400
    group = f"group s3 ({args.devices // 10:,} devices)"
    return {
        f"drift: fleet, {args.days} d": {"since": month, "until": top},
        "drift: fleet, 24 h": {"since": top - 86400, "until": top},
        "drift: fleet, last 90 min (minutes + hours)": {"since": top - 5400, "until": top},
        f"drift: {group}, {args.days} d": {"since": month, "until": top, "group": "s3"},
        f"drift: {group}, {args.device_hours} h": {"since": top - d, "until": top,
                                                   "group": "s3"},
        f"drift: one device, {args.device_hours} h": {"since": top - d, "until": top,
                                                      "device": "dev-00003"},
        f"performance: fleet, {args.days} d": {"since": month, "until": top},
        "performance: fleet, 24 h": {"since": top - 86400, "until": top},
        f"performance: {group}, {args.days} d": {"since": month, "until": top,
                                                 "group": "s3"},
        f"performance: one device, {args.days} d": {"since": month, "until": top,
                                                    "device": "dev-00003"},
    }


def measure(s: Any, top: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out = {}
    for name, kw in cases(top, args).items():
        service = s.drift if name.startswith("drift") else s.performance

        def run(kw=kw, service=service):
            return service.report("sensor@1.0.0", now=top + 60, **kw)
        t0 = time.perf_counter()
        first = run()  # the warm-up: the first query plans on fresh tables
        first_ms = (time.perf_counter() - t0) * 1000
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1000)
        if name.startswith("drift"):
            read, devices = first.rollups, first.devices
        else:  # one rollup per step (a device's or the scope's own)
            read, devices = len(first.points), first.total.devices
        out[name] = {"p50_ms": statistics.median(times), "max_ms": max(times),
                     "first_ms": first_ms, "rollups": read, "devices": devices}
        log(f"  {name}: {out[name]['p50_ms']:.1f} ms ({read:,} rollups, {devices:,} "
            f"devices; the first run {first_ms:,.0f} ms)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--device-hours", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--analyze", action="store_true",
                        help="ANALYZE after seeding (else the planner may run the first "
                             "reports without statistics of the fresh tables)")
    parser.add_argument("--db", default=None, help="an empty PostgreSQL database")
    parser.add_argument("--postgres", action="store_true",
                        help="start a private PostgreSQL 15 (tests/pg.py, fsync on)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/drift_reports.json")
    args = parser.parse_args(argv)

    from tests.bundles import BundleFactory, make_keys

    pg = None
    results: dict[str, dict[str, Any]] = {}
    seeded: dict[str, Any] = {}
    loads = [Path("/proc/loadavg").read_text().split()[:3]]
    with tempfile.TemporaryDirectory(prefix="edgefleet-drift-") as tmp:
        work = Path(tmp)
        keys = make_keys(work / "keys")
        log("building a bundle with the packager")
        bundle_path = BundleFactory(work / "bundle-files", keys).build("1.0.0")
        targets: dict[str, str | Path] = {"sqlite": work / "fleet.db"}
        try:
            if args.postgres:
                from tests.pg import Postgres

                pg = Postgres(durable=True)
                pg.start()
                targets["postgresql"] = pg.new_database()
            elif args.db:
                targets["postgresql"] = args.db
            now = time.time()
            for engine, db in targets.items():
                log(f"{engine}: seeding")
                (work / engine).mkdir()
                s, seeded[engine] = seed(work / engine, db, bundle_path, keys, args, now)
                try:
                    log(f"{engine}: reports")
                    results[engine] = measure(s, seeded[engine]["top"], args)
                finally:
                    s.close()
                loads.append(Path("/proc/loadavg").read_text().split()[:3])
        finally:
            if pg is not None:
                pg.cleanup()
    engines = list(results)
    names = list(results[engines[0]])
    rows = [[name, *[f"{results[e][name]['p50_ms']:.1f}" for e in engines],
             f"{results[engines[0]][name]['rollups']:,}",
             *["yes" if results[e][name]["p50_ms"] < TARGET_MS else "NO" for e in engines]]
            for name in names]
    print(table(["report", *[f"{e} p50 ms" for e in engines], "rollups read",
                 *[f"{e} < 1 s" for e in engines]], rows))
    doc = {"benchmark": "drift_reports", "sizes": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()},
           "seeded": seeded, "target_ms": TARGET_MS, "reports": results,
           "machine": machine(["numpy", "psycopg"]), "loadavg": loads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
