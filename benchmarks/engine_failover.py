"""Engine failover over PostgreSQL: time from the leader's death to the standby leading.

Run from the repository root::

    .venv/bin/python benchmarks/engine_failover.py [--kills 10] [--db postgresql://...]
        [--out benchmarks/out/engine_failover.json]

Two ``fleet serve --role engine`` processes over one database (a private PostgreSQL 15
from ``tests/pg.py`` unless ``--db`` names an empty database). Each round: find the leader
(the session holding the engine's advisory lock, named ``fleet-engine:host:pid:n`` in
``pg_stat_activity``), SIGKILL it, and time until another process's session holds the
lock (polled every 10 ms), then until the new leader's ``engine.lead`` line is in the audit
log (its engine started); then a fresh process replaces the dead one as the standby.
Reported: median, min and max of ``--kills`` rounds. Not measured: a leader's host
vanishing without closing its socket (then PostgreSQL's keepalives, ~9 s, decide).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path
                              if Path(p or ".").resolve() != _ROOT / "benchmarks"]

import psycopg  # noqa: E402

from benchmarks.common import machine  # noqa: E402


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def leader(url: str) -> int | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON "
            "a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND "
            "a.application_name LIKE 'fleet-engine:%'").fetchone()
    return None if row is None else int(row[0].split(":")[2])


def takeovers(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM audit WHERE action = 'engine.lead'"
                            ).fetchone()[0]


def wait(predicate, timeout: float, what: str, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--db", default=None)
    parser.add_argument("--out", type=Path,
                        default=_ROOT / "benchmarks/out/engine_failover.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="failover-"))
    pg = None
    url = args.db
    if url is None:
        from tests.pg import Postgres

        pg = Postgres(durable=True)
        try:
            pg.start()
        except BaseException:
            pg.cleanup()
            raise
        url = pg.new_database()
    procs: dict[int, subprocess.Popen] = {}

    def start(name: str) -> subprocess.Popen:
        with open(work / f"{name}.log", "ab") as err:
            p = subprocess.Popen(
                [sys.executable, "-m", "fleet_server.cli", "serve", "--db", url, "--role",
                 "engine", "--bundle-dir", str(work / "bundles")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env={**os.environ, "PYTHONPATH": str(_ROOT)})
        procs[p.pid] = p
        wait(lambda: "engine: " in (work / f"{name}.log").read_text(), 120,
             f"{name} to lead or stand by", 0.1)
        return p

    to_lock, to_audit = [], []
    load_before = os.getloadavg()
    try:
        start("e0")
        start("e1")
        for k in range(args.kills):
            old = leader(url)
            assert old in procs, (old, list(procs))
            before = takeovers(url)
            t0 = time.monotonic()
            procs[old].send_signal(signal.SIGKILL)
            wait(lambda o=old: leader(url) not in (None, o), 30, "the standby to lead")
            to_lock.append(time.monotonic() - t0)
            wait(lambda b=before: takeovers(url) > b, 30, "the takeover in the audit log")
            to_audit.append(time.monotonic() - t0)
            procs.pop(old).wait(10)
            log(f"kill {k + 1}/{args.kills}: lock after {to_lock[-1]:.2f} s, engine "
                f"started after {to_audit[-1]:.2f} s")
            start(f"e{k + 2}")
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    def summary(xs: list[float]) -> dict[str, float]:
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    doc = {"machine": machine(("edgefleet", "psycopg")), "kills": args.kills,
           "to_lock_s": summary(to_lock), "to_engine_started_s": summary(to_audit),
           "raw": {"to_lock_s": to_lock, "to_engine_started_s": to_audit},
           "load_average_1_5_15": {"before": list(load_before), "after": list(load_after)}}
    print(f"engine failover, {args.kills} SIGKILLs of the leader: standby holds the lock "
          f"after median {doc['to_lock_s']['median']:.2f} s (min {min(to_lock):.2f}, max "
          f"{max(to_lock):.2f}); its engine started (audit) after median "
          f"{doc['to_engine_started_s']['median']:.2f} s; load {load_before} -> {load_after}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
