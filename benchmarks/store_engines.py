"""Store engines side by side: SQLite and PostgreSQL ingesting the same summaries, one run.

Run from the repository root::

    .venv/bin/python benchmarks/store_engines.py [--quick] [--db postgresql://...]
        [--out benchmarks/out/store_engines.json]

Without ``--db`` it starts a private PostgreSQL 15 (``tests/pg.py``) with fsync and
synchronous commit **on** (the durability SQLite's ``synchronous=FULL`` gives), in a
temporary directory on this machine. Each engine gets a fresh database and the same data
(real summaries of a 20-feature bundle, 10 rows a window), in the same order:

1. **store API**: ``ensure_devices`` + ``insert_summaries`` + ``note_summaries`` in one
   transaction per batch of 500, what the ingest worker's transaction writes for them;
2. **ingest rules**: :meth:`Ingestor.process` in batches of 500 (decode, validate, pack
   the profiles, merge the rollups, store): the whole of ingest except the broker.

Throughput is summaries stored per second; the median of ``--repeats`` runs, each on a
fresh database. Both engines run on the same two shared cores as this process (the
PostgreSQL server competes with the client for them; SQLite runs inside it). Not measured:
several ingest workers at once, a database on another host, network latency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path
                              if Path(p or ".").resolve() != _ROOT / "benchmarks"]

from benchmarks.common import machine, table  # noqa: E402
from benchmarks.server import FEATURES, _profile, build_bundle, live_rows  # noqa: E402
from edgefleet.contract.messages import BundleRef, Summary, encode, topic  # noqa: E402
from edgefleet.contract.profile import parse_reference, to_wire  # noqa: E402

LIBRARIES = ("edgefleet", "numpy", "sqlite-utils", "psycopg", "psycopg-binary")
BATCH = 500


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def messages(bundle: Path, model: Any, ref_x: np.ndarray, devices: int, windows: int
             ) -> list[tuple[str, bytes]]:
    """``devices`` x ``windows`` summary messages, windows of one minute, 10 rows each."""
    from edgefleet.contract.bundle import read_unverified

    spec, _ = parse_reference(read_unverified(bundle.read_bytes()).member("reference.json"))
    distinct = 64
    rows = live_rows(distinct * 10, 1, ref_x).reshape(distinct, 10, -1)
    wires = [to_wire(_profile(spec, r, model.predict_proba(r))) for r in rows]
    start = 1_800_000_000.0
    out = []
    for w in range(windows):
        for d in range(devices):
            device = f"dev{d:05d}"
            msg = Summary(device, w + 1, BundleRef("bench", "1.0.0"), start + 60 * w,
                          start + 60 * (w + 1), wires[(w * devices + d) % distinct])
            out.append((topic(device, "summary"), encode(msg)))
    return out


def run_store_api(db: str | Path, msgs: list[tuple[str, bytes]]) -> float:
    from edgefleet.contract.messages import decode
    from fleet_server.store import PENDING, Store, SummaryRow

    rows = []
    for t, payload in msgs:
        m = decode(t, payload)
        rows.append(SummaryRow(m.device, m.seq, "bench", "1.0.0", "ab" * 32, m.window_start,
                               m.window_end, 10, m.window_end + 1, (1, 2, 3), {}, None, 0,
                               payload, PENDING))
    with Store(db) as store:
        start = time.perf_counter()
        for i in range(0, len(rows), BATCH):
            part = rows[i:i + BATCH]
            with store.transaction():
                store.ensure_devices({r.device for r in part}, part[0].received)
                stored = store.insert_summaries(part)
                store.note_summaries({r.device: (1, r.window_end, 0) for r in part})
            assert all(stored)
        took = time.perf_counter() - start
        assert store.count_summaries() == len(rows)
    return len(rows) / took


def run_ingest(db: str | Path, bundle_dir: Path, bundle: Path, pub: Path,
               msgs: list[tuple[str, bytes]]) -> float:
    from fleet_server.config import ServerConfig
    from fleet_server.services import build_services
    from fleet_server.telemetry.link import Incoming

    s = build_services(ServerConfig(db=db, bundle_dir=bundle_dir, trust=(f"build={pub}",),
                                    evaluate=False))
    try:
        s.bundles.upload(bundle.read_bytes(), "bench", time.time())
        now = 1_800_000_000.0 + 3600 * 24
        start = time.perf_counter()
        for i in range(0, len(msgs), BATCH):
            result = s.ingestor.process([Incoming(t, p, 1, 0, 0, now)
                                         for t, p in msgs[i:i + BATCH]], now=now)
            assert not result.dead, result.dead
        took = time.perf_counter() - start
        assert s.store.count_summaries() == len(msgs)
    finally:
        s.close()
    return len(msgs) / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="A small run (a smoke test).")
    parser.add_argument("--db", default=None, help="An empty PostgreSQL database to use "
                        "(a new database is created beside it per run); default: a private "
                        "server started here.")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks/out/store_engines.json")
    args = parser.parse_args()
    devices, windows = (200, 5) if args.quick else (1000, 20)
    repeats = args.repeats or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="store-engines-"))
    pg = None
    if args.db is None:
        from tests.pg import Postgres

        pg = Postgres(durable=True)
        try:
            pg.start()
        except BaseException:
            pg.cleanup()
            raise
        new_pg = pg.new_database
    else:
        import psycopg

        counter = iter(range(10**6))

        def new_pg() -> str:
            base, _, _ = args.db.rpartition("/")
            name = f"bench_{os.getpid()}_{next(counter)}"
            with psycopg.connect(args.db, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            return f"{base}/{name}"
    try:
        log("building the 20-feature bundle")
        bundle, pub, model, ref_x = build_bundle(work)
        msgs = messages(bundle, model, ref_x, devices, windows)
        log(f"{len(msgs):,} summaries, {devices} devices x {windows} windows, "
            f"{statistics.mean(len(p) for _, p in msgs):.0f} bytes each")
        load_before = os.getloadavg()
        results: dict[str, dict[str, list[float]]] = {}
        for k in range(repeats):
            for engine in ("sqlite", "postgresql"):
                for case in ("store API", "ingest rules"):
                    db = work / f"{k}-{case[:5]}.db" if engine == "sqlite" else new_pg()
                    if case == "store API":
                        rate = run_store_api(db, msgs)
                    else:
                        rate = run_ingest(db, work / f"bundles-{engine}-{k}", bundle, pub, msgs)
                    results.setdefault(case, {}).setdefault(engine, []).append(rate)
                    log(f"  run {k + 1}/{repeats} {engine:<10} {case:<12} {rate:>8,.0f}/s")
        load_after = os.getloadavg()
    finally:
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for case, by in results.items():
        sq, pq = statistics.median(by["sqlite"]), statistics.median(by["postgresql"])
        rows.append([case, f"{sq:,.0f}", f"{pq:,.0f}", f"{pq / sq:.2f}"])
    print(table(["summaries/s (median)", "SQLite", "PostgreSQL", "PG / SQLite"], rows))
    print(f"load average before {load_before}, after {load_after}")
    doc = {"machine": machine(LIBRARIES), "summaries": len(msgs), "devices": devices,
           "windows": windows, "batch": BATCH, "repeats": repeats, "results": results,
           "postgresql": "private, fsync on" if pg is not None else "given by --db",
           "load_average_1_5_15": {"before": list(load_before), "after": list(load_after)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    assert FEATURES == 20
    main()
