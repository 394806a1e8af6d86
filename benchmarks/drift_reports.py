"""Drift reports over 30 days of rollups for a 10,000-device fleet, SQLite and PostgreSQL.

Run from the repository root::

    .venv/bin/python benchmarks/drift_reports.py [--devices 10000] [--days 30]
        [--device-hours 6] [--repeats 7] [--analyze] [--db postgresql://... | --postgres]
        [--out benchmarks/out/drift_reports.json]

The same fleet is seeded into each engine (a SQLite file, and a private PostgreSQL 15 from
``tests/pg.py`` with fsync on for ``--postgres``, or the empty database ``--db`` names):
``--devices`` devices in 10 groups (``site=s0..s9``), one bundle built by the packager,
and the rollups the server keeps: the fleet's hourly rollups for ``--days`` days (the
second half drifted), its minute rollups for the last 2 hours, and every device's hourly
rollups for the last ``--device-hours`` hours. Each report is
:meth:`fleet_server.monitoring.drift.DriftService.report` (read the rollups, merge them,
compare with the reference), one warm-up then ``--repeats`` runs; medians.

Not seeded: every device's hourly rollups for all 30 days (7.2 million rows of several KB
for 10,000 devices, tens of GB). A group's report reads one rollup per device and hour,
so its time over 30 days is projected from the measured cost per rollup read and merged
(printed as a projection, not a measurement); the fleet's report reads the fleet's own
rollups plus one count of devices over the device rows, measured here over the rows
seeded.
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
    if args.analyze:  # what autovacuum does some time after a bulk load
        store._exec("ANALYZE")
    return s, {"devices": len(ids), "rollups": len(rows), "rollup_bytes": len(packs[1]),
               "top": top}


def cases(top: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    d = args.device_hours * 3600
    return {
        f"fleet, {args.days} d": {"since": top - args.days * 86400, "until": top},
        "fleet, 24 h": {"since": top - 86400, "until": top},
        "fleet, last 90 min (minutes + hours)": {"since": top - 5400, "until": top},
        f"group s3 ({args.devices // 10:,} devices), {args.device_hours} h":
            {"since": top - d, "until": top, "group": "s3"},
        f"one device, {args.device_hours} h": {"since": top - d, "until": top,
                                               "device": "dev-00003"},
    }


def measure(s: Any, top: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out = {}
    for name, kw in cases(top, args).items():
        def run(kw=kw):
            return s.drift.report("sensor@1.0.0", now=top + 60, **kw)
        t0 = time.perf_counter()
        first = run()  # the warm-up: the first query plans on fresh tables
        first_ms = (time.perf_counter() - t0) * 1000
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = {"p50_ms": statistics.median(times), "max_ms": max(times),
                     "first_ms": first_ms,
                     "rollups": first.rollups, "devices": first.devices}
        log(f"  {name}: {out[name]['p50_ms']:.1f} ms ({first.rollups:,} rollups; the "
            f"first run {first_ms:,.0f} ms)")
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
    group = next(n for n in names if n.startswith("group"))
    projected = {}
    for e in engines:
        # the group's time per rollup it read (its fixed costs included: an upper bound)
        per = results[e][group]["p50_ms"] / results[e][group]["rollups"]
        n = (args.devices // 10) * args.days * 24
        projected[e] = {"ms_per_rollup": per, "rollups": n, "projected_ms": per * n}
        print(f"{e}: group of {args.devices // 10:,} over {args.days} d would read {n:,} "
              f"rollups: about {per * n / 1000:,.0f} s at {per * 1000:.1f} µs a rollup "
              "(projected, an upper bound)")
    doc = {"benchmark": "drift_reports", "sizes": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()},
           "seeded": seeded, "target_ms": TARGET_MS, "reports": results,
           "group_projection": projected,
           "machine": machine(["numpy", "psycopg"]), "loadavg": loads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
