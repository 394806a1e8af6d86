"""What the rollups written at ingest cost: :meth:`Ingestor.process` with and without groups
and performance entries, on SQLite and PostgreSQL, for the code on the path.

Run from the repository root, once per checkout to compare (the code measured is the one
``EDGEFLEET_ROOT`` names, this repository by default)::

    .venv/bin/python benchmarks/ingest_rollups.py [--devices 1000] [--windows 10]
        [--repeats 3] [--no-postgres] [--out benchmarks/out/ingest_rollups.json]
    EDGEFLEET_ROOT=/path/to/other/checkout .venv/bin/python benchmarks/ingest_rollups.py ...

The summaries are store_engines.py's (a 20-feature bundle, windows of one minute, 10 rows
each, batches of 500), in three cases, each on a fresh database:

- ``plain``: no groups, no performance entries (what store_engines.py measures);
- ``10 groups``: the devices labelled into 10 groups of equal size (each window also goes
  into its group's rollups, where the code keeps them);
- ``10 groups + performance``: each summary also carries a performance entry (a realized
  and an estimated block of its 10 rows), stored and, where the code keeps them, added to
  the performance rollups.

Throughput is summaries stored per second, the median of ``--repeats``. Both engines share
the machine's cores with this process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent.parent
_ROOT = Path(os.environ.get("EDGEFLEET_ROOT", _HERE)).resolve()
sys.path[:] = [str(_ROOT)] + [p for p in sys.path
                              if Path(p or ".").resolve() not in (_ROOT / "benchmarks", _HERE)]

import numpy as np  # noqa: E402

from benchmarks.common import machine, performance_blocks, table  # noqa: E402
from benchmarks.server import build_bundle  # noqa: E402
from benchmarks.store_engines import BATCH, messages  # noqa: E402

CASES = ("plain", "10 groups", "10 groups + performance")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def with_performance(msgs: list[tuple[str, bytes]], spec: Any) -> list[tuple[str, bytes]]:
    from edgefleet.contract.messages import BundleRef, decode, encode
    from edgefleet.contract.performance import PerformanceEntry

    rng = np.random.default_rng(3)
    entries = []
    for _ in range(64):
        real, est = performance_blocks(spec, rng, 10)
        entries.append(PerformanceEntry(BundleRef("bench", "1.0.0"), real, est))
    out = []
    for i, (t, payload) in enumerate(msgs):
        msg = replace(decode(t, payload), performance=(entries[i % 64],))
        out.append((t, encode(msg)))
    return out


def run(db: str | Path, work: Path, bundle: Path, pub: Path, msgs: list[tuple[str, bytes]],
        devices: int, groups: bool) -> float:
    from fleet_server.config import ServerConfig
    from fleet_server.services import build_services
    from fleet_server.telemetry.link import Incoming

    s = build_services(ServerConfig(db=db, bundle_dir=work, trust=(f"build={pub}",),
                                    evaluate=False))
    try:
        s.bundles.upload(bundle.read_bytes(), "bench", time.time())
        now = 1_800_000_000.0 + 3600 * 24
        if groups:
            for g in range(10):
                s.registry.create_group(f"s{g}", {"site": f"s{g}"}, "bench", now - 86400 * 2)
            store = s.store
            ids = [f"dev{d:05d}" for d in range(devices)]
            with store.transaction():  # labels as set_labels writes them, in one go
                store.ensure_devices(ids, now)
                store._many("UPDATE devices SET labels = ?, set_labels = ? WHERE id = ?",
                            [(f'{{"site":"s{i % 10}"}}',) * 2 + (d,)
                             for i, d in enumerate(ids)])
                store._many("INSERT INTO device_labels (device, key, value) VALUES "
                            "(?, 'site', ?)", [(d, f"s{i % 10}") for i, d in enumerate(ids)])
            # the groups first seen (their rollups' start) a day and an hour before the
            # windows, by an earlier window of one device, so that every window counts
            from edgefleet.contract.messages import decode, encode

            first = decode(*msgs[0])
            seen = first.window_start - 86400 - 3600
            early = replace(first, seq=10**6, window_start=seen - 120, window_end=seen - 60)
            s.ingestor.process([Incoming(msgs[0][0], encode(early), 1, 0, 0, seen)],
                               now=seen)
        start = time.perf_counter()
        for i in range(0, len(msgs), BATCH):
            result = s.ingestor.process([Incoming(t, p, 1, 0, 0, now)
                                         for t, p in msgs[i:i + BATCH]], now=now)
            assert not result.dead, result.dead
        took = time.perf_counter() - start
        assert s.store.count_summaries() == len(msgs) + (1 if groups else 0)
    finally:
        s.close()
    return len(msgs) / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--out", type=Path, default=_HERE / "benchmarks/out/ingest_rollups.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ingest-rollups-"))
    pg = None
    engines = ["sqlite"]
    if not args.no_postgres:
        from tests.pg import Postgres

        pg = Postgres(durable=True)
        pg.start()
        engines.append("postgresql")
    try:
        log(f"code under test: {_ROOT}")
        bundle, pub, model, ref_x = build_bundle(work)
        plain = messages(bundle, model, ref_x, args.devices, args.windows)
        from edgefleet.contract.bundle import read_unverified
        from edgefleet.contract.manifest import Manifest
        from edgefleet.contract.performance import PerformanceSpec

        manifest = json.loads(read_unverified(bundle.read_bytes()).member("manifest.json"))
        spec = PerformanceSpec.from_manifest(Manifest.from_dict(manifest))
        perf = with_performance(plain, spec)
        load_before = os.getloadavg()
        results: dict[str, dict[str, list[float]]] = {}
        for k in range(args.repeats):
            for engine in engines:
                for case in CASES:
                    db = work / f"{k}-{CASES.index(case)}.db" if engine == "sqlite" else \
                        pg.new_database()
                    msgs = perf if case.endswith("performance") else plain
                    rate = run(db, work / f"b-{engine}-{k}-{CASES.index(case)}", bundle, pub,
                               msgs, args.devices, case != "plain")
                    results.setdefault(case, {}).setdefault(engine, []).append(rate)
                    log(f"  run {k + 1}/{args.repeats} {engine:<10} {case:<24} "
                        f"{rate:>8,.0f}/s")
        load_after = os.getloadavg()
    finally:
        if pg is not None:
            pg.cleanup()
    rows = [[case, *[f"{statistics.median(results[case][e]):,.0f}" for e in engines]]
            for case in CASES]
    print(f"code: {_ROOT}")
    print(table(["summaries/s (median)", *engines], rows))
    print(f"load average before {load_before}, after {load_after}")
    doc = {"code": str(_ROOT), "machine": machine(["numpy", "psycopg"]),
           "devices": args.devices, "windows": args.windows, "repeats": args.repeats,
           "results": results, "load_average_1_5_15": {"before": list(load_before),
                                                       "after": list(load_after)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
